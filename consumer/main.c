/* consumer/main.c - the consumer worker: applies the events topic to PostgreSQL exactly once,
 * behind the oversell guard; `consumer --replay` rebuilds a database from the log
 * (consumer/consumer.c, docs/consumer.md). */
#include "consumer.h"
#include "log.h"
#include "worker.h"

int main(int argc, char **argv) {
    sp_config cfg;
    sp_consumer_opts opts;
    char err[256];
    int status = 2;
    if (sp_worker_setup("consumer", SP_WORKER_CONSUMER, argc, argv, SP_CONSUMER_SYNOPSIS, &cfg,
                        &status) != 0)
        return status;
    if (sp_consumer_parse_args(cfg.nargs, cfg.args, &opts, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    sp_config_log(&cfg, SP_WORKER_CONSUMER);
    return sp_consumer_run(&cfg, &opts);
}
