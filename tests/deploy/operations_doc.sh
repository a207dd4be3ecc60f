#!/usr/bin/env bash
# operations_doc.sh - docs/operations.md names only what exists: every metric it lists is declared
# by the workers (common/*.[ch]), and every repository path it mentions is there.
# Prints "ok - ..." / "not ok - ..." and last "N passed, M failed"; exits 1 on a failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
DOC=docs/operations.md

passed=0
failed=0
report() { # report OK-OR-NOT DESCRIPTION [PROBLEMS]
    if [ "$1" = ok ]; then
        echo "ok - $2"
        passed=$((passed + 1))
    else
        echo "not ok - $2: $3"
        failed=$((failed + 1))
    fi
}

# Metric names (a histogram's series drop their _bucket/_sum/_count), each as a string in the C.
mapfile -t metrics < <(grep -o '\b\(stockpipe\|process\)_[a-z_]*[a-z]' "$DOC" |
    sed -E 's/_(bucket|sum|count)$//' | sort -u)
unknown=()
for m in "${metrics[@]}"; do
    grep -qF "\"$m" common/*.[ch] producer/*.[ch] consumer/*.[ch] reaper/*.[ch] || unknown+=("$m")
done
if [ ${#metrics[@]} -gt 0 ] && [ ${#unknown[@]} -eq 0 ]; then
    report ok "the ${#metrics[@]} metrics $DOC names are all declared in the workers' code"
else
    report no "the metrics $DOC names are all declared in the workers' code" \
        "unknown: ${unknown[*]:-none found}"
fi

# Repository paths in backquotes (var/ is made at run time; globs must match something).
mapfile -t paths < <(grep -o '`[a-z]*/[^` ]*`' "$DOC" | tr -d '`' |
    grep -E '^(deploy|docs|tests|scripts|sql|common|producer|consumer|reaper|bench)/' |
    sed -E 's/[.,:;)]+$//' | sort -u)
missing=()
for p in "${paths[@]}"; do
    compgen -G "$p" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    report ok "the ${#paths[@]} repository paths $DOC mentions exist"
else
    report no "the repository paths $DOC mentions exist" "missing: ${missing[*]}"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
