/* worker.c - what every worker does the same way: start-up (settings, logger, signals) and the
 *            reachability checks of its backends that feed /readyz. */
#include "worker.h"

#include <stdio.h>
#include <time.h>
#include <string.h>

#include "http.h"
#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "signals.h"

#define CHECK_TIMEOUT_MS 1000

int sp_worker_setup(const char *name, unsigned worker, int argc, char **argv, const char *synopsis,
                    sp_config *cfg, int *exit_code) {
    char err[512];
    sp_log_level level = SP_LOG_INFO;
    sp_log_init(name, NULL, SP_LOG_INFO);
    int rc = sp_config_load(cfg, worker, argc, argv, synopsis, err, sizeof(err));
    if (rc == SP_CONFIG_EXIT) {
        *exit_code = 0;
        return -1;
    }
    if (rc != SP_CONFIG_OK) {
        sp_error("cannot start: %s", err);
        *exit_code = 2;
        return -1;
    }
    if (cfg->nargs > 0 && (synopsis == NULL || synopsis[0] == '\0')) {
        sp_error("cannot start: unexpected argument \"%s\"; see %s --help", cfg->args[0], name);
        *exit_code = 2;
        return -1;
    }
    if (sp_log_level_parse(cfg->log_level, &level) != 0) level = SP_LOG_INFO; /* checked by load */
    sp_log_init(name, cfg->worker_id, level);
    if (sp_signal_install() != 0) {
        sp_error("cannot start: installing the SIGTERM/SIGINT handlers failed");
        *exit_code = 2;
        return -1;
    }
    return 0;
}

int sp_backends_init(sp_backends *b, const sp_config *cfg, unsigned want, char *errbuf,
                     size_t errlen) {
    memset(b, 0, sizeof(*b));
    b->cfg = cfg;
    b->want = want;
    if ((want & SP_BACKEND_REDIS) &&
        sp_redis_parse_url(cfg->redis_url, &b->redis_target, errbuf, errlen) != 0)
        return -1;
    if (want & SP_BACKEND_KAFKA) {
        rd_kafka_conf_t *conf = sp_kafka_conf_new(cfg->kafka_brokers, cfg->worker_id, cfg, errbuf,
                                                  errlen);
        if (conf == NULL) return -1;
        /* A producer handle makes no group membership; it is only asked for metadata. */
        b->kafka = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, errlen);
        if (b->kafka == NULL) {
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    }
    return 0;
}

int sp_backends_check(sp_backends *b, char *why, size_t whylen) {
    char err[512];
    int npartitions = 0;
    if (b->want & SP_BACKEND_REDIS) {
        if (b->redis && sp_redis_ping(b->redis, err, sizeof(err)) != 0) {
            sp_redis_close(b->redis);
            b->redis = NULL;
        }
        if (b->redis == NULL)
            b->redis = sp_redis_open(&b->redis_target, CHECK_TIMEOUT_MS, err, sizeof(err));
        if (b->redis == NULL) {
            snprintf(why, whylen, "redis unreachable: %s", err);
            goto not_ready;
        }
    }
    if (b->want & SP_BACKEND_PG) {
        if (b->pg && sp_pg_ping(b->pg, err, sizeof(err)) != 0) {
            PQfinish(b->pg);
            b->pg = NULL;
        }
        if (b->pg == NULL)
            b->pg = sp_pg_connect(b->cfg->pg_dsn, b->cfg->worker_id, err, sizeof(err));
        if (b->pg == NULL) {
            snprintf(why, whylen, "postgresql unreachable: %s", err);
            goto not_ready;
        }
    }
    if ((b->want & SP_BACKEND_KAFKA) &&
        sp_kafka_topic_partitions(b->kafka, b->cfg->kafka_topic, CHECK_TIMEOUT_MS, &npartitions,
                                  err, sizeof(err)) != 0) {
        snprintf(why, whylen, "kafka unreachable: %s", err);
        goto not_ready;
    }
    sp_health_set_ready(1, "");
    return 0;
not_ready:
    sp_health_set_ready(0, why);
    return -1;
}

void sp_backends_close(sp_backends *b) {
    if (b->redis) sp_redis_close(b->redis);
    if (b->pg) PQfinish(b->pg);
    if (b->kafka) rd_kafka_destroy(b->kafka);
    memset(b, 0, sizeof(*b));
}

int sp_worker_run_idle(const char *name, unsigned worker, unsigned want, int argc, char **argv,
                       const char *synopsis) {
    sp_config cfg;
    sp_backends backends;
    sp_http_thread *http = NULL;
    char err[512], why[600];
    int status = 2, was_ready = -1;
    const struct timespec tick = {0, 100 * 1000 * 1000};

    if (sp_worker_setup(name, worker, argc, argv, synopsis, &cfg, &status) != 0) return status;
    sp_config_log(&cfg, worker);
    if (sp_backends_init(&backends, &cfg, want, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    http = sp_http_thread_start(cfg.http_addr, cfg.http_port, err, sizeof(err));
    if (http == NULL) {
        sp_error("cannot start: %s", err);
        goto out;
    }
    sp_info("%s started; HTTP on %s:%d", name, cfg.http_addr, cfg.http_port);
    for (int n = 0; !sp_signal_stop_requested(); n++) {
        sp_health_beat();
        if (n % 10 == 0) {
            int ready = sp_backends_check(&backends, why, sizeof(why)) == 0;
            if (ready != was_ready) {
                if (ready)
                    sp_info("ready: every backend answers");
                else
                    sp_warn("not ready: %s", why);
                was_ready = ready;
            }
        }
        nanosleep(&tick, NULL);
    }
    sp_info("stop requested; exiting");
    status = 0;
out:
    sp_http_thread_stop(http);
    sp_backends_close(&backends);
    return status;
}
