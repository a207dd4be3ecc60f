/* stock_return.c - gives the return ledger back to Redis, exactly once per row. */
#include "stock_return.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "signals.h"
#include "stock.h"

#define MARKER_SCAN 200 /* markers asked for per HSCAN step */
/* most markers handled per step (HSCAN may return more than asked) */
#define MARKER_STEP_MAX 1024

static sp_metric m_returned = SP_METRIC_COUNTER(
    "stockpipe_reaper_returned_total",
    "Return-ledger rows given back to Redis (stock and the user's count) and stamped.", NULL);
static sp_metric m_returned_units = SP_METRIC_COUNTER(
    "stockpipe_reaper_returned_units_total",
    "Units given back to Redis from the return ledger (0 for a row given back before a crash).",
    NULL);
static sp_metric m_errors = SP_REAPER_ERRORS("return");

void sp_stock_return_register_metrics(void) {
    sp_metrics_register(&m_returned);
    sp_metrics_register(&m_returned_units);
    sp_metrics_register(&m_errors);
}

/* One row of a drain batch. */
typedef struct ledger_row {
    char order_id[SP_ORDER_ID_MAX + 1];
    int64_t sku_id, user_id;
    int32_t qty;
    char reason[16]; /* "expired" or "voided" */
    int shard;       /* the order's home shard (its user's, over the sale's inventory.shards):
                      * its entry, its buyer's count and its marker live there, and nowhere else */
    int stamp;       /* given back (now or before): stamp it */
} ledger_row;

/* Where a drain stands: rows after (created_at, order_id) come next, so rows left for later do
 * not hold up the ones behind them. */
typedef struct drain_pos {
    char created_at[64]; /* "" before the first batch */
    char order_id[SP_ORDER_ID_MAX + 1];
} drain_pos;

/* A sale's shards as PostgreSQL's inventory row says (text; NULL or out of range: 1). */
static int shards_of(const char *text) {
    long n = text ? strtol(text, NULL, 10) : 1;
    return n >= 1 && n <= SP_SHARDS_MAX ? (int)n : 1;
}

/* Reads and locks the next batch; *rows (malloc'd) and *n. Runs inside the caller's BEGIN. Each
 * row comes with its sale's shards (a subselect, so only the ledger rows are locked: the
 * consumer's inventory updates never wait on a drain), 1 when the sale has no inventory row. */
static int read_batch(sp_reaper *rp, drain_pos *pos, ledger_row **rows, size_t *n, char *errbuf,
                      size_t errlen) {
    char limit[24];
    const char *params[] = {sp_reaper_i64(limit, rp->cfg->reaper_batch),
                            pos->created_at[0] ? pos->created_at : NULL, pos->order_id};
    PGresult *res = sp_pg_query(
        rp->pg,
        "SELECT order_id, sku_id, user_id, qty, created_at, reason,"
        "       (SELECT i.shards FROM inventory i WHERE i.sku_id = r.sku_id)"
        "  FROM stock_returns r"
        " WHERE returned_to_redis_at IS NULL"
        "   AND ($2::timestamptz IS NULL OR (created_at, order_id) > ($2::timestamptz, $3))"
        " ORDER BY created_at, order_id LIMIT $1::int FOR UPDATE SKIP LOCKED",
        3, params, errbuf, errlen);
    if (res == NULL) return -1;
    size_t k = (size_t)PQntuples(res);
    ledger_row *out = k ? calloc(k, sizeof(*out)) : NULL;
    if (k && out == NULL) {
        PQclear(res);
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < k; i++) {
        int r = (int)i;
        snprintf(out[i].order_id, sizeof(out[i].order_id), "%s", PQgetvalue(res, r, 0));
        out[i].sku_id = strtoll(PQgetvalue(res, r, 1), NULL, 10);
        out[i].user_id = strtoll(PQgetvalue(res, r, 2), NULL, 10);
        out[i].qty = (int32_t)strtol(PQgetvalue(res, r, 3), NULL, 10);
        snprintf(out[i].reason, sizeof(out[i].reason), "%s", PQgetvalue(res, r, 5));
        int nshards = shards_of(PQgetisnull(res, r, 6) ? NULL : PQgetvalue(res, r, 6));
        out[i].shard = sp_stock_home_shard(out[i].user_id, nshards);
    }
    if (k > 0) {
        snprintf(pos->created_at, sizeof(pos->created_at), "%s", PQgetvalue(res, (int)k - 1, 4));
        snprintf(pos->order_id, sizeof(pos->order_id), "%s", out[k - 1].order_id);
    }
    PQclear(res);
    *rows = out;
    *n = k;
    return 0;
}

