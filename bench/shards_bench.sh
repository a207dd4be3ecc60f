#!/usr/bin/env bash
# shards_bench.sh - one hot SKU with 1, 2 and 3 shards on a Redis Cluster of 3 primaries: Redis
# CPU per accepted order on each primary and summed, and the ceiling each primary implies (issue 17
# part 3; docs/reservation.md, "Hot-SKU sharding").
#
# Usage: bench/shards_bench.sh        (`make bench` runs it after bench/scripts_bench.sh)
#
# Settings (environment):
#   BENCH_SHARDS_CONNS=128  wrk's connections to the producer
#   BENCH_THREADS=2         wrk's threads
#   BENCH_SECONDS=5         length of every measured run
#   BENCH_RUNS=3            runs per number of shards; every figure printed is the median of its runs
#   BENCH_WARMUP_S=5        closed-loop orders per sale before anything is measured
#   STACK_VAR, STACK_*      the stack (below)
#
# The stack: by default a PRIVATE one, never the shared stack of var/:
#   STACK_VAR=/tmp/shards-bench STACK_REDIS_CLUSTER=1 STACK_REDIS_PORT=25379
#   STACK_REDIS_BUS_PORT=25389 STACK_PG_PORT=25432 STACK_KAFKA_PORT=25092
#   STACK_KAFKA_CONTROLLER_PORT=25093 STACK_KAFKA_BROKERS=1 scripts/stack.sh up
# (Redis Cluster: 3 primaries with a replica each, node N on STACK_REDIS_PORT+100*(N-1)). With
# STACK_VAR unset these are the settings whatever the environment says (a sourced var/stack.env
# exports the shared stack's ports); with STACK_VAR set, the STACK_* of the environment are taken,
# these as defaults. The stack is started here, and stopped at the end, only if it was not running;
# when this run also made its directory, the stop is `down --purge` and the directory goes too
# (its logs stay when the run failed).
#
# What it does:
#   1. reads the primaries and their slots (CLUSTER NODES) and picks three fresh SKU ids whose
#      shard keys {sku:ID} (shard 0), {sku:ID/1}, {sku:ID/2} fall in slots of three different
#      primaries (CRC16 of the hash tag, checked against CLUSTER KEYSLOT), one id per number of
#      shards, and prints which primary serves each shard;
#   2. starts one producer (bin/producer, SALE_SHARDS_MAX=3, a Kafka topic of its own) and opens
#      the three sales through POST /v1/skus with "shards" 1, 2 and 3 (stock 10^12, no per-user
#      limit: no shard runs short, so no units move between shards: what is measured is the cost
#      of splitting the orders' batches over the shards); a buyer's home shard is user_id mod N;
#   3. warms each sale up (wrk, BENCH_WARMUP_S), then BENCH_RUNS rounds, each sale in turn (so a
#      load that drifts on this shared machine hits the three alike): wrk -t BENCH_THREADS -c
#      BENCH_SHARDS_CONNS -s bench/orders.lua (ORDERS_USERS=1000000, POST /v1/orders without
#      Idempotency-Key), around each run INFO cpu (used_cpu_user + used_cpu_sys: every thread of
#      the server, AOF and the replication stream included) and INFO commandstats of every
#      primary, and the producer's CPU ticks (/proc/PID/stat). Per run and primary: CPU us /
#      orders answered 202;
#   4. prints per number of shards (medians over the runs): accepted orders/s, Redis CPU us per
#      accepted order on each primary and summed over them (the median of the runs' sums), script
#      calls (EVALSHA) per accepted order, the ceiling each primary implies - 10^6 / its us per
#      accepted order: the sale's orders/s at which that primary would be busy a whole core - and
#      the sale's, the lowest over the primaries that serve a shard, and the producer's CPU per
#      accepted order; the units each shard sold (about 1/N each) and that no transfer was made;
#      then the overhead of sharding: summed CPU per order with 2 and 3 shards over that with 1,
#      PASS when at most +20% (issue 17), else MISS.
# The ceilings are derived from CPU, not measured by saturating the primaries: on a 2-core machine
# that runs all six Redis nodes, Kafka, PostgreSQL, the producer and wrk, the total scale-out of 3
# primaries cannot be shown, so the per-primary figures and their sum are what this reports. A MISS
# is information, not a failure; the exit status is non-zero only when the harness itself could
# not measure. It stops the producer and deletes its keys and its topic at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh # median, kv, calc, free_port, proc_ticks

