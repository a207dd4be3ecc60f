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
private_work sp-pgf stack.log 'stack/redis' 'stack/kafka*'

run_helper python3 "$here/pg_failover.py" --workdir "$work" "$@"
exit "$rc"
