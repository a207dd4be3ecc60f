# procs.sh - runs a Python helper, and stops it and the processes it recorded; sourced by
# tests/chaos/chaos.sh, tests/producer/integration_faults.sh and scripts/demo.sh (their EXIT traps).

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
