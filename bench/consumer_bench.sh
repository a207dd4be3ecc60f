#!/usr/bin/env bash
# consumer_bench.sh - the consumer's throughput on one hot SKU, next to the two ways PostgreSQL
# could be written without it (issue #4).
#
# Usage: bench/consumer_bench.sh        (`make bench` runs it)
#
# Settings (environment):
#   BENCH_EVENTS=1000000  order.created events preloaded into the topic
#   BENCH_RUNS=3          consumer runs; the figure printed is their median
#   BENCH_SECONDS=5       length of each pgbench run
#   BENCH_BATCH_MAX=      BATCH_MAX of the consumer (default: the consumer's own, 5000)
#
# What it does, against the local stack (scripts/stack.sh; started here and stopped at the end
# only if it was not running; STACK_VAR picks a private stack as for stack.sh):
#   1. creates a topic of its own (4 partitions, scripts/stack.sh topic create) and preloads it with
#      BENCH_EVENTS order.created events for five SKUs, 80% of them for one hot SKU, generated
#      by python3 in the event schema of docs/events.md and produced by kcat (acks=all), after
#      the five stock.set events;
#   2. BENCH_RUNS times: a fresh database (CREATE DATABASE, scripts/migrate.sh), one bin/consumer
#      in its own group, timed from its start until PostgreSQL stores every offset (lag 0); then
#      its peak RSS (VmHWM) and SIGTERM; checks the orders all arrived, once;
#   3. in one more fresh database, pgbench on the same hot SKU (custom scripts, -T BENCH_SECONDS):
#      the per-order transaction (SELECT ... FOR UPDATE, guarded UPDATE, INSERT, COMMIT) with 1
#      and with 8 clients (the better is the baseline), and the batched ceiling: 500 orders per
#      transaction with one aggregated guarded UPDATE, 1 client;
#   4. prints the three figures, the ratios and PASS/MISS against the targets (50x the per-order
#      baseline, half the batched ceiling, RSS under 64 MiB). A MISS is information, not a
#      failure; the exit status is non-zero only when the harness could not measure.
# It drops its databases and deletes its topic at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh # median

EVENTS=${BENCH_EVENTS:-1000000}
RUNS=${BENCH_RUNS:-3}
PGBENCH_SECONDS=${BENCH_SECONDS:-5}
BATCH_MAX=${BENCH_BATCH_MAX:-}
PARTITIONS=4
SKUS=5
HOT_PERCENT=80

GOAL_BASELINE_X=50 # consumer orders/s >= this x the per-order baseline
GOAL_CEILING=0.5   # consumer orders/s >= this x the batched ceiling
GOAL_RSS_MIB=64

say() { printf '%s\n' "$*"; }
die() {
    printf 'consumer_bench: error: %s\n' "$*" >&2
    exit 1
}

for v in EVENTS RUNS PGBENCH_SECONDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ -z $BATCH_MAX || $BATCH_MAX =~ ^[1-9][0-9]*$ ]] || die "BENCH_BATCH_MAX must be a positive integer"
for tool in kcat psql pgbench python3 java; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/install-deps.sh installs it)"
done
[[ -x bin/consumer ]] || die "bin/consumer is missing: run make first"

tag=$$_$(date +%s)
topic=stockpipe.bench.consumer.$tag
tmp=$(mktemp -d)
started_stack=0
consumer_pid=
dbs=()
topic_made=0

# drop_db NAME: a plain DROP makes an autovacuum worker leave the database (WITH (FORCE) may not
# signal it as a non-superuser); FORCE only as the last resort.
drop_db() {
    local i
    for i in 1 2 3 4 5; do
        psql "$PG_DSN" -X -q -c "DROP DATABASE IF EXISTS \"$1\"" >/dev/null 2>&1 && return 0
        sleep 1
    done
    psql "$PG_DSN" -X -q -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" >/dev/null 2>&1
}

cleanup() {
    set +e
    [[ -n $consumer_pid ]] && kill -9 "$consumer_pid" 2>/dev/null
    for db in "${dbs[@]}"; do drop_db "$db"; done
    ((topic_made)) && scripts/stack.sh topic delete "$topic" >/dev/null 2>&1
    if ((started_stack)); then
        scripts/stack.sh down >/dev/null || say "warning: scripts/stack.sh down failed"
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }

# ---- the stack --------------------------------------------------------------------------------

env_file=$(scripts/stack.sh env)
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
[[ -f $env_file ]] || die "$env_file is missing after scripts/stack.sh up"
# shellcheck disable=SC1090
. "$env_file"

