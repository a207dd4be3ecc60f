#!/usr/bin/env bash
# demo.sh - `make demo`: starts the local stack and the three workers, shows that each is up and
# ready, then stops what it started.
#
# Foundation stage: the workers serve health and metrics and check their backends; the flash-sale
# drive (a burst of orders, payments, expiries and the final table) arrives with the order API.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/stack.sh up
# shellcheck disable=SC1091
. var/stack.env

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    scripts/stack.sh down
}
trap cleanup EXIT

mkdir -p var/log
port=${DEMO_HTTP_PORT:-18080}
for w in producer consumer reaper; do
    HTTP_ADDR=127.0.0.1 HTTP_PORT=$port WORKER_ID="demo-$w" bin/$w >"var/log/demo-$w.log" 2>&1 &
    pids+=($!)
    eval "port_$w=$port"
    port=$((port + 1))
done

printf '\n%-10s %-6s %-8s %s\n' worker port ready reason
for w in producer consumer reaper; do
    eval "p=\$port_$w"
    body=""
    for _ in $(seq 1 50); do
        body=$(curl -s --max-time 2 "http://127.0.0.1:$p/readyz" || true)
        case $body in *'"ready"'*) break ;; esac
        sleep 0.2
    done
    status=$(sed -n 's/.*"status":"\([a-z_]*\)".*/\1/p' <<<"$body")
    reason=$(sed -n 's/.*"reason":"\([^"]*\)".*/\1/p' <<<"$body")
    printf '%-10s %-6s %-8s %s\n' "$w" "$p" "${status:-down}" "$reason"
done
echo
echo "Logs: var/log/demo-*.log. Metrics: curl http://127.0.0.1:$port_producer/metrics"
