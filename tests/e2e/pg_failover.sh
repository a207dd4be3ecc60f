#!/usr/bin/env bash
# pg_failover.sh - the workers follow a PostgreSQL failover (tests/e2e/pg_failover.py): the primary
# of a private stack with a synchronous standby killed with -9 mid-sale, the standby promoted.
#
#   tests/e2e/pg_failover.sh          (BIN_DIR picks the build; default bin)
#
# Everything runs on a private stack of its own (scripts/stack.sh with STACK_VAR in a scratch
# directory, ports of its own, STACK_PG_STANDBY=1), so the shared stack is never touched. Whatever
# happens (a failed check, a crash, Ctrl-C, SIGTERM), the EXIT trap stops the helper, every process
# it recorded in WORK/pids (only if its command line still matches) and the private stack, and
# deletes their data; the logs are kept when a check failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/tests/lib/procs.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/sp-pgf.XXXXXX") || exit 1
chmod 755 "$work" # as root, PostgreSQL runs as `postgres` and must reach the private stack's data
rc=1
helper=

teardown() {
    stop_helper "$helper"
    kill_recorded "$work/pids"
    if [[ -d $work/stack ]]; then
        STACK_VAR=$work/stack "$root/scripts/stack.sh" down --purge >>"$work/stack.log" 2>&1
    fi
    if [[ $rc -eq 0 ]]; then
        rm -rf "$work"
    else # keep the logs (the helper named the directory); drop the data
        rm -rf "$work"/stack/redis "$work"/stack/kafka
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'rc=130; exit 130' INT
trap 'rc=143; exit 143' TERM

run_helper python3 "$here/pg_failover.py" --workdir "$work" "$@"
exit "$rc"
