/* consumer/main.c - the consumer worker: persists order events from Kafka into PostgreSQL.
 *
 * Foundation stage: it loads its settings, serves /healthz /readyz /metrics and reports whether
 * Kafka, PostgreSQL and Redis answer. Applying events (the oversell guard) lands with issue #4. */
#include "worker.h"

int main(int argc, char **argv) {
    return sp_worker_run_idle("consumer", SP_WORKER_CONSUMER,
                              SP_BACKEND_KAFKA | SP_BACKEND_PG | SP_BACKEND_REDIS, argc, argv, "");
}
