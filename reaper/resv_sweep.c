/* resv_sweep.c - keeps every SKU's reservations in Redis honest: voids the ones whose producer
 *                died before Kafka answered, drops the entries of orders PostgreSQL holds,
 *                settles leftover return markers, and notices sales Redis lost. */
#include "resv_sweep.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock_skew.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "reaper_requests.h"
#include "reconcile.h"
#include "signals.h"
#include "stock.h"
#include "stock_return.h"

#define SKU_PAGE            500  /* SKUs listed per query */
#define LOSS_CHECK_EVERY_MS 200  /* a long sweep checks Redis for a data loss this often */
#define RESV_SCAN           256  /* entries asked for per HSCAN step */
#define STEP_MAX            1024 /* most entries acted on at once (a small hash answers whole) */
#define ENTRY_MAX           160 /* bytes of an entry we act on ("r:user:qty:ts:idem_key" is well below) */
#define VOID_REASON         "lost reservation"
#define GONE_REASON         "accepted order missing from the log"

static sp_metric m_gone = SP_METRIC_COUNTER(
    "stockpipe_reaper_accepted_gone_total",
    "Accepted orders voided because the consumer passed their offset without storing them (the log "
    "no longer holds them: retention, a lost broker disk, a topic made anew).",
    NULL);
static sp_metric m_voided = SP_METRIC_COUNTER(
    "stockpipe_reaper_voided_total",
    "order.voided events published for reservations whose producer never heard from Kafka, and "
    "acknowledged.",
    NULL);
static sp_metric m_dropped_r = SP_METRIC_COUNTER(
    "stockpipe_reaper_entries_dropped_total",
    "Leftover entries dropped from {sku:ID}:resv because PostgreSQL holds their orders.",
    "entry=\"reserved\"");
static sp_metric m_dropped_a = SP_METRIC_COUNTER(
    "stockpipe_reaper_entries_dropped_total",
    "Leftover entries dropped from {sku:ID}:resv because PostgreSQL holds their orders.",
    "entry=\"accepted\"");
static sp_metric m_settled = SP_METRIC_COUNTER(
    "stockpipe_reaper_markers_settled_total",
    "Return markers left in Redis by an interrupted give-back, settled by a sweep.", NULL);
static sp_metric m_errors = SP_REAPER_ERRORS("resv");

void sp_resv_sweep_register_metrics(void) {
    sp_metrics_register(&m_voided);
    sp_metrics_register(&m_gone);
    sp_metrics_register(&m_dropped_r);
    sp_metrics_register(&m_dropped_a);
    sp_metrics_register(&m_settled);
    sp_metrics_register(&m_errors);
}

/* One entry of {sku:ID}:resv, parsed: "r:user:qty:ts:idem" or "a:user:qty:ts:partition:offset"
 * ("a:user:qty:ts" as entries confirmed before the position was kept). */
typedef struct resv_entry {
    const char *order_id; /* points into the HSCAN reply */
    const char *value;
    char state; /* 'r' or 'a' */
    int64_t user_id, ts_ms;
    int32_t qty;
    int64_t partition, offset; /* 'a:': where Kafka put its order.created; -1 when not kept */
} resv_entry;

/* Parses a decimal field ending at ':' or NUL; advances *p past the ':'. */
static int field(const char **p, int64_t *v) {
    char *end;
    if (**p < '0' || **p > '9') return -1;
    long long x = strtoll(*p, &end, 10);
    if (*end != ':' && *end != '\0') return -1;
    *v = x;
    *p = *end ? end + 1 : end;
    return 0;
}

static int parse_entry(const char *id, const char *value, resv_entry *e) {
    const char *p = value + 2;
    int64_t qty = 0;
    if ((value[0] != 'r' && value[0] != 'a') || value[1] != ':' || strlen(value) > ENTRY_MAX ||
        !sp_order_id_valid(id))
        return -1;
    if (field(&p, &e->user_id) != 0 || field(&p, &qty) != 0 || field(&p, &e->ts_ms) != 0) return -1;
    if (e->user_id < 1 || e->user_id > SP_ID_MAX || qty < 1 || qty > SP_QTY_MAX) return -1;
    e->partition = e->offset = -1;
    if (value[0] == 'a' && *p != '\0' &&
        (field(&p, &e->partition) != 0 || field(&p, &e->offset) != 0 || *p != '\0'))
        return -1;
    e->order_id = id;
    e->value = value;
    e->state = value[0];
    e->qty = (int32_t)qty;
    return 0;
}