# What the environment set, for the command line printed with the results.
cmdline=""
for v in BENCH_SHARDS_CONNS BENCH_THREADS BENCH_SECONDS BENCH_RUNS BENCH_WARMUP_S STACK_VAR; do
    if [[ -n ${!v+x} ]]; then cmdline+="$v=${!v} "; fi
done
cmdline+="bench/shards_bench.sh"

CONNS=${BENCH_SHARDS_CONNS:-128}
THREADS=${BENCH_THREADS:-2}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RUNS=${BENCH_RUNS:-3}
WARMUP_S=${BENCH_WARMUP_S:-5}
USERS=1000000
STOCK_MAX=1000000000000
PAY_TIMEOUT_S=600
SHARD_COUNTS=(1 2 3)
MAX_SHARDS=3
GOAL_OVERHEAD=0.20 # summed Redis CPU per order, N shards over 1 shard, minus 1

say() { printf '%s\n' "$*"; }
die() {
    printf 'shards_bench: error: %s\n' "$*" >&2
    exit 1
}

for v in CONNS:BENCH_SHARDS_CONNS THREADS:BENCH_THREADS SECONDS_PER_RUN:BENCH_SECONDS RUNS:BENCH_RUNS \
    WARMUP_S:BENCH_WARMUP_S; do
    name=${v%%:*}
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "${v#*:} must be a positive integer (got '${!name}')"
done
for c in wrk redis-cli curl python3; do
    command -v "$c" >/dev/null || die "$c not found (scripts/install-deps.sh installs it)"
done
[[ -x bin/producer ]] || die "bin/producer is missing: run make first"

# ---- the stack: a private Redis Cluster stack unless STACK_VAR says otherwise -------------------

if [[ -z ${STACK_VAR:-} ]]; then
    export STACK_VAR=/tmp/shards-bench STACK_REDIS_CLUSTER=1 STACK_REDIS_PORT=25379
    export STACK_REDIS_BUS_PORT=25389 STACK_PG_PORT=25432 STACK_KAFKA_PORT=25092
    export STACK_KAFKA_CONTROLLER_PORT=25093 STACK_KAFKA_BROKERS=1
else
    export STACK_VAR STACK_REDIS_CLUSTER=${STACK_REDIS_CLUSTER:-1}
    export STACK_REDIS_PORT=${STACK_REDIS_PORT:-25379} STACK_REDIS_BUS_PORT=${STACK_REDIS_BUS_PORT:-25389}
    export STACK_PG_PORT=${STACK_PG_PORT:-25432} STACK_KAFKA_PORT=${STACK_KAFKA_PORT:-25092}
    export STACK_KAFKA_CONTROLLER_PORT=${STACK_KAFKA_CONTROLLER_PORT:-25093}
    export STACK_KAFKA_BROKERS=${STACK_KAFKA_BROKERS:-1}