# new_db NAME: a fresh, migrated database, remembered for the clean-up; its conninfo in $dsn.
new_db() {
    local db=sp_bench_${tag}_$1
    psql "$PG_DSN" -X -q -c "CREATE DATABASE \"$db\"" >/dev/null || die "cannot create database $db"
    dbs+=("$db")
    dsn="$PG_DSN dbname=$db"
    scripts/migrate.sh --dsn "$dsn" >/dev/null || die "migrating $db failed"
}

# ---- 1. the log -------------------------------------------------------------------------------

sku_base=$((900000000 + RANDOM * 10))
hot=$((sku_base + 1))
scripts/stack.sh topic create "$topic" "$PARTITIONS" >"$tmp/topic.log" 2>&1 ||
    { cat "$tmp/topic.log" >&2; die "cannot create topic $topic"; }
topic_made=1
say "preloading $EVENTS order.created events ($SKUS SKUs, ${HOT_PERCENT}% on SKU $hot) into $topic ($PARTITIONS partitions)"
t0=$(now)
python3 - "$EVENTS" "$sku_base" "$SKUS" "$HOT_PERCENT" >"$tmp/events.tsv" <<'EOF'
import sys
n, base, nskus, hot_percent = (int(a) for a in sys.argv[1:5])
skus = [base + 1 + i for i in range(nskus)]
ts0 = 1767225600000
out = []
for s in skus:
    out.append('%d\t{"v":1,"type":"stock.set","ts_ms":%d,"sku_id":%d,"stock":%d,'
               '"per_user_limit":0,"pay_timeout_s":600}' % (s, ts0, s, n))
for i in range(n):
    # hot_percent of each hundred orders go to the hot SKU, the rest spread over the others
    s = skus[0] if i % 100 < hot_percent else skus[1 + i % (nskus - 1)]
    ts = ts0 + 1 + i // 50  # 50 orders a millisecond
    oid = '%012x-%d-bench-%08x' % (ts, s, i)  # the shape of producer/order_id.h
    out.append('%d\t{"v":1,"type":"order.created","ts_ms":%d,"sku_id":%d,"order_id":"%s",'
               '"user_id":%d,"qty":1,"expires_ms":%d}' % (s, ts, s, oid, 1 + i, ts + 600000))
    if len(out) >= 100000:
        sys.stdout.write('\n'.join(out) + '\n')
        out = []
sys.stdout.write('\n'.join(out) + '\n')
EOF
kcat -b "$KAFKA_BROKERS" -P -t "$topic" -K $'\t' -X acks=all -X linger.ms=20 \
    -X batch.num.messages=10000 -X queue.buffering.max.messages=1000000 -l "$tmp/events.tsv" ||
    die "kcat could not produce the events"
total=$((EVENTS + SKUS))
rm -f "$tmp/events.tsv"
say "  produced $total events in $(printf '%.1f' "$(echo "$(now) - $t0" | bc)") s"

# ---- 2. the consumer --------------------------------------------------------------------------

# stored DSN: the sum of the topic's next offsets in PostgreSQL (every event applied when = total).
stored() {
    psql "$1" -X -A -t -c "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE topic = '$topic'"
}

rates=()
rss_max=0
for run in $(seq 1 "$RUNS"); do
    new_db "run$run"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    start=$(now)
    env PG_DSN="$dsn" KAFKA_TOPIC="$topic" KAFKA_DLQ_TOPIC="$KAFKA_DLQ_TOPIC" \
        KAFKA_GROUP="bench-$tag-$run" HTTP_ADDR=127.0.0.1 HTTP_PORT="$port" WORKER_ID="bench-$run" \
        LOG_LEVEL=warn ${BATCH_MAX:+BATCH_MAX=$BATCH_MAX} bin/consumer 2>"$tmp/consumer-$run.log" &
    consumer_pid=$!
    first=
    while :; do
        n=$(stored "$dsn")
        [[ -z $first && $n -gt 0 ]] && first=$(now)
        ((n >= total)) && break
        kill -0 "$consumer_pid" 2>/dev/null || { tail -5 "$tmp/consumer-$run.log" >&2; die "the consumer died"; }
        sleep 0.05
    done
    end=$(now)
    rss_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$consumer_pid/status")
    kill -TERM "$consumer_pid"
    rc=0
    wait "$consumer_pid" || rc=$?
    consumer_pid=
    ((rc == 0)) || die "the consumer exited $rc after SIGTERM (log: $(tail -2 "$tmp/consumer-$run.log"))"
    orders=$(psql "$dsn" -X -A -t -c "SELECT count(*) FROM orders WHERE status = 'pending'")
    ((orders == EVENTS)) || die "run $run stored $orders pending orders, not $EVENTS"
    secs=$(echo "$end - $start" | bc)
    rate=$(echo "$EVENTS / $secs" | bc)
    rates+=("$rate")
    ((rss_kib > rss_max)) && rss_max=$rss_kib
    say "  run $run: $rate orders/s ($(printf '%.1f' "$secs") s from start to lag 0, first commit after $(printf '%.1f' "$(echo "$first - $start" | bc)") s), peak RSS $((rss_kib / 1024)) MiB"
    drop_db "sp_bench_${tag}_run$run"
