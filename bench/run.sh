#!/usr/bin/env bash
# run.sh - runs each benchmark binary given (make bench) and prints its figures.
# Benchmarks report medians of repeated runs; they are never timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in "$@"; do
    echo "=== $(basename "$b")"
    "$b"
done