/* The statuses PostgreSQL holds for ids: status[i] is the status text ("" when unknown), copied
 * into caller storage of 16 bytes per id. */
static int order_statuses(sp_reaper *rp, const char *const *ids, size_t n, char (*status)[16],
                          char *errbuf, size_t errlen) {
    for (size_t i = 0; i < n; i++) status[i][0] = '\0';
    if (n == 0) return 0;
    char *array = sp_reaper_text_array(ids, n);
    const char *params[] = {array};
    if (array == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    PGresult *res = sp_reaper_query(
        rp, "SELECT order_id, status FROM orders WHERE order_id = ANY($1::text[])", 1, params,
        errbuf, errlen);
    free(array);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++)
        for (size_t i = 0; i < n; i++)
            if (strcmp(ids[i], PQgetvalue(res, r, 0)) == 0)
                snprintf(status[i], 16, "%s", PQgetvalue(res, r, 1));
    PQclear(res);
    return 0;
}

/* Publishes the voids of n lost reservations this replica wins the claim of, with reason; redis_now
 * is Redis's clock, which their stamps are on (for the log). */
static int void_lost(sp_reaper *rp, int64_t sku_id, int shard, const resv_entry *const *lost,
                     size_t n, const char *reason, int64_t redis_now, sp_resv_sweep_stats *st,
                     char *errbuf, size_t errlen) {
    const char **ids = calloc(n, sizeof(*ids));
    int *won = calloc(n, sizeof(*won)), *acked = calloc(n, sizeof(*acked));
    sp_event *evs = calloc(n, sizeof(*evs));
    size_t nev = 0, nfailed = 0;
    int rc = -1;
    if (ids == NULL || won == NULL || acked == NULL || evs == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) ids[i] = lost[i]->order_id;
    if (sp_requests_claim_voids(rp, sku_id, ids, n, won, errbuf, errlen) != 0) goto out;
    int64_t now = sp_clock_wall_ms();
    for (size_t i = 0; i < n; i++) {
        if (!won[i]) continue;
        sp_event *ev = &evs[nev++];
        ev->type = SP_EV_ORDER_VOIDED;
        ev->ts_ms = now;
        ev->sku_id = sku_id;
        ev->user_id = lost[i]->user_id;
        ev->qty = lost[i]->qty;
        snprintf(ev->order_id, sizeof(ev->order_id), "%s", lost[i]->order_id);
        snprintf(ev->reason, sizeof(ev->reason), "%s", reason);
        sp_log_ctx ctx = {.order_id = ev->order_id, .sku_id = sku_id};
        SP_LOG_CTX(SP_LOG_INFO, &ctx,
                   "%s: user %" PRId64 " (%d units, shard %d), %" PRId64
                   " ms old: publishing order.voided",
                   reason, ev->user_id, (int)ev->qty, shard, redis_now - lost[i]->ts_ms);
    }
    if (nev > 0) {
        size_t nacked = sp_reaper_publish(rp, evs, nev, acked);
        sp_metric_add(&m_voided, (int64_t)nacked);
        st->nvoided += nacked;
        for (size_t i = 0; i < nev; i++)
            if (!acked[i]) ids[nfailed++] = evs[i].order_id;
        if (nfailed > 0) {
            sp_metric_inc(&m_errors);
            sp_warn("kafka did not acknowledge %zu order.voided; they are tried again", nfailed);
            sp_requests_unclaim(rp, "void", ids, nfailed);
        }
    }
    rc = 0;
out:
    free(ids);
    free(won);
    free(acked);
    free(evs);
    return rc;
}

/* Which of the n accepted entries' events the log no longer holds: the consumer has passed the
 * offset Kafka gave the order.created (PostgreSQL stores a next offset beyond it) without storing
 * the order (the caller asked), and the broker's oldest offset of the partition is past it too
 * (retention deleted it, or a lost disk). An event still in the log that the consumer passed (a
 * dead letter, to be fixed and published again) is left alone: voiding it would cancel an order
 * its buyer was told is accepted. gone[i] is 1 for the others. */
