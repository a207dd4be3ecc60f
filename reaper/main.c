/* reaper/main.c - the reaper worker: expires unpaid orders and returns their stock exactly once.
 *
 * Foundation stage: it loads its settings, serves /healthz /readyz /metrics and reports whether
 * Kafka, PostgreSQL and Redis answer. Expiry, the Redis return and reconcile land with issue #5. */
#include "worker.h"

int main(int argc, char **argv) {
    return sp_worker_run_idle("reaper", SP_WORKER_REAPER,
                              SP_BACKEND_KAFKA | SP_BACKEND_PG | SP_BACKEND_REDIS, argc, argv, "");
}
