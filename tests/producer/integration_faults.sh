#!/usr/bin/env bash
# integration_faults.sh - the producer when Kafka or Redis stops, and across a Sentinel failover
# (see integration_faults.py). BIN_DIR picks the build. Needs the shared stack's env (its Kafka
# serves the Sentinel scenario); for stopping servers it starts a private stack of its own
# (scripts/stack.sh with STACK_VAR and other ports), so the shared stack is never disturbed.
#
# Whatever happens (a failed check, a crash, Ctrl-C, SIGTERM), the EXIT trap stops the helper,
# every process it recorded in WORK/pids (only if its command line still matches) and the
# private stack, and deletes their data; the logs are kept when something failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/tests/lib/procs.sh"
private_work sp-faults logs/stack.log 'sentinel/primary' 'sentinel/replica'

run_helper python3 "$here/integration_faults.py" --workdir "$work" "$@"
exit "$rc"