static int passed_by_consumer(sp_reaper *rp, const resv_entry *const *e, size_t n, int *gone,
                              char *errbuf, size_t errlen) {
    const char *params[] = {rp->cfg->kafka_topic};
    PGresult *res = sp_reaper_query(
        rp, "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1", 1, params,
        errbuf, errlen);
    if (res == NULL) return -1;
    for (size_t i = 0; i < n; i++) {
        gone[i] = 0;
        for (int r = 0; r < PQntuples(res); r++)
            if (strtoll(PQgetvalue(res, r, 0), NULL, 10) == e[i]->partition &&
                strtoll(PQgetvalue(res, r, 1), NULL, 10) > e[i]->offset)
                gone[i] = 1;
        int64_t lo = -1, hi = -1;
        if (gone[i] && (rp->kafka == NULL ||
                        rd_kafka_query_watermark_offsets(rp->kafka, rp->cfg->kafka_topic,
                                                         (int32_t)e[i]->partition, &lo, &hi,
                                                         10000) != RD_KAFKA_RESP_ERR_NO_ERROR ||
                        lo <= e[i]->offset))
            gone[i] = 0; /* still in the log, or the broker cannot say: left for a later sweep */
    }
    PQclear(res);
    return 0;
}

/* Acts on one HSCAN step's worth of entries of shard `shard`'s resv (see resv_sweep.h); every
 * action addresses that shard, which holds the entries' buyers' counts and Idempotency-Keys. An
 * entry's age is Redis's clock now minus its stamp, which reserve.lua took from the same clock (the
 * shard's node's): no host's clock enters it, so a reaper whose clock runs ahead cannot take a
 * reservation still waiting for Kafka for lost. A voided entry's units come back through its
 * ledger row, on its user's home shard: this shard. */
