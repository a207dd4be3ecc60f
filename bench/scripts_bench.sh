#!/usr/bin/env bash
# scripts_bench.sh - what one Redis thread spends per accepted order on reserve.lua + confirm.lua:
# today's scripts (bench/baseline/, kept only here) next to common/lua/'s, in the same run (#17).
#
# Usage: bench/scripts_bench.sh        (`make bench` runs it after producer_bench.sh)
#
# Settings (environment):
#   BENCH_SCRIPT_CONNS=128  wrk's connections to the one producer under load
#   BENCH_CONNS=256         redis-benchmark's clients in the ceiling runs
#   BENCH_THREADS=2         wrk's threads
#   BENCH_SECONDS=5         length of every measured run
#   BENCH_RUNS=3            runs per measurement; every figure printed is the median of its runs
#   BENCH_WARMUP_S=5        closed-loop orders per producer before anything is measured
#   BENCH_CEILING_BATCH=    orders per reserve call in the ceiling (default: the mean batch the
#                           baseline producer sent under wrk, measured here)
#
# What it does, against the local stack (scripts/stack.sh; STACK_VAR picks a private one; started
# here and stopped at the end only if it was not running):
#   1. links a baseline producer: bin/producer's objects (build/release, from `make`) with the Lua
#      scripts embedded as the build does (scripts/embed-lua.sh), bench/baseline/reserve.lua and
#      confirm.lua in place of common/lua's; the C that builds their KEYS/ARGV is the same;
#   2. starts one producer of each (baseline, new) on ports of their own and a Kafka topic of its
#      own, opens one SKU per producer (stock 10^12, no per-user limit), sends each a probe order
#      while `redis-cli MONITOR` watches and takes the producer's own reserve EVALSHA as the
#      ceiling's template (as producer_bench.sh does);
#   3. BENCH_RUNS rounds, each producer in turn: wrk with BENCH_SCRIPT_CONNS connections, POST
#      /v1/orders without Idempotency-Key; around each run Redis's INFO cpu (used_cpu_user +
#      used_cpu_sys: every thread of the server, AOF included) and INFO commandstats (the commands
#      the scripts ran). Redis CPU per accepted order = CPU delta / orders answered 202. Orders
#      per reserve call = reserve calls / TIME calls (both scripts call TIME once per call that
#      admits an order; the producers' clock check adds one a second each);
#   4. the one-SKU ceiling, without HTTP: redis-benchmark -P 16 of each producer's captured call,
#      widened to a batch of BENCH_CEILING_BATCH orders the way the producer batches (users
#      __rand_int__, order ids bench-...-__rand_int__), on a SKU of its own whose users and resv
#      start empty every run; orders/s = calls/s x batch; a run counts only if the stock fell by
#      calls x batch. Then the same with the call as captured (one order per call);
#      The time inside the scripts is split into their Redis commands (commandstats counts a
#      script's redis.call()s as commands; the producers' few own commands are in it too) and Lua
#      itself (the rest: the interpreter, ARGV and the reply, Lua's garbage collector), and the
#      last run's top commands by time are named;
#   5. prints the figures side by side, the ratios, and PASS/MISS per target of issue 17 (Redis
#      CPU per accepted order <= 5 us; ceiling >= 2.5x the baseline's). A MISS is information, not
#      a failure; the exit status is non-zero only when the harness itself could not measure.
# It stops both producers and deletes its keys and its topic at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh # median, kv, calc, free_port, proc_ticks

WRK_CONNS=${BENCH_SCRIPT_CONNS:-128}
CONNS=${BENCH_CONNS:-256}
THREADS=${BENCH_THREADS:-2}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RUNS=${BENCH_RUNS:-3}
WARMUP_S=${BENCH_WARMUP_S:-5}
CEILING_BATCH=${BENCH_CEILING_BATCH:-}
PIPELINE=16
USERS=1000000
STOCK_MAX=1000000000000
PAY_TIMEOUT_S=600
GOAL_US=5        # Redis CPU per accepted order, us
GOAL_CEILING=2.5 # ceiling of the new scripts / the baseline's

