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
private_work sp-security logs/stack.log 'stack' 'certs/*.key'

run_helper python3 "$here/integration_security.py" --workdir "$work" "$@"
exit "$rc"