done
consumer_rate=$(printf '%s\n' "${rates[@]}" | median)

# ---- 3. pgbench ---------------------------------------------------------------------------------

new_db pgbench
psql "$dsn" -X -q -c "INSERT INTO inventory (sku_id, stock, version, supplied, per_user_limit, pay_timeout_s, created_at, updated_at) VALUES ($hot, 1000000000000, 0, 1000000000000, 0, 600, now(), now())" >/dev/null
cat >"$tmp/per_order.sql" <<EOF
BEGIN;
SELECT stock, version FROM inventory WHERE sku_id = $hot FOR UPDATE \gset
UPDATE inventory SET stock = stock - 1, version = version + 1, updated_at = now() WHERE sku_id = $hot AND version = :version AND stock >= 1;
INSERT INTO orders (order_id, user_id, sku_id, qty, status, created_at, expires_at, kafka_partition, kafka_offset) VALUES ('pgb-' || gen_random_uuid(), 1 + :client_id, $hot, 1, 'pending', now(), now() + interval '10 minutes', 0, 0);
COMMIT;
EOF
cat >"$tmp/batch500.sql" <<EOF
BEGIN;
UPDATE inventory SET stock = stock - 500, version = version + 1, updated_at = now() WHERE sku_id = $hot AND stock >= 500;
INSERT INTO orders (order_id, user_id, sku_id, qty, status, created_at, expires_at, kafka_partition, kafka_offset) SELECT 'pgb-' || gen_random_uuid(), g, $hot, 1, 'pending', now(), now() + interval '10 minutes', 0, g FROM generate_series(1, 500) AS g;
COMMIT;
EOF
tps() { # tps SCRIPT CLIENTS: pgbench's transactions per second
    pgbench "$dsn" -n -f "$1" -c "$2" -j "$(($2 < 2 ? 1 : 2))" -T "$PGBENCH_SECONDS" 2>&1 |
        sed -n 's/^tps = \([0-9.]*\) .*/\1/p'
}
per1=$(tps "$tmp/per_order.sql" 1)
per8=$(tps "$tmp/per_order.sql" 8)
batch_tps=$(tps "$tmp/batch500.sql" 1)
[[ -n $per1 && -n $per8 && -n $batch_tps ]] || die "pgbench gave no figure"
baseline=$(echo "if ($per1 > $per8) $per1 else $per8" | bc)
ceiling=$(echo "$batch_tps * 500" | bc)

# ---- 4. the figures -----------------------------------------------------------------------------

x_baseline=$(echo "scale=1; $consumer_rate / $baseline" | bc)
x_ceiling=$(echo "scale=2; $consumer_rate / $ceiling" | bc)
rss_mib=$(echo "scale=1; $rss_max / 1024" | bc)
verdict() { if [[ $(echo "$1" | bc) == 1 ]]; then echo PASS; else echo MISS; fi; }
say ""
say "consumer, $EVENTS order.created on $SKUS SKUs (${HOT_PERCENT}% on one), ${BATCH_MAX:-default} BATCH_MAX:"
say "  persisted, start to lag 0:    $consumer_rate orders/s (median of $RUNS)"
say "pgbench on the same hot SKU, ${PGBENCH_SECONDS} s each:"
say "  per-order transaction:        $(printf '%.0f' "$per1") orders/s with 1 client, $(printf '%.0f' "$per8") with 8 -> baseline $(printf '%.0f' "$baseline")"
say "  500 orders per transaction:   $(printf '%.0f' "$ceiling") orders/s with 1 client (the batched ceiling)"
say "ratios:"
say "  consumer / per-order baseline: ${x_baseline}x   (target >= ${GOAL_BASELINE_X}x)   $(verdict "$consumer_rate >= $GOAL_BASELINE_X * $baseline")"
say "  consumer / batched ceiling:    ${x_ceiling}     (target >= $GOAL_CEILING)   $(verdict "$consumer_rate >= $GOAL_CEILING * $ceiling")"
say "  consumer peak RSS:             ${rss_mib} MiB (target < $GOAL_RSS_MIB MiB)   $(verdict "$rss_max < $GOAL_RSS_MIB * 1024")"