say() { printf '%s\n' "$*"; }
die() {
    printf 'scripts_bench: error: %s\n' "$*" >&2
    exit 1
}

for v in WRK_CONNS CONNS THREADS SECONDS_PER_RUN RUNS WARMUP_S; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ -z $CEILING_BATCH || $CEILING_BATCH =~ ^[1-9][0-9]*$ ]] ||
    die "BENCH_CEILING_BATCH must be a positive integer (got '$CEILING_BATCH')"
[[ -z $CEILING_BATCH ]] || ((CEILING_BATCH <= 64)) || die "BENCH_CEILING_BATCH is at most 64 (SP_RESERVE_BATCH_MAX)"
for c in wrk redis-benchmark redis-cli curl python3 pkg-config; do
    command -v "$c" >/dev/null || die "$c not found (scripts/install-deps.sh installs it)"
done
OBJ=build/release
for f in bin/producer $OBJ/producer/main.o $OBJ/libproducer.a $OBJ/libstockpipe.a; do
    [[ -e $f ]] || die "$f is missing: run make first"
done
for f in bench/baseline/reserve.lua bench/baseline/confirm.lua; do
    [[ -f $f ]] || die "$f is missing"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/scripts-bench.XXXXXX")
started_stack=0
topic_made=0
bench_topic=stockpipe.bench.scripts.$$
pids=()
mon_pid=""
keys_made=()

