/* consumer/main.c - the consumer worker: persists order events from Kafka into PostgreSQL.
 *
 * Foundation stage: it loads its settings, serves /healthz /readyz /metrics and reports whether
 * Kafka, PostgreSQL and Redis answer. Applying events (the oversell guard) lands with issue #4. */
#include <stdio.h>

#include "http.h"
#include "log.h"
#include "worker.h"

int main(int argc, char **argv) {
    sp_config cfg;
    sp_backends backends;
    sp_http_thread *http = NULL;
    char err[512];
    int status = 2;

    if (sp_worker_setup("consumer", SP_WORKER_CONSUMER, argc, argv, "", &cfg, &status) != 0)
        return status;
    sp_config_log(&cfg, SP_WORKER_CONSUMER);
    if (sp_backends_init(&backends, &cfg, SP_BACKEND_KAFKA | SP_BACKEND_PG | SP_BACKEND_REDIS, err,
                         sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    http = sp_http_thread_start(cfg.http_addr, cfg.http_port, err, sizeof(err));
    if (http == NULL) {
        sp_error("cannot start: %s", err);
        goto out;
    }
    sp_info("consumer started; HTTP on %s:%d", cfg.http_addr, cfg.http_port);
    status = sp_worker_idle_loop(&backends);
out:
    sp_http_thread_stop(http);
    sp_backends_close(&backends);
    return status;
}
