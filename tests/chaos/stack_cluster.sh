#!/usr/bin/env bash
# stack_cluster.sh - scripts/stack.sh with STACK_KAFKA_BROKERS=3 on a private stack of its own
# (STACK_VAR in a scratch directory, ports of its own): the three brokers and three controllers
# come up with replicated topics; one broker stopped (down) leaves acks=all writes working; a
# second one killed (kill -9) makes them fail with NOT_ENOUGH_REPLICAS (min.insync.replicas=2);
# `up kafka-2` brings one back and writes work again; a broker and a controller whose
# directories were deleted while they were down (lost disks) come back on `up`: the broker's
# replicas catch up (every partition back to 3 in-sync replicas, its copy complete) and the
# controller is a voter of the quorum again. Then `down --purge`.
#
# Prints `ok - CHECK` or `not ok - CHECK: detail` per check and last `N passed, M failed`; exit
# 0 only if nothing failed. 84-93 s measured on this 2-core machine with other tests running (the
# six JVM starts of `up` dominate, ~30 s).
# Whatever happens, the EXIT trap purges the private stack (scripts/stack.sh down --purge
# signals only the pids it recorded there).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
stack=$root/scripts/stack.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/sp-stack-cluster.XXXXXX") || exit 1
chmod 755 "$work" # as root, PostgreSQL runs as `postgres` and must reach the stack's data
export STACK_VAR=$work/stack STACK_KAFKA_BROKERS=3 STACK_KAFKA_PARTITIONS=4
export STACK_KAFKA_TOPIC=stockpipe.events
passed=0 failed=0 t_start=$SECONDS

