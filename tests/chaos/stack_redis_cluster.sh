#!/usr/bin/env bash
# stack_redis_cluster.sh - scripts/stack.sh with STACK_REDIS_CLUSTER=1 on a private stack of its own
# (STACK_VAR in a scratch directory, ports of its own): six redis-server nodes come up as a Redis
# Cluster of 3 primaries with a replica each, every slot covered; keys of different hash tags
# spread over the three primaries, where CLUSTER KEYSLOT says; the primary of {sku:1} killed
# (kill -9) is replaced by its replica within a bound (the seconds are printed), a write acked by
# the replica (WAIT) survives and writes work again; the killed node comes back (`up redis-N`) as
# a replica; a replica's and a primary's directories deleted while they were down (lost disks)
# come back on `up` as synced replicas, the old node ids forgotten everywhere; the whole cluster
# stopped and started again keeps every key; the env file of the first (full) `up` has
# STACK_REDIS_CLUSTER=1 and REDIS_URL=redis-cluster://...; `status` shows the six nodes and their
# roles; `down --purge` leaves no redis-server of the stack. And refused before anything starts: a
# busy cluster bus port, a node named on a stack with no cluster yet, other ports than the cluster
# was made with.
#
# Ports: Redis 23379..23879 (cluster bus 23389..23889: the default STACK_REDIS_PORT+10000 would be
# in the ephemeral range), PostgreSQL 23432 (23433 kept free for a standby), Kafka 23092/23093.
#
# Prints `ok - CHECK` or `not ok - CHECK: detail` per check and last `N passed, M failed`; exit
# 0 only if nothing failed. 39-45 s measured on this 2-core machine with other tests running (the
# full `up`, Kafka's JVM and PostgreSQL's initdb, 12-14 s of it; the failover ~5-6 s; the lost
# primary's `up` waits as long again for its replica's promotion).
# Whatever happens, the EXIT trap (private_work, tests/lib/procs.sh) purges the private stack
# (scripts/stack.sh down --purge signals only the pids it recorded there) and stops the port
# holder this test starts; the logs stay when a check failed.
# shellcheck disable=SC2317 # the predicates below run through check "$@"
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
stack=$root/scripts/stack.sh
# shellcheck source=tests/lib/procs.sh
. "$root/tests/lib/procs.sh"
private_work sp-stack-redis-cluster stack-down.log 'stack/redis*' 'stack/pg' 'stack/kafka*'
mkdir -p "$work/pids"
export STACK_VAR=$work/stack STACK_REDIS_CLUSTER=1
export STACK_REDIS_PORT=23379 STACK_REDIS_BUS_PORT=23389 STACK_PG_PORT=23432
export STACK_KAFKA_PORT=23092 STACK_KAFKA_CONTROLLER_PORT=23093 STACK_KAFKA_BROKERS=1
unset STACK_PG_STANDBY STACK_KAFKA_EXTRA_CONFIG STACK_PG_EXTRA_CONFIG
ports=(23379 23479 23579 23679 23779 23879)
nkeys=12 # {sku:1..12}:sale: 4, 5 and 3 of them on the three primaries (the slots are fixed)
passed=0 failed=0 t_start=$SECONDS

