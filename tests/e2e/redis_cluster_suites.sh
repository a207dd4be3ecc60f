#!/usr/bin/env bash
# redis_cluster_suites.sh - the integration suites that talk to Redis, run against a Redis Cluster:
# a private stack of its own with STACK_REDIS_CLUSTER=1 (six nodes, 3 primaries with a replica
# each; the workers and the tests on REDIS_URL=redis-cluster://...), so the shared stack is never
# touched.
#
#   tests/e2e/redis_cluster_suites.sh [--with-reaper]
#                                 (BIN_DIR picks the workers' build, default bin; the C suites are
#                                 always build/release's; --with-reaper adds the reaper's suite on
#                                 a private cluster of its own, 4-5 minutes more)
#   make test-redis-cluster       (with --with-reaper; make test runs it without)
#
# In order, after `scripts/stack.sh up` and `. stack.env`: the C suites integration_stock_redis,
# integration_stack_smoke (tests/common/), integration_consumer, integration_replay
# (tests/consumer/), integration_admin, integration_idempotency, integration_recovering,
# integration_redis_async (tests/producer/; its destructive case only with SP_TEST_CLUSTER_KILL=1),
# integration_clock_skew, integration_stranded (tests/reaper/); the shell suite
# integration_workers.sh; the Python suites integration_api.sh and integration_http_hostile.sh
# (tests/producer/, Redis through tests/lib/testkit.py's redis_cmd / redis_each_primary); last the
# flash-sale demo (scripts/demo.sh on the running stack: its own database and topic, Redis's
# database 0) with its own checks (nothing oversold or leaked, every 202 in PostgreSQL, Redis =
# PostgreSQL, the audit).
#
# Prints each suite's output indented by two spaces, then `# SUITE: N passed, M failed (S s)`;
# last one line `N passed, M failed (...)` over all of them (a cmocka test or a Python check is one;
# the stack's start and the demo one each; a suite that crashed or ran nothing is one failure),
# as tests/run-all.sh's run_suite reads it. Exit 0 only if nothing failed.
#
# Ports: Redis 22379..22879 (cluster bus 22389..22889: the default STACK_REDIS_PORT+10000 would be
# in the ephemeral range), PostgreSQL 22432, Kafka 22092/22093; fixed, so a port taken by another
# run fails the stack's start (named in the output). 183-199 s measured on this 2-core machine (the
# stack's start 9-11 s, integration_consumer 51-60 s, the demo 14-21 s).
# Whatever happens (a failed check, a crash, Ctrl-C, SIGTERM), the EXIT trap (private_work,
# tests/lib/procs.sh) stops the suite under way and the demo's workers, and purges the private
# stack; the logs stay (in the work directory it names) when something failed.
set -uo pipefail
with_reaper=0
case ${1:-} in
    --with-reaper) with_reaper=1 ;;
    "") ;;
    *)
        echo "usage: $0 [--with-reaper]" >&2
        exit 2
        ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
# shellcheck source=tests/lib/procs.sh
. "$root/tests/lib/procs.sh"
private_work sp-redis-cluster-suites stack-down.log 'stack/redis*' 'stack/pg' 'stack/kafka*'
mkdir -p "$work/pids"
export STACK_VAR=$work/stack STACK_REDIS_CLUSTER=1
export STACK_REDIS_PORT=22379 STACK_REDIS_BUS_PORT=22389 STACK_PG_PORT=22432
export STACK_KAFKA_PORT=22092 STACK_KAFKA_CONTROLLER_PORT=22093 STACK_KAFKA_BROKERS=1
unset STACK_PG_STANDBY STACK_KAFKA_EXTRA_CONFIG STACK_PG_EXTRA_CONFIG
export BIN_DIR=${BIN_DIR:-bin}
# Leak checking as in tests/run-all.sh (for an ASan build of the workers).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
passed=0 failed=0 t_start=$SECONDS
failed_suites=()

