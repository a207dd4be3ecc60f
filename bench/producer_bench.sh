#!/usr/bin/env bash
# producer_bench.sh - the producer's order path under real HTTP load, next to its Redis ceiling.
#
# Usage: bench/producer_bench.sh        (`make bench` runs it after bench_event)
#
# Settings (environment):
#   BENCH_CONNS=256    wrk's connections, and redis-benchmark's clients for the ceiling
#   BENCH_THREADS=2    wrk's threads
#   BENCH_SECONDS=5    length of every measured run
#   BENCH_RUNS=3       runs per measurement; every figure printed is the median of its runs
#   BENCH_PRODUCERS=2  producer processes sharing one port (HTTP_REUSE_PORT=1: the kernel spreads
#                      wrk's connections over them; one event loop per core of the 2-core box);
#                      1 measures a single producer
#   BENCH_WARMUP_S=10  closed-loop orders before anything is measured (not counted): the
#                      broker's JVM compiles its hot paths in the first seconds under load, and a
#                      stack this script has just started would otherwise be measured cold
#   BENCH_RATE=        orders/s offered in the latency run; default a quarter of the -P 16
#                      ceiling (half of the throughput target, as issue #3 asks); when set,
#                      the run at half the producer's own accepted rate is left out
#
# What it does, all against the local stack (scripts/stack.sh; started here and stopped at the
# end only if it was not running; STACK_VAR picks a private stack as for stack.sh):
#   1. starts BENCH_PRODUCERS bin/producer processes on one free loopback port, waits for /readyz, opens two fresh SKUs
#      through POST /v1/skus: one with stock 10^12 and no per-user limit, one with stock 0;
#   2. sends one probe order while `redis-cli MONITOR` watches, and takes the producer's own
#      EVALSHA of common/lua/reserve.lua as the ceiling's call (on a third SKU, in Redis only);
#   3. BENCH_RUNS rounds of: the ceiling (redis-benchmark, BENCH_CONNS clients, with -P 16 and
#      without), wrk POSTing orders for the unlimited SKU (accepted orders/s, p50/p99), wrk
#      against the stock-0 SKU (sold-out answers/s);
#   4. BENCH_RUNS paced wrk runs at BENCH_RATE, and BENCH_RUNS at half the producer's own accepted
#      rate (bench/orders.lua's delay(): an approximate open-loop rate, with enough connections
#      that the pacing, not the connection count, sets the rate);
#   5. prints the figures, where the CPU went in each kind of run, the producer's peak RSS and
#      CPU time, and a summary with PASS/MISS per target of issue #3. A MISS is information, not
#      a failure: the exit status is non-zero only when the harness itself could not measure.
# Then it stops the producer with SIGTERM (and reports its exit status) and deletes the
# ceiling's Redis keys, the two SKUs' keys and its own Kafka topic (the events never reach the
# shared stockpipe.events).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh # median, kv, calc, free_port, proc_ticks

CONNS=${BENCH_CONNS:-256}
THREADS=${BENCH_THREADS:-2}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RUNS=${BENCH_RUNS:-3}
PRODUCERS=${BENCH_PRODUCERS:-2}
WARMUP_S=${BENCH_WARMUP_S:-10}
RATE=${BENCH_RATE:-}
PIPELINE=16          # redis-benchmark -P of the ceiling the target refers to
USERS=1000000        # user ids are drawn from 1..USERS, by wrk and by redis-benchmark
PACED_SLACK_MS=50    # paced runs get connections for this much latency (see paced_conns)
STOCK_MAX=1000000000000 # SP_STOCK_MAX: "effectively unlimited"
PAY_TIMEOUT_S=600

# Targets of issue #3.
GOAL_RATIO=0.5     # accepted orders/s >= this x the -P 16 ceiling
GOAL_P99_MS=10     # p99 below this at half the throughput target
GOAL_SOLDOUT=2     # sold-out answers/s >= this x accepted orders/s
GOAL_RSS_MIB=64    # producer peak RSS below this

say() { printf '%s\n' "$*"; }
die() {
    printf 'producer_bench: error: %s\n' "$*" >&2
    exit 1
}

for v in CONNS THREADS SECONDS_PER_RUN RUNS PRODUCERS WARMUP_S; do
    name=${v/SECONDS_PER_RUN/SECONDS}
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "BENCH_${name} must be a positive integer (got '${!v}')"
done
[[ -z $RATE || $RATE =~ ^[1-9][0-9]*$ ]] || die "BENCH_RATE must be a positive integer (got '$RATE')"
((CONNS >= THREADS)) || die "BENCH_CONNS ($CONNS) must be at least BENCH_THREADS ($THREADS)"
for c in wrk redis-benchmark redis-cli curl python3; do
    command -v "$c" >/dev/null || die "$c not found (scripts/install-deps.sh installs it)"
done
[[ -x bin/producer ]] || die "bin/producer is missing: run make first"

HZ=$(getconf CLK_TCK)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/producer-bench.XXXXXX")
started_stack=0
topic_made=0
bench_topic=stockpipe.bench.producer.$$
producer_keys=()
producer_pids=() # every producer process, in start order
mon_pid=""
ceiling_keys=()

# ---- clean-up on every exit -------------------------------------------------------------------

