# procs.sh - runs a Python helper, and stops it and the processes it recorded; sourced by
# tests/chaos/chaos.sh, tests/producer/integration_faults.sh, tests/common/integration_security.sh,
# tests/e2e/pg_failover.sh (their private work directory and EXIT trap) and scripts/demo.sh.

# run_helper COMMAND [ARG...]: runs the helper in the background, so that a signal reaches the
# caller's traps at once (bash runs them only between commands, and `wait` is interruptible), and
# waits for it. While it runs its pid is in $helper (for stop_helper in the EXIT trap); its exit
# status ends up in $rc.
run_helper() {
    "$@" &
    helper=$!
    wait "$helper"
    rc=$?
    helper=
}

# stop_helper PID: SIGTERM to the helper if it still runs (it stops its own children on the way
# out), then waits for it. PID must be a child of this shell; empty does nothing.
stop_helper() {
    local pid=$1
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
}

# kill_recorded DIR: what a crashed helper left behind. Each DIR/*.pid holds "PID NEEDLE"; the
# process gets SIGKILL only if its command line still contains NEEDLE (a recycled pid is left
# alone). The files are removed.
kill_recorded() {
    local f pid needle
    for f in "$1"/*.pid; do
        [[ -f $f ]] || continue
        read -r pid needle <"$f"
        if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"; then
            kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

# private_work PREFIX STACK_LOG [DROP...]: a scratch directory $work (under TMPDIR, named PREFIX.*,
# with $work/logs) for a helper and its private stack ($work/stack, whose `down` output goes to
# $work/STACK_LOG), and the traps that clean it up whatever happens (a failed check, a crash,
# Ctrl-C, SIGTERM): the helper is stopped, every process it recorded in $work/pids (only if its
# command line still matches) is killed, the private stack is purged; then $work is deleted when
# the helper exited 0, else only its DROP paths (globs under $work: data, keys) and the logs stay.
# Needs $root. Sets $work, $rc (1 until run_helper sets it) and $helper.
private_work() {
    local prefix=$1
    PRIVATE_STACK_LOG=$2
    shift 2
    PRIVATE_DROP=("$@")
    work=$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX") || exit 1
    chmod 755 "$work" # as root, PostgreSQL runs as `postgres` and must reach the private stack's data
    mkdir -p "$work/logs"
    rc=1
    helper=
    trap private_teardown EXIT
    trap 'rc=130; exit 130' INT
    trap 'rc=143; exit 143' TERM
}

private_teardown() {
    stop_helper "$helper"
    kill_recorded "$work/pids"
    if [[ -d $work/stack ]]; then
        STACK_VAR=$work/stack "$root/scripts/stack.sh" down --purge >>"$work/$PRIVATE_STACK_LOG" 2>&1
    fi
    if [[ $rc -eq 0 ]]; then
        rm -rf "$work"
    else
        local drop
        for drop in "${PRIVATE_DROP[@]}"; do
            # shellcheck disable=SC2086 # a glob under $work
            rm -rf "$work"/$drop
        done
    fi
    exit "$rc"
}
