# lib.sh - the small helpers the bench scripts share; sourced (`. bench/lib.sh`) from the
# repository's root, after the script's own `cd`.
# shellcheck shell=bash

# median: the median of the numbers on stdin, one a line ("nan" when there are none).
median() {
    sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# kv LINE KEY: the value of KEY=value in LINE (nothing when absent).
kv() {
    local re="(^|[[:space:]])$2=([^[:space:]]*)"
    if [[ $1 =~ $re ]]; then echo "${BASH_REMATCH[2]}"; fi
}

# calc EXPR [FMT]: awk arithmetic printed with printf format FMT (default %.0f); d(a, b) is a / b,
# or 0 when b is 0.
calc() { awk "function d(a, b) { return b ? a / b : 0 } BEGIN { printf \"${2:-%.0f}\", $1 }"; }

# free_port: a TCP port free on 127.0.0.1 now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# proc_ticks PID: ticks (1/HZ s) of user+system CPU of PID, 0 when it is not there.
proc_ticks() {
    local line f
    if [[ -z $1 ]] || ! read -r line 2>/dev/null <"/proc/$1/stat"; then
        echo 0
        return
    fi
    read -r -a f <<<"${line##*) }" # f[0] is field 3 (state): utime is field 14, stime 15
    echo $((f[11] + f[12]))
}