# Stops the producers with SIGTERM, bounded; sets producer_rc to 0 when every one exited 0, else
# to what went wrong.
producer_rc=""
stop_producer() {
    local pid i rc
    ((${#producer_pids[@]})) || return 0
    kill -TERM "${producer_pids[@]}" 2>/dev/null || true
    producer_rc=0
    for pid in "${producer_pids[@]}"; do
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            producer_rc="still running 15 s after SIGTERM (killed)"
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            continue
        fi
        rc=0
        wait "$pid" || rc=$?
        [[ $rc == 0 ]] || producer_rc=$rc
    done
    producer_pids=()
}

cleanup() {
    local rc=$?
    stop_producer
    [[ -z $mon_pid ]] || kill -TERM "$mon_pid" 2>/dev/null || true
    if ((${#ceiling_keys[@]})); then
        rcli UNLINK "${ceiling_keys[@]}" >/dev/null 2>&1 || say "warning: could not delete the ceiling's keys ${ceiling_keys[*]}"
    fi
    if ((${#producer_keys[@]})); then
        rcli UNLINK "${producer_keys[@]}" >/dev/null 2>&1 || say "warning: could not delete the bench SKUs' keys"
    fi
    if ((topic_made)); then
        scripts/stack.sh topic delete "$bench_topic" >/dev/null 2>&1 || say "warning: could not delete topic $bench_topic"
    fi
    rm -rf "$tmp"
    if ((started_stack)); then
        scripts/stack.sh down >/dev/null || say "warning: scripts/stack.sh down failed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU accounting -----------------------------------------------------------------------------

# Ticks of the waited-for children of this shell (cutime + cstime): wrk and redis-benchmark.
children_ticks() {
    local line f
    read -r line </proc/$$/stat
    read -r -a f <<<"${line##*) }"
    echo $((f[13] + f[14]))
}

# The whole machine from /proc/stat: "busy steal idle" ticks over all CPUs.
machine_ticks() {
    local cpu user nice system idle iowait irq softirq steal rest
    read -r cpu user nice system idle iowait irq softirq steal rest </proc/stat
    echo "$((user + nice + system + irq + softirq)) $steal $((idle + iowait))"
}

# snapshot: one line "wall_us producer redis kafka tool busy steal idle".
snapshot() {
    local t=${EPOCHREALTIME//[!0-9]/}
    local pid prod=0
    for pid in "${producer_pids[@]}"; do prod=$((prod + $(proc_ticks "$pid"))); done
    echo "$t $prod $(proc_ticks "$redis_pid") $(proc_ticks "$kafka_pid") $(children_ticks) $(machine_ticks)"
}

# measured KIND CMD...: runs CMD and appends the CPU used meanwhile to $tmp/cpu.KIND.
measured() {
    local kind=$1 before after
    shift
    before=$(snapshot)
    "$@"
    after=$(snapshot)
    echo "$before $after" >>"$tmp/cpu.$kind"
}

# cpu_line KIND TOOL: medians over KIND's runs of the cores each party used, as one line.
cpu_line() {
    [[ -s $tmp/cpu.$1 ]] || return 0
    awk -v hz="$HZ" -v tool="$2" -v label="$1" -v known="${redis_pid:+redis}${kafka_pid:+kafka}" '
        function show(name, col) { return (known ~ name) ? sprintf("%s %.2f", name, med(col)) : name " n/a" }
        function med(col,   n, i, j, t, v) {
            n = 0
            for (i = 1; i <= NR; i++) v[++n] = x[i, col]
            for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
            return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        {
            s = ($9 - $1) / 1e6 * hz       # ticks of one core over the run
            x[NR, 1] = ($10 - $2) / s; x[NR, 2] = ($11 - $3) / s; x[NR, 3] = ($12 - $4) / s
            x[NR, 4] = ($13 - $5) / s
            busy = ($14 - $6) / s
            x[NR, 5] = busy - x[NR, 1] - x[NR, 2] - x[NR, 3] - x[NR, 4]
            if (x[NR, 5] < 0) x[NR, 5] = 0
            x[NR, 6] = ($15 - $7) / s; x[NR, 7] = ($16 - $8) / s
        }
        END {
            printf "  %-13s producer %.2f  %s  %s  %-15s %.2f  rest %.2f  steal %.2f  idle %.2f\n",
                label, med(1), show("redis", 2), show("kafka", 3), tool, med(4), med(5), med(6), med(7)
        }' "$tmp/cpu.$1"
}

# ---- the stack ----------------------------------------------------------------------------------

if scripts/stack.sh status >/dev/null 2>&1; then
    say "stack: already up, using it (left running)"
else
    say "stack: not running, starting it (stopped again at the end)"
    started_stack=1
    scripts/stack.sh up >"$tmp/stack-up.log" 2>&1 || {
        cat "$tmp/stack-up.log" >&2
        die "scripts/stack.sh up failed"
    }
fi
# STACK_VAR picks a private stack, as for scripts/stack.sh: its env file and its pid files.
env_file=$(scripts/stack.sh env)
run_dir=$(dirname "$env_file")/run
[[ -f $env_file ]] || die "$env_file is missing after scripts/stack.sh up"
# shellcheck disable=SC1090
. "$env_file"

redis_pid=$(cat "$run_dir/redis.pid" 2>/dev/null || true)
kafka_pid=$(cat "$run_dir/kafka.pid" 2>/dev/null || true)
[[ -n $redis_pid && -r /proc/$redis_pid/stat ]] || redis_pid=""
[[ -n $kafka_pid && -r /proc/$kafka_pid/stat ]] || kafka_pid=""

# REDIS_URL: redis://[:password@]host:port[/db]; the ceiling runs against the same server.
[[ $REDIS_URL == redis://* ]] || die "the ceiling needs a redis:// REDIS_URL (got ${REDIS_URL%%://*}://...)"
url=${REDIS_URL#redis://}
redis_pass=""
if [[ $url == *@* ]]; then
    redis_pass=${url%%@*}
    redis_pass=${redis_pass#:}
    url=${url#*@}
fi
redis_db=0
if [[ $url == */* ]]; then
    redis_db=${url#*/}
    url=${url%%/*}
fi
redis_host=${url%:*}
redis_port=${url##*:}
[[ $redis_port =~ ^[0-9]+$ ]] || redis_port=6379
auth=()
if [[ -n $redis_pass ]]; then
    export REDISCLI_AUTH=$redis_pass # redis-cli reads it; redis-benchmark needs -a
    auth=(-a "$redis_pass")
fi
rcli() { redis-cli -h "$redis_host" -p "$redis_port" -n "$redis_db" "$@"; }
[[ $(rcli PING 2>&1) == PONG ]] || die "Redis at $redis_host:$redis_port does not answer PING"

# A topic of its own (4 partitions, like stockpipe.events), deleted at the end: the benchmark's
# hundreds of thousands of events never land in the shared log other runs and the demo read.
scripts/stack.sh topic create "$bench_topic" 4 || die "cannot create topic $bench_topic"
topic_made=1

# ---- the producer -------------------------------------------------------------------------------

port=$(free_port)
admin_token=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
payment_token=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
api=http://127.0.0.1:$port
reuse=0
((PRODUCERS == 1)) || reuse=1
for ((i = 1; i <= PRODUCERS; i++)); do
    HTTP_ADDR=127.0.0.1 HTTP_PORT=$port HTTP_REUSE_PORT=$reuse ADMIN_TOKEN=$admin_token \
        PAYMENT_TOKEN=$payment_token WORKER_ID=bench-$$-$i KAFKA_TOPIC=$bench_topic \
        bin/producer >"$tmp/producer$i.log" 2>&1 &
    producer_pids+=($!)
done
t_start=${EPOCHREALTIME//[!0-9]/}

producer_failed() {
    local i
    for ((i = 1; i <= PRODUCERS; i++)); do
        say "--- producer $i's log (last 20 lines):" >&2
        tail -n 20 "$tmp/producer$i.log" >&2 || true
    done
    die "$1"
}
producers_alive() {
    local pid
    for pid in "${producer_pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}

# Ready when /readyz answers 200 on 8 new connections in a row: with several producers on the
# port each connection reaches one of them, so one that is not ready yet would be seen.
code=""
ok_in_row=0
for ((i = 0; i < 300 && ok_in_row < 8; i++)); do
    producers_alive || producer_failed "bin/producer exited at start"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$api/readyz" || true)
    if [[ $code == 200 ]]; then ok_in_row=$((ok_in_row + 1)); else ok_in_row=0; sleep 0.2; fi
done
((ok_in_row >= 8)) || producer_failed "the producers not ready within 60 s (/readyz: $code)"

# Fresh ids every run: milliseconds since the epoch x 10 stays far below 2^53.
base=$((${EPOCHREALTIME//[!0-9]/} / 1000 * 10))
sku_open=$((base + 1))  # stock 10^12, no per-user limit: every order is accepted
sku_zero=$((base + 2))  # stock 0: every order is sold out
sku_ceiling=$((base + 3)) # Redis only, for redis-benchmark; never seen by the producer

open_sku() {
    local out
    out=$(curl -s -w ' %{http_code}' --max-time 15 -X POST "$api/v1/skus" \
        -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
        -d "{\"sku_id\":$1,\"stock\":$2,\"per_user_limit\":0,\"pay_timeout_s\":$PAY_TIMEOUT_S}" || true)
    [[ $out == *' 201' ]] || producer_failed "POST /v1/skus for sku $1 answered: ${out:-nothing}"
}
open_sku "$sku_open" "$STOCK_MAX"
open_sku "$sku_zero" 0

# ---- wrk ----------------------------------------------------------------------------------------

# run_wrk OUT SKU SECONDS [RATE [CONNECTIONS]]: one wrk run; its orders-result line goes to OUT.
run_wrk() {
    local out=$1 sku=$2 secs=$3 rate=${4:-0} conns=${5:-$CONNS}
    ORDERS_SKU=$sku ORDERS_RATE=$rate ORDERS_THREADS=$THREADS ORDERS_USERS=$USERS \
        wrk -t "$THREADS" -c "$conns" -d "${secs}s" --timeout 5s -s bench/orders.lua "$api" \
        >"$tmp/wrk.out" 2>&1 || true
    if ! grep '^orders-result ' "$tmp/wrk.out" >"$out"; then
        cat "$tmp/wrk.out" >&2
        producer_failed "wrk gave no result"
    fi
}

# ---- the ceiling: redis-benchmark running reserve.lua ----------------------------------------------
#
# The ceiling sends exactly the call the producer sends. Rather than restating reserve.lua's KEYS
# and ARGV here (they change with the code), one probe order goes through the API while
# `redis-cli MONITOR` watches, and the producer's own EVALSHA of reserve.lua becomes the template:
# its SKU's keys are renamed to the ceiling's SKU (copied with COPY, so the sale hash is whatever
# the producer's open wrote), its user id becomes __rand_int__ and its order id
# "bench-BASE-__rand_int__"; every other argument (the empty idempotency key of a key-less
# order, qty, ts, ttl) is kept as sent.

reserve_sha=$(rcli -x SCRIPT LOAD <common/lua/reserve.lua)
[[ $reserve_sha =~ ^[0-9a-f]{40}$ ]] || die "SCRIPT LOAD of common/lua/reserve.lua answered: $reserve_sha"
probe_user=$((USERS + 1 + RANDOM)) # outside 1..USERS: no order of wrk has this user
captured=""
probe_order=""
accepted_re='"order_id":"([^"]*)","status":"accepted"'
for ((attempt = 1; attempt <= 3 && ${#captured} == 0; attempt++)); do
    redis-cli -h "$redis_host" -p "$redis_port" -n "$redis_db" MONITOR >"$tmp/monitor" 2>&1 &
    mon_pid=$!
    for ((i = 0; i < 50; i++)); do
        grep -q '^OK' "$tmp/monitor" && break
        sleep 0.05
    done
    body=$(curl -s --max-time 15 -X POST "$api/v1/orders" -H 'Content-Type: application/json' \
        -d "{\"user_id\":$probe_user,\"sku_id\":$sku_open,\"qty\":1}" || true)
    sleep 0.2
    kill -TERM "$mon_pid" 2>/dev/null || true
    wait "$mon_pid" 2>/dev/null || true
    mon_pid=""
    probe_order=""
    if [[ $body =~ $accepted_re ]]; then probe_order=${BASH_REMATCH[1]}; fi
    # After a script-cache flush the producer sends EVAL once; then try again.
    captured=$(grep -F "\"EVALSHA\" \"$reserve_sha\"" "$tmp/monitor" | grep -F "\"$probe_user\"" | head -n 1 || true)
    probe_user=$((probe_user + 1))
done
[[ -n $probe_order ]] || producer_failed "the probe order was not accepted: ${body:-no answer}"
[[ -n $captured ]] || die "MONITOR did not show the producer's EVALSHA of common/lua/reserve.lua (sha $reserve_sha): is bin/producer built from this tree?"
probe_user=$((probe_user - 1))

# MONITOR prints: TIME [DB ADDR] "EVALSHA" "sha" "numkeys" "key"... "arg"...
rest=${captured#*] }
words=()
word_re='^"(([^"\\]|\\.)*)"[ ]?(.*)$'
while [[ -n $rest ]]; do
    [[ $rest =~ $word_re ]] || die "cannot read MONITOR's line: $captured"
    [[ ${BASH_REMATCH[1]} != *\\* ]] || die "an escaped character in the producer's reserve call: $captured"
    words+=("${BASH_REMATCH[1]}")
    rest=${BASH_REMATCH[3]}
done
numkeys=${words[2]:-}
if ! [[ $numkeys =~ ^[0-9]+$ ]] || ((${#words[@]} < 3 + numkeys)); then
    die "unexpected reserve call: $captured"
fi
ck="{sku:$sku_ceiling}"
ceiling_args=()   # everything after EVALSHA SHA
producer_keys=()
ceiling_keys=()
for ((i = 2; i < ${#words[@]}; i++)); do
    w=${words[i]}
    if ((i >= 3 && i < 3 + numkeys)) && [[ $w == *"{sku:$sku_open}"* ]]; then
        producer_keys+=("$w")
        w=${w//"{sku:$sku_open}"/$ck}
        ceiling_keys+=("$w")
    elif [[ $w == "$probe_user" ]]; then
        w=__rand_int__
    elif [[ $w == "$probe_order" ]]; then
        w="bench-$base-__rand_int__"
    elif [[ $w == "$sku_open" ]]; then
        w=$sku_ceiling
    fi
    ceiling_args+=("$w")
done
((${#ceiling_keys[@]})) || die "the producer's reserve call names no key of sku $sku_open: $captured"
sale_key=$ck:sale # the hash whose "stock" field sp_stock_available reads
[[ " ${ceiling_keys[*]} " == *" $sale_key "* ]] || die "the producer's reserve call has no $sale_key-like key: $captured"
ceiling_calls=0     # calls that ran the script (each reserved one unit)
ceiling_discarded=0 # runs thrown away because calls failed

# ceiling_ready: reserve.lua in the script cache and the ceiling's keys in place, both idempotent
# and done before every run: the stack is shared, and a test elsewhere may flush the script cache
# (after which every EVALSHA is a cheap NOSCRIPT error that redis-benchmark counts as done).
ceiling_ready() {
    local sha j
    sha=$(rcli -x SCRIPT LOAD <common/lua/reserve.lua)
    [[ $sha == "$reserve_sha" ]] || die "SCRIPT LOAD of common/lua/reserve.lua answered $sha, not $reserve_sha"
    if [[ $(rcli EXISTS "$sale_key") != 1 ]]; then
        for j in "${!producer_keys[@]}"; do
            rcli COPY "${producer_keys[j]}" "${ceiling_keys[j]}" REPLACE >/dev/null
        done
        rcli HSET "$sale_key" stock "$STOCK_MAX" >/dev/null
    fi
}

# evalsha_stats: "calls usec" of EVALSHA from INFO commandstats.
evalsha_stats() {
    local s
    s=$(rcli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2/p')
    echo "${s:-0 0}"
}

# run_ceiling N PIPELINE: N calls of the template; writes redis-benchmark's requests/s to
# $tmp/ceiling.out. __rand_int__ is a 12-digit zero-padded number in 0..USERS-1, drawn afresh for
# each occurrence. A run counts only if the sale's stock fell by at least N (redis-benchmark may
# send up to clients x pipeline more): otherwise some calls failed, and the run is repeated
# (twice at most).
run_ceiling() {
    local n=$1 p=$2 out rps before after attempt
    for ((attempt = 1; attempt <= 3; attempt++)); do
        ceiling_ready
        before=$(rcli HGET "$sale_key" stock)
        out=$(redis-benchmark -h "$redis_host" -p "$redis_port" --dbnum "$redis_db" "${auth[@]}" \
            -c "$CONNS" -n "$n" -P "$p" -r "$USERS" --csv EVALSHA "$reserve_sha" "${ceiling_args[@]}" 2>&1) ||
            die "redis-benchmark failed: $out"
        after=$(rcli HGET "$sale_key" stock)
        if [[ $before =~ ^[0-9]+$ && $after =~ ^[0-9]+$ ]] && ((before - after >= n)); then
            ceiling_calls=$((ceiling_calls + before - after))
            rps=$(tail -n 1 <<<"$out" | cut -d, -f2 | tr -d '"')
            [[ $rps =~ ^[0-9.]+$ ]] || die "redis-benchmark printed no rate: $out"
            echo "$rps" >"$tmp/ceiling.out"
            return 0
        fi
        ceiling_discarded=$((ceiling_discarded + 1))
        say "  (ceiling run discarded: $n calls sent, stock went from ${before:-none} to ${after:-none};" \
            "the script cache or the sale's key was lost meanwhile)"
    done
    die "the ceiling could not be measured: the reserve calls keep failing on $redis_host:$redis_port"
}

# One call of the template by hand first: it must answer "ok" and reserve one unit.
ceiling_ready
before=$(rcli HGET "$sale_key" stock)
one=("${ceiling_args[@]//__rand_int__/000000000001}")
reply=$(rcli EVALSHA "$reserve_sha" "${one[@]}" | head -n 1)
after=$(rcli HGET "$sale_key" stock)
[[ $reply == ok && $((before - after)) == 1 ]] ||
    die "the ceiling's call (EVALSHA $reserve_sha ${one[*]}) answered '$reply' and reserved $((before - after))"

# Calibration: a short run per pipelining setting sizes the measured runs to ~BENCH_SECONDS.
say "producer_bench: $CONNS connections, $THREADS wrk threads, $RUNS runs of ${SECONDS_PER_RUN}s per measurement"
say "  skus: $sku_open (stock $STOCK_MAX, no per-user limit), $sku_zero (stock 0), $sku_ceiling (ceiling, Redis only)"
run_ceiling 20000 "$PIPELINE"
n_p16=$(calc "$(<"$tmp/ceiling.out") * $SECONDS_PER_RUN + 1000")
run_ceiling 5000 1
n_p1=$(calc "$(<"$tmp/ceiling.out") * $SECONDS_PER_RUN + 1000")

# Warm-up: Kafka's producer id, connections, caches, the broker's JIT. Not counted.
run_wrk "$tmp/warmup" "$sku_open" "$WARMUP_S"
[[ $(kv "$(<"$tmp/warmup")" c202) -gt 0 ]] || producer_failed "no order was accepted during the warm-up: $(<"$tmp/warmup")"

# ---- the measured rounds -------------------------------------------------------------------------

: >"$tmp/p16"
: >"$tmp/p1"
: >"$tmp/accepted"
: >"$tmp/soldout"
redis_ceiling_calls=0
redis_ceiling_usec=0
for ((r = 1; r <= RUNS; r++)); do
    s0=$(evalsha_stats)
    measured ceiling_p16 run_ceiling "$n_p16" "$PIPELINE"
    cat "$tmp/ceiling.out" >>"$tmp/p16"
    measured ceiling_p1 run_ceiling "$n_p1" 1
    cat "$tmp/ceiling.out" >>"$tmp/p1"
    s1=$(evalsha_stats)
    measured accepted run_wrk "$tmp/run" "$sku_open" "$SECONDS_PER_RUN"
    cat "$tmp/run" >>"$tmp/accepted"
    measured soldout run_wrk "$tmp/run" "$sku_zero" "$SECONDS_PER_RUN"
    cat "$tmp/run" >>"$tmp/soldout"
    read -r c0 u0 <<<"$s0"
    read -r c1 u1 <<<"$s1"
    redis_ceiling_calls=$((redis_ceiling_calls + c1 - c0))
    redis_ceiling_usec=$((redis_ceiling_usec + u1 - u0))
    a=$(tail -n 1 "$tmp/accepted")
    b=$(tail -n 1 "$tmp/soldout")
    say "  round $r/$RUNS: ceiling -P $PIPELINE $(calc "$(tail -n 1 "$tmp/p16")")/s, unpipelined $(calc "$(tail -n 1 "$tmp/p1")")/s;" \
        "accepted $(calc "d($(kv "$a" c202), $(kv "$a" duration_us)) * 1e6")/s; sold out $(calc "d($(kv "$b" c409), $(kv "$b" duration_us)) * 1e6")/s"
done

# Figures of the wrk runs in FILE: "accepted/s soldout/s other/s p50_ms p99_ms requests/s", each
# the median over the runs.
wrk_medians() {
    local f=$1 col
    for col in c202 c409 other; do
        while read -r line; do calc "d($(kv "$line" "$col"), $(kv "$line" duration_us)) * 1e6" %.1f; echo; done <"$f" | median
    done | tr '\n' ' '
    for col in p50_us p99_us; do
        while read -r line; do calc "$(kv "$line" "$col") / 1000" %.2f; echo; done <"$f" | median
    done | tr '\n' ' '
    while read -r line; do
        calc "d($(kv "$line" c202) + $(kv "$line" c409) + $(kv "$line" other), $(kv "$line" duration_us)) * 1e6" %.1f
        echo
    done <"$f" | median
}
# sum_of KEY FILE...: the sum of KEY=N over the orders-result lines in the files; a KEY starting
# with "_" (such as _err) matches every key ending so.
sum_of() {
    local key=$1
    shift
    awk -v key="$key" '{ for (i = 2; i <= NF; i++) { split($i, kv, "=")
            if (kv[1] == key || (key ~ /^_/ && kv[1] ~ (key "$"))) n += kv[2] } }
        END { print n + 0 }' "$@"
}
sock_errors() { sum_of _err "$1"; }
# col_median FILE KEY: the median of KEY over the orders-result lines in FILE.
col_median() { while read -r line; do kv "$line" "$2"; done <"$1" | median; }

ceil16=$(median <"$tmp/p16")
ceil1=$(median <"$tmp/p1")
read -r acc_rate acc_409 acc_other acc_p50 acc_p99 acc_req <<<"$(wrk_medians "$tmp/accepted")"
read -r so_202 so_rate so_other so_p50 so_p99 _ <<<"$(wrk_medians "$tmp/soldout")"

# ---- latency at a paced load ------------------------------------------------------------------

# The producer's own latency histogram (stockpipe_producer_order_seconds on /metrics), "le count"
# per line, into FILE; empty when the metric is not there.
hist_snapshot() {
    curl -s --max-time 5 "$api/metrics" | tr -d '\r' |
        sed -n 's/^stockpipe_producer_order_seconds_bucket{le="\([^"]*\)"} \([0-9.e+]*\)$/\1 \2/p' >"$1" || true
}

# hist_quantiles FILE0 FILE1: from the orders counted between the two snapshots, the buckets that
# hold p50 and p99, as words for the report.
hist_quantiles() {
    paste -d ' ' "$1" "$2" | awk '$1 == $3 { le[++n] = $1; c[n] = $4 - $2 }
        function bucket(q,   i) {
            for (i = 1; i <= n; i++) if (c[i] >= q * c[n]) return (i == 1 ? "<= " le[i] : le[i - 1] "-" le[i]) " s"
            return "?"
        }
        END { if (n && c[n] > 0) printf "p50 in %s, p99 in %s (%d orders)", bucket(0.5), bucket(0.99), c[n] }'
}

if [[ -n $RATE ]]; then
    target_rate=$RATE
    target_why="BENCH_RATE"
else
    target_rate=$(calc "$ceil16 * $GOAL_RATIO / 2")
    target_why="1/4 of the -P $PIPELINE ceiling: half the throughput target"
fi
half_own=$(calc "$acc_rate / 2")
((target_rate > 0)) || target_rate=1
((half_own > 0)) || half_own=1
# A paced run needs idle connections to send on when a slot comes, or it is closed-loop again:
# enough for every order of PACED_SLACK_MS to be in flight, and at least BENCH_CONNS.
paced_conns() {
    local c
    c=$(calc "$1 * $PACED_SLACK_MS / 1000 + $THREADS")
    ((c >= CONNS)) || c=$CONNS
    echo $((c / THREADS * THREADS))
}
target_conns=$(paced_conns "$target_rate")
half_conns=$(paced_conns "$half_own")
: >"$tmp/paced_target"
: >"$tmp/paced_half"
hist_snapshot "$tmp/hist0"
for ((r = 1; r <= RUNS; r++)); do
    measured paced_target run_wrk "$tmp/run" "$sku_open" "$SECONDS_PER_RUN" "$target_rate" "$target_conns"
    cat "$tmp/run" >>"$tmp/paced_target"
done
hist_snapshot "$tmp/hist1"
if [[ -z $RATE ]]; then
    for ((r = 1; r <= RUNS; r++)); do
        measured paced_half run_wrk "$tmp/run" "$sku_open" "$SECONDS_PER_RUN" "$half_own" "$half_conns"
        cat "$tmp/run" >>"$tmp/paced_half"
    done
fi
hist_snapshot "$tmp/hist2"
read -r pt_rate _ pt_other pt_p50 pt_p99 _ <<<"$(wrk_medians "$tmp/paced_target")"
if [[ -s $tmp/paced_half ]]; then
    read -r ph_rate _ ph_other ph_p50 ph_p99 _ <<<"$(wrk_medians "$tmp/paced_half")"
fi

# ---- the producer's memory and CPU, then its shutdown ---------------------------------------------

producers_alive || producer_failed "a producer exited during the benchmark"
# Memory: the largest producer's (the goal is per process). CPU: all of them together.
hwm_kib=0
rss_kib=0
utime=0
stime=0
for pid in "${producer_pids[@]}"; do
    h=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status")
    r=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status")
    ((h > hwm_kib)) && hwm_kib=$h
    ((r > rss_kib)) && rss_kib=$r
    read -r -a pstat <<<"$(sed 's/.*) //' "/proc/$pid/stat")"
    utime=$((utime + pstat[11]))
    stime=$((stime + pstat[12]))
done
prod_user=$(calc "$utime / $HZ" %.2f)
prod_sys=$(calc "$stime / $HZ" %.2f)
prod_life=$(calc "(${EPOCHREALTIME//[!0-9]/} - $t_start) / 1e6" %.1f)
# CPU seconds per thread name (the event loop is "producer", librdkafka's threads are "rdk:...").
prod_threads=$(for t in "${producer_pids[@]/#//proc/}"; do for t in "$t"/task/*; do
    read -r name <"$t/comm" || continue
    read -r line <"$t/stat" || continue
    read -r -a f <<<"${line##*) }"
    echo "$name $((f[11] + f[12]))"
done; done | awk -v hz="$HZ" '{ t[$1] += $2 } END {
    for (n in t) if (t[n] > 0) printf "%s %.2f\n", n, t[n] / hz }' | sort -k2 -gr | awk '{ printf "%s%s %s s", sep, $1, $2; sep = ", " }')
total_accepted=$(sum_of c202 "$tmp/warmup" "$tmp/accepted" "$tmp/paced_target" "$tmp/paced_half")
stop_producer

# What the run leaves in Redis: the keys of the producer's unlimited SKU (reserve.lua's keys).
left_bytes=0
for k in "${producer_keys[@]}"; do
    b=$(rcli MEMORY USAGE "$k" 2>/dev/null || true)
    [[ $b =~ ^[0-9]+$ ]] && left_bytes=$((left_bytes + b))
done


# ---- report -----------------------------------------------------------------------------------------

# hist_line FILE0 FILE1: the producer's own latency between two snapshots, when it has one.
hist_line() {
    ((PRODUCERS == 1)) || return 0 # /metrics on the shared port is one producer's, not all
    [[ -s $1 && -s $2 ]] || return 0
    local q
    q=$(hist_quantiles "$1" "$2")
    [[ -z $q ]] || say "    the producer's own histogram (request in to answer out): $q"
}

# Producer CPU per answer: its cores over the run / answers per second.
cpu_per() { # KIND RATE -> microseconds of producer CPU per answer
    awk -v hz="$HZ" '{ s = ($9 - $1) / 1e6 * hz; print ($10 - $2) / s }' "$tmp/cpu.$1" | median |
        awk -v r="$2" '{ printf "%.0f", (r > 0) ? $1 / r * 1e6 : 0 }'
}

say ""
say "ceiling: redis-benchmark -c $CONNS -r $USERS, the producer's own reserve.lua call (seen by MONITOR):"
shown=""
for w in "${ceiling_args[@]}"; do shown+=" ${w:-\"\"}"; done
say "  EVALSHA ${reserve_sha:0:12}...$shown"
say "  with -P $PIPELINE        $(calc "$ceil16")/s"
say "  without pipelining $(calc "$ceil1")/s"
if ((redis_ceiling_calls > 0)); then
    say "  Redis CPU per EVALSHA in the ceiling runs: $(calc "d($redis_ceiling_usec, $redis_ceiling_calls)" %.1f) us" \
        "(INFO commandstats; counts every client of this Redis)"
fi
say "  check: every counted run reserved one unit per call ($ceiling_calls calls in all);" \
    "runs discarded because calls failed: $ceiling_discarded"
say ""
if ((PRODUCERS == 1)); then
    say "producer: one process"
else
    say "producer: $PRODUCERS processes sharing port $port (HTTP_REUSE_PORT=1; the kernel spreads the connections)"
fi
say "  wrk -t $THREADS -c $CONNS, POST /v1/orders {user_id 1..$USERS, qty 1}, no Idempotency-Key"
say "  accepted (stock 10^12): $(calc "$acc_rate")/s answered 202 (all answers $(calc "$acc_req")/s; 409 $(calc "$acc_409")/s, other $(calc "$acc_other")/s, socket errors $(sock_errors "$tmp/accepted") in all runs)"
say "    latency p50 $acc_p50 ms, p99 $acc_p99 ms (closed loop, $CONNS in flight)"
say "    ratio to the ceiling: $(calc "d($acc_rate, $ceil16)" %.3f) of -P $PIPELINE, $(calc "d($acc_rate, $ceil1)" %.3f) of unpipelined"
say "    producer CPU per accepted order: $(cpu_per accepted "$acc_rate") us"
# Little's law: a closed loop carries (orders in flight) / (mean latency).
acc_mean_ms=$(calc "$(col_median "$tmp/accepted" mean_us) / 1000" %.2f)
say "    closed loop: $CONNS orders in flight (the -P $PIPELINE ceiling keeps $CONNS x $PIPELINE = $((CONNS * PIPELINE)) calls in flight);" \
    "at the mean latency of $acc_mean_ms ms, $(calc "$GOAL_RATIO * $ceil16") orders/s would take about" \
    "$(calc "$GOAL_RATIO * $ceil16 * $acc_mean_ms / 1000") in flight (BENCH_CONNS)"
say "  sold out (stock 0): $(calc "$so_rate")/s answered 409 (202 $(calc "$so_202")/s, other $(calc "$so_other")/s, socket errors $(sock_errors "$tmp/soldout") in all runs)"
say "    latency p50 $so_p50 ms, p99 $so_p99 ms; $(calc "d($so_rate, $acc_rate)" %.2f)x the accepted rate"
say "    producer CPU per sold-out answer: $(cpu_per soldout "$so_rate") us"
say "  paced at $target_rate orders/s offered ($target_why), $target_conns connections:"
say "    achieved $(calc "$pt_rate")/s accepted (other $(calc "$pt_other")/s), p50 $pt_p50 ms, p99 $pt_p99 ms"
hist_line "$tmp/hist0" "$tmp/hist1"
if [[ -s $tmp/paced_half ]]; then
    say "  paced at $half_own orders/s offered (half the producer's own accepted rate), $half_conns connections:"
    say "    achieved $(calc "$ph_rate")/s accepted (other $(calc "$ph_other")/s), p50 $ph_p50 ms, p99 $ph_p99 ms"
    hist_line "$tmp/hist1" "$tmp/hist2"
fi
say "  (paced runs: wrk is closed-loop; bench/orders.lua's delay() spaces the sends to offer the"
say "   rate approximately open-loop, and latency counts from the send, not from the scheduled slot)"
say "  memory: peak RSS (VmHWM) $(calc "$hwm_kib / 1024" %.1f) MiB, RSS at the end $(calc "$rss_kib / 1024" %.1f) MiB (the largest of $PRODUCERS)"
say "  CPU (all producers): user $prod_user s + system $prod_sys s over $prod_life s of life ($total_accepted orders accepted)"
say "    by thread: ${prod_threads:-?}"
say "  left in Redis: $(calc "$left_bytes / 1048576" %.1f) MiB under sku $sku_open's keys (${producer_keys[*]});" \
    "deleted at exit with the bench's own topic $bench_topic"
if [[ $producer_rc == 0 ]]; then
    say "  shutdown: SIGTERM, exit status 0"
else
    say "  SHUTDOWN PROBLEM: after SIGTERM a producer's exit status is $producer_rc"
    for ((i = 1; i <= PRODUCERS; i++)); do tail -n 20 "$tmp/producer$i.log" | sed "s/^/    log $i: /"; done
fi
say ""
say "where the CPU went (cores, of $(nproc); medians over the runs; 'rest' = everything else busy on the machine):"
cpu_line ceiling_p16 redis-benchmark
cpu_line ceiling_p1 redis-benchmark
cpu_line accepted wrk
cpu_line soldout wrk
cpu_line paced_target wrk
cpu_line paced_half wrk

verdict() { if [[ $(calc "($1) ? 1 : 0") == 1 ]]; then echo PASS; else echo MISS; fi; }
say ""
say "==== producer benchmark: targets of issue #3 (medians of $RUNS runs of ${SECONDS_PER_RUN}s, $CONNS connections, $PRODUCERS producer(s)) ===="
printf '%-42s %-44s %-10s %s\n' "target" "measured" "goal" "result"
printf '%-42s %-44s %-10s %s\n' "accepted orders/s vs ceiling (-P $PIPELINE)" \
    "$(calc "$acc_rate") / $(calc "$ceil16") = $(calc "d($acc_rate, $ceil16)" %.2f)" ">= $GOAL_RATIO" \
    "$(verdict "$acc_rate >= $GOAL_RATIO * $ceil16")"
# The p99 counts only if the paced run really carried (90% of) the load it was offered.
load_note=""
if [[ $(verdict "$pt_rate >= 0.9 * $target_rate") == MISS ]]; then
    load_note=", load not reached"
fi
printf '%-42s %-44s %-10s %s\n' "p99 at $target_rate orders/s offered" \
    "$pt_p99 ms (achieved $(calc "$pt_rate")/s$load_note)" "< $GOAL_P99_MS ms" \
    "$(verdict "$pt_p99 < $GOAL_P99_MS && $pt_rate >= 0.9 * $target_rate")"
printf '%-42s %-44s %-10s %s\n' "sold-out answers/s vs accepted orders/s" \
    "$(calc "$so_rate") / $(calc "$acc_rate") = $(calc "d($so_rate, $acc_rate)" %.2f)x" ">= ${GOAL_SOLDOUT}x" \
    "$(verdict "$so_rate >= $GOAL_SOLDOUT * $acc_rate")"
printf '%-42s %-44s %-10s %s\n' "producer peak RSS (VmHWM)" "$(calc "$hwm_kib / 1024" %.1f) MiB" "< $GOAL_RSS_MIB MiB" \
    "$(verdict "$hwm_kib < $GOAL_RSS_MIB * 1024")"
say "(benchmarks inform, they do not fail the build; the machine is shared, so figures vary run to run)"