ok() { passed=$((passed + 1)); echo "ok - $1${2:+ ($2)}"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $1: $2"; }
check() { # check NAME DETAIL CMD...: ok if CMD succeeds
    local name=$1 detail=$2
    shift 2
    if "$@"; then ok "$name" "$detail"; else not_ok "$name" "$detail"; fi
}
finish() {
    echo "# $((SECONDS - t_start)) s"
    echo "$passed passed, $failed failed"
    rc=$((failed > 0))
    exit "$rc"
}
stack_sh() { # stack_sh ARGS...: scripts/stack.sh, its output appended to the log (and kept in $out)
    out=$("$stack" "$@" 2>&1)
    local rc=$?
    printf '$ stack.sh %s (rc %d)\n%s\n' "$*" "$rc" "$out" >>"$work/stack.log"
    return "$rc"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
port_node() { echo "redis-$((($1 - 23379) / 100 + 1))"; }
rcli() { # rcli PORT ARGS...: one node, bounded
    local port=$1
    shift
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}
live_port() { # a port of a node that answers
    local p
    for p in "${ports[@]}"; do
        if [[ $(rcli "$p" PING) == PONG ]]; then echo "$p"; return 0; fi
    done
    return 1
}
rcc() { # rcc ARGS...: redis-cli -c through any node that answers (follows MOVED)
    local p
    p=$(live_port) || return 1
    timeout 5 redis-cli -c -h 127.0.0.1 -p "$p" "$@" 2>/dev/null
}
cluster_nodes() { local p; p=$(live_port) && rcli "$p" CLUSTER NODES; }
# slot_owner SLOT: the port of the primary serving SLOT, as CLUSTER NODES of a live node says
slot_owner() {
    cluster_nodes | awk -v s="$1" '$3 ~ /master/ && $3 !~ /fail/ {
        for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n > 1) ? r[2] : r[1]
            if (s >= lo && s <= hi) { sub(/^[^:]*:/, "", $2); sub(/@.*/, "", $2); print $2 } } }'
}
role_of() { rcli "$1" ROLE | head -n1; } # master / slave
primary_of() { rcli "$1" INFO replication | sed -n 's/^master_port:\([0-9]*\).*/\1/p'; } # a replica's
synced() { # synced PORT: a replica with its link up and no sync in progress
    local info
    info=$(rcli "$1" INFO replication) || return 1
    grep -q '^role:slave' <<<"$info" && grep -q '^master_link_status:up' <<<"$info" &&
        grep -q '^master_sync_in_progress:0' <<<"$info"
}
# all_ok: every node that answers reports cluster_state:ok and all 16384 slots served
all_ok() {
    local p info n=0
    for p in "${ports[@]}"; do
        info=$(rcli "$p" CLUSTER INFO) || continue
        grep -q '^cluster_state:ok' <<<"$info" && grep -q '^cluster_slots_ok:16384' <<<"$info" || return 1
        n=$((n + 1))
    done
    ((n > 0))
}
known_nodes() { local p; for p in "${ports[@]}"; do rcli "$p" CLUSTER INFO | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p'; done | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep = ", "}'; }
roles() { cluster_nodes | awk '{ r = ($3 ~ /master/) ? "P" : "R"; if ($3 ~ /fail/) r = r "!"; sub(/^[^:]*:/, "", $2); sub(/@.*/, "", $2); print $2 r }' | sort | paste -sd' '; }
# readonly_get PORT KEY: GET on a replica (READONLY first, one connection)
readonly_get() { printf 'READONLY\nGET %s\n' "$2" | timeout 5 redis-cli -h 127.0.0.1 -p "$1" 2>/dev/null | tail -n1; }
# replica_of PORT [PRIMARY_PORT]: a synced replica (of that primary), and the cluster ok
replica_of() {
    [[ $(role_of "$1") == slave && (-z ${2:-} || $(primary_of "$1") == "$2") ]] && synced "$1" && all_ok
}
env_ok() {
    grep -qx "export STACK_REDIS_CLUSTER=1" "$env_file" &&
        grep -qx "export REDIS_URL=redis-cluster://127.0.0.1:23379,127.0.0.1:23479,127.0.0.1:23579" "$env_file"
}
no_pid_files() { [[ -z $(ls "$STACK_VAR"/run/redis-*.pid 2>/dev/null) ]]; }

