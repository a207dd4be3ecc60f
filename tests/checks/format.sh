#!/usr/bin/env bash
# format.sh - the C sources are formatted as .clang-format says: `clang-format --dry-run -Werror`
# over the files `make format` rewrites (the Makefile's FORMAT_SRC, asked from make so that the
# two lists cannot drift apart). Nothing is modified.
#
# All clean: one line "ok - ..." and "1 passed, 0 failed". Otherwise one "not ok - FILE: ..." per
# file clang-format would change (how many lines, the first of them), "0 passed, M failed" with M
# the number of such files, and a non-zero exit; `make format` rewrites them. No clang-format on
# PATH is a failure too (Debian package clang-format). The style was tuned on Debian 12's
# clang-format 14; another major version may format some lines differently, so it is named.
set -uo pipefail
cd "$(dirname "$0")/../.."

finish() {
    echo "$1 passed, $2 failed"
    [ "$2" -eq 0 ]
    exit
}

if ! command -v clang-format >/dev/null 2>&1; then
    echo "not ok - clang-format is not installed (Debian package clang-format; make deps installs it)"
    finish 0 1
fi
if [ ! -f .clang-format ]; then
    echo "not ok - no .clang-format at the top of the tree"
    finish 0 1
fi
version=$(clang-format --version | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p')
if [ "$version" != 14 ]; then
    echo "# note: .clang-format was tuned on clang-format 14; this is $(clang-format --version)"
fi

# MAKEFLAGS cleared: under `make -jN test` the parent's jobserver is not ours to use.
# shellcheck disable=SC2016 # $(FORMAT_SRC) is for make to expand
mapfile -t files < <(MAKEFLAGS= make -s --no-print-directory --eval 'print-fmt: ; @printf "%s\n" $(FORMAT_SRC)' print-fmt)
if [ "${#files[@]}" -eq 0 ]; then
    echo "not ok - the Makefile's FORMAT_SRC lists no file"
    finish 0 1
fi

failed=0
for f in "${files[@]}"; do
    if ! out=$(clang-format --dry-run -Werror --style=file "$f" 2>&1); then
        lines=$(clang-format --style=file "$f" | diff "$f" - | grep -c '^<')
        first=$(printf '%s\n' "$out" | sed -n 's/^[^:]*:\([0-9]*\):[0-9]*: error: .*/\1/p' | head -1)
        if [ -n "$first" ]; then
            [ "$lines" = 1 ] && what="1 line would change" || what="$lines lines would change"
            echo "not ok - $f: $what, the first at line $first (make format)"
        else
            echo "not ok - $f: clang-format failed: $(printf '%s\n' "$out" | head -1)"
        fi
        failed=$((failed + 1))
    fi
done
if [ "$failed" -gt 0 ]; then finish 0 "$failed"; fi
echo "ok - the ${#files[@]} C sources of FORMAT_SRC are formatted as .clang-format says"
finish 1 0