finish() {
    local total=$((SECONDS - t_start))
    ((${#failed_suites[@]})) && echo "# failed: ${failed_suites[*]}"
    ((failed)) && echo "# logs kept in $work"
    echo "$passed passed, $failed failed (redis cluster suites, $total s)"
    rc=$((failed > 0))
    exit "$rc"
}

# suite LABEL CMD...: runs one suite in the background (so that a signal reaches the EXIT trap at
# once; $helper while it runs), prints its output indented, and adds its counts: cmocka's
# "[  PASSED  ] N test(s)." and "[  FAILED  ] N test(s), listed below:", or a last line
# "N passed, M failed" (shell and Python suites), as run_suite of tests/run-all.sh counts them.
suite() {
    local label=$1 out=$work/logs/suite.out p f skipped t=$SECONDS
    shift
    echo "=== $label"
    "$@" >"$out" 2>&1 </dev/null &
    helper=$!
    wait "$helper"
    local code=$?
    helper=
    sed 's/^/  /' "$out"
    cp "$out" "$work/logs/$(basename "$label" | tr -c 'A-Za-z0-9_.\n-' _).log"
    p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test(s)\.$/\1/p' "$out" | tail -1)
    f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test(s), listed below:$/\1/p' "$out" | tail -1)
    skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test(s), listed below:$/\1/p' "$out" | tail -1)
    if [[ -z $p$f ]]; then
        p=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*$/\1/p' "$out" | tail -1)
        f=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*$/\2/p' "$out" | tail -1)
    fi
    p=${p:-0} f=${f:-0}
    if ((code != 0 && f == 0)); then f=1; fi # a crash or a non-zero exit with nothing counted
    if ((p == 0 && f == 0)); then
        echo "  !!! $label ran no test"
        f=1
    fi
    passed=$((passed + p)) failed=$((failed + f))
    ((f)) && failed_suites+=("$label")
    echo "# $label: $p passed, $f failed${skipped:+, $skipped skipped} (exit $code, $((SECONDS - t)) s)"
}

# check LABEL CMD...: one check of this script's own (ok / not ok).
check() {
    local label=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok - $label"
    else
        failed=$((failed + 1))
        failed_suites+=("$label")
        echo "not ok - $label"
    fi
}

echo "# private Redis Cluster stack in $STACK_VAR (Redis 22379..22879, PostgreSQL 22432, Kafka 22092)"
t=$SECONDS
if ! "$root/scripts/stack.sh" up >"$work/logs/stack-up.log" 2>&1; then
    failed=$((failed + 1))
    echo "not ok - the private stack with a Redis Cluster comes up: scripts/stack.sh up failed"
    sed 's/^/  /' "$work/logs/stack-up.log" | tail -20
    finish
fi
echo "ok - the private stack with a Redis Cluster comes up ($((SECONDS - t)) s)"
passed=$((passed + 1))
# shellcheck disable=SC1091
. "$STACK_VAR/stack.env"
check "the stack's REDIS_URL names the cluster (REDIS_URL=$REDIS_URL)" \
    test "${REDIS_URL#redis-cluster://}" != "$REDIS_URL"

for name in common/integration_stock_redis common/integration_stack_smoke \
    consumer/integration_consumer consumer/integration_replay \
    producer/integration_admin producer/integration_idempotency \
    producer/integration_recovering producer/integration_redis_async \
    reaper/integration_clock_skew reaper/integration_stranded; do
    t_bin=build/release/tests/$name
    if [[ -x $t_bin ]]; then
        suite "integration $name (release)" "$t_bin"
    else
        echo "=== integration $name (release)"
        echo "  !!! $t_bin was not built (make tests)"
        failed=$((failed + 1))
        failed_suites+=("$name")
    fi
done
# The reaper's own suite starts a cluster of its own (three primaries: a flush of every primary,
# one primary restarted empty while the others keep their data): 4-5 minutes, so only with
# --with-reaper (make test-redis-cluster), not in make test's run.
if ((with_reaper)); then
    suite "integration reaper/integration_reaper (release, ITEST_REDIS_CLUSTER=1)" \
        env ITEST_REDIS_CLUSTER=1 build/release/tests/reaper/integration_reaper
fi
suite "integration common/integration_workers.sh ($BIN_DIR)" bash tests/common/integration_workers.sh
suite "integration producer/integration_api.sh ($BIN_DIR)" bash tests/producer/integration_api.sh
suite "integration producer/integration_http_hostile.sh ($BIN_DIR)" \
    bash tests/producer/integration_http_hostile.sh

# The demo on the running stack (scripts/demo.sh uses a stack that runs and leaves it up); its
# workers' pids are in $STACK_VAR/log/demo/pids, which demo.sh's own trap cleans up.
echo "=== demo (scripts/demo.sh on the cluster, $BIN_DIR)"
t=$SECONDS
scripts/demo.sh >"$work/logs/demo.out" 2>&1 </dev/null &
helper=$!
wait "$helper"
code=$?
helper=
sed 's/^/  /' "$work/logs/demo.out"
if ((code == 0)) && grep -q '^PASS: ' "$work/logs/demo.out"; then
    passed=$((passed + 1))
    echo "ok - the demo's sale on the cluster passes its checks ($((SECONDS - t)) s)"
else
    failed=$((failed + 1))
    failed_suites+=("demo")
    echo "not ok - the demo's sale on the cluster passes its checks (exit $code, $((SECONDS - t)) s)"
fi
finish