/* Stamps the rows marked `stamp` (inside the caller's transaction). */
static int stamp_rows(sp_reaper *rp, const ledger_row *rows, size_t n, char *errbuf,
                      size_t errlen) {
    const char **ids = calloc(n ? n : 1, sizeof(*ids));
    size_t k = 0;
    int rc = -1;
    if (ids == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        if (rows[i].stamp) ids[k++] = rows[i].order_id;
    if (k == 0) {
        free(ids);
        return 0;
    }
    char *array = sp_reaper_text_array(ids, k);
    const char *params[] = {array};
    if (array == NULL)
        snprintf(errbuf, errlen, "out of memory");
    else if (sp_pg_exec(rp->pg,
                        "UPDATE stock_returns SET returned_to_redis_at = now()"
                        " WHERE order_id = ANY($1::text[]) AND returned_to_redis_at IS NULL",
                        1, params, errbuf, errlen) == 0)
        rc = 0;
    free(array);
    free(ids);
    return rc;
}

/* Removes the markers of stamped rows: one pipelined round trip. Best effort (a marker left is
 * settled by its SKU's next sweep). */
static void remove_markers(sp_reaper *rp, const ledger_row *rows, size_t n) {
    enum { ROUND = 64 }; /* commands per pipelined round trip */
    char key[ROUND][SP_STOCK_KEY_MAX], err[256];
    const char *argv[ROUND][3];
    sp_redis_cmd cmds[ROUND];
    redisReply *replies[ROUND];
    size_t k = 0;
    if (rp->redis == NULL) return;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && rows[i].stamp) {
            sp_stock_shard_key(key[k], rows[i].sku_id, rows[i].shard, "returned");
            argv[k][0] = "HDEL", argv[k][1] = key[k], argv[k][2] = rows[i].order_id;
            cmds[k] = (sp_redis_cmd){.key = key[k], .argc = 3, .argv = argv[k]};
            k++;
        }
        if (k == ROUND || (i == n && k > 0)) {
            if (sp_redis_pipeline(rp->redis, k, cmds, replies, err, sizeof(err)) != 0) {
                sp_reaper_redis_failed(rp);
                return;
            }
            for (size_t j = 0; j < k; j++) freeReplyObject(replies[j]);
            k = 0;
        }
    }
}

/* One batch: BEGIN, read and lock, give back, stamp, COMMIT, remove markers. *nread, *nstamped. */
static int drain_batch(sp_reaper *rp, drain_pos *pos, size_t *nread, size_t *nstamped, char *errbuf,
                       size_t errlen) {
    ledger_row *rows = NULL;
    size_t n = 0, nstamp = 0, nblocked = 0;
    int64_t units = 0, blocked_sku = 0;
    int rc = -1, given = 0;
    *nread = *nstamped = 0;

    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    if (sp_reaper_exec(rp, "BEGIN", 0, NULL, errbuf, errlen) != 0) return -1;
    if (read_batch(rp, pos, &rows, &n, errbuf, errlen) != 0) goto fail;
    *nread = n;
    int64_t now = sp_clock_wall_ms();
    for (size_t i = 0; i < n; i++) {
        sp_log_ctx ctx = {.order_id = rows[i].order_id, .sku_id = rows[i].sku_id};
        if (sp_stock_give_back_on_shard(redis, rows[i].sku_id, rows[i].shard, rows[i].order_id,
                                        rows[i].user_id, rows[i].qty, rows[i].reason, now, &given,
                                        errbuf, errlen) != 0) {
            /* Stamp what went back so far; the rest waits (a marker set by a reply we did not
             * get makes its redo give nothing). */
            sp_reaper_redis_failed(rp);
            SP_LOG_CTX(SP_LOG_WARN, &ctx, "give-back on shard %d failed: %s", rows[i].shard,
                       errbuf);
            break;
        }
        if (given >= 0) {
            rows[i].stamp = 1;
            nstamp++;
            units += given;
            if (given == 0)
                SP_LOG_CTX(SP_LOG_INFO, &ctx,
                           "ledger row given back before (marker found, or "
                           "its reservation gone); stamping it");
        } else {
            nblocked++;
            blocked_sku = rows[i].sku_id;
        }
    }
    if (stamp_rows(rp, rows, n, errbuf, errlen) != 0 ||
        sp_pg_exec(rp->pg, "COMMIT", 0, NULL, errbuf, errlen) != 0)
        goto fail;
    sp_metric_add(&m_returned, (int64_t)nstamp);
    sp_metric_add(&m_returned_units, units);
    *nstamped = nstamp;
    remove_markers(rp, rows, n);
    if (nblocked > 0) {
        sp_log_ctx ctx = {.sku_id = blocked_sku};
        SP_LOG_CTX(SP_LOG_INFO, &ctx,
                   "%zu ledger rows wait: their sale is missing from Redis or paused by a "
                   "reconcile",
                   nblocked);
    }
    rc = rp->redis ? 0 : -1;
    if (rc != 0) snprintf(errbuf, errlen, "redis failed during the give-back");
    goto out;
fail:
    sp_reaper_pg_failed(rp); /* ends the transaction; markers make its redo harmless */
out:
    free(rows);
    return rc;
}