teardown() {
    "$stack" down --purge >>"$work/stack.log" 2>&1
    if ((failed == 0)); then rm -rf "$work"; else echo "# logs kept in $work"; fi
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ok() { passed=$((passed + 1)); echo "ok - $1${2:+ ($2)}"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $1: $2"; }
check() { # check NAME DETAIL CMD...: ok if CMD succeeds
    local name=$1 detail=$2
    shift 2
    if "$@"; then ok "$name" "$detail"; else not_ok "$name" "$detail"; fi
}
port_busy() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Ports: the first base whose every port is free (below the ephemeral range 32768..60999, away
# from the shared stack's and the other tests' private stacks).
for base in 24 23 22 21; do
    free=1
    for p in ${base}379 ${base}432 ${base}433 ${base}092 ${base}093 ${base}192 ${base}193 ${base}292 ${base}293; do
        if port_busy "$p"; then free=0; fi
    done
    if ((free)); then break; fi
done
((free)) || { echo "not ok - free ports: none of the bases 24xxx..21xxx is free"; echo "0 passed, 1 failed"; exit 1; }
export STACK_REDIS_PORT=${base}379 STACK_PG_PORT=${base}432 STACK_KAFKA_PORT=${base}092
export STACK_KAFKA_CONTROLLER_PORT=${base}093
brokers=127.0.0.1:${base}092,127.0.0.1:${base}192,127.0.0.1:${base}292
topic=$STACK_KAFKA_TOPIC

stack_sh() { # stack_sh ARGS...: scripts/stack.sh, its output appended to the log (and kept in $out)
    out=$("$stack" "$@" 2>&1)
    local rc=$?
    printf '$ stack.sh %s (rc %d)\n%s\n' "$*" "$rc" "$out" >>"$work/stack.log"
    return "$rc"
}
# partitions: "P LEADER REPLICAS ISRS" of each partition of the events topic
partitions() {
    kcat -b "$brokers" -L -t "$topic" -m 5 2>/dev/null |
        sed -n 's/^ *partition \([0-9]*\), leader \(-\{0,1\}[0-9]*\), replicas: \([0-9,]*\), isrs: \([0-9,]*\).*/\1 \2 \3 \4/p'
}
isr_sizes() { partitions | awk '{print split($4, a, ",")}' | sort -u | paste -sd' '; }
isr_sizes_are() { [[ $(isr_sizes) == "$1" ]]; }
# produce_all N LABEL: N messages to each partition with acks=all, no retries; prints kcat's
# first error of each partition that failed; fails if one did.
produce_all() {
    local p rc=0 err
    for p in 0 1 2 3; do
        if ! err=$(seq 1 "$1" | sed "s/^/$2-/" | kcat -P -b "$brokers" -t "$topic" -p "$p" \
            -X acks=all -X retries=0 -X message.timeout.ms=10000 2>&1); then
            grep -m1 'Delivery failed' <<<"$err" || echo "${err:-kcat failed}" | tail -n1
            rc=1
        fi
    done
    return "$rc"
}
wait_for() { # wait_for SECONDS CMD...: until CMD succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# --- settings checked before anything starts ------------------------------------------------------
msg=$(STACK_KAFKA_BROKERS=2 "$stack" up 2>&1)
check "STACK_KAFKA_BROKERS=2 is refused" "$msg" grep -q "must be 1 (one broker) or 3" <<<"$msg"
msg=$(STACK_KAFKA_CONTROLLER_PORT=${base}192 "$stack" up 2>&1)
check "a controller port on a broker's port is refused" "$msg" grep -q "kafka-2's port (STACK_KAFKA_PORT+100)" <<<"$msg"

# --- up from nothing --------------------------------------------------------------------------
t0=$SECONDS
if stack_sh up; then
    ok "up from nothing" "$((SECONDS - t0)) s"
else
    not_ok "up from nothing" "$(tail -n 5 <<<"$out")"
    echo "$passed passed, $failed failed"
    exit 1
fi
stack_sh status
check "status lists three brokers and three controllers running" "" \
    test "$(grep -cE '^kafka-(controller-)?[1-3] +running' <<<"$out")" = 6
# shellcheck disable=SC1091
check "stack.env names all three brokers" "" grep -qx "export KAFKA_BROKERS=$brokers" "$STACK_VAR/stack.env"
check "every partition of $topic has 3 replicas, all in sync" "$(isr_sizes)" test "$(isr_sizes)" = 3
desc=$(java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC "-Dlog4j2.configurationFile=file:$root/deploy/kafka-local/log4j2.properties" \
    -cp "$root/var/kafka-libs/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "$brokers" \
    --describe --topic "$topic" 2>&1 | head -n1)
check "$topic: min.insync.replicas=2, unlimited retention" "$desc" \
    grep -q "min.insync.replicas=2.*retention.bytes=-1\|retention.bytes=-1.*min.insync.replicas=2" <<<"$desc"
err=$(produce_all 500 all-up)
check "acks=all writes with all brokers up" "$err" test -z "$err"

# --- one broker down, then two ------------------------------------------------------------------
stack_sh down kafka-2
check "down kafka-2 (SIGTERM)" "$out" grep -q "kafka-2: stopped" <<<"$out"
stack_sh status
check "status exits 1 and shows kafka-2 stopped" "" test $? -ne 0 -a -n "$(grep '^kafka-2 *stopped' <<<"$out")"
err=$(produce_all 100 one-down)
check "acks=all writes with one broker down" "$err" test -z "$err"
stack_sh kill kafka-3
check "kill kafka-3 (SIGKILL)" "$out" grep -q "kafka-3: killed" <<<"$out"
t0=$SECONDS
if wait_for 40 isr_sizes_are 1; then
    ok "the ISRs shrink to the one broker left" "$((SECONDS - t0)) s after the kill"
else
    not_ok "the ISRs shrink to the one broker left" "ISR sizes after 40 s: $(isr_sizes)"
fi
err=$(produce_all 1 two-down)
check "acks=all writes fail with NOT_ENOUGH_REPLICAS with two brokers down" "$(head -n1 <<<"$err"), on $(grep -c 'Not enough in-sync replicas' <<<"$err") of 4 partitions" \
    test "$(grep -c 'Not enough in-sync replicas' <<<"$err")" = 4

# --- lost disks: kafka-3 and kafka-controller-2 ---------------------------------------------------
stack_sh kill kafka-controller-2
rm -rf "${STACK_VAR:?}/kafka-3" "$STACK_VAR/kafka-controller-2"
t0=$SECONDS
stack_sh up kafka-2
check "up kafka-2 brings one broker back" "$((SECONDS - t0)) s; $(tail -n1 <<<"$out")" grep -q "up kafka-2 in" <<<"$out"
err=$(produce_all 100 one-back)
check "acks=all writes work again" "$err" test -z "$err"
t0=$SECONDS
stack_sh up
check "up after kafka-3 and kafka-controller-2 lost their directories" "$((SECONDS - t0)) s" \
    grep -q "kafka-3: its storage is gone" <<<"$out"
check "kafka-controller-2 is a voter again, with its new directory" "" \
    grep -q "kafka-controller-2: a voter of the controller quorum again" <<<"$out"
check "every partition of $topic has 3 replicas in sync again" "$(isr_sizes)" test "$(isr_sizes)" = 3
# Each partition's log on kafka-3 holds every message: 500 + 100 + 100 written with acks=all, and
# the same bytes as kafka-1's copy (followers copy the leader's record batches as they are).
ends=$(for p in 0 1 2 3; do kcat -Q -b "$brokers" -t "$topic:$p:-1" 2>/dev/null | awk '{print $NF}'; done | paste -sd' ')
log_bytes() { cat "$STACK_VAR/$1/data/$topic-$2"/*.log 2>/dev/null | wc -c; }
same=0
for p in 0 1 2 3; do
    if (($(log_bytes kafka-3 "$p") > 0 && $(log_bytes kafka-3 "$p") == $(log_bytes kafka-1 "$p"))); then same=$((same + 1)); fi
done
check "kafka-3 holds a full copy of every partition" "end offsets $ends; $same of 4 logs the same bytes as kafka-1's" \
    test "$same" = 4 -a "$ends" = "700 700 700 700"

# --- topics of a test's own, and down ---------------------------------------------------------
if stack_sh topic create stack-cluster-check 2; then
    d=$(kcat -b "$brokers" -L -t stack-cluster-check -m 5 2>/dev/null | grep -c 'replicas: [0-9],[0-9],[0-9], isrs: [0-9],[0-9],[0-9]$')
    check "topic create: 3 replicas, all in sync" "" test "$d" = 2
else
    not_ok "topic create" "$out"
fi
t0=$SECONDS
stack_sh down kafka
check "down kafka stops all six nodes cleanly" "$((SECONDS - t0)) s" \
    test "$(grep -c ': stopped (pid' <<<"$out")" = 6 -a -z "$(grep 'SIGKILL' <<<"$out")"

echo "# $((SECONDS - t_start)) s"
echo "$passed passed, $failed failed"
((failed == 0))
