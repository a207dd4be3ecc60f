/* reaper.c - the reaper worker: expires unpaid orders, gives returned stock back to Redis exactly
 *            once, voids lost reservations and keeps Redis equal to PostgreSQL; `reaper
 *            reconcile` and `reaper audit` by hand. */
#include "reaper.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit.h"
#include "clock_skew.h"
#include "expiry.h"
#include "http.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "reaper_ctx.h"
#include "reaper_requests.h"
#include "reconcile.h"
#include "restock_catchup.h"
#include "stock.h"
#include "resv_sweep.h"
#include "shard_transfers.h"
#include "signals.h"
#include "stock_return.h"

#define READY_EVERY_MS   1000 /* how often /readyz is brought up to date */
#define CHECK_TIMEOUT_MS 1000
#define FORGET_LIMIT     5000 /* decided requests deleted per sweep */
#define LOSS_CHECK_MS    200  /* how often Redis is checked for a data loss between sweeps */

static sp_metric m_sweep = SP_METRIC_LATENCY(
    "stockpipe_reaper_sweep_seconds",
    "Time one sweep took (data-loss check, expiry, ledger drain; reservation sweep when due).");
static sp_metric m_forgotten = SP_METRIC_COUNTER(
    "stockpipe_reaper_requests_forgotten_total",
    "Requests (order.expired, order.voided) deleted from reaper_requests once decided.", NULL);

int sp_reaper_parse_args(int nargs, char *const *args, sp_reaper_opts *opts, char *errbuf,
                         size_t errlen) {
    memset(opts, 0, sizeof(*opts));
    if (nargs == 0) return 0;
    if (strcmp(args[0], "reconcile") == 0) {
        opts->cmd = SP_REAPER_CMD_RECONCILE;
        for (int i = 1; i < nargs; i++) {
            const char *value = NULL;
            if (strncmp(args[i], "--sku=", 6) == 0)
                value = args[i] + 6;
            else if (strcmp(args[i], "--sku") == 0 && i + 1 < nargs)
                value = args[++i];
            if (value == NULL) {
                snprintf(errbuf, errlen, "reconcile takes only --sku=ID (got \"%.*s\")",
                         sp_config_arg_shown(args[i], 40), args[i]);
                return -1;
            }
            char *end = NULL;
            long long id = strtoll(value, &end, 10);
            if (value[0] < '1' || value[0] > '9' || *end != '\0' || id < 1 || id > SP_ID_MAX) {
                snprintf(errbuf, errlen, "--sku is \"%.40s\"; it must be a SKU id from 1 to %lld",
                         value, (long long)SP_ID_MAX);
                return -1;
            }
            opts->sku_id = id;
        }
        return 0;
    }
    if (strcmp(args[0], "audit") == 0) {
        opts->cmd = SP_REAPER_CMD_AUDIT;
        for (int i = 1; i < nargs; i++) {
            if (strcmp(args[i], "--pg-only") != 0) {
                snprintf(errbuf, errlen, "audit takes only --pg-only (got \"%.*s\")",
                         sp_config_arg_shown(args[i], 40), args[i]);
                return -1;
            }
            opts->pg_only = 1;
        }
        return 0;
    }
    snprintf(errbuf, errlen, "unknown command \"%.*s\"; the reaper takes %s",
             sp_config_arg_shown(args[0], 40), args[0], SP_REAPER_SYNOPSIS);
    return -1;
}

int sp_reaper_check_config(const sp_config *cfg, char *errbuf, size_t errlen) {
    if ((int64_t)cfg->resv_lost_after_ms < (int64_t)cfg->kafka_message_timeout_ms + 1000) {
        snprintf(errbuf, errlen,
                 "RESV_LOST_AFTER_MS (%d) must exceed KAFKA_MESSAGE_TIMEOUT_MS (%d) by at least "
                 "1000, or a reservation whose order.created may still reach Kafka would be "
                 "voided; raise RESV_LOST_AFTER_MS",
                 cfg->resv_lost_after_ms, cfg->kafka_message_timeout_ms);
        return -1;
    }
    return 0;
}

static void register_metrics(void) {
    sp_metrics_register(&m_sweep);
    sp_audit_register_metrics();
    sp_metrics_register(&m_forgotten);
    sp_expiry_register_metrics();
    sp_stock_return_register_metrics();
    sp_resv_sweep_register_metrics();
    sp_restock_catchup_register_metrics();
    sp_reconcile_register_metrics();
    sp_clock_skew_register_metrics();
}