static int act_on_entries(sp_reaper *rp, int64_t sku_id, int shard, redisReply *const *kv, size_t n,
                          sp_resv_sweep_stats *st, char *errbuf, size_t errlen) {
    size_t ncand = 0, ndrop = 0, nlost = 0;
    int64_t now;
    char resv_key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(resv_key, sku_id, shard, "resv"); /* its node's clock stamped the entries */
    sp_redis *clock = sp_reaper_redis(rp, errbuf, errlen);
    if (clock == NULL) return -1;
    if (sp_clock_redis_now_ms(clock, resv_key, &now, errbuf, errlen) != 0) {
        sp_reaper_redis_failed(rp);
        return -1;
    }
    int64_t lost_before = now - rp->cfg->resv_lost_after_ms;
    int64_t stale_before = now - rp->cfg->accepted_stale_after_ms;
    int64_t gone_before = now - rp->cfg->accepted_lost_after_ms;
    size_t nwaiting = 0, ngone = 0;
    resv_entry *cand = calloc(n ? n : 1, sizeof(*cand));
    const char **ids = calloc(n ? n : 1, sizeof(*ids)), **vals = calloc(n ? n : 1, sizeof(*vals));
    const resv_entry **lost = calloc(n ? n : 1, sizeof(*lost));
    const resv_entry **rejected = calloc(n ? n : 1, sizeof(*rejected));
    const resv_entry **waiting = calloc(n ? n : 1, sizeof(*waiting));
    int *gone = calloc(n ? n : 1, sizeof(*gone));
    char(*status)[16] = calloc(n ? n : 1, sizeof(*status));
    int rc = -1, dropped = 0;
    if (cand == NULL || ids == NULL || vals == NULL || lost == NULL || rejected == NULL ||
        status == NULL || waiting == NULL || gone == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const redisReply *k = kv[2 * i], *v = kv[2 * i + 1];
        resv_entry e;
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
            parse_entry(k->str, v->str, &e) != 0) {
            sp_log_ctx ctx = {.sku_id = sku_id};
            SP_LOG_CTX(SP_LOG_WARN, &ctx, "malformed reservation entry left alone (shard %d)",
                       shard);
            continue;
        }
        if ((e.state == 'r' && e.ts_ms < lost_before) || (e.state == 'a' && e.ts_ms < stale_before))
            cand[ncand++] = e;
    }
    for (size_t i = 0; i < ncand; i++) ids[i] = cand[i].order_id;
    if (order_statuses(rp, ids, ncand, status, errbuf, errlen) != 0) goto out;
    size_t ndrop_r = 0, nrejected = 0;
    for (size_t i = 0; i < ncand; i++) {
        int known = status[i][0] != '\0';
        if (known && strcmp(status[i], "rejected") == 0) {
            /* PostgreSQL refused it: the buyer's units come back with the entry, once
             * (rejected_forget.lua), as the consumer does when it refuses one. Here when the
             * consumer could not (killed after its commit, or Redis unreachable then). */
            rejected[nrejected++] = &cand[i];
        } else if (cand[i].state == 'a' && known) {
            ids[ndrop] = cand[i].order_id, vals[ndrop++] = cand[i].value;
        } else if (cand[i].state == 'r' && known && strcmp(status[i], "cancelled") != 0) {
            ids[ndrop] = cand[i].order_id, vals[ndrop++] = cand[i].value;
            ndrop_r++;
        } else if (cand[i].state == 'r' && !known) {
            lost[nlost++] = &cand[i];
        } else if (cand[i].state == 'a' && !known && cand[i].offset >= 0 &&
                   cand[i].ts_ms < gone_before) {
            waiting[nwaiting++] = &cand[i];
        }
        /* 'r:' of a cancelled order: its ledger row gives it back (give_back.lua drops it).
         * 'a:' unknown to PostgreSQL: the consumer has not got there yet, unless it has passed
         * the order's offset (below). */
    }
    /* An accepted order PostgreSQL still lacks after ACCEPTED_LOST_AFTER_MS, whose offset the
     * consumer has passed, will never come: its event is gone from the log. Voided, its units
     * come back through the ledger (give_back.lua takes an 'a:' entry for a voided row too). */
    if (nwaiting > 0) {
        if (passed_by_consumer(rp, waiting, nwaiting, gone, errbuf, errlen) != 0) goto out;
        for (size_t i = 0; i < nwaiting; i++)
            if (gone[i]) waiting[ngone++] = waiting[i];
    }
    if (ndrop > 0) {
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL) goto out;
        if (sp_stock_resv_drop_on_shard(redis, sku_id, shard, ids, vals, ndrop, &dropped, errbuf,
                                        errlen) != 0) {
            sp_reaper_redis_failed(rp);
            goto out;
        }
        sp_log_ctx ctx = {.sku_id = sku_id};
        SP_LOG_CTX(SP_LOG_INFO, &ctx,
                   "dropped %d leftover reservation entries of orders PostgreSQL holds (shard %d)",
                   dropped, shard);
        sp_metric_add(&m_dropped_r, (int64_t)ndrop_r);
        sp_metric_add(&m_dropped_a, (int64_t)(ndrop - ndrop_r));
        st->ndropped += (size_t)dropped;
    }
    for (size_t i = 0; i < nrejected; i++) {
        int units = 0;
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL) goto out;
        if (sp_stock_rejected_forget_on_shard(redis, sku_id, shard, rejected[i]->order_id,
                                              rejected[i]->user_id, rejected[i]->qty, &units,
                                              errbuf, errlen) != 0) {
            sp_reaper_redis_failed(rp);
            goto out;
        }
        st->ndropped += units > 0;
    }
    if (nlost > 0 &&
        void_lost(rp, sku_id, shard, lost, nlost, VOID_REASON, now, st, errbuf, errlen) != 0)
        goto out;
    if (ngone > 0) {
        if (void_lost(rp, sku_id, shard, waiting, ngone, GONE_REASON, now, st, errbuf, errlen) != 0)
            goto out;
        sp_metric_add(&m_gone, (int64_t)ngone);
    }
    rc = 0;
out:
    free(cand);
    free(ids);
    free(vals);
    free(waiting);
    free(gone);
    free(lost);
    free(rejected);
    free(status);
    return rc;
}

typedef struct sweep_ctx {
    int64_t sku_id;
    int shard;
    sp_resv_sweep_stats *st;
} sweep_ctx;

static int sweep_step(sp_reaper *rp, redisReply *const *kv, size_t n, void *arg, char *errbuf,
                      size_t errlen) {
    const sweep_ctx *sc = arg;
    if (act_on_entries(rp, sc->sku_id, sc->shard, kv, n, sc->st, errbuf, errlen) != 0) return -1;
    return sp_signal_stop_requested() ? 1 : 0;
}

/* Scans the resv hash of each of the sale's nshards shards in turn (the caller holds the SKU's
 * lock): every order's entry sits on its buyer's home shard. */