# --- refused before anything starts ------------------------------------------------------------
msg=$(STACK_REDIS_CLUSTER=2 "$stack" up redis 2>&1)
check "STACK_REDIS_CLUSTER=2 is refused" "$msg" grep -q "must be 0 (one server) or 1" <<<"$msg"
msg=$("$stack" up redis-3 2>&1)
check "up redis-3 on a stack with no cluster yet is refused" "$msg" grep -q "a new cluster is started whole" <<<"$msg"
# redis-4's cluster bus port (23689) held by another process: `up` fails before starting any node.
python3 -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 23689)); s.listen(); print("ready", flush=True); time.sleep(120)' 23689 >"$work/holder.out" 2>&1 &
holder=$!
echo "$holder 23689" >"$work/pids/holder.pid"
for _ in $(seq 50); do grep -q ready "$work/holder.out" && break; sleep 0.1; done
stack_sh up redis
busy_refused() { no_pid_files && grep -q "redis-4's cluster bus port (STACK_REDIS_BUS_PORT+300)" <<<"$out"; }
check "a busy cluster bus port fails up before any node starts" "$(tail -n1 <<<"$out")" busy_refused
kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null
rm -f "$work/pids/holder.pid"

# --- up from nothing (the whole stack: the cluster is made while Kafka's JVM starts) -------------
t0=$SECONDS
if stack_sh up; then
    ok "up from nothing (the Redis cluster made; PostgreSQL and Kafka started)" "$((SECONDS - t0)) s; $(grep 'redis: cluster' <<<"$out" | paste -sd' ')"
else
    not_ok "up from nothing" "$(tail -n 5 <<<"$out")"
    finish
fi
env_file=$STACK_VAR/stack.env
check "stack.env: STACK_REDIS_CLUSTER=1, REDIS_URL=redis-cluster://<the first three nodes>" "$(grep -E 'REDIS_URL|STACK_REDIS_CLUSTER' "$env_file" 2>/dev/null | paste -sd' ')" \
    env_ok
p=$(live_port)
info=$(rcli "$p" CLUSTER INFO)
check "six nodes, cluster_state ok, all 16384 slots assigned and served" "$(grep -E 'state|slots_(ok|assigned)|known' <<<"$info" | tr -d '\r' | paste -sd' ')" \
    grep -q "cluster_state:ok" <<<"$info"
check "  ... and seen so by every node" "" all_ok
check "  ... slots: 16384 assigned, 16384 ok, 6 known nodes" "" \
    test "$(grep -cE '^cluster_slots_assigned:16384|^cluster_slots_ok:16384|^cluster_known_nodes:6' <<<"$info")" = 3
r=$(roles)
check "3 primaries with a replica each" "$r" \
    test "$(grep -o 'P' <<<"$r" | wc -l)" = 3 -a "$(grep -o 'R' <<<"$r" | wc -l)" = 3 -a \
    "$(cluster_nodes | awk '$3 ~ /slave/ {print $4}' | sort -u | wc -l)" = 3
stack_sh status
check "status: six lines with roles, port and pid" "$(grep -c '^redis-[1-6] *running  pid [0-9]* *port 23[3-8]79  \(primary, slots\|replica of redis-\)' <<<"$out") of 6" \
    test "$(grep -c '^redis-[1-6] *running  pid [0-9]* *port 23[3-8]79  \(primary, slots\|replica of redis-\)' <<<"$out")" = 6

# --- keys spread by hash tag ------------------------------------------------------------------
bad=0 owners=""
for i in $(seq 1 "$nkeys"); do
    key="{sku:$i}:sale"
    [[ $(rcc SET "$key" "units-$i") == OK ]] || bad=$((bad + 1))
    slot=$(rcli "$p" CLUSTER KEYSLOT "$key")
    [[ $slot == "$(rcli "$p" CLUSTER KEYSLOT "sku:$i")" ]] || bad=$((bad + 1)) # the hash tag decides
    owner=$(slot_owner "$slot")
    # The primary CLUSTER KEYSLOT names holds it, answering itself (no -c, no MOVED).
    [[ $(rcli "$owner" GET "$key") == "units-$i" && $(rcli "$owner" CLUSTER COUNTKEYSINSLOT "$slot") -ge 1 ]] || bad=$((bad + 1))
    owners+="$owner"$'\n'
done
spread=$(sort <<<"$owners" | uniq -c | awk 'NF == 2 {printf "%s%s:%s", sep, $2, $1; sep = " "}')
check "$nkeys keys {sku:N}:sale written with redis-cli -c, each on the primary CLUSTER KEYSLOT names" "$bad mismatches" test "$bad" = 0
check "  ... over all three primaries" "keys per primary port: $spread" test "$(sort -u <<<"$owners" | grep -c .)" = 3

