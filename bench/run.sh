#!/usr/bin/env bash
# run.sh - `make bench`: runs each benchmark binary given, then the producer's HTTP benchmark
# against the local stack (bench/producer_bench.sh; its settings are at the top of that file),
# then what Redis spends per accepted order on common/lua's reserve.lua + confirm.lua next to the
# scripts before issue 17 (bench/baseline/), in one run (bench/scripts_bench.sh).
# Benchmarks report medians of repeated runs; they are never timed tests: a figure that misses a
# target is printed as such and does not fail the run. A benchmark that cannot run does.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in "$@"; do
    echo "=== $(basename "$b")"
    "$b"
done
echo "=== producer_bench"
bench/producer_bench.sh
echo "=== scripts_bench"
bench/scripts_bench.sh
