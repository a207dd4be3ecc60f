#!/usr/bin/env bash
# run-all.sh - the whole test suite, as `make test` runs it.
#
# The build on a simulated fresh machine, unit tests, then the checks of deploy/ (the image's build, the Kubernetes manifests), then (with
# the real local stack) integration tests; unit and integration tests run for the plain build and
# the ASan+UBSan build; last the chaos suite's short pass (release build, a private stack), the
# PostgreSQL failover test, the integration suites that talk to Redis against a Redis Cluster, one
# chaos case on three Kafka brokers, a PostgreSQL standby and a Redis Cluster, and the checks of
# the stack's Redis Cluster mode.
# Starts the stack if it is not running and stops it again at the end; a stack that was already
# up is left up. Prints every suite's own output and, last, one line:
#   tests: N passed, M failed
# Usage: tests/run-all.sh [--unit-only]
set -uo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
failed_suites=()

# Runs one test program and adds its counts. cmocka prints "[  PASSED  ] N test(s)." and
# "[  FAILED  ] N test(s), listed below:"; shell suites print a last line "N passed, M failed".
run_suite() {
    local label=$1
    shift
    local out rc p f
    echo "=== $label"
    out=$("$@" 2>&1)
    rc=$?
    printf '%s\n' "$out"
    p=$(printf '%s\n' "$out" | sed -n 's/^\[  PASSED  \] \([0-9]*\) test(s)\.$/\1/p' | tail -1)
    f=$(printf '%s\n' "$out" | sed -n 's/^\[  FAILED  \] \([0-9]*\) test(s), listed below:$/\1/p' | tail -1)
    if [ -z "$p$f" ]; then
        p=$(printf '%s\n' "$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*$/\1/p' | tail -1)
        f=$(printf '%s\n' "$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*$/\2/p' | tail -1)
    fi
    p=${p:-0}
    f=${f:-0}
    # A crash or a non-zero exit with no failure counted is still a failure of one test.
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
        echo "!!! $label ran no test"
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    [ "$f" -gt 0 ] && failed_suites+=("$label")
}

# Leak checking is on; a test must free what it allocates.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# Tests sit with what they test (tests/common/, tests/producer/, tests/consumer/, tests/reaper/);
# a test's kind is its name: unit_*.c need no server, integration_*.c and integration_*.sh run
# against the local stack. tests_of KIND EXT lists them as AREA/NAME.
AREAS=(common producer consumer reaper)
tests_of() {
    local area src
    for area in "${AREAS[@]}"; do
        for src in tests/"$area"/"$1"_*."$2"; do [ -f "$src" ] && echo "$area/$(basename "$src" ."$2")"; done
    done
}

for build in release asan; do
    for name in $(tests_of unit c); do
        t=build/$build/tests/$name
        if [ -x "$t" ]; then run_suite "unit $name ($build)" "$t"; else
            echo "!!! $t was not built"
            failed=$((failed + 1))
        fi
    done
done

# The build itself (tests/checks/): `make demo` and `make test` on a simulated fresh machine; once,
# not per build; no stack.
for s in tests/checks/*.sh; do
    [ -f "$s" ] && run_suite "check $(basename "$s" .sh)" bash "$s"
done

# The container image and the Kubernetes manifests (deploy/): once, not per build; no stack.
for s in tests/deploy/*.sh; do
    [ -f "$s" ] && run_suite "deploy $(basename "$s" .sh)" bash "$s"
done

# The fuzz targets (tests/fuzz/run.sh): every kept corpus and regression input once, then a short
# libFuzzer run per target (FUZZ_SECONDS, 20 by default); once, not per build; no stack.
[ "${1:-}" != "--unit-only" ] && run_suite "fuzz (${FUZZ_SECONDS:-20} s per target)" tests/fuzz/run.sh

if [ "${1:-}" != "--unit-only" ]; then
    started_stack=0
    if ! scripts/stack.sh status >/dev/null 2>&1; then
        scripts/stack.sh up || { echo "!!! the local stack did not start"; failed=$((failed + 1)); }
        started_stack=1
    fi
    if [ -f var/stack.env ]; then
        # shellcheck disable=SC1091
        . var/stack.env
        for build in release asan; do
            for name in $(tests_of integration c); do
                t=build/$build/tests/$name
                if [ -x "$t" ]; then run_suite "integration $name ($build)" "$t"; else
                    echo "!!! $t was not built"
                    failed=$((failed + 1))
                fi
            done
            bindir=bin
            [ "$build" = asan ] && bindir=bin/asan
            for name in $(tests_of integration sh); do
                run_suite "integration $name ($build)" env BIN_DIR="$bindir" bash "tests/$name.sh"
            done
        done
    fi
    [ "$started_stack" = 1 ] && scripts/stack.sh down
    # The chaos suite's short pass (every fault kind, a short sale each): once, with the release
    # build, on a private stack of its own (about 2.5 minutes). `make chaos` runs the long one.
    run_suite "chaos short pass (release)" env BIN_DIR=bin bash tests/chaos/chaos.sh --short
    # The replicated backends (issue 16), once, with the release build, each on a private stack:
    # the PostgreSQL primary killed and its synchronous standby promoted mid-sale
    # (tests/e2e/pg_failover.sh, about 50 s), and one chaos case on the stack users run (three
    # Kafka brokers, a PostgreSQL standby, a Redis Cluster of six): the leader of the busiest
    # partition killed mid-sale (about 80 s; `make chaos-cluster` runs all six).
    run_suite "e2e pg_failover (release)" env BIN_DIR=bin bash tests/e2e/pg_failover.sh
    # The integration suites that talk to Redis, on a private stack whose Redis is a Redis Cluster
    # of six (STACK_REDIS_CLUSTER=1): the C suites, integration_workers, the producer's Python
    # suites and the demo (tests/e2e/redis_cluster_suites.sh, about 3.5 minutes).
    run_suite "e2e redis_cluster_suites (release)" env BIN_DIR=bin bash tests/e2e/redis_cluster_suites.sh
    run_suite "chaos cluster: kafka-leader-kill (release)" env BIN_DIR=bin \
        bash tests/chaos/chaos.sh --cluster --short --only kafka-leader-kill
    # scripts/stack.sh with STACK_REDIS_CLUSTER=1 on a private stack: six nodes, a primary killed
    # and replaced, lost disks, a restart (tests/chaos/stack_redis_cluster.sh, about 40 s).
    run_suite "chaos stack_redis_cluster" bash tests/chaos/stack_redis_cluster.sh
fi

echo
if [ ${#failed_suites[@]} -gt 0 ]; then
    echo "failed suites:"
    printf '  %s\n' "${failed_suites[@]}"
fi
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
