#!/usr/bin/env bash
# chaos.sh - the chaos suite (tests/chaos/chaos.py): flash sales under kill -9 of workers, Kafka
# and PostgreSQL restarts and a Redis failover that loses writes, each audited once quiet; with
# --cluster on three Kafka brokers, a PostgreSQL standby and a Redis Cluster (make chaos-cluster).
#
#   tests/chaos/chaos.sh [--short] [--seed N] [--only CASE]...     (make chaos [SEED=N])
#
# BIN_DIR picks the build (default bin). Everything runs on a private stack of its own
# (scripts/stack.sh with STACK_VAR in a scratch directory and ports of its own), so the shared
# stack is never touched. Whatever happens (a failed case, a crash, Ctrl-C, SIGTERM), the EXIT
# trap stops the helper, every process it recorded in WORK/pids (only if its command line still
# matches) and the private stack, and deletes their data; the logs are kept when a case failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/tests/lib/procs.sh"
private_work sp-chaos stack.log 'stack/redis' 'stack/redis-[1-6]' 'stack/kafka*' '*/sentinel/*-data-*'

run_helper python3 "$here/chaos.py" --workdir "$work" "$@"
exit "$rc"
