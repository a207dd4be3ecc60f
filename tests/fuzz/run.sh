#!/usr/bin/env bash
# run.sh - the fuzz suite: each libFuzzer target of tests/fuzz/ on its corpus and regressions.
#
# For every target tests/fuzz/fuzz_NAME.c:
#   1. every file of tests/fuzz/corpus/fuzz_NAME/ and tests/fuzz/regressions/fuzz_NAME/ is run
#      once through the libFuzzer build (build/fuzz/fuzz_NAME, clang) and through the gcc ASan
#      build of the same target (build/asan/fuzz/fuzz_NAME, tests/fuzz/replay.c): deterministic;
#   2. libFuzzer fuzzes it for FUZZ_SECONDS (default 20; 0 skips this step), starting from both
#      directories, with tests/fuzz/json.dict. New inputs go to a scratch directory, so the kept
#      corpus changes only with --merge (which adds the inputs that bring new coverage).
# A crash, a broken invariant, a leak, a timeout or an out-of-memory fails the target; its input
# is kept and named: copy it into tests/fuzz/regressions/fuzz_NAME/ and fix the module.
# Prints `ok - ...` / `not ok - ...` per check and, last, `N passed, M failed`.
# Usage: tests/fuzz/run.sh [--merge]      (build first: make fuzz-targets, make SAN=1 tests)
set -uo pipefail
cd "$(dirname "$0")/../.."
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
MERGE=0
case "${1:-}" in
    "") ;;
    --merge) MERGE=1 ;;
    *) echo "usage: tests/fuzz/run.sh [--merge]" >&2; exit 2 ;;
esac

pass=0
fail=0
ok() { echo "ok - $*"; pass=$((pass + 1)); }
not_ok() { echo "not ok - $*"; fail=$((fail + 1)); }

work=$(mktemp -d "${TMPDIR:-/tmp}/sp-fuzz.XXXXXX") || exit 1
keep=0
cleanup() { [ "$keep" = 1 ] && echo "# inputs and logs kept in $work" || rm -rf "$work"; }
trap cleanup EXIT

# The files of a directory, one per line (none if it is missing or empty).
files_in() { [ -d "$1" ] && find "$1" -maxdepth 1 -type f | sort; }

# A value from libFuzzer's -print_final_stats output.
stat_of() { sed -n "s/^stat::$1: *\([0-9.]*\)$/\1/p" "$2" | tail -1; }

for src in tests/fuzz/fuzz_*.c; do
    t=$(basename "$src" .c)
    corpus=tests/fuzz/corpus/$t
    regress=tests/fuzz/regressions/$t
    mapfile -t inputs < <(files_in "$corpus"; files_in "$regress")
    ncorpus=$(files_in "$corpus" | wc -l)
    nregress=$(files_in "$regress" | wc -l)
    bin=build/fuzz/$t
    replay=build/asan/fuzz/$t
    log=$work/$t

    # 1. every kept input once, through both builds
    if [ "${#inputs[@]}" -eq 0 ]; then
        not_ok "$t: no inputs in $corpus"
    elif [ ! -x "$bin" ]; then
        not_ok "$t: $bin is not built (make fuzz-targets)"
    elif "$bin" "${inputs[@]}" >"$log.replay" 2>&1; then
        ok "$t: $ncorpus corpus and $nregress regression inputs run clean (libFuzzer build)"
    else
        not_ok "$t: a kept input fails (libFuzzer build):"
        grep -E 'Running:|ERROR|invariant|SUMMARY' "$log.replay" | tail -8 | sed 's/^/#   /'
        keep=1
    fi
    if [ ! -x "$replay" ]; then
        not_ok "$t: $replay is not built (make SAN=1 tests)"
    elif "$replay" "$corpus" $([ -d "$regress" ] && echo "$regress") >"$log.gcc" 2>&1; then
        ok "$t: the same inputs run clean through the gcc ASan+UBSan build"
    else
        not_ok "$t: a kept input fails (gcc ASan+UBSan build):"
        tail -8 "$log.gcc" | sed 's/^/#   /'
        keep=1
    fi

    # 2. fuzz for FUZZ_SECONDS
    [ "$FUZZ_SECONDS" -gt 0 ] && [ -x "$bin" ] || continue
    mkdir -p "$work/$t.new" "$work/$t.crash"
    dirs=("$work/$t.new" "$corpus")
    [ -d "$regress" ] && dirs+=("$regress")
    start=$SECONDS
    timeout -k 10 $((FUZZ_SECONDS + 60)) "$bin" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
        -rss_limit_mb=2048 -max_len=9000 -dict=tests/fuzz/json.dict -print_final_stats=1 \
        -artifact_prefix="$work/$t.crash/" "${dirs[@]}" >"$log.fuzz" 2>&1
    rc=$?
    execs=$(stat_of number_of_executed_units "$log.fuzz")
    rate=$(stat_of average_exec_per_sec "$log.fuzz")
    added=$(stat_of new_units_added "$log.fuzz")
    rss=$(stat_of peak_rss_mb "$log.fuzz")
    last=$(grep -E '^#[0-9]+' "$log.fuzz" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\) .*/\1/p' <<<"$last")
    found=$(find "$work/$t.crash" -type f | head -1)
    if [ "$rc" -eq 0 ] && [ -z "$found" ] && [ -n "$execs" ]; then
        ok "$t: fuzzed $((SECONDS - start)) s, ${execs} execs (${rate}/s), corpus ${corp:-?} (+${added:-0} new), cov ${cov:-?}, peak RSS ${rss:-?} MB, no crash"
    else
        not_ok "$t: fuzzing failed (exit $rc) after ${execs:-?} execs"
        grep -E 'ERROR|invariant|SUMMARY|Test unit written|Base64' "$log.fuzz" | tail -8 | sed 's/^/#   /'
        [ -n "$found" ] && echo "#   input: $found -> copy it into $regress/ and fix the module"
        keep=1
    fi
    if [ "$MERGE" = 1 ] && [ -z "$found" ]; then
        before=$ncorpus
        "$bin" -merge=1 -max_len=9000 "$corpus" "$work/$t.new" >"$log.merge" 2>&1
        echo "# $t: merged into $corpus: $before -> $(files_in "$corpus" | wc -l) inputs"
    fi
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
