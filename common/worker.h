/* worker.h - what every worker does the same way: start-up (settings, logger, signals) and the
 *            reachability checks of its backends that feed /readyz. */
#ifndef SP_WORKER_H
#define SP_WORKER_H

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "config.h"
#include "redis_store.h"

/* Loads the settings of `worker` (an SP_WORKER_* bit) named `name`, starts the JSON logger and
 * installs the signal handlers. A worker whose synopsis is empty takes no positional arguments: one
 * is a startup error. Returns 0 when the worker should run; otherwise -1 and the status
 * to exit with in *exit_code: 0 after --help, 2 after a startup error, which it has logged as one
 * sentence naming the setting and the fix. */
int sp_worker_setup(const char *name, unsigned worker, int argc, char **argv, const char *synopsis,
                    sp_config *cfg, int *exit_code) __attribute__((warn_unused_result));

/* Which backends a worker checks. */
#define SP_BACKEND_REDIS 1u
#define SP_BACKEND_KAFKA 2u
#define SP_BACKEND_PG    4u

/* Connections kept only to answer "can this worker reach what it needs?". Owned by the worker's
 * main thread. */
typedef struct sp_backends {
    const sp_config *cfg;
    unsigned want;
    sp_redis_target redis_target;
    sp_redis *redis;
    PGconn *pg;
    rd_kafka_t *kafka;
} sp_backends;

/* Parses the settings of the wanted backends (a bad REDIS_URL is a startup error) and makes the
 * Kafka handle; connects nothing yet. -1 with errbuf. */
int sp_backends_init(sp_backends *b, const sp_config *cfg, unsigned want, char *errbuf,
                     size_t errlen) __attribute__((warn_unused_result));

/* (Re)connects and pings every wanted backend, each bounded by a short timeout, then publishes the
 * outcome to /readyz. 0 when all answered; -1 with the first failure in why. */
int sp_backends_check(sp_backends *b, char *why, size_t whylen);

void sp_backends_close(sp_backends *b);

/* The whole life of a worker whose main loop is not libevent and that has no job of its own yet:
 * setup, the health server on its own thread, the backends in `want` checked every second for
 * /readyz, until SIGTERM/SIGINT. Returns the process exit status. */
int sp_worker_run_idle(const char *name, unsigned worker, unsigned want, int argc, char **argv,
                       const char *synopsis);

#endif
