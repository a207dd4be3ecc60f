#!/usr/bin/env bash
# demo.sh - `make demo`: a flash sale on the local stack, watched live, checked at the end.
#
# Starts the local stack if it is not running (scripts/stack.sh up), then tests/e2e/demo.py:
# two producers, two consumers and a reaper; a sale of 1,000 units, one per user, five seconds
# to pay; 30,000 orders from 20,000 users at once; 60% of the accepted orders paid, the rest
# left to expire; a live line while it runs; a table at the end (units sold, orders by status,
# oversold, leaked, Redis = PostgreSQL, throughput, latency, `reaper audit`). Exit status 0 only
# if every check held.
#
# Stops what it started: the workers always, the stack only if this script started it. The
# stack honours STACK_VAR and the STACK_*_PORT variables (see scripts/stack.sh), so
#   STACK_VAR=/tmp/mystack STACK_REDIS_PORT=28379 STACK_PG_PORT=28432 \
#   STACK_KAFKA_PORT=28092 STACK_KAFKA_CONTROLLER_PORT=28093 scripts/demo.sh
# runs it on a private stack. With STACK_REDIS_CLUSTER=1 its Redis is a Redis Cluster of six
# (scripts/stack.sh; a stack started without it must be stopped first, or use another STACK_VAR):
# the demo then keeps to Redis's database 0, the only one a cluster has (see tests/e2e/demo.py).
# Options after the script name go to demo.py (--help lists them).
# The workers' logs are kept in $STACK_VAR/log/demo/logs (var/log/demo/logs).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
        echo
        exec python3 tests/e2e/demo.py --help
        ;;
esac
root=$PWD
. tests/lib/procs.sh
var=${STACK_VAR:-$root/var}
[[ $var == /* ]] || var=$root/$var
work=$var/log/demo
started_stack=0
helper=
rc=1

teardown() {
    stop_helper "$helper" # demo.py stops its workers on the way out
    kill_recorded "$work/pids" # whatever a crashed demo.py left behind
    if ((started_stack)); then
        echo "demo: stopping the stack it started (data kept; make stack-clean deletes it)"
        scripts/stack.sh down >/dev/null || echo "demo: warning: scripts/stack.sh down failed"
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'rc=130; exit 130' INT
trap 'rc=143; exit 143' TERM

if ! status=$(scripts/stack.sh status 2>&1); then
    echo "demo: starting the local stack (scripts/stack.sh up)"
    started_stack=1
    if ! scripts/stack.sh up; then
        # A stack that was partly running is left as it was when `up` refused or failed (say,
        # the one Redis server runs and STACK_REDIS_CLUSTER=1 asks for a cluster).
        if grep -q ' running ' <<<"$status"; then started_stack=0; fi
        exit 1
    fi
else
    echo "demo: the local stack is running; using it"
fi
mkdir -p "$work/pids"

# In the background (run_helper), so that Ctrl-C reaches the traps at once.
run_helper python3 tests/e2e/demo.py --workdir "$work" "$@"
exit "$rc"