/* /readyz: Redis, PostgreSQL and Kafka each answer (each bounded by a short timeout). */
static void check_ready(sp_reaper *rp, int *was_ready) {
    char err[512], why[600];
    int npartitions = 0;
    sp_redis *redis = sp_reaper_redis(rp, err, sizeof(err));
    PGconn *pg = NULL;
    int64_t redis_now;
    if (redis == NULL || sp_clock_redis_now_ms(redis, NULL, &redis_now, err, sizeof(err)) != 0) {
        if (redis) sp_reaper_redis_failed(rp);
        snprintf(why, sizeof(why), "redis unreachable: %s", err);
        goto not_ready;
    }
    pg = sp_reaper_pg(rp, err, sizeof(err));
    if (pg == NULL || sp_pg_ping(pg, err, sizeof(err)) != 0) {
        if (pg) sp_reaper_pg_failed(rp);
        snprintf(why, sizeof(why), "postgresql unreachable: %s", err);
        goto not_ready;
    }
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, CHECK_TIMEOUT_MS, &npartitions,
                                  err, sizeof(err)) != 0) {
        snprintf(why, sizeof(why), "kafka unreachable: %s", err);
        goto not_ready;
    }
    /* The reaper's own decisions do not read its clock (Redis's and PostgreSQL's decide), but a
     * host whose clock is off is worth an operator's look. */
    if (sp_clock_skew_exceeded(rp->cfg->clock_skew_max_ms, why, sizeof(why))) goto not_ready;
    sp_health_set_ready(1, "");
    if (*was_ready != 1) sp_info("ready: Redis, PostgreSQL and Kafka answer");
    *was_ready = 1;
    return;
not_ready:
    sp_health_set_ready(0, why);
    if (*was_ready != 0) sp_warn("not ready: %s", why);
    *was_ready = 0;
}

/* One sweep: the data-loss check, expiry, the ledger drain; the reservation sweep when due. A step
 * that fails is logged (its module counted it) and the others still run. Returns whether the
 * reservation sweep ran. */
static int sweep(sp_reaper *rp, int resv_due) {
    char err[512];
    size_t n = 0;
    int64_t budget = rp->cfg->reaper_interval_ms > 2000 ? rp->cfg->reaper_interval_ms : 2000;
    int64_t started = sp_clock_mono_ms();

    int checked = sp_reconcile_check(rp, err, sizeof(err)) == 0;
    if (!checked) sp_warn("redis data-loss check failed: %s", err);
    if (!sp_signal_stop_requested() && sp_expiry_sweep(rp, budget, &n, err, sizeof(err)) != 0)
        sp_warn("expiry sweep failed: %s", err);
    else if (n > 0)
        sp_info("expiry: %zu order.expired published", n);
    /* Nothing goes back to a Redis not confirmed to be the one the ledger's stamps describe
     * (another replica is reconciling it, or the check could not run: Redis or PostgreSQL is
     * down, and the steps that need both wait). Expiry needs only PostgreSQL and Kafka. */
    if (!checked || !rp->seen.known) {
        sp_debug("redis not confirmed yet: the ledger drain and the reservation sweep wait");
        resv_due = 0;
    } else {
        if (!sp_signal_stop_requested() &&
            sp_stock_return_drain(rp, budget, &n, err, sizeof(err)) != 0)
            sp_warn("ledger drain failed: %s", err);
        else if (n > 0)
            sp_info("ledger: %zu rows given back to Redis", n);
        if (!sp_signal_stop_requested() && sp_restock_catchup(rp, &n, err, sizeof(err)) != 0)
            sp_warn("restock catch-up failed: %s", err);
    }
    if (resv_due && !sp_signal_stop_requested()) {
        sp_resv_sweep_stats st;
        if (sp_resv_sweep(rp, &st, err, sizeof(err)) != 0)
            sp_warn("reservation sweep failed: %s", err);
        else if (st.nvoided || st.ndropped || st.nsettled || st.nreconciled)
            sp_info("reservation sweep: %zu SKUs, %zu voided, %zu entries dropped, %zu markers "
                    "settled, %zu SKUs reconciled",
                    st.nskus, st.nvoided, st.ndropped, st.nsettled, st.nreconciled);
        sp_shard_sweep sw;
        if (sp_shard_transfers_sweep(rp, &sw, err, sizeof(err)) != 0)
            sp_warn("shard transfer sweep failed: %s", err);
        else if (sw.completed || sw.aborted)
            sp_info("shard transfers: %d completed, %d given back to their donor, %d waiting",
                    sw.completed, sw.aborted, sw.waiting);
        if (sp_requests_forget_decided(rp, FORGET_LIMIT, &n, err, sizeof(err)) != 0)
            sp_warn("forgetting decided requests failed: %s", err);
        else
            sp_metric_add(&m_forgotten, (int64_t)n);
    }
    if (rp->nlocks != 0) {
        /* Every step releases what it took; one that did not would keep the reaper from ever
         * opening a new session. */
        sp_error("a step left %d advisory locks counted; dropping the session", rp->nlocks);
        rp->nlocks = 0;
        sp_reaper_pg_failed(rp);
    }
    sp_metric_observe(&m_sweep, (sp_clock_mono_ms() - started) * 1000);
    return resv_due;
}

/* The periodic audit behind the stockpipe_reaper_audit_* gauges (audit.h); its findings are logged
 * too, a clean audit only when it follows one that was not. */