int sp_stock_return_drain(sp_reaper *rp, int64_t budget_ms, size_t *nreturned, char *errbuf,
                          size_t errlen) {
    drain_pos pos = {{0}, {0}};
    int64_t until = sp_clock_mono_ms() + budget_ms;
    size_t total = 0, nread = 0, nstamped = 0;
    do {
        sp_health_beat();
        if (drain_batch(rp, &pos, &nread, &nstamped, errbuf, errlen) != 0) {
            sp_metric_inc(&m_errors);
            *nreturned = total + nstamped;
            return -1;
        }
        total += nstamped;
    } while (nread == (size_t)rp->cfg->reaper_batch && sp_clock_mono_ms() < until &&
             !sp_signal_stop_requested());
    *nreturned = total;
    return 0;
}

/* Stamps the rows of k markers of sku_id, then removes the markers. *nremoved. */
static int settle_chunk(sp_reaper *rp, int64_t sku_id, const char *key, const char **ids, size_t k,
                        size_t *nremoved, char *errbuf, size_t errlen) {
    char sku[24];
    const char *hdel[2 + MARKER_STEP_MAX];
    char *array = sp_reaper_text_array(ids, k);
    const char *params[] = {array, sp_reaper_i64(sku, sku_id)};
    if (array == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    int rc = sp_reaper_exec(rp,
                            "UPDATE stock_returns SET returned_to_redis_at = now()"
                            " WHERE order_id = ANY($1::text[]) AND sku_id = $2::bigint"
                            "   AND returned_to_redis_at IS NULL",
                            2, params, errbuf, errlen);
    free(array);
    if (rc != 0) return -1;
    /* Every row of these markers is stamped now: the markers have done their job. */
    hdel[0] = "HDEL", hdel[1] = key;
    memcpy(&hdel[2], ids, k * sizeof(*ids));
    redisReply *d = sp_reaper_redis_argv(rp, (int)k + 2, hdel, REDIS_REPLY_INTEGER, errbuf, errlen);
    if (d == NULL) return -1;
    *nremoved += (size_t)d->integer;
    freeReplyObject(d);
    return 0;
}

typedef struct settle_ctx {
    int64_t sku_id;
    const char *key;
    size_t total;
} settle_ctx;

static int settle_step(sp_reaper *rp, redisReply *const *kv, size_t n, void *arg, char *errbuf,
                       size_t errlen) {
    settle_ctx *sc = arg;
    const char *ids[MARKER_STEP_MAX];
    for (size_t i = 0; i < n; i++) ids[i] = kv[2 * i]->str;
    return n ? settle_chunk(rp, sc->sku_id, sc->key, ids, n, &sc->total, errbuf, errlen) : 0;
}

int sp_stock_return_settle_markers_on_shards(sp_reaper *rp, int64_t sku_id, int nshards,
                                             size_t *nsettled, char *errbuf, size_t errlen) {
    int rc = 0;
    size_t total = 0;
    if (nshards < 1 || nshards > SP_SHARDS_MAX) nshards = 1;
    /* Every shard holds the markers of its own buyers' rows (give_back.lua on the home shard). */
    for (int k = 0; k < nshards && rc == 0; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, sku_id, k, "returned");
        settle_ctx sc = {.sku_id = sku_id, .key = key};
        rc = sp_reaper_hscan(rp, key, MARKER_SCAN, MARKER_STEP_MAX, settle_step, &sc, errbuf,
                             errlen);
        total += sc.total;
    }
    *nsettled = total;
    return rc;
}

int sp_stock_return_settle_markers(sp_reaper *rp, int64_t sku_id, size_t *nsettled, char *errbuf,
                                   size_t errlen) {
    char sku[24];
    const char *params[] = {sp_reaper_i64(sku, sku_id)};
    *nsettled = 0;
    PGresult *res = sp_reaper_query(rp, "SELECT shards FROM inventory WHERE sku_id = $1::bigint", 1,
                                    params, errbuf, errlen);
    if (res == NULL) return -1;
    int nshards = shards_of(PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : NULL);
    PQclear(res);
    return sp_stock_return_settle_markers_on_shards(rp, sku_id, nshards, nsettled, errbuf, errlen);
}
