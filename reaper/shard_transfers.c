/* shard_transfers.c - completes the stock transfers a caller left open (shard_transfers.h). */
#include "shard_transfers.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stock.h"

#define XFER_SCAN 100 /* records asked for per HSCAN step */

typedef struct pass {
    int64_t sku_id;
    int shard, nshards;
    int64_t now_ms; /* the shard's server clock when the pass over it began */
    sp_shard_sweep *sw;
} pass;

/* The clock of the server that holds key, in ms. */
static int server_ms(sp_reaper *rp, const char *key, int64_t *now_ms, char *errbuf, size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    const char *argv[] = {"TIME"};
    redisReply *r = sp_redis_argv(redis, key, 1, argv, NULL, errbuf, errlen);
    if (r == NULL) return -1;
    int ok = r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
             r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING;
    if (ok)
        *now_ms = strtoll(r->element[0]->str, NULL, 10) * 1000 +
                  strtoll(r->element[1]->str, NULL, 10) / 1000;
    else
        snprintf(errbuf, errlen, "TIME: unexpected reply");
    freeReplyObject(r);
    return ok ? 0 : -1;
}

/* 1 when the recipient t->to holds an "in:" record of t, 0 when not, -1 on an error. */
static int given_before(sp_reaper *rp, const sp_shard_transfer *t, char *errbuf, size_t errlen) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, t->sku_id, t->to, "xfer");
    const char *argv[] = {"HEXISTS", key, t->id};
    redisReply *r = sp_reaper_redis_argv(rp, 3, argv, REDIS_REPLY_INTEGER, errbuf, errlen);
    if (r == NULL) return -1;
    int given = r->integer == 1;
    freeReplyObject(r);
    return given;
}

/* An "out:" record of the shard p->shard: its transfer completed, aborted or left waiting. */
static int on_out(sp_reaper *rp, pass *p, sp_shard_transfer *t, int64_t units, int64_t ts,
                  char *errbuf, size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    int64_t age = p->now_ms - ts, v = 0;
    if (age < SP_SHARD_COMPLETE_AFTER_MS ||
        (age >= SP_SHARD_COMPLETE_WITHIN_MS && age <= SP_SHARD_ABORT_AFTER_MS)) {
        p->sw->waiting++;
        return 0;
    }
    if (age < SP_SHARD_COMPLETE_WITHIN_MS) {
        if (sp_stock_shard_give(redis, t, units, ts, SP_SHARD_COMPLETE_WITHIN_MS, &v, errbuf,
                                errlen) != 0)
            return -1;
        if (v == -1 || v == -2 || v == -4) { /* the recipient gone or paused; too late there */
            p->sw->waiting++;
            return 0;
        }
        if (v == -3) {
            /* The recipient is of another generation than the take: it never got the units. A
             * donor rebuilt since drops the record alone (shard_done.lua); one that was not gets
             * them back. Settling here would lose them. */
            if (sp_stock_shard_abort(redis, t, 0, &v, errbuf, errlen) != 0) return -1;
            if (v > 0) p->sw->aborted++;
            return 0;
        }
        /* given now, or given before (0) */
    } else {
        int given = given_before(rp, t, errbuf, errlen);
        if (given < 0) return -1;
        if (!given) {
            if (sp_stock_shard_abort(redis, t, SP_SHARD_ABORT_AFTER_MS, &v, errbuf, errlen) != 0)
                return -1;
            if (v > 0) p->sw->aborted++;
            return 0;
        }
    }
    if (sp_stock_shard_done(redis, t, t->from, 0, &v, errbuf, errlen) != 0) return -1;
    p->sw->completed++;
    return 0;
}

