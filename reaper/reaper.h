/* reaper.h - the reaper worker: expires unpaid orders, gives returned stock back to Redis exactly
 *            once, voids lost reservations and keeps Redis equal to PostgreSQL; `reaper
 *            reconcile` and `reaper audit` by hand (docs/reaper.md).
 *
 * The worker runs its steps in turn on one thread, every REAPER_INTERVAL_MS: notice Redis data
 * loss (reconcile.h), expire (expiry.h), drain the ledger (stock_return.h); and every
 * RESV_SWEEP_INTERVAL_MS the reservation sweep (resv_sweep.h) and the clean-up of decided
 * requests (reaper_requests.h); every AUDIT_INTERVAL_MS the periodic audit behind the audit gauges
 * (audit.h). Any number of replicas may run: claims, SKIP LOCKED and advisory
 * locks split the work, and nothing one of them holds outlives it. /healthz beats between and
 * inside the steps, /readyz says whether Redis, Kafka and PostgreSQL answer, /metrics counts
 * every step. SIGTERM: the step under way finishes (a reconcile stops at its next wait, leaving
 * its sale paused for any replica to finish), Kafka is flushed, exit 0.
 */
#ifndef SP_REAPER_H
#define SP_REAPER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef enum sp_reaper_cmd {
    SP_REAPER_CMD_RUN = 0,   /* the worker */
    SP_REAPER_CMD_RECONCILE, /* `reaper reconcile [--sku ID]` */
    SP_REAPER_CMD_AUDIT,     /* `reaper audit [--pg-only]` */
} sp_reaper_cmd;

typedef struct sp_reaper_opts {
    sp_reaper_cmd cmd;
    int64_t sku_id; /* reconcile: this SKU only; 0 = every SKU */
    int pg_only;    /* audit: skip the comparison with Redis */
} sp_reaper_opts;

#define SP_REAPER_SYNOPSIS "[reconcile [--sku=ID] | audit [--pg-only]]"

/* Reads the positional arguments left by the config loader (`reconcile --sku 7`, `audit`). 0, or
 * -1 with one sentence in errbuf. */
int sp_reaper_parse_args(int nargs, char *const *args, sp_reaper_opts *opts, char *errbuf,
                         size_t errlen) __attribute__((warn_unused_result));

/* Checks settings that depend on each other (RESV_LOST_AFTER_MS against
 * KAFKA_MESSAGE_TIMEOUT_MS). 0, or -1 with one sentence naming them and the fix. */
int sp_reaper_check_config(const sp_config *cfg, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Runs what opts asks for on the calling thread and returns the exit status: the worker 0 after
 * SIGTERM; reconcile 0 when done, 1 when not (busy, failed); audit 0 when it passed, 1 on
 * violations or when it could not finish (its report on stdout says which); 2 for a startup
 * error, logged as one sentence. */
int sp_reaper_run(const sp_config *cfg, const sp_reaper_opts *opts);

#endif