# --- the primary of {sku:1} killed: failover ------------------------------------------------------
slot1=$(rcli "$p" CLUSTER KEYSLOT "{sku:1}:sale")
victim_port=$(slot_owner "$slot1")
victim=$(port_node "$victim_port")
replica_port=$(cluster_nodes | awk -v id="$(rcli "$victim_port" CLUSTER MYID)" '$4 == id { sub(/^[^:]*:/, "", $2); sub(/@.*/, "", $2); print $2 }')
rcli "$victim_port" SET "{sku:1}:sale" "before-failover" >/dev/null
acked=$(rcli "$victim_port" WAIT 1 2000)
check "a write to {sku:1}:sale on $victim acked by its replica (WAIT 1)" "WAIT: $acked" test "$acked" = 1
stack_sh kill "$victim"
t0=$(now_ms)
promoted() {
    [[ $(role_of "$replica_port") == master && $(slot_owner "$slot1") == "$replica_port" ]] && all_ok
}
failed_over() { promoted && ((ms <= 15000)); }
deadline=$((SECONDS + 30))
until promoted || ((SECONDS >= deadline)); do sleep 0.1; done
ms=$(($(now_ms) - t0))
failover_s=$(awk -v ms="$ms" 'BEGIN { printf "%.1f", ms / 1000 }')
check "kill $victim (the primary of {sku:1}): its replica $(port_node "$replica_port") promoted, cluster ok again" \
    "${failover_s} s after the kill (bound 15 s; cluster-node-timeout 3 s)" failed_over
v=$(rcc GET "{sku:1}:sale")
check "  ... the acked write survived" "$v" test "$v" = before-failover
v=$(rcc SET "{sku:1}:sale" after-failover)
check "  ... a write to {sku:1}:sale succeeds afterwards" "$v" test "$v" = OK

# --- the killed node back -----------------------------------------------------------------------
t0=$SECONDS
stack_sh up "$victim"
check "up $victim: it rejoins as a replica of $(port_node "$replica_port"), synced" "$((SECONDS - t0)) s; $(tail -n1 <<<"$out")" \
    replica_of "$victim_port" "$replica_port"

# --- lost disks: a replica's, then a primary's ------------------------------------------------------
rep_port=$(cluster_nodes | awk '$3 ~ /slave/ { sub(/^[^:]*:/, "", $2); sub(/@.*/, "", $2); print $2 }' | sort | head -n1)
rep=$(port_node "$rep_port")
rep_primary=$(primary_of "$rep_port")
key=""
for i in $(seq 1 "$nkeys"); do
    if [[ $(slot_owner "$(rcli "$p" CLUSTER KEYSLOT "{sku:$i}:sale")") == "$rep_primary" ]]; then key="{sku:$i}:sale"; break; fi
done
stack_sh down "$rep"
rm -rf "${STACK_VAR:?}/$rep"
t0=$SECONDS
stack_sh up "$rep"
check "up $rep after its directory was deleted (a replica's lost disk)" "$((SECONDS - t0)) s; $(grep -c . <<<"$out") lines" \
    grep -q "$rep: its directory or nodes.conf is gone" <<<"$out"
want=$(rcc GET "$key")
got=$(readonly_get "$rep_port" "$key")
holds_copy() { replica_of "$rep_port" "$rep_primary" && [[ -n $key && -n $want && $got == "$want" ]]; }
check "  ... it is the replica of $(port_node "$rep_primary") again, synced, holding $key" "$got; the primary: $want" holds_copy
check "  ... every node knows 6 nodes (its old id forgotten)" "$(known_nodes)" test "$(known_nodes)" = "6 x6"

