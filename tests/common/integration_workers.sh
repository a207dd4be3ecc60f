#!/usr/bin/env bash
# integration_workers.sh - each worker binary starts against the real local stack, answers /healthz, /readyz
# and /metrics, refuses bad settings with one clear sentence, and drains on SIGTERM with exit 0.
# Needs var/stack.env loaded; BIN_DIR picks the build (bin or bin/asan).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN_DIR=${BIN_DIR:-bin}
pass=0
fail=0
ok() { echo "ok - $*"; pass=$((pass + 1)); }
not_ok() { echo "not ok - $*"; fail=$((fail + 1)); }
check() { local name=$1; shift; if "$@"; then ok "$name"; else not_ok "$name"; fi; }

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until URL answers with the wanted HTTP code (bounded).
wait_code() {
    local url=$1 want=$2 i code
    for i in $(seq 1 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url")
        [ "$code" = "$want" ] && return 0
        sleep 0.2
    done
    echo "  $url answered $code, wanted $want" >&2
    return 1
}

for w in producer consumer reaper; do
    port=$(free_port)
    log=$tmp/$w.log
    HTTP_ADDR=127.0.0.1 HTTP_PORT=$port WORKER_ID="test-$w" "$BIN_DIR/$w" >"$log" 2>&1 &
    pid=$!
    pids+=("$pid")
    check "$w answers /healthz" wait_code "http://127.0.0.1:$port/healthz" 200
    check "$w is ready once Redis, Kafka and PostgreSQL answer" wait_code "http://127.0.0.1:$port/readyz" 200
    metrics=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics")
    check "$w serves Prometheus text on /metrics" grep -q '^stockpipe_build_info{version="[^"]*"} 1$' <<<"$metrics"
    check "$w reports its memory on /metrics" grep -q '^process_resident_memory_bytes [1-9][0-9]*$' <<<"$metrics"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/no-such-path")
    check "$w answers 404 for an unknown path" test "$code" = 404
    kill -TERM "$pid"
    rc=timeout
    for i in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; rc=$?; break; fi
        sleep 0.1
    done
    check "$w drains and exits 0 on SIGTERM (got $rc)" test "$rc" = 0
    check "$w logs only JSON lines" python3 -c '
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert lines, "no log lines"
for l in lines:
    o = json.loads(l)
    assert o["level"] in ("debug", "info", "warn", "error") and o["worker"] and "msg" in o, l
' "$log"
done

# A startup error is one clear sentence naming the setting, and exit status 2.
out=$(PG_DSN= "$BIN_DIR/consumer" 2>&1); rc=$?
check "a missing PG_DSN stops the consumer with status 2 (got $rc)" test "$rc" = 2
check "the startup error names PG_DSN and the flag" grep -q 'PG_DSN is not set.*--pg-dsn' <<<"$out"
out=$(HTTP_PORT=http "$BIN_DIR/producer" 2>&1); rc=$?
check "a malformed HTTP_PORT stops the producer with status 2 (got $rc)" test "$rc" = 2
out=$(REDIS_URL=mysql://x "$BIN_DIR/reaper" 2>&1); rc=$?
check "a bad REDIS_URL stops the reaper with status 2 (got $rc)" test "$rc" = 2
check "the startup error says what REDIS_URL must look like" grep -q 'REDIS_URL must start with redis://' <<<"$out"
out=$("$BIN_DIR/consumer" --no-such-flag 2>&1); rc=$?
check "an unknown flag stops the consumer with status 2 (got $rc)" test "$rc" = 2
check "the startup error names the unknown argument" grep -q 'unexpected argument \\"--no-such-flag\\"' <<<"$out"
out=$("$BIN_DIR/producer" --help 2>&1); rc=$?
check "--help exits 0" test "$rc" = 0
check "--help lists every producer setting" bash -c 'for v in REDIS_URL KAFKA_BROKERS KAFKA_TOPIC PG_DSN HTTP_PORT WORKER_ID ADMIN_TOKEN PAYMENT_TOKEN LOG_LEVEL; do grep -q "env $v" <<<"$1" || exit 1; done' _ "$out"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
