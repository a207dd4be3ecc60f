#!/usr/bin/env bash
# integration_security.sh - the workers against a Kafka that wants SASL_SSL and a PostgreSQL that
# wants TLS, and no secret in anything they print (see integration_security.py). BIN_DIR picks
# the build. Needs no shared stack: it starts a private one of its own (scripts/stack.sh with
# STACK_VAR and other ports), so the shared stack is never disturbed.
#
# Whatever happens (a failed check, a crash, Ctrl-C, SIGTERM), the EXIT trap stops the helper,
# every process it recorded in WORK/pids (only if its command line still matches) and the
# private stack, and deletes their data; the logs are kept when something failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/tests/lib/procs.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/sp-security.XXXXXX") || exit 1
chmod 755 "$work" # as root, PostgreSQL runs as `postgres` and must reach the private stack's data
mkdir -p "$work/logs"
rc=1
helper=

teardown() {
    stop_helper "$helper"
    kill_recorded "$work/pids"
    if [ -d "$work/stack" ]; then
        STACK_VAR=$work/stack "$root/scripts/stack.sh" down --purge >>"$work/logs/stack.log" 2>&1
    fi
    if [ "$rc" -eq 0 ]; then
        rm -rf "$work"
    else # the logs stay; the keys and the stack's data go
        rm -rf "$work/stack" "$work"/certs/*.key
    fi
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run_helper python3 "$here/integration_security.py" --workdir "$work" "$@"
exit "$rc"