static int on_records(sp_reaper *rp, redisReply *const *kv, size_t npairs, void *arg, char *errbuf,
                      size_t errlen) {
    pass *p = arg;
    for (size_t i = 0; i < npairs; i++) {
        const redisReply *field = kv[2 * i], *value = kv[2 * i + 1];
        if (field->type != REDIS_REPLY_STRING || value->type != REDIS_REPLY_STRING ||
            field->len >= sizeof(((sp_shard_transfer *)0)->id))
            continue; /* not a record this code writes */
        sp_shard_transfer t = {.sku_id = p->sku_id};
        snprintf(t.id, sizeof(t.id), "%s", field->str);
        int other = -1, n = 0;
        long long units = 0, ts = 0;
        char gen[sizeof(t.gen)] = "";
        if (strncmp(value->str, "out:", 4) == 0 &&
            (n = sscanf(value->str, "out:%d:%lld:%lld:%63s", &other, &units, &ts, gen)) >= 3 &&
            other >= 0 && other < p->nshards && units > 0) {
            t.from = p->shard;
            t.to = other;
            snprintf(t.gen, sizeof(t.gen), "%s", n == 4 ? gen : "");
            if (on_out(rp, p, &t, units, ts, errbuf, errlen) != 0) return -1;
        } else if (sscanf(value->str, "in:%d:%lld:%lld", &other, &units, &ts) == 3 && other >= 0 &&
                   other < p->nshards && p->now_ms - ts > SP_SHARD_IN_KEEP_MS) {
            sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
            int64_t v = 0, settled = 0;
            /* The "in:" record proves the give: the donor's "out:" record, if still there, is
             * settled first (else, gone with it, that record would look never given and be
             * aborted: its units twice in Redis). */
            t.from = other;
            t.to = p->shard;
            if (redis == NULL ||
                sp_stock_shard_done(redis, &t, other, 0, &settled, errbuf, errlen) != 0 ||
                sp_stock_shard_done(redis, &t, p->shard, SP_SHARD_IN_KEEP_MS, &v, errbuf, errlen) !=
                    0)
                return -1;
            if (settled > 0) p->sw->completed++;
            if (v > 0) p->sw->dropped++;
        }
    }
    return 0;
}

int sp_shard_transfers_complete(sp_reaper *rp, int64_t sku_id, int nshards, sp_shard_sweep *sw,
                                char *errbuf, size_t errlen) {
    memset(sw, 0, sizeof(*sw));
    for (int k = 0; k < nshards && k < SP_SHARDS_MAX; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, sku_id, k, "xfer");
        pass p = {.sku_id = sku_id, .shard = k, .nshards = nshards, .sw = sw};
        if (server_ms(rp, key, &p.now_ms, errbuf, errlen) != 0 ||
            sp_reaper_hscan(rp, key, XFER_SCAN, XFER_SCAN, on_records, &p, errbuf, errlen) != 0)
            return -1;
    }
    return 0;
}

int sp_shard_transfers_sweep(sp_reaper *rp, sp_shard_sweep *total, char *errbuf, size_t errlen) {
    enum { PAGE = 500 };
    int64_t last = 0;
    memset(total, 0, sizeof(*total));
    for (;;) {
        char after[24], limit[24];
        const char *params[] = {sp_reaper_i64(after, last), sp_reaper_i64(limit, PAGE)};
        PGresult *res = sp_reaper_query(rp,
                                        "SELECT sku_id, shards FROM inventory"
                                        " WHERE shards > 1 AND sku_id > $1::bigint"
                                        " ORDER BY sku_id LIMIT $2::int",
                                        2, params, errbuf, errlen);
        if (res == NULL) return -1;
        int n = PQntuples(res), rc = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            int64_t sku = strtoll(PQgetvalue(res, i, 0), NULL, 10);
            int nshards = (int)strtol(PQgetvalue(res, i, 1), NULL, 10), got = 0;
            sp_shard_sweep sw;
            last = sku;
            /* the one completer of the sale's transfers: under its lock, or another has it */
            if (sp_reaper_lock_try(rp, SP_LOCK_SKU, sku, &got, errbuf, errlen) != 0) {
                rc = -1;
                break;
            }
            if (!got) continue;
            rc = sp_shard_transfers_complete(rp, sku, nshards, &sw, errbuf, errlen);
            sp_reaper_unlock(rp, SP_LOCK_SKU, sku);
            total->completed += sw.completed, total->aborted += sw.aborted;
            total->dropped += sw.dropped, total->waiting += sw.waiting;
        }
        PQclear(res);
        if (rc != 0) return -1;
        if (n < PAGE) return 0;
    }
}
