#!/usr/bin/env bash
# migrate.sh - apply the SQL migrations sql/NNN_*.sql to a PostgreSQL database, each once.
#
#   PG_DSN='host=... dbname=...' scripts/migrate.sh
#   scripts/migrate.sh --dsn 'host=... dbname=...' [--dir DIR]
#
# Files are applied in name order, each in a single transaction together with its row in
#   schema_migrations(version text primary key, applied_at timestamptz, checksum text)
# where version is the file name without .sql (e.g. 001_init) and checksum its sha256. A file
# already recorded is skipped; if its content changed since, a warning says so (migrations are
# append-only: write a new file instead of editing an applied one). A transaction-scoped advisory
# lock makes concurrent runs (two test jobs, say) apply each file once and wait for each other.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SQL_DIR=$ROOT/sql
DSN=${PG_DSN:-}

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --dsn) DSN=${2:?--dsn needs a value}; shift 2 ;;
        --dsn=*) DSN=${1#--dsn=}; shift ;;
        --dir) SQL_DIR=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) SQL_DIR=${1#--dir=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "migrate: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf 'migrate: %s\n' "$*"; }
die() {
    printf 'migrate: error: %s\n' "$*" >&2
    exit 1
}

[[ -n $DSN ]] || die "no database: set PG_DSN or pass --dsn (e.g. . var/stack.env)"
command -v psql >/dev/null || die "psql not found (scripts/install-deps.sh installs it)"
[[ -d $SQL_DIR ]] || die "no migration directory $SQL_DIR"

# Any advisory lock key will do as long as every migrate.sh uses the same one.
LOCK_KEY=727001
PSQL=(psql "$DSN" -X -q -v ON_ERROR_STOP=1)
# Silence "relation ... already exists, skipping" NOTICEs of the idempotent DDL.
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

# The DSN as messages show it: a password (password=..., user:password@) never.
redact_dsn() { sed -E -e 's/(password[[:space:]]*=[[:space:]]*)('"'"'[^'"'"']*'"'"'|[^[:space:]]*)/\1***/g' -e 's#(://[^:/@]*:)[^@]*@#\1***@#' <<<"$1"; }

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

"${PSQL[@]}" --single-transaction -c "SELECT pg_advisory_xact_lock($LOCK_KEY)" -c "
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text        NOT NULL
)" >/dev/null || die "cannot reach the database or create schema_migrations (DSN: $(redact_dsn "$DSN"))"

# What is recorded already: "version checksum" per line.
declare -A RECORDED=()
while read -r version checksum; do
    [[ -n $version ]] && RECORDED[$version]=$checksum
done < <("${PSQL[@]}" -At -F ' ' -c "SELECT version, checksum FROM schema_migrations")

shopt -s nullglob
files=("$SQL_DIR"/[0-9][0-9][0-9]_*.sql) # glob order is name order (LC_COLLATE aside: digits first)
applied=0 skipped=0
for file in "${files[@]}"; do
    version=$(basename "$file" .sql)
    checksum=$(sha256sum <"$file" | cut -d' ' -f1)
    if [[ -n ${RECORDED[$version]:-} ]]; then
        if [[ ${RECORDED[$version]} != "$checksum" ]]; then
            printf 'migrate: warning: %s changed since it was applied (recorded sha256 %s, now %s); not re-applied\n' \
                "$version" "${RECORDED[$version]:0:12}" "${checksum:0:12}" >&2
        fi
        skipped=$((skipped + 1))
        continue
    fi
    # One transaction: take the lock, re-check under it (another run may have applied the file
    # since we looked), apply the file, record it. Any error rolls all of it back.
    # Quotes in names are doubled for the SQL literals; \i takes the path in single quotes.
    v_sql=${version//\'/\'\'}
    f_sql=${file//\'/\'\'}
    cat >"$tmp" <<EOF
SELECT pg_advisory_xact_lock($LOCK_KEY);
SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = '$v_sql') AS already_applied \gset
\if :already_applied
\echo stockpipe-migrate:already
\else
\i '$f_sql'
INSERT INTO schema_migrations (version, checksum) VALUES ('$v_sql', '$checksum');
\echo stockpipe-migrate:applied
\endif
EOF
    out=$("${PSQL[@]}" -At --single-transaction -f "$tmp") || die "$version failed; nothing of it was applied"
    if [[ $(tail -n1 <<<"$out") == stockpipe-migrate:already ]]; then
        skipped=$((skipped + 1)) # a concurrent run applied it meanwhile
    else
        say "applied $version"
        applied=$((applied + 1))
    fi
done

say "$applied applied, $skipped already there (${#files[@]} files in ${SQL_DIR#"$ROOT"/})"
