/* restock_catchup.c - gives Redis the restocks PostgreSQL applied and Redis missed, once each. */
#include "restock_catchup.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "reconcile.h"
#include "signals.h"
#include "stock.h"

/* How long before IDEM_TTL_S runs out a row counts as old: restock.lua stamps an id with Redis's
 * clock when it applies it, the row carries the producer's event time, and hosts differ by up to
 * CLOCK_SKEW_MAX_MS; the margin covers that and the time between the two. */
#define OLD_MARGIN_S  600
#define CATCHUP_PAGES 20 /* pages of REAPER_BATCH rows looked at per round, at most */

static sp_metric m_applied = SP_METRIC_COUNTER(
    "stockpipe_reaper_restocks_caught_up_total",
    "Restocks PostgreSQL applied whose units Redis had not got (its write failed after the "
    "stock.add was logged), added to Redis by the reaper.",
    NULL);
static sp_metric m_errors = SP_REAPER_ERRORS("restock");

void sp_restock_catchup_register_metrics(void) {
    sp_metrics_register(&m_applied);
    sp_metrics_register(&m_errors);
}

static int stamp(sp_reaper *rp, const char *sku, const char *request_id, char *errbuf,
                 size_t errlen) {
    const char *params[] = {sku, request_id};
    return sp_reaper_exec(rp,
                          "UPDATE restocks SET applied_to_redis_at = now()"
                          " WHERE sku_id = $1::bigint AND request_id = $2"
                          "   AND applied_to_redis_at IS NULL",
                          2, params, errbuf, errlen);
}

/* A row too old for restock.lua's memory: stamped if Redis still knows its id, else its SKU is
 * rebuilt from PostgreSQL (which marks the id; the next round stamps the row). */
static int settle_old(sp_reaper *rp, int64_t sku_id, const char *sku, const char *request_id,
                      char *errbuf, size_t errlen) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku_id, "restocks");
    const char *argv[] = {"HEXISTS", key, request_id};
    redisReply *r = sp_reaper_redis_argv(rp, 3, argv, REDIS_REPLY_INTEGER, errbuf, errlen);
    if (r == NULL) return -1;
    int known = r->integer == 1;
    freeReplyObject(r);
    if (known) return stamp(rp, sku, request_id, errbuf, errlen);
    int busy = 0;
    sp_log_ctx ctx = {.sku_id = sku_id};
    SP_LOG_CTX(SP_LOG_WARN, &ctx,
               "restock %s is older than IDEM_TTL_S and Redis does not know it: rebuilding the "
               "sale from PostgreSQL",
               request_id);
    return sp_reconcile_sku(rp, sku_id, "a restock older than IDEM_TTL_S never reached Redis", 0,
                            &busy, errbuf, errlen);
}

/* One page of the round: rows after pos (stored_at as text, sku_id, request_id; stored_at "" before
 * the first), which moves past them. *nrows: rows read. */
static int catchup_page(sp_reaper *rp, char pos[3][96], int64_t old_s, size_t *napplied, int *nrows,
                        char *errbuf, size_t errlen) {
    char limit[24], old[24];
    const char *params[] = {sp_reaper_i64(limit, rp->cfg->reaper_batch), sp_reaper_i64(old, old_s),
                            pos[0][0] ? pos[0] : NULL, pos[1], pos[2]};
    PGresult *res = sp_reaper_query(
        rp,
        "SELECT sku_id, request_id, add_units,"
        "       created_at < now() - make_interval(secs => $2::bigint), stored_at"
        "  FROM restocks WHERE applied_to_redis_at IS NULL"
        "   AND ($3::timestamptz IS NULL"
        "        OR (stored_at, sku_id, request_id) > ($3::timestamptz, $4::bigint, $5))"
        " ORDER BY stored_at, sku_id, request_id LIMIT $1::int",
        5, params, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = 0;
    *nrows = PQntuples(res);
    for (int i = 0; i < PQntuples(res) && rc == 0 && !sp_signal_stop_requested(); i++) {
        const char *sku = PQgetvalue(res, i, 0), *id = PQgetvalue(res, i, 1);
        int64_t sku_id = strtoll(sku, NULL, 10), add = strtoll(PQgetvalue(res, i, 2), NULL, 10);
        snprintf(pos[0], sizeof(pos[0]), "%s", PQgetvalue(res, i, 4));
        snprintf(pos[1], sizeof(pos[1]), "%s", sku);
        snprintf(pos[2], sizeof(pos[2]), "%s", id);
        if (PQgetvalue(res, i, 3)[0] == 't') {
            rc = settle_old(rp, sku_id, sku, id, errbuf, errlen);
            continue;
        }
        sp_restock_status st;
        int64_t stock;
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL ||
            sp_stock_restock(redis, sku_id, add, id, &st, &stock, errbuf, errlen) != 0) {
            if (redis) sp_reaper_redis_failed(rp);
            rc = -1;
            break;
        }
        if (st == SP_RESTOCK_NO_SALE || st == SP_RESTOCK_PAUSED) continue; /* reconcile's */
        if (st == SP_RESTOCK_APPLIED) {
            sp_log_ctx ctx = {.sku_id = sku_id};
            SP_LOG_CTX(SP_LOG_INFO, &ctx,
                       "restock %s: %" PRId64 " units Redis had not got added (stock now %" PRId64
                       ")",
                       id, add, stock);
            sp_metric_inc(&m_applied);
            (*napplied)++;
        }
        rc = stamp(rp, sku, id, errbuf, errlen);
    }
    PQclear(res);
    return rc;
}

int sp_restock_catchup(sp_reaper *rp, size_t *napplied, char *errbuf, size_t errlen) {
    char pos[3][96] = {"", "0", ""};
    int64_t old_s = rp->cfg->idem_ttl_s - (rp->cfg->idem_ttl_s / 2 < OLD_MARGIN_S
                                               ? rp->cfg->idem_ttl_s / 2
                                               : OLD_MARGIN_S);
    *napplied = 0;
    /* Page after page, so that rows waiting for a reconcile never hold up the ones behind. */
    for (int page = 0; page < CATCHUP_PAGES && !sp_signal_stop_requested(); page++) {
        int nrows = 0;
        if (catchup_page(rp, pos, old_s, napplied, &nrows, errbuf, errlen) != 0) {
            sp_metric_inc(&m_errors);
            return -1;
        }
        if (nrows < rp->cfg->reaper_batch) break;
    }
    return 0;
}