cleanup() {
    local rc=$? pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ -z $mon_pid ]] || kill -TERM "$mon_pid" 2>/dev/null || true
    if ((${#keys_made[@]})); then
        rcli UNLINK "${keys_made[@]}" >/dev/null 2>&1 || say "warning: could not delete the bench's keys"
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

# ---- the stack ------------------------------------------------------------------------------------

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
env_file=$(scripts/stack.sh env)
[[ -f $env_file ]] || die "$env_file is missing after scripts/stack.sh up"
# shellcheck disable=SC1090
. "$env_file"
[[ $REDIS_URL == redis://* ]] || die "needs a redis:// REDIS_URL (got ${REDIS_URL%%://*}://...)"
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
    export REDISCLI_AUTH=$redis_pass
    auth=(-a "$redis_pass")
fi
rcli() { redis-cli -h "$redis_host" -p "$redis_port" -n "$redis_db" "$@"; }
[[ $(rcli PING 2>&1) == PONG ]] || die "Redis at $redis_host:$redis_port does not answer PING"

scripts/stack.sh topic create "$bench_topic" 4 >/dev/null || die "cannot create topic $bench_topic"
topic_made=1

# ---- the baseline producer: today's scripts embedded, everything else bin/producer's ------------

lua_files=()
for f in common/lua/*.lua; do
    case $(basename "$f") in
        reserve.lua | confirm.lua) lua_files+=("bench/baseline/$(basename "$f")") ;;
        *) lua_files+=("$f") ;;
    esac
done
scripts/embed-lua.sh "$tmp/lua_baseline.c" "${lua_files[@]}"
CC=${CC:-gcc}
"$CC" -c -o "$tmp/lua_baseline.o" "$tmp/lua_baseline.c"
# The object comes before the archives, so the linker never takes libstockpipe.a's own scripts.
# shellcheck disable=SC2046
"$CC" -o "$tmp/producer-baseline" "$OBJ/producer/main.o" "$tmp/lua_baseline.o" "$OBJ/libproducer.a" \
    "$OBJ/libstockpipe.a" $(pkg-config --libs rdkafka hiredis jansson libevent libpq) -lpthread ||
    die "cannot link the baseline producer"

# ---- the producers --------------------------------------------------------------------------------

variants=(baseline new)
declare -A bin port sku csku sha captured lua_dir pid
bin[baseline]=$tmp/producer-baseline
bin[new]=bin/producer
lua_dir[baseline]=bench/baseline
lua_dir[new]=common/lua
admin_token=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
base=$((${EPOCHREALTIME//[!0-9]/} / 1000 * 10))
i=0
for v in "${variants[@]}"; do
    i=$((i + 1))
    port[$v]=$(free_port)
    sku[$v]=$((base + i))       # the producer's SKU, ordered through HTTP
    csku[$v]=$((base + 2 + i))  # the ceiling's, in Redis only
    HTTP_ADDR=127.0.0.1 HTTP_PORT=${port[$v]} ADMIN_TOKEN=$admin_token PAYMENT_TOKEN=$admin_token \
        WORKER_ID=scripts-bench-$$-$v KAFKA_TOPIC=$bench_topic \
        "${bin[$v]}" >"$tmp/producer-$v.log" 2>&1 &
    pids+=($!)
    pid[$v]=$!
    for s in "${sku[$v]}" "${csku[$v]}"; do
        keys_made+=("{sku:$s}:sale" "{sku:$s}:users" "{sku:$s}:resv" "{sku:$s}:opening")
    done
done

producer_failed() {
    local v
    for v in "${variants[@]}"; do
        say "--- the $v producer's log (last 20 lines):" >&2
        tail -n 20 "$tmp/producer-$v.log" >&2 || true
    done
    die "$1"
}

for v in "${variants[@]}"; do
    ok=0
    for ((t = 0; t < 300 && ok < 5; t++)); do
        kill -0 "${pid[$v]}" 2>/dev/null || producer_failed "the $v producer exited at start"
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${port[$v]}/readyz" || true)
        if [[ $code == 200 ]]; then ok=$((ok + 1)); else ok=0; sleep 0.2; fi
    done
    ((ok >= 5)) || producer_failed "the $v producer was not ready within 60 s (/readyz: $code)"
    out=$(curl -s -w ' %{http_code}' --max-time 15 -X POST "http://127.0.0.1:${port[$v]}/v1/skus" \
        -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
        -d "{\"sku_id\":${sku[$v]},\"stock\":$STOCK_MAX,\"per_user_limit\":0,\"pay_timeout_s\":$PAY_TIMEOUT_S}" || true)
    [[ $out == *' 201' ]] || producer_failed "POST /v1/skus for sku ${sku[$v]} answered: ${out:-nothing}"
done

# ---- each producer's own reserve call, seen by MONITOR ---------------------------------------------

# capture V: one probe order through producer V while MONITOR watches; its EVALSHA of V's
# reserve.lua goes to captured[V] as words (after EVALSHA SHA), tab-separated.
capture() {
    local v=$1 user body line rest words=() attempt
    local word_re='^"(([^"\\]|\\.)*)"[ ]?(.*)$'
    sha[$v]=$(rcli -x SCRIPT LOAD <"${lua_dir[$v]}/reserve.lua")
    [[ ${sha[$v]} =~ ^[0-9a-f]{40}$ ]] || die "SCRIPT LOAD of ${lua_dir[$v]}/reserve.lua answered ${sha[$v]}"
    line=""
    for ((attempt = 1; attempt <= 3 && ${#line} == 0; attempt++)); do
        user=$((USERS + 1 + RANDOM))
        # redis-cli itself, not through rcli: $! must be its pid, not a subshell's
        redis-cli -h "$redis_host" -p "$redis_port" -n "$redis_db" MONITOR >"$tmp/monitor" 2>&1 &
        mon_pid=$!
        for ((t = 0; t < 50; t++)); do
            grep -q '^OK' "$tmp/monitor" && break
            sleep 0.05
        done
        body=$(curl -s --max-time 15 -X POST "http://127.0.0.1:${port[$v]}/v1/orders" \
            -H 'Content-Type: application/json' -d "{\"user_id\":$user,\"sku_id\":${sku[$v]},\"qty\":1}" || true)
        sleep 0.2
        kill -TERM "$mon_pid" 2>/dev/null || true
        wait "$mon_pid" 2>/dev/null || true
        mon_pid=""
        [[ $body == *'"status":"accepted"'* ]] || producer_failed "the $v probe order was not accepted: ${body:-no answer}"
        line=$(grep -aF "\"EVALSHA\" \"${sha[$v]}\"" "$tmp/monitor" | grep -aF "\"$user\"" | head -n 1 || true)
    done
    if [[ -z $line ]]; then
        tail -n 5 "$tmp/monitor" | cut -c1-300 >&2
        die "MONITOR did not show the $v producer's EVALSHA of ${lua_dir[$v]}/reserve.lua"
    fi
    rest=${line#*] }
    while [[ -n $rest ]]; do
        [[ $rest =~ $word_re ]] || die "cannot read MONITOR's line: $line"
        words+=("${BASH_REMATCH[1]}")
        rest=${BASH_REMATCH[3]}
    done
    # EVALSHA sha 3 sale users resv ttl refusal_ttl user qty order_id 0: one order, no key
    ((${#words[@]} == 12)) && [[ ${words[2]} == 3 && ${words[11]} == 0 ]] ||
        die "the $v producer's reserve call is not the one-order, key-less layout: $line"
    captured[$v]=$(printf '%s\t' "${words[@]:2}")
}

# template V N: the ceiling's arguments (after EVALSHA SHA) for a batch of N orders on V's ceiling
# SKU, into the array tpl.
template() {
    local v=$1 n=$2 w j ck="{sku:${csku[$1]}}"
    IFS=$'\t' read -r -a w <<<"${captured[$v]}"
    # w: numkeys sale users resv ttl refusal_ttl user qty order_id index
    tpl=(3 "$ck:sale" "$ck:users" "$ck:resv" "${w[4]}" "${w[5]}")
    for ((j = 0; j < n; j++)); do tpl+=(__rand_int__ "${w[7]}" "bench-$base-__rand_int__" 0); done
}

# ceiling_ready V: V's reserve.lua in the script cache, its ceiling sale open with the stock of the
# producer's sale, its users and reservations empty.
ceiling_ready() {
    local v=$1 ck="{sku:${csku[$1]}}" s
    s=$(rcli -x SCRIPT LOAD <"${lua_dir[$v]}/reserve.lua")
    [[ $s == "${sha[$v]}" ]] || die "SCRIPT LOAD of ${lua_dir[$v]}/reserve.lua answered $s"
    rcli DEL "$ck:users" "$ck:resv" >/dev/null # not UNLINK: no freeing in the background meanwhile
    rcli COPY "{sku:${sku[$v]}}:sale" "$ck:sale" REPLACE >/dev/null
    rcli HSET "$ck:sale" stock "$STOCK_MAX" >/dev/null
}

# Redis's CPU seconds so far (every thread: used_cpu_user + used_cpu_sys).
redis_cpu() {
    rcli INFO cpu | tr -d '\r' | awk -F: '$1 == "used_cpu_user" || $1 == "used_cpu_sys" { s += $2 } END { printf "%.6f", s }'
}
# "commands evalsha time evalsha_usec commands_usec": calls so far of every command but
# EVAL/EVALSHA/INFO (a script's own redis.call()s are counted there too), of EVALSHA, of TIME, the
# microseconds Redis spent inside EVALSHA and inside those commands. With a file argument, also
# writes "name usec" per command to it (the breakdown's top commands).
redis_calls() {
    rcli INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v per="${1:-/dev/null}" '/^cmdstat_/ {
        name = substr($1, 9); n = $3
        if (name == "evalsha") { e += n; u += $5 } else if (name != "eval" && name != "info") { c += n; cu += $5; print name, $5 > per }
        if (name == "time") t += n } END { printf "%d %d %d %d %d", c, e, t, u, cu }'
}

# run_ceiling V N CALLS: one redis-benchmark run of V's call widened to N orders; appends
# "orders_per_s redis_us_per_order" to $tmp/ceiling.V.N. Repeated (twice at most) when the stock
# did not fall by CALLS x N.
run_ceiling() {
    local v=$1 n=$2 calls=$3 out rps before after c0 c1 attempt
    template "$v" "$n"
    for ((attempt = 1; attempt <= 3; attempt++)); do
        ceiling_ready "$v"
        before=$(rcli HGET "{sku:${csku[$v]}}:sale" stock)
        c0=$(redis_cpu)
        out=$(redis-benchmark -h "$redis_host" -p "$redis_port" --dbnum "$redis_db" "${auth[@]}" \
            -c "$CONNS" -n "$calls" -P "$PIPELINE" -r "$USERS" --csv EVALSHA "${sha[$v]}" "${tpl[@]}" 2>&1) ||
            die "redis-benchmark failed: $out"
        c1=$(redis_cpu)
        after=$(rcli HGET "{sku:${csku[$v]}}:sale" stock)
        if [[ $before =~ ^[0-9]+$ && $after =~ ^[0-9]+$ ]] && ((before - after >= calls * n)); then
            rps=$(tail -n 1 <<<"$out" | cut -d, -f2 | tr -d '"')
            [[ $rps =~ ^[0-9.]+$ ]] || die "redis-benchmark printed no rate: $out"
            echo "$(calc "$rps * $n" %.1f) $(calc "d(($c1 - $c0) * 1e6, $before - $after)" %.3f)" >>"$tmp/ceiling.$v.$n"
            return 0
        fi
        say "  (ceiling run discarded: $calls calls of $n orders, stock went from ${before:-none} to ${after:-none})"
    done
    die "the ceiling of the $v script could not be measured"
}

# run_wrk V SECONDS OUT: wrk against V's producer; its orders-result line, then the deltas of
# Redis's CPU, the commands, EVALSHA calls and time inside them, TIME calls and the producer's CPU
# ticks, appended to OUT.
run_wrk() {
    local v=$1 secs=$2 out=$3 c0 c1 k0 k1 p0 p1
    c0=$(redis_cpu)
    k0=$(redis_calls "$tmp/cmds.$v.before")
    p0=$(proc_ticks "${pid[$v]}")
    ORDERS_SKU=${sku[$v]} ORDERS_THREADS=$THREADS ORDERS_USERS=$USERS \
        wrk -t "$THREADS" -c "$WRK_CONNS" -d "${secs}s" --timeout 5s -s bench/orders.lua \
        "http://127.0.0.1:${port[$v]}" >"$tmp/wrk.out" 2>&1 || true
    c1=$(redis_cpu)
    k1=$(redis_calls "$tmp/cmds.$v.after")
    p1=$(proc_ticks "${pid[$v]}")
    local line
    line=$(grep '^orders-result ' "$tmp/wrk.out") || {
        cat "$tmp/wrk.out" >&2
        producer_failed "wrk gave no result"
    }
    read -r a0 b0 t0 u0 x0 <<<"$k0"
    read -r a1 b1 t1 u1 x1 <<<"$k1"
    echo "$line redis_cpu_s=$(calc "$c1 - $c0" %.6f) cmds=$((a1 - a0)) evalsha=$((b1 - b0)) time=$((t1 - t0)) evalsha_us=$((u1 - u0)) cmds_us=$((x1 - x0)) ticks=$((p1 - p0))" >>"$out"
    # the run's top commands by time: "name us_per_accepted_order ..." (the last run's are printed)
    awk -v n="$(kv "$line" c202)" 'NR == FNR { b[$1] = $2; next } { d = $2 - b[$1]; if (d > 0 && n > 0) printf "%s %.2f\n", $1, d / n }' \
        "$tmp/cmds.$v.before" "$tmp/cmds.$v.after" | sort -k2,2 -rn | head -n 5 | tr '\n' ' ' >"$tmp/top.$v"
}

for v in "${variants[@]}"; do capture "$v"; done

say "scripts_bench: one producer per script under wrk -t $THREADS -c $WRK_CONNS, $RUNS runs of ${SECONDS_PER_RUN}s each"
say "  producers' skus: baseline ${sku[baseline]}, new ${sku[new]} (stock $STOCK_MAX, no per-user limit)"
for v in "${variants[@]}"; do
    run_wrk "$v" "$WARMUP_S" "$tmp/warmup.$v"
    [[ $(kv "$(tail -n 1 "$tmp/warmup.$v")" c202) -gt 0 ]] || producer_failed "the $v producer accepted nothing in the warm-up"
done

for ((r = 1; r <= RUNS; r++)); do
    for v in "${variants[@]}"; do
        run_wrk "$v" "$SECONDS_PER_RUN" "$tmp/wrk.$v"
        l=$(tail -n 1 "$tmp/wrk.$v")
        say "  round $r/$RUNS, $v: $(calc "d($(kv "$l" c202), $(kv "$l" duration_us)) * 1e6")/s accepted," \
            "Redis $(calc "d($(kv "$l" redis_cpu_s) * 1e6, $(kv "$l" c202))" %.2f) us of CPU per accepted order"
    done
done

HZ=$(getconf CLK_TCK)
# wrk_fig V NUM DEN [SCALE]: the median over V's runs of NUM x SCALE / DEN, fields of the runs' lines.
wrk_fig() {
    awk -v num="$2" -v den="$3" -v scale="${4:-1}" '{
        for (i = 2; i <= NF; i++) { split($i, p, "="); f[p[1]] = p[2] }
        v = (f[den] > 0) ? f[num] * scale / f[den] : 0
        print v }' "$tmp/wrk.$1" | median
}
declare -A acc us cmds evals batch prod_us in_us cmd_us
for v in "${variants[@]}"; do
    acc[$v]=$(wrk_fig "$v" c202 duration_us 1e6)
    us[$v]=$(wrk_fig "$v" redis_cpu_s c202 1e6)
    in_us[$v]=$(wrk_fig "$v" evalsha_us c202)
    cmd_us[$v]=$(wrk_fig "$v" cmds_us c202)
    cmds[$v]=$(wrk_fig "$v" cmds c202)
    evals[$v]=$(wrk_fig "$v" evalsha c202)
    batch[$v]=$(wrk_fig "$v" c202 time)
    prod_us[$v]=$(wrk_fig "$v" ticks c202 "$(calc "1e6 / $HZ" %.1f)")
done

# ---- the ceiling -----------------------------------------------------------------------------------

if [[ -z $CEILING_BATCH ]]; then
    CEILING_BATCH=$(calc "${batch[baseline]} < 1 ? 1 : (${batch[baseline]} > 64 ? 64 : ${batch[baseline]})")
    batch_why="the baseline producer's mean batch under wrk"
else
    batch_why="BENCH_CEILING_BATCH"
fi
declare -A ncalls
for n in "$CEILING_BATCH" 1; do
    for v in "${variants[@]}"; do
        # calibration: a short run sizes the measured ones to about BENCH_SECONDS
        run_ceiling "$v" "$n" "$(calc "20000 / $n + 1000")"
        ncalls[$v.$n]=$(calc "$(tail -n 1 "$tmp/ceiling.$v.$n" | cut -d' ' -f1) / $n * $SECONDS_PER_RUN + 1000")
        : >"$tmp/ceiling.$v.$n"
    done
    for ((r = 1; r <= RUNS; r++)); do
        for v in "${variants[@]}"; do run_ceiling "$v" "$n" "${ncalls[$v.$n]}"; done
    done
    [[ $n != 1 ]] || break
done
# ceil_fig V N COL: the median of column COL (1 orders/s, 2 Redis us per order) of V's runs.
ceil_fig() { cut -d' ' -f"$3" "$tmp/ceiling.$1.$2" | median; }

# ---- report -----------------------------------------------------------------------------------------

verdict() { if [[ $(calc "($1) ? 1 : 0") == 1 ]]; then echo PASS; else echo MISS; fi; }
row() { printf '  %-46s %14s %14s %10s\n' "$@"; }
say ""
say "==== Redis cost per order, today's reserve.lua + confirm.lua (bench/baseline/) vs common/lua/ (issue 17) ===="
say "medians of $RUNS runs of ${SECONDS_PER_RUN}s; Redis $redis_host:$redis_port (appendonly, everysec)"
say "one producer, wrk -t $THREADS -c $WRK_CONNS, POST /v1/orders {user_id 1..$USERS, qty 1}, no Idempotency-Key:"
row "" baseline new new/base
row "accepted orders/s" "$(calc "${acc[baseline]}")" "$(calc "${acc[new]}")" "$(calc "d(${acc[new]}, ${acc[baseline]})" %.2f)"
row "Redis CPU per accepted order (us)" "$(calc "${us[baseline]}" %.2f)" "$(calc "${us[new]}" %.2f)" "$(calc "d(${us[new]}, ${us[baseline]})" %.2f)"
row "  of which inside the scripts (us, commandstats)" "$(calc "${in_us[baseline]}" %.2f)" "$(calc "${in_us[new]}" %.2f)" "$(calc "d(${in_us[new]}, ${in_us[baseline]})" %.2f)"
row "    in their Redis commands (us)" "$(calc "${cmd_us[baseline]}" %.2f)" "$(calc "${cmd_us[new]}" %.2f)" "$(calc "d(${cmd_us[new]}, ${cmd_us[baseline]})" %.2f)"
row "    in Lua itself (us: the rest of the above)" "$(calc "${in_us[baseline]} - ${cmd_us[baseline]}" %.2f)" "$(calc "${in_us[new]} - ${cmd_us[new]}" %.2f)" \
    "$(calc "d(${in_us[new]} - ${cmd_us[new]}, ${in_us[baseline]} - ${cmd_us[baseline]})" %.2f)"
row "  outside the scripts (us: I/O, replies, AOF)" "$(calc "${us[baseline]} - ${in_us[baseline]}" %.2f)" "$(calc "${us[new]} - ${in_us[new]}" %.2f)" \
    "$(calc "d(${us[new]} - ${in_us[new]}, ${us[baseline]} - ${in_us[baseline]})" %.2f)"
row "commands run per accepted order (not EVALSHA)" "$(calc "${cmds[baseline]}" %.2f)" "$(calc "${cmds[new]}" %.2f)" ""
row "EVALSHA calls per accepted order" "$(calc "${evals[baseline]}" %.3f)" "$(calc "${evals[new]}" %.3f)" ""
row "orders per reserve call (mean)" "$(calc "${batch[baseline]}" %.1f)" "$(calc "${batch[new]}" %.1f)" ""
row "producer CPU per accepted order (us)" "$(calc "${prod_us[baseline]}" %.1f)" "$(calc "${prod_us[new]}" %.1f)" ""
for v in "${variants[@]}"; do
    say "  top commands of the last $v run (command, us per accepted order): $(cat "$tmp/top.$v" 2>/dev/null)"
done
say "one-SKU ceiling, redis-benchmark -c $CONNS -P $PIPELINE of the producer's own reserve call, no HTTP:"
for n in "$CEILING_BATCH" 1; do
    what="$n orders per call ($batch_why)"
    [[ $n != 1 ]] || what="1 order per call (the call as captured)"
    say "  $what:"
    row "  reserved orders/s" "$(calc "$(ceil_fig baseline "$n" 1)")" "$(calc "$(ceil_fig new "$n" 1)")" \
        "$(calc "d($(ceil_fig new "$n" 1), $(ceil_fig baseline "$n" 1))" %.2f)"
    row "  Redis CPU per reserved order (us)" "$(calc "$(ceil_fig baseline "$n" 2)" %.2f)" "$(calc "$(ceil_fig new "$n" 2)" %.2f)" \
        "$(calc "d($(ceil_fig new "$n" 2), $(ceil_fig baseline "$n" 2))" %.2f)"
    [[ $n != 1 ]] || break
done
say ""
printf '%-52s %-28s %-10s %s\n' "target (issue 17)" "measured" "goal" "result"
printf '%-52s %-28s %-10s %s\n' "Redis CPU per accepted order, new scripts" \
    "$(calc "${us[new]}" %.2f) us (baseline $(calc "${us[baseline]}" %.2f))" "<= $GOAL_US us" \
    "$(verdict "${us[new]} <= $GOAL_US")"
c_new=$(ceil_fig new "$CEILING_BATCH" 1)
c_base=$(ceil_fig baseline "$CEILING_BATCH" 1)
printf '%-52s %-28s %-10s %s\n' "one-SKU ceiling, new / baseline ($CEILING_BATCH orders per call)" \
    "$(calc "$c_new") / $(calc "$c_base") = $(calc "d($c_new, $c_base)" %.2f)x" ">= ${GOAL_CEILING}x" \
    "$(verdict "$c_new >= $GOAL_CEILING * $c_base")"
say "(benchmarks inform, they do not fail the build; the machine is shared, so figures vary run to run)"