static void watch(sp_reaper *rp, int *was_clean) {
    char err[512];
    sp_audit_figures fig;
    if (sp_audit_watch(rp, &fig, err, sizeof(err)) != 0) {
        if (!sp_signal_stop_requested()) sp_warn("periodic audit failed: %s", err);
        return;
    }
    if (!fig.clean)
        sp_warn("audit: %" PRId64 " units oversold and %" PRId64 " leaked in PostgreSQL; %" PRId64
                " quiet sales differ between Redis and PostgreSQL (Redis %" PRId64
                " units above, %" PRId64 " below); %" PRId64 " of %" PRId64
                " sales not compared (not quiet)",
                fig.oversold, fig.leaked, fig.ndiffering, fig.above, fig.below, fig.nunchecked,
                fig.nskus);
    else if (*was_clean != 1)
        sp_info("audit clean: %" PRId64 " SKUs, %" PRId64 " not compared (not quiet)", fig.nskus,
                fig.nunchecked);
    *was_clean = fig.clean;
}

static int run_worker(sp_reaper *rp) {
    char err[512];
    int was_ready = -1, was_clean = -1;
    int64_t next_ready = 0, next_sweep = 0, next_resv = 0, next_audit = 0, next_loss_check = 0;
    sp_http_thread *http = sp_http_thread_start(rp->cfg->http_addr, rp->cfg->http_port, err,
                                                sizeof(err));
    if (http == NULL) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    sp_info("reaper started; HTTP on %s:%d", rp->cfg->http_addr, rp->cfg->http_port);
    while (!sp_signal_stop_requested()) {
        int64_t now = sp_clock_mono_ms();
        sp_health_beat();
        if (now >= next_ready) {
            check_ready(rp, &was_ready);
            next_ready = now + READY_EVERY_MS;
        }
        /* A data loss is noticed within LOSS_CHECK_MS, not a whole REAPER_INTERVAL_MS: recovery's
         * settle wait counts from the moment it is noticed. A check that fails (Redis or
         * PostgreSQL down) waits for the next sweep's, which logs it. */
        if (now >= next_loss_check && now < next_sweep) {
            next_loss_check = now + LOSS_CHECK_MS;
            if (sp_reconcile_check(rp, err, sizeof(err)) != 0)
                next_loss_check = now + rp->cfg->reaper_interval_ms;
            now = sp_clock_mono_ms();
        }
        if (now >= next_sweep) {
            int swept_resv = sweep(rp, now >= next_resv);
            now = sp_clock_mono_ms();
            next_sweep = now + rp->cfg->reaper_interval_ms;
            if (swept_resv) next_resv = now + rp->cfg->resv_sweep_interval_ms;
        }
        if (now >= next_audit && !sp_signal_stop_requested()) {
            watch(rp, &was_clean);
            next_audit = sp_clock_mono_ms() + rp->cfg->audit_interval_ms;
        }
        (void)sp_reaper_sleep(50);
    }
    sp_health_set_ready(0, "draining");
    sp_info("stop requested: the step under way finished; flushing Kafka");
    sp_http_thread_stop(http);
    return 0;
}

static int run_reconcile(sp_reaper *rp, const sp_reaper_opts *opts) {
    char err[512];
    int busy = 0, rc;
    if (opts->sku_id)
        rc = sp_reconcile_sku(rp, opts->sku_id, "asked by hand", 1, &busy, err, sizeof(err));
    else
        rc = sp_reconcile_all(rp, "asked by hand", &busy, err, sizeof(err));
    if (rc != 0) {
        printf("reconcile failed: %s\n", err);
        return 1;
    }
    if (busy) {
        printf("reconcile not run: another reaper holds the %s lock; try again later\n",
               opts->sku_id ? "SKU's" : "reconcile");
        return 1;
    }
    if (opts->sku_id)
        printf("reconcile done: SKU %" PRId64 " rebuilt from PostgreSQL\n", opts->sku_id);
    else
        printf("reconcile done: every SKU rebuilt from PostgreSQL\n");
    return 0;
}

int sp_reaper_run(const sp_config *cfg, const sp_reaper_opts *opts) {
    sp_reaper rp;
    char err[512];
    int status = 2;
    if (sp_reaper_check_config(cfg, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    register_metrics();
    sp_stock_idem_ttls(cfg->idem_ttl_s, cfg->idem_refusal_ttl_s); /* restock.lua's memory */
    if (sp_reaper_init(&rp, cfg, 1, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    switch (opts->cmd) {
    case SP_REAPER_CMD_RUN:
        status = run_worker(&rp);
        break;
    case SP_REAPER_CMD_RECONCILE:
        status = run_reconcile(&rp, opts);
        break;
    case SP_REAPER_CMD_AUDIT: {
        sp_audit_opts aopts = {.pg_only = opts->pg_only};
        int n = sp_audit_run(&rp, &aopts, stdout, err, sizeof(err));
        if (n < 0) sp_error("audit could not finish: %s", err);
        status = n == 0 ? 0 : 1;
        break;
    }
    }
    int left = sp_reaper_close(&rp);
    if (left > 0) sp_warn("%d events were still unacknowledged by Kafka at exit", left);
    return status;
}
