# procs.sh - stops a Python helper and the processes it recorded; sourced by the EXIT traps of
# tests/chaos/chaos.sh, tests/integration/producer_faults.sh and scripts/demo.sh.

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