fi
[[ $STACK_REDIS_CLUSTER == 1 ]] || die "needs a Redis Cluster stack (STACK_REDIS_CLUSTER=1, got '$STACK_REDIS_CLUSTER')"
[[ $STACK_VAR == /* ]] || STACK_VAR=$PWD/$STACK_VAR

tmp=$(mktemp -d "${TMPDIR:-/tmp}/shards-bench.XXXXXX")
started_stack=0
made_var=0
topic_made=0
bench_topic=stockpipe.bench.shards.$$
prod_pid=""
skus_made=() # SKU ids whose keys are to be deleted at the end

cleanup() {
    local rc=$? s
    if [[ -n $prod_pid ]]; then
        kill -TERM "$prod_pid" 2>/dev/null || true
        wait "$prod_pid" 2>/dev/null || true
    fi
    for s in "${skus_made[@]}"; do
        delete_sku_keys "$s" || say "warning: could not delete the keys of sku $s"
    done
    if ((topic_made)); then
        scripts/stack.sh topic delete "$bench_topic" >/dev/null 2>&1 || say "warning: could not delete topic $bench_topic"
    fi
    rm -rf "$tmp"
    if ((started_stack)); then
        if ((made_var)); then
            if scripts/stack.sh down --purge >/dev/null 2>&1; then
                if ((rc == 0)); then rm -rf "$STACK_VAR"; else say "the private stack's logs: $STACK_VAR/log"; fi
            else
                say "warning: scripts/stack.sh down --purge failed (STACK_VAR=$STACK_VAR)"
            fi
        else
            scripts/stack.sh down >/dev/null 2>&1 || say "warning: scripts/stack.sh down failed (STACK_VAR=$STACK_VAR)"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if scripts/stack.sh status >/dev/null 2>&1; then
    say "stack: STACK_VAR=$STACK_VAR already up, using it (left running)"
else
    say "stack: STACK_VAR=$STACK_VAR not running, starting it (stopped again at the end)"
    [[ -e $STACK_VAR ]] || made_var=1
    started_stack=1
    scripts/stack.sh up >"$tmp/stack-up.log" 2>&1 || {
        cat "$tmp/stack-up.log" >&2
        die "scripts/stack.sh up failed"
    }
fi
env_file=$(scripts/stack.sh env)
[[ -f $env_file ]] || die "$env_file is missing after scripts/stack.sh up"
# shellcheck disable=SC1090
. "$env_file"
[[ $REDIS_URL == redis-cluster://* ]] || die "needs a redis-cluster:// REDIS_URL (got ${REDIS_URL%%://*}://...)"
seeds=${REDIS_URL#redis-cluster://}
if [[ $seeds == *@* ]]; then
    redis_pass=${seeds%%@*}
    export REDISCLI_AUTH=${redis_pass#*:}
    seeds=${seeds#*@}
fi
seed=${seeds%%,*}
redis_host=${seed%:*}
seed_port=${seed##*:}
[[ $seed_port =~ ^[0-9]+$ ]] || die "cannot read a node's port from REDIS_URL ($REDIS_URL)"
# rnode PORT ARGS...: redis-cli to one cluster node (no redirections followed).
rnode() {
    local port=$1
    shift
    redis-cli -h "$redis_host" -p "$port" "$@"
}
[[ $(rnode "$seed_port" PING 2>&1) == PONG ]] || die "Redis at $redis_host:$seed_port does not answer PING"

# ---- the primaries, and SKU ids whose shards are on three different primaries ----------------------

rnode "$seed_port" CLUSTER NODES >"$tmp/nodes" || die "CLUSTER NODES failed on $redis_host:$seed_port"
base=$((${EPOCHREALTIME//[!0-9]/} / 100)) # tenths of ms: fresh SKU ids every run
# Prints "primary PORT SLOTS" per primary (by first slot), then per SKU id "sku ID PORT0 SLOT0
# PORT1 SLOT1 PORT2 SLOT2": its shards' primaries and slots.
python3 - "$tmp/nodes" "$base" "${#SHARD_COUNTS[@]}" "$MAX_SHARDS" >"$tmp/layout" <<'EOF' || die "cannot lay the shards out over the primaries: $(cat "$tmp/layout")"
import sys

nodes_file, base, want, nshards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def crc16(data):  # CRC16-CCITT (XMODEM), as Redis Cluster's key slots
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key):
    s = key.find("{")
    if s >= 0:
        e = key.find("}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return crc16(key.encode()) % 16384


owner = [None] * 16384
prims = []
for line in open(nodes_file):
    f = line.split()
    if len(f) < 8:
        continue
    flags = f[2].split(",")
    if "master" not in flags or "fail" in flags or "noaddr" in flags:
        continue
    port = int(f[1].split("@")[0].rsplit(":", 1)[1])
    ranges = [r for r in f[8:] if not r.startswith("[")]
    for r in ranges:
        a, _, b = r.partition("-")
        for i in range(int(a), int(b or a) + 1):
            owner[i] = port
    if ranges:
        prims.append((min(int(r.split("-")[0]) for r in ranges), port, ",".join(ranges)))
if None in owner:
    print("the cluster does not serve all 16384 slots")
    sys.exit(1)
if len(prims) < nshards:
    print("%d primaries serve slots; %d shards need as many" % (len(prims), nshards))
    sys.exit(1)
for _, port, ranges in sorted(prims):
    print("primary %d %s" % (port, ranges))
sku, found = base, 0
while found < want:
    sku += 1
    tags = ["sku:%d" % sku] + ["sku:%d/%d" % (sku, k) for k in range(1, nshards)]
    slots = [slot("{%s}:sale" % t) for t in tags]
    if len(set(owner[s] for s in slots)) == nshards:
        print("sku %d %s" % (sku, " ".join("%d %d" % (owner[s], s) for s in slots)))
        found += 1
EOF

prim_ports=()
declare -A prim_slots pname
while read -r what a b; do
    [[ $what == primary ]] || continue
    prim_ports+=("$a")
    prim_slots[$a]=$b
    pname[$a]=P${#prim_ports[@]}
done <"$tmp/layout"
NP=${#prim_ports[@]}

# shard_tag SKU K: the hash tag of shard K's keys.
shard_tag() { if (($2 == 0)); then echo "sku:$1"; else echo "sku:$1/$2"; fi; }

declare -A sku_of shard_port shard_slot
i=0
while read -r what id rest; do
    [[ $what == sku ]] || continue
    n=${SHARD_COUNTS[i]}
    i=$((i + 1))
    sku_of[$n]=$id
    read -r -a w <<<"$rest"
    for ((k = 0; k < MAX_SHARDS; k++)); do
        shard_port[$id.$k]=${w[2 * k]}
        shard_slot[$id.$k]=${w[2 * k + 1]}
        # the CRC16 above against Redis's own
        s=$(rnode "$seed_port" CLUSTER KEYSLOT "{$(shard_tag "$id" "$k")}:sale")
        [[ $s == "${shard_slot[$id.$k]}" ]] || die "slot of {$(shard_tag "$id" "$k")}:sale: computed ${shard_slot[$id.$k]}, CLUSTER KEYSLOT says $s"
    done
done <"$tmp/layout"
((i == ${#SHARD_COUNTS[@]})) || die "no SKU ids found: $(cat "$tmp/layout")"

# delete_sku_keys SKU: DEL (not UNLINK: nothing freed in the background later) every key of the
# SKU's shards, found in their slots on the primaries that serve them.
delete_sku_keys() {
    local id=$1 k tag port keys
    for ((k = 0; k < MAX_SHARDS; k++)); do
        tag=$(shard_tag "$id" "$k")
        port=${shard_port[$id.$k]}
        mapfile -t keys < <(rnode "$port" CLUSTER GETKEYSINSLOT "${shard_slot[$id.$k]}" 100000 | grep -F "{$tag}:" || true)
        if ((${#keys[@]})); then rnode "$port" DEL "${keys[@]}" >/dev/null || return 1; fi
    done
}

# ---- the producer and the three sales --------------------------------------------------------------

scripts/stack.sh topic create "$bench_topic" 4 >/dev/null || die "cannot create topic $bench_topic"
topic_made=1
admin_token=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
port=$(free_port)
for n in "${SHARD_COUNTS[@]}"; do skus_made+=("${sku_of[$n]}"); done
HTTP_ADDR=127.0.0.1 HTTP_PORT=$port ADMIN_TOKEN=$admin_token PAYMENT_TOKEN=$admin_token \
    WORKER_ID=shards-bench-$$ KAFKA_TOPIC=$bench_topic SALE_SHARDS_MAX=$MAX_SHARDS \
    bin/producer >"$tmp/producer.log" 2>&1 &
prod_pid=$!

producer_failed() {
    say "--- the producer's log (last 20 lines):" >&2
    tail -n 20 "$tmp/producer.log" >&2 || true
    die "$1"
}

ok=0
code=""
for ((t = 0; t < 300 && ok < 5; t++)); do
    kill -0 "$prod_pid" 2>/dev/null || producer_failed "the producer exited at start"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/readyz" || true)
    if [[ $code == 200 ]]; then ok=$((ok + 1)); else ok=0; sleep 0.2; fi
done
((ok >= 5)) || producer_failed "the producer was not ready within 60 s (/readyz: $code)"

# shard_stock SKU K: the units in stock on shard K.
shard_stock() { rnode "${shard_port[$1.$2]}" HGET "{$(shard_tag "$1" "$2")}:sale" stock; }

declare -A stock0
for n in "${SHARD_COUNTS[@]}"; do
    id=${sku_of[$n]}
    out=$(curl -s -w ' %{http_code}' --max-time 15 -X POST "http://127.0.0.1:$port/v1/skus" \
        -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
        -d "{\"sku_id\":$id,\"stock\":$STOCK_MAX,\"per_user_limit\":0,\"pay_timeout_s\":$PAY_TIMEOUT_S,\"shards\":$n}" || true)
    [[ $out == *' 201' ]] || producer_failed "POST /v1/skus for sku $id with $n shards answered: ${out:-nothing}"
    for ((k = 0; k < n; k++)); do
        stock0[$id.$k]=$(shard_stock "$id" "$k")
        [[ ${stock0[$id.$k]} =~ ^[1-9][0-9]*$ ]] || die "shard $k of sku $id has no stock after the open (${stock0[$id.$k]:-none})"
    done
done

# ---- the runs ---------------------------------------------------------------------------------------

# "cpu_seconds evalsha_calls" of every primary, in prim_ports' order, one pair a line.
redis_counters() {
    local p
    for p in "${prim_ports[@]}"; do
        rnode "$p" INFO cpu commandstats | tr -d '\r' | awk -F'[:=,]' '
            $1 == "used_cpu_user" || $1 == "used_cpu_sys" { s += $2 }
            $1 == "cmdstat_evalsha" { e = $3 }
            END { if (s == "") exit 1; printf "%.6f %d\n", s, e }' || die "INFO failed on primary $redis_host:$p"
    done
}

# run_wrk N SECONDS OUT: wrk on the sale with N shards; its orders-result line, then per primary i
# (1..NP) cpuI= (CPU seconds) and evI= (EVALSHA calls), their sums cpu= and ev=, and the
# producer's CPU ticks, appended to OUT.
run_wrk() {
    local n=$1 secs=$2 out=$3 p0 p1 line i extra="" cs=0 es=0
    local -a r0 r1
    mapfile -t r0 < <(redis_counters)
    p0=$(proc_ticks "$prod_pid")
    ORDERS_SKU=${sku_of[$n]} ORDERS_THREADS=$THREADS ORDERS_USERS=$USERS \
        wrk -t "$THREADS" -c "$CONNS" -d "${secs}s" --timeout 5s -s bench/orders.lua \
        "http://127.0.0.1:$port" >"$tmp/wrk.out" 2>&1 || true
    mapfile -t r1 < <(redis_counters)
    p1=$(proc_ticks "$prod_pid")
    line=$(grep '^orders-result ' "$tmp/wrk.out") || {
        cat "$tmp/wrk.out" >&2
        producer_failed "wrk gave no result"
    }
    ((${#r0[@]} == NP && ${#r1[@]} == NP)) || die "could not read INFO of every primary"
    for ((i = 0; i < NP; i++)); do
        local c e
        c=$(calc "${r1[i]%% *} - ${r0[i]%% *}" %.6f)
        e=$((${r1[i]##* } - ${r0[i]##* }))
        extra+=" cpu$((i + 1))=$c ev$((i + 1))=$e"
        cs=$(calc "$cs + $c" %.6f)
        es=$((es + e))
    done
    echo "$line$extra cpu=$cs ev=$es ticks=$((p1 - p0))" >>"$out"
}

# fig N NUM DEN [SCALE]: the median over the runs of N shards of NUM x SCALE / DEN (their fields).
fig() {
    awk -v num="$2" -v den="$3" -v scale="${4:-1}" '{
        for (i = 2; i <= NF; i++) { split($i, p, "="); f[p[1]] = p[2] }
        print (f[den] > 0) ? f[num] * scale / f[den] : 0 }' "$tmp/wrk.$1" | median
}

wrk_cmd="wrk -t $THREADS -c $CONNS -d ${SECONDS_PER_RUN}s --timeout 5s -s bench/orders.lua http://127.0.0.1:$port"
say "shards_bench: one SKU with 1, 2, 3 shards on a Redis Cluster of $NP primaries; $RUNS run(s) of ${SECONDS_PER_RUN}s per sale, after ${WARMUP_S}s of warm-up"
line="  primaries:"
for p in "${prim_ports[@]}"; do line+=" ${pname[$p]} $redis_host:$p (slots ${prim_slots[$p]}),"; done
say "${line%,}"
for n in "${SHARD_COUNTS[@]}"; do
    id=${sku_of[$n]}
    line="  N=$n: sku $id, shards"
    for ((k = 0; k < MAX_SHARDS; k++)); do
        mark=""
        ((k < n)) || mark=" (unused)"
        line+=" $k {$(shard_tag "$id" "$k")} slot ${shard_slot[$id.$k]} on ${pname[${shard_port[$id.$k]}]}$mark;"
    done
    say "${line%;}"
done
say "  stock $STOCK_MAX over the shards, no per-user limit; buyers 1..$USERS, home shard user_id mod N"

for n in "${SHARD_COUNTS[@]}"; do
    run_wrk "$n" "$WARMUP_S" "$tmp/warmup.$n"
    [[ $(kv "$(tail -n 1 "$tmp/warmup.$n")" c202) -gt 0 ]] || producer_failed "the sale with $n shards accepted nothing in the warm-up"
done

for ((r = 1; r <= RUNS; r++)); do
    for n in "${SHARD_COUNTS[@]}"; do
        run_wrk "$n" "$SECONDS_PER_RUN" "$tmp/wrk.$n"
        l=$(tail -n 1 "$tmp/wrk.$n")
        acc=$(kv "$l" c202)
        ((acc > 0)) || producer_failed "the sale with $n shards accepted nothing in round $r: $l"
        per=""
        for ((i = 1; i <= NP; i++)); do per+=" P$i $(calc "d($(kv "$l" "cpu$i") * 1e6, $acc)" %.2f),"; done
        say "  round $r/$RUNS, N=$n: $(calc "d($acc, $(kv "$l" duration_us)) * 1e6")/s accepted" \
            "(409: $(kv "$l" c409), other: $(kv "$l" other), socket errors: $(($(kv "$l" connect_err) + $(kv "$l" read_err) + $(kv "$l" write_err) + $(kv "$l" timeout_err))));" \
            "Redis us of CPU per accepted order:$per sum $(calc "d($(kv "$l" cpu) * 1e6, $acc)" %.2f)"
    done
done

# ---- report -----------------------------------------------------------------------------------------

HZ=$(getconf CLK_TCK)
declare -A acc_s us us_sum ev_sum prod_us ceil ceil_sale
for n in "${SHARD_COUNTS[@]}"; do
    id=${sku_of[$n]}
    acc_s[$n]=$(fig "$n" c202 duration_us 1e6)
    us_sum[$n]=$(fig "$n" cpu c202 1e6)
    ev_sum[$n]=$(fig "$n" ev c202)
    prod_us[$n]=$(fig "$n" ticks c202 "$(calc "1e6 / $HZ" %.1f)")
    ceil_sale[$n]=""
    for ((i = 1; i <= NP; i++)); do
        p=${prim_ports[i - 1]}
        us[$n.$i]=$(fig "$n" "cpu$i" c202 1e6)
        ceil[$n.$i]=-
        for ((k = 0; k < n; k++)); do
            [[ ${shard_port[$id.$k]} == "$p" ]] || continue
            ceil[$n.$i]=$(calc "d(1e6, ${us[$n.$i]})")
            if [[ -z ${ceil_sale[$n]} ]] || ((ceil[$n.$i] < ceil_sale[$n])); then ceil_sale[$n]=${ceil[$n.$i]}; fi
        done
    done
done

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
say ""
say "==== one hot SKU over 1, 2, 3 shards on a Redis Cluster of $NP primaries (issue 17 part 3) ===="
say "machine: ${cpu_model:-unknown CPU}, $(nproc) cores (all six Redis nodes, Kafka, PostgreSQL, the producer and wrk on them)"
say "command: $cmdline"
say "load: $wrk_cmd (ORDERS_SKU=the sale's sku, ORDERS_USERS=$USERS, ORDERS_THREADS=$THREADS), POST /v1/orders qty 1, no Idempotency-Key"
say "medians of $RUNS run(s) of ${SECONDS_PER_RUN}s per number of shards; the runs of the three sales interleaved (round by round)"
say "Redis CPU = used_cpu_user + used_cpu_sys of each primary's process (INFO cpu; replicas not counted)"
say ""
hdr=$(printf '%2s %10s |' N "accepted/s")
for ((i = 1; i <= NP; i++)); do hdr+=$(printf ' %7s' "P$i"); done
hdr+=$(printf ' %7s %6s |' sum calls)
for ((i = 1; i <= NP; i++)); do hdr+=$(printf ' %8s' "P$i"); done
hdr+=$(printf ' %8s | %8s' sale producer)
grp=$(printf '%13s |' "")
w1=$((NP * 8 + 15))
w2=$((NP * 9 + 9))
grp+=$(printf " %-$((w1 - 1))s| %-$((w2 - 1))s| %s" "Redis CPU us per accepted order" "implied ceiling, orders/s" "us/order")
say "$grp"
say "$hdr"
for n in "${SHARD_COUNTS[@]}"; do
    row=$(printf '%2s %10s |' "$n" "$(calc "${acc_s[$n]}")")
    for ((i = 1; i <= NP; i++)); do row+=$(printf ' %7s' "$(calc "${us[$n.$i]}" %.2f)"); done
    row+=$(printf ' %7s %6s |' "$(calc "${us_sum[$n]}" %.2f)" "$(calc "${ev_sum[$n]}" %.3f)")
    for ((i = 1; i <= NP; i++)); do row+=$(printf ' %8s' "${ceil[$n.$i]}"); done
    row+=$(printf ' %8s | %8s' "${ceil_sale[$n]}" "$(calc "${prod_us[$n]}" %.1f)")
    say "$row"
done
line="  primaries:"
for p in "${prim_ports[@]}"; do line+=" ${pname[$p]} = $redis_host:$p,"; done
say "${line%,}"
say "  sum: the median over the runs of the CPU of all $NP primaries per accepted order; calls: script calls"
say "  (EVALSHA, reserve and confirm batches) per accepted order, all primaries"
say "  implied ceiling: 10^6 / that primary's us per accepted order = the sale's orders/s at which the"
say "  primary would be busy one whole core (only primaries that serve a shard; '-' serves none); sale: the"
say "  lowest of them. DERIVED FROM CPU, NOT MEASURED by saturating the primaries: $(nproc) cores cannot run"
say "  $NP primaries flat out next to the rest, so the total scale-out is not shown here; the per-primary"
say "  figures and their sum are what is measured"
say "  producer: the producer's CPU per accepted order (/proc/PID/stat)"
for n in "${SHARD_COUNTS[@]}"; do
    id=${sku_of[$n]}
    total=0
    for ((k = 0; k < n; k++)); do total=$((total + stock0[$id.$k] - $(shard_stock "$id" "$k"))); done
    line="  N=$n, units sold per shard ($total in all):"
    xfers=0
    for ((k = 0; k < n; k++)); do
        sold=$((stock0[$id.$k] - $(shard_stock "$id" "$k")))
        line+=" shard $k (${pname[${shard_port[$id.$k]}]}) $(calc "d($sold * 100, $total)" %.1f)%,"
        xfers=$((xfers + $(rnode "${shard_port[$id.$k]}" EXISTS "{$(shard_tag "$id" "$k")}:xfer")))
    done
    line=${line%,}
    if ((xfers)); then line+="; transfers: $xfers shards hold some (units moved)"; else line+="; transfers: none"; fi
    say "$line"
done
say ""
verdict() { if [[ $(calc "($1) ? 1 : 0") == 1 ]]; then echo PASS; else echo MISS; fi; }
printf '%-58s %-30s %-10s %s\n' "target (issue 17 part 3)" "measured" "goal" "result"
for n in "${SHARD_COUNTS[@]}"; do
    ((n > 1)) || continue
    o=$(calc "d(${us_sum[$n]}, ${us_sum[1]}) - 1" %.4f)
    printf '%-58s %-30s %-10s %s\n' "Redis CPU per order, all primaries, $n shards over 1 shard" \
        "$(calc "${us_sum[$n]}" %.2f) / $(calc "${us_sum[1]}" %.2f) - 1 = $(calc "$o * 100" %+.1f)%" \
        "<= +$(calc "$GOAL_OVERHEAD * 100")%" "$(verdict "$o <= $GOAL_OVERHEAD")"
done
say "(benchmarks inform, they do not fail the build; the machine is shared, so figures vary run to run)"
