#!/usr/bin/env bash
# operations_doc.sh - the docs and the code agree, both ways:
#   docs -> code: every metric docs/operations.md lists is declared by the workers, and every
#                 repository path it mentions is there;
#   code -> docs: every metric the workers export is in docs/operations.md, and every setting of
#                 common/config.c's table has its row in the README's settings table.
# The code's lists are read from the code itself (the metric names in the workers' C, the table in
# config.c), so a metric or setting added later without its docs fails here.
# Prints "ok - ..." / "not ok - ..." and last "N passed, M failed"; exits 1 on a failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
DOC=docs/operations.md
README=README.md
CONFIG=common/config.c
SOURCES=(common/*.[ch] producer/*.[ch] consumer/*.[ch] reaper/*.[ch])

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

# The metrics the workers export: every string literal of their C that starts with a metric name,
# i.e. the name argument of each SP_METRIC_COUNTER/GAUGE/HISTOGRAM/LATENCY declaration (directly
# or through a module's wrapper macro) and the series common/metrics.c writes itself
# (process_resident_memory_bytes, stockpipe_build_info). Both checks below compare whole names
# (stockpipe_http_connections is not stockpipe_http_connections_refused_total).
mapfile -t exported < <(grep -oh '"\(stockpipe\|process\)_[a-z0-9_]*[a-z0-9]' "${SOURCES[@]}" |
    tr -d '"' | sort -u)
declare -A in_code=()
for m in "${exported[@]}"; do in_code[$m]=1; done

# docs -> code: the metric names the doc uses (a histogram's series drop their
# _bucket/_sum/_count), each exported by a worker.
mapfile -t metrics < <(grep -o '\b\(stockpipe\|process\)_[a-z0-9_]*[a-z0-9]' "$DOC" |
    sed -E 's/_(bucket|sum|count)$//' | sort -u)
unknown=()
for m in "${metrics[@]}"; do
    [ -n "${in_code[$m]:-}" ] || unknown+=("$m")
done
if [ ${#metrics[@]} -gt 0 ] && [ ${#unknown[@]} -eq 0 ]; then
    report ok "the ${#metrics[@]} metrics $DOC names are all declared in the workers' code"
else
    report no "the metrics $DOC names are all declared in the workers' code" \
        "unknown: ${unknown[*]:-none found}"
fi

# code -> docs: each exported metric appears in the doc (as itself, or as a histogram's series).
declare -A in_doc=()
while read -r name; do
    [ -n "$name" ] && in_doc[$name]=1
done < <(grep -o '\b\(stockpipe\|process\)_[a-z0-9_]*[a-z0-9]' "$DOC" |
    sed -E 'p; s/_(bucket|sum|count)$//' | sort -u)
undocumented=()
for m in "${exported[@]}"; do
    [ -n "${in_doc[$m]:-}" ] || undocumented+=("$m")
done
if [ ${#exported[@]} -gt 0 ] && [ ${#undocumented[@]} -eq 0 ]; then
    report ok "the ${#exported[@]} metrics the workers export are all in $DOC"
else
    report no "the metrics the workers export are all in $DOC" \
        "missing: ${undocumented[*]:-none found in the code}"
fi

# The settings: each entry of config.c's conf_table starts {"flag", "ENV", ...; the table is read
# as one line so that an entry wrapped by clang-format still parses. Every entry must yield its
# variable (an entry this cannot read fails the check rather than go unchecked).
table=$(sed -n '/^static const conf_opt conf_table\[\] = {/,/^};/p' "$CONFIG" | tr '\n' ' ')
mapfile -t settings < <(grep -oE '\{ *"[a-z0-9-]+", *"[A-Z][A-Z0-9_]*"' <<<"$table" |
    grep -oE '"[A-Z][A-Z0-9_]*"$' | tr -d '"')
entries=$(grep -oE '\{ *"' <<<"$table" | wc -l)
# The README's settings table: the rows of its "## Configuration" section, first cell `ENV`.
mapfile -t rows < <(awk '/^## /{in_conf = ($0 == "## Configuration")} in_conf' "$README" |
    grep -oE '^\| *`[A-Z][A-Z0-9_]*` *\|' | tr -d '|` ')
declare -A in_readme=()
for r in "${rows[@]}"; do in_readme[$r]=1; done
unlisted=()
for s in "${settings[@]}"; do
    [ -n "${in_readme[$s]:-}" ] || unlisted+=("$s")
done
if [ ${#settings[@]} -eq 0 ] || [ "${#settings[@]}" -ne "$entries" ]; then
    report no "every setting of $CONFIG has a row in $README's settings table" \
        "read ${#settings[@]} variables from $entries entries of conf_table"
elif [ ${#unlisted[@]} -eq 0 ]; then
    report ok "the ${#settings[@]} settings of $CONFIG all have a row in $README's settings table"
else
    report no "every setting of $CONFIG has a row in $README's settings table" \
        "missing: ${unlisted[*]}"
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