slot2=$(rcli "$p" CLUSTER KEYSLOT "{sku:2}:sale")
lost_port=$(slot_owner "$slot2")
lost=$(port_node "$lost_port")
stack_sh kill "$lost"
rm -rf "${STACK_VAR:?}/$lost"
t0=$SECONDS
stack_sh up "$lost" # waits for its replica's promotion first
lost_rejoined() { grep -q "joined the cluster as the replica of" <<<"$out" && replica_of "$lost_port"; }
check "up $lost right after its kill and its directory deleted (a primary's lost disk)" "$((SECONDS - t0)) s; $(grep -m1 'joined the cluster' <<<"$out")" \
    lost_rejoined
v=$(rcc GET "{sku:2}:sale")
check "  ... its replica took over {sku:2}, which kept its value" "$v" \
    test "$(slot_owner "$slot2")" != "$lost_port" -a "$v" = units-2
check "  ... every node knows 6 nodes" "$(known_nodes)" test "$(known_nodes)" = "6 x6"
r=$(roles)
check "  ... 3 primaries with a replica each" "$r" \
    test "$(grep -o 'P' <<<"$r" | wc -l)" = 3 -a "$(cluster_nodes | awk '$3 ~ /slave/ {print $4}' | sort -u | wc -l)" = 3

# --- the whole cluster stopped and started again ------------------------------------------------
rcc SET "{sku:99}:sale" before-restart >/dev/null
stack_sh down redis
check "down redis stops all six nodes" "$(grep -c ': stopped (pid' <<<"$out") stopped" \
    test "$(grep -c '^stack: redis-[1-6]: stopped (pid' <<<"$out")" = 6 -a -z "$(grep SIGKILL <<<"$out")"
msg=$(STACK_REDIS_PORT=23378 STACK_REDIS_BUS_PORT=23388 "$stack" up redis 2>&1)
ports_refused() { grep -q "was made with STACK_REDIS_PORT=23379 STACK_REDIS_BUS_PORT=23389" <<<"$msg" && no_pid_files; }
check "up on other ports than the cluster was made with is refused" "$msg" ports_refused
t0=$SECONDS
if stack_sh up redis; then
    ok "up redis: the cluster re-forms from the nodes.conf files" "$((SECONDS - t0)) s; $(grep 'redis: cluster' <<<"$out")"
else
    not_ok "up redis: the cluster re-forms" "$(tail -n 5 <<<"$out")"
fi
check "  ... cluster ok on every node" "" all_ok
vals=$(for i in $(seq 1 "$nkeys"); do rcc GET "{sku:$i}:sale"; done | grep -c '^units-\|^after-failover$')
v=$(rcc GET "{sku:99}:sale")
check "  ... every key written before is read after" "$vals of $nkeys sku keys; {sku:99}:sale=$v" test "$vals" = "$nkeys" -a "$v" = before-restart

# --- status and down --purge ----------------------------------------------------------------------
stack_sh status
st_rc=$?
check "status: exit 0 (the whole stack runs), six Redis lines: 3 primaries, 3 replicas" "$(grep '^redis-' <<<"$out" | sed 's/  */ /g' | paste -sd';')" \
    test "$st_rc" = 0 -a "$(grep -c '^redis-[1-6] *running .*  primary, slots ' <<<"$out")" = 3 -a \
    "$(grep -c '^redis-[1-6] *running .*  replica of redis-[1-6]$' <<<"$out")" = 3
pids=$(sed -n 's/^redis-[1-6] *running  pid \([0-9]*\) .*/\1/p' <<<"$out")
stack_sh down --purge
left=$(for f in /proc/[0-9]*/cmdline; do { tr '\0' ' ' <"$f"; } 2>/dev/null; echo; done | grep -c 'redis-server 127\.0\.0\.1:23[3-8]79' || true)
alive=0
for pid in $pids; do if [[ -d /proc/$pid ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then alive=$((alive + 1)); fi; done
check "down --purge: no redis-server of the stack left, its data gone" "$left processes on its ports, $alive of its pids alive" \
    test "$left" = 0 -a "$alive" = 0 -a -z "$(ls -d "$STACK_VAR"/redis-* "$STACK_VAR/redis-cluster.ports" 2>/dev/null)"

echo "# failover: ${failover_s} s"
finish