static int sweep_entries(sp_reaper *rp, int64_t sku_id, int nshards, sp_resv_sweep_stats *st,
                         char *errbuf, size_t errlen) {
    for (int k = 0; k < nshards && !sp_signal_stop_requested(); k++) {
        char key[SP_STOCK_KEY_MAX];
        sweep_ctx sc = {.sku_id = sku_id, .shard = k, .st = st};
        sp_stock_shard_key(key, sku_id, k, "resv");
        if (sp_reaper_hscan(rp, key, RESV_SCAN, STEP_MAX, sweep_step, &sc, errbuf, errlen) != 0)
            return -1;
    }
    return 0;
}

/* What the SKU's sale looks like over its nshards shards, read in one pipelined round trip: 1
 * fine, 0 a shard missing, 2 a shard paused (told first: a reconcile that paused it died, and the
 * sale is rebuilt whatever its age; a shard missing from a young sale may be its open under way,
 * which opens shard 0 last); *shard is the first shard at fault. Either leaves the SKU alone. */
static int sale_state(sp_reaper *rp, int64_t sku_id, int nshards, int *state, int *shard,
                      char *errbuf, size_t errlen) {
    char key[SP_SHARDS_MAX][SP_STOCK_KEY_MAX];
    const char *argv[SP_SHARDS_MAX][4];
    sp_redis_cmd cmds[SP_SHARDS_MAX];
    redisReply *replies[SP_SHARDS_MAX];
    int rc = 0;
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    for (int k = 0; k < nshards; k++) {
        sp_stock_shard_key(key[k], sku_id, k, "sale");
        argv[k][0] = "HMGET", argv[k][1] = key[k], argv[k][2] = "stock", argv[k][3] = "paused";
        cmds[k] = (sp_redis_cmd){.key = key[k], .argc = 4, .argv = argv[k]};
    }
    if (sp_redis_pipeline(redis, (size_t)nshards, cmds, replies, errbuf, errlen) != 0) {
        sp_reaper_redis_failed(rp);
        return -1;
    }
    *state = 1, *shard = 0;
    for (int k = 0; k < nshards; k++) {
        const redisReply *r = replies[k];
        if (rc == 0 && (r->type != REDIS_REPLY_ARRAY || r->elements != 2)) {
            snprintf(errbuf, errlen, "HMGET %.*s: %s", SP_STOCK_KEY_MAX, key[k],
                     r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
            rc = -1;
        } else if (rc == 0) {
            int one = r->element[0]->type == REDIS_REPLY_NIL   ? 0
                      : r->element[1]->type != REDIS_REPLY_NIL ? 2
                                                               : 1;
            if ((one == 2 && *state != 2) || (one == 0 && *state == 1)) *state = one, *shard = k;
        }
        freeReplyObject(replies[k]);
    }
    return rc;
}

/* One SKU, a sale over nshards Redis shards, under its lock; *reconcile says why it needs a
 * reconcile ("" when it does not). */
static int sweep_sku(sp_reaper *rp, int64_t sku_id, int nshards, int64_t open_for_ms,
                     sp_resv_sweep_stats *st, const char **reconcile, char *errbuf, size_t errlen) {
    int state = 1, got = 0, rc = -1, shard = 0;
    size_t nsettled = 0;
    *reconcile = "";
    if (sp_reaper_lock_try(rp, SP_LOCK_SKU, sku_id, &got, errbuf, errlen) != 0) return -1;
    if (!got) return 0; /* another replica is on it */
    if (sale_state(rp, sku_id, nshards, &state, &shard, errbuf, errlen) != 0) goto out;
    if (state != 1) {
        int idle = 0;
        /* Only while no reconcile of every SKU runs (it pauses them all first, then takes them
         * one by one): this session holds the SKU's lock, so no reconcile of this one runs. */
        if (sp_reaper_lock_try(rp, SP_LOCK_RECONCILE, 0, &idle, errbuf, errlen) != 0) goto out;
        if (idle) {
            sp_reaper_unlock(rp, SP_LOCK_RECONCILE, 0);
            /* The producer opens the sale in Redis right after Kafka took stock.set, and the
             * consumer may store it first: only a sale missing for long is lost. */
            if (state == 2)
                *reconcile = "it was left paused by a reconcile that did not finish";
            else if (open_for_ms > rp->cfg->resv_lost_after_ms)
                *reconcile = "its sale is missing from Redis";
            if (nshards > 1 && (*reconcile)[0]) {
                sp_log_ctx ctx = {.sku_id = sku_id};
                SP_LOG_CTX(SP_LOG_INFO, &ctx, "shard %d of the sale's %d is %s", shard, nshards,
                           state == 2 ? "paused" : "missing");
            }
        }
        rc = 0;
        goto out;
    }
    if (sweep_entries(rp, sku_id, nshards, st, errbuf, errlen) != 0) goto out;
    if (sp_stock_return_settle_markers_on_shards(rp, sku_id, nshards, &nsettled, errbuf, errlen) !=
        0)
        goto out;
    if (nsettled > 0) {
        sp_log_ctx ctx = {.sku_id = sku_id};
        SP_LOG_CTX(SP_LOG_INFO, &ctx, "settled %zu leftover return markers", nsettled);
        sp_metric_add(&m_settled, (int64_t)nsettled);
        st->nsettled += nsettled;
    }
    rc = 0;
out:
    sp_reaper_unlock(rp, SP_LOCK_SKU, sku_id);
    return rc;
}

/* The data-loss check, from inside a sweep: 1 when Redis is still the one the last reconcile of
 * every SKU left (the sweep goes on), 0 when it is not, or cannot be told (the sweep stops: a
 * reconcile of every SKU, run by the check itself or by another replica, rebuilds the sales; one
 * by one, each with its own settle wait, they would take the catalog's size times as long). */
static int redis_still_known(sp_reaper *rp) {
    char err[512], epoch[sizeof(rp->seen.epoch)];
    snprintf(epoch, sizeof(epoch), "%s", rp->seen.epoch);
    if (sp_reconcile_check(rp, err, sizeof(err)) != 0) return 0;
    return rp->seen.known && strcmp(epoch, rp->seen.epoch) == 0;
}

int sp_resv_sweep(sp_reaper *rp, sp_resv_sweep_stats *st, char *errbuf, size_t errlen) {
    char after[24], limit[24], err[512];
    int64_t last = 0, next_check = sp_clock_mono_ms() + LOSS_CHECK_EVERY_MS;
    memset(st, 0, sizeof(*st));
    for (;;) {
        const char *params[] = {sp_reaper_i64(after, last), sp_reaper_i64(limit, SKU_PAGE)};
        PGresult *res = sp_reaper_query(
            rp,
            "SELECT sku_id, (extract(epoch FROM now() - created_at) * 1000)::bigint, shards"
            "  FROM inventory WHERE sku_id > $1::bigint"
            " ORDER BY sku_id LIMIT $2::int",
            2, params, errbuf, errlen);
        if (res == NULL) goto fail;
        int n = PQntuples(res), lost = 0;
        for (int i = 0; i < n && !sp_signal_stop_requested(); i++) {
            int64_t sku = strtoll(PQgetvalue(res, i, 0), NULL, 10);
            /* How long the sale has been open, on PostgreSQL's clock: not this host's. */
            int64_t open_for = strtoll(PQgetvalue(res, i, 1), NULL, 10);
            long nshards = strtol(PQgetvalue(res, i, 2), NULL, 10);
            const char *why = "";
            sp_log_ctx ctx = {.sku_id = sku};
            last = sku;
            st->nskus++;
            sp_health_beat();
            if (sp_clock_mono_ms() >= next_check) {
                if ((lost = !redis_still_known(rp))) break;
                next_check = sp_clock_mono_ms() + LOSS_CHECK_EVERY_MS;
            }
            if (nshards < 1 || nshards > SP_SHARDS_MAX) nshards = 1;
            if (sweep_sku(rp, sku, (int)nshards, open_for, st, &why, err, sizeof(err)) != 0) {
                sp_metric_inc(&m_errors);
                SP_LOG_CTX(SP_LOG_WARN, &ctx, "reservation sweep failed: %s", err);
                continue;
            }
            if (why[0]) {
                int busy = 0;
                /* A sale missing or left paused may be the first sign that Redis lost data. */
                if ((lost = !redis_still_known(rp))) break;
                SP_LOG_CTX(SP_LOG_WARN, &ctx, "reconciling the SKU: %s", why);
                if (sp_reconcile_sku(rp, sku, why, 0, &busy, err, sizeof(err)) != 0)
                    SP_LOG_CTX(SP_LOG_WARN, &ctx, "reconcile failed, tried again later: %s", err);
                else if (!busy)
                    st->nreconciled++;
            }
        }
        PQclear(res);
        if (n < SKU_PAGE || lost || sp_signal_stop_requested()) return 0;
    }
fail:
    sp_metric_inc(&m_errors);
    return -1;
}
