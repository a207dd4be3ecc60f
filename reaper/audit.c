/* audit.c - `reaper audit`: checks the invariants of the whole pipeline and reports each
 *           violation in a sentence; the running reaper's periodic audit behind its gauges. */
#include "audit.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "signals.h"
#include "stock.h"

#define SHOWN_MAX            100 /* violations printed per check */
#define LOGGED_MAX           5   /* SKUs named in the log per periodic audit */
#define SKU_PAGE             500
#define WATERMARK_TIMEOUT_MS 5000

static sp_metric m_oversold = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_oversold_units",
    "Units PostgreSQL's pending and paid orders hold beyond what was put on sale (supplied - "
    "stock), summed over SKUs, at the last periodic audit: 0 unless the oversell guard failed.",
    NULL);
static sp_metric m_leaked = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_leaked_units",
    "Units that left PostgreSQL's stock but no pending or paid order holds (supplied - stock - "
    "held), summed over SKUs, at the last periodic audit: 0 unless a return was lost.",
    NULL);
static sp_metric m_above = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_stock_difference_units",
    "Redis's stock minus PostgreSQL's over the quiet sales of the last periodic audit: units Redis "
    "would sell that PostgreSQL does not have (redis_above), or holds back (redis_below).",
    "direction=\"redis_above\"");
static sp_metric m_below = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_stock_difference_units",
    "Redis's stock minus PostgreSQL's over the quiet sales of the last periodic audit: units Redis "
    "would sell that PostgreSQL does not have (redis_above), or holds back (redis_below).",
    "direction=\"redis_below\"");
static sp_metric m_differing = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_skus_differing",
    "Quiet sales whose stock or supplied differ between Redis and PostgreSQL (or that Redis lacks) "
    "at the last periodic audit.",
    NULL);
static sp_metric m_unchecked = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_skus_unchecked",
    "Sales the last periodic audit did not compare with Redis because they were not quiet "
    "(reservations in flight, paused, ledger rows owed, the consumer behind, changing meanwhile).",
    NULL);
static sp_metric m_last_clean = SP_METRIC_GAUGE(
    "stockpipe_reaper_audit_last_clean_timestamp_seconds",
    "Unix time of the last periodic audit that found nothing oversold, nothing leaked and no quiet "
    "sale differing between Redis and PostgreSQL; 0 before the first.",
    NULL);
static sp_metric m_errors = SP_REAPER_ERRORS("audit");

void sp_audit_register_metrics(void) {
    sp_metrics_register(&m_oversold);
    sp_metrics_register(&m_leaked);
    sp_metrics_register(&m_above);
    sp_metrics_register(&m_below);
    sp_metrics_register(&m_differing);
    sp_metrics_register(&m_unchecked);
    sp_metrics_register(&m_last_clean);
    sp_metrics_register(&m_errors);
}

typedef struct report {
    FILE *out;
    int nviolations;
    int shown; /* of the current check */
} report;

static void violation(report *rep, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void violation(report *rep, const char *fmt, ...) {
    va_list ap;
    rep->nviolations++;
    if (rep->shown++ >= SHOWN_MAX) return;
    fputs("VIOLATION ", rep->out);
    va_start(ap, fmt);
    vfprintf(rep->out, fmt, ap);
    va_end(ap);
    fputc('\n', rep->out);
}

/* Starts a check: its title, printed once it is done with how it went. */
static int check_begin(report *rep) {
    rep->shown = 0;
    return rep->nviolations;
}

static void check_end(report *rep, int before, const char *title) {
    int n = rep->nviolations - before;
    if (rep->shown > SHOWN_MAX) fprintf(rep->out, "  ... and %d more\n", rep->shown - SHOWN_MAX);
    fprintf(rep->out, "%s %s\n", n ? "[FAIL]" : "[ok]  ", title);
}

static const char *v(const PGresult *res, int r, int f) { return PQgetvalue(res, r, f); }

/* ---- what both audits read ---- */

/* One SKU as PostgreSQL holds it: its inventory row, the units its pending and paid orders hold,
 * its ledger rows not yet given back to Redis, how long it has been on sale (PostgreSQL's clock),
 * its sale's shards in Redis. One statement reads a page of them: one snapshot. */
typedef struct sku_row {
    int64_t sku_id, stock, supplied, held, owed, open_for_ms, shards;
} sku_row;

#define SKU_ROWS                                                                                   \
    "SELECT i.sku_id, i.stock, i.supplied,"                                                        \
    "       coalesce((SELECT sum(o.qty) FROM orders o WHERE o.sku_id = i.sku_id"                   \
    "                   AND o.status IN ('pending', 'paid')), 0),"                                 \
    "       (SELECT count(*) FROM stock_returns r WHERE r.sku_id = i.sku_id"                       \
    "           AND r.returned_to_redis_at IS NULL),"                                              \
    "       (extract(epoch FROM now() - i.created_at) * 1000)::bigint, i.shards"                   \
    "  FROM inventory i"

/* The rows of a SKU_ROWS query into rows (room for SKU_PAGE), *n of them. */
static int sku_rows(PGresult *res, sku_row *rows, int *n) {
    *n = PQntuples(res) < SKU_PAGE ? PQntuples(res) : SKU_PAGE;
    for (int r = 0; r < *n; r++) {
        int64_t *f[] = {&rows[r].sku_id, &rows[r].stock,       &rows[r].supplied, &rows[r].held,
                        &rows[r].owed,   &rows[r].open_for_ms, &rows[r].shards};
        for (int k = 0; k < 7; k++) *f[k] = strtoll(v(res, r, k), NULL, 10);
    }
    PQclear(res);
    return 0;
}

/* The next page of SKUs by id after `after` (at most SKU_PAGE). */
static int read_sku_page(sp_reaper *rp, int64_t after, sku_row *rows, int *n, char *errbuf,
                         size_t errlen) {
    char a[24], limit[24];
    const char *params[] = {sp_reaper_i64(a, after), sp_reaper_i64(limit, SKU_PAGE)};
    PGresult *res = sp_reaper_query(
        rp, SKU_ROWS " WHERE i.sku_id > $1::bigint ORDER BY i.sku_id LIMIT $2::int", 2, params,
        errbuf, errlen);
    return res ? sku_rows(res, rows, n) : -1;
}

/* The SKUs of ids (n of them, at most SKU_PAGE), by id; those gone are left out. */
static int read_skus(sp_reaper *rp, const int64_t *ids, int n, sku_row *rows, int *nrows,
                     char *errbuf, size_t errlen) {
    char *array = malloc(3 + 21 * (size_t)n);
    size_t len = 0;
    if (array == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    array[len++] = '{';
    for (int i = 0; i < n; i++)
        len += (size_t)sprintf(array + len, i ? ",%" PRId64 : "%" PRId64, ids[i]);
    array[len++] = '}';
    array[len] = '\0';
    const char *params[] = {array};
    PGresult *res = sp_reaper_query(
        rp, SKU_ROWS " WHERE i.sku_id = ANY($1::bigint[]) ORDER BY i.sku_id", 1, params, errbuf,
        errlen);
    free(array);
    return res ? sku_rows(res, rows, nrows) : -1;
}

/* What a SKU's supply says: supplied = stock + held, else *oversold (held beyond what was put on
 * sale) or *leaked (units gone from stock that no order holds). */
static void supply_of(const sku_row *row, int64_t *oversold, int64_t *leaked) {
    int64_t d = row->supplied - row->stock - row->held;
    *oversold = d < 0 ? -d : 0;
    *leaked = d > 0 ? d : 0;
}

/* A sale as Redis holds it. A sale over N > 1 shards (inventory.shards; docs/reservation.md,
 * "Hot-SKU sharding") as one: it exists when every shard does, it is paused when any shard is, its
 * stock is the units its shards hold (sp_stock_sharded_read: stock + moving, a transfer given and
 * not yet settled counted once), its supplied and inflight summed over the shards. */
typedef struct sale_view {
    int exists, paused;
    char stock[32], supplied[32]; /* as Redis holds them; "" when absent */
    long long inflight;           /* entries in {sku:ID}:resv (every shard's) */
    int missing;                  /* sharded and not exists: the first shard missing */
} sale_view;

/* Runs a command that answers with an integer (HLEN); -1 with errbuf. */
static int redis_int(sp_reaper *rp, const char *cmd, const char *key, long long *out, char *errbuf,
                     size_t errlen) {
    const char *argv[] = {cmd, key};
    redisReply *r = sp_reaper_redis_argv(rp, 2, argv, REDIS_REPLY_INTEGER, errbuf, errlen);
    if (r == NULL) return -1;
    *out = r->integer;
    freeReplyObject(r);
    return 0;
}

/* read_sale of a sale over nshards > 1 shards. */
static int read_sharded_sale(sp_reaper *rp, int64_t sku_id, int nshards, sale_view *sv,
                             char *errbuf, size_t errlen) {
    sp_sharded_units u;
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    if (sp_stock_sharded_read(redis, sku_id, nshards, &u, errbuf, errlen) != 0) {
        sp_reaper_redis_failed(rp);
        return -1;
    }
    memset(sv, 0, sizeof(*sv));
    sv->exists = u.missing < 0;
    sv->missing = u.missing;
    sv->paused = u.paused > 0;
    snprintf(sv->stock, sizeof(sv->stock), "%" PRId64, u.units);
    if (u.nunsupplied == 0) snprintf(sv->supplied, sizeof(sv->supplied), "%" PRId64, u.supplied);
    for (int k = 0; k < nshards; k++) {
        char key[SP_STOCK_KEY_MAX];
        long long n = 0;
        sp_stock_shard_key(key, sku_id, k, "resv");
        if (redis_int(rp, "HLEN", key, &n, errbuf, errlen) != 0) return -1;
        sv->inflight += n;
    }
    return 0;
}

/* The sale of sku_id (over nshards Redis shards: inventory.shards) into *sv. */
static int read_sale(sp_reaper *rp, int64_t sku_id, int nshards, sale_view *sv, char *errbuf,
                     size_t errlen) {
    if (nshards > 1) return read_sharded_sale(rp, sku_id, nshards, sv, errbuf, errlen);
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku_id, "sale");
    const char *hmget[] = {"HMGET", key, "stock", "supplied", "paused"};
    redisReply *r = sp_reaper_redis_argv(rp, 5, hmget, REDIS_REPLY_ARRAY, errbuf, errlen);
    if (r == NULL) return -1;
    if (r->elements != 3) {
        snprintf(errbuf, errlen, "HMGET %s: unexpected reply", key);
        freeReplyObject(r);
        return -1;
    }
    memset(sv, 0, sizeof(*sv));
    sv->exists = r->element[0]->type == REDIS_REPLY_STRING;
    sv->paused = r->element[2]->type == REDIS_REPLY_STRING;
    if (sv->exists) snprintf(sv->stock, sizeof(sv->stock), "%s", r->element[0]->str);
    if (r->element[1]->type == REDIS_REPLY_STRING)
        snprintf(sv->supplied, sizeof(sv->supplied), "%s", r->element[1]->str);
    freeReplyObject(r);
    sp_stock_key(key, sku_id, "resv");
    return redis_int(rp, "HLEN", key, &sv->inflight, errbuf, errlen);
}

/* Per partition of the events topic (npartitions of them), its end (high watermark) and what
 * the consumer stored of it (next_offset; 0 when nothing). */
static int read_positions(sp_reaper *rp, int npartitions, int64_t *high, int64_t *stored,
                          char *errbuf, size_t errlen) {
    const char *params[] = {rp->cfg->kafka_topic};
    for (int p = 0; p < npartitions; p++) {
        int64_t low = 0;
        rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(
            rp->kafka, rp->cfg->kafka_topic, p, &low, &high[p], WATERMARK_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(errbuf, errlen, "watermarks of %s[%d]: %s", rp->cfg->kafka_topic, p,
                     rd_kafka_err2str(err));
            return -1;
        }
        stored[p] = 0;
    }
    PGresult *res = sp_reaper_query(
        rp, "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1", 1, params,
        errbuf, errlen);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++) {
        int p = atoi(v(res, r, 0));
        if (p >= 0 && p < npartitions) stored[p] = strtoll(v(res, r, 1), NULL, 10);
    }
    PQclear(res);
    return 0;
}

/* ---- PostgreSQL ---- */

static int check_supply(sp_reaper *rp, report *rep, char *errbuf, size_t errlen) {
    int before = check_begin(rep), n = 0;
    int64_t last = 0;
    sku_row *rows = malloc(SKU_PAGE * sizeof(*rows));
    if (rows == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    do {
        if (read_sku_page(rp, last, rows, &n, errbuf, errlen) != 0) {
            free(rows);
            return -1;
        }
        for (int r = 0; r < n; r++) {
            int64_t oversold, leaked;
            supply_of(&rows[r], &oversold, &leaked);
            if (oversold || leaked)
                violation(rep,
                          "sku %" PRId64 ": supplied %" PRId64 " != stock %" PRId64
                          " + pending/paid %" PRId64 " (%" PRId64 " units %s)",
                          rows[r].sku_id, rows[r].supplied, rows[r].stock, rows[r].held,
                          oversold + leaked, leaked ? "missing" : "too many: oversold");
            last = rows[r].sku_id;
        }
    } while (n == SKU_PAGE);
    free(rows);
    check_end(rep, before, "per SKU: supplied = stock + qty of pending and paid orders");
    return 0;
}

static int check_payments(sp_reaper *rp, report *rep, char *errbuf, size_t errlen) {
    int before = check_begin(rep);
    PGresult *res = sp_reaper_query(
        rp,
        "SELECT o.order_id, o.sku_id, o.status, o.refund_due, o.paid_at IS NOT NULL,"
        "       o.closed_at IS NOT NULL, r.reason"
        "  FROM orders o LEFT JOIN stock_returns r ON r.order_id = o.order_id"
        " WHERE (o.status = 'paid' AND (o.refund_due OR o.closed_at IS NOT NULL"
        "                               OR r.order_id IS NOT NULL))"
        "    OR (o.status IN ('expired', 'rejected', 'cancelled') AND o.paid_at IS NOT NULL"
        "        AND NOT o.refund_due)"
        "    OR (o.status = 'pending' AND (o.refund_due OR o.paid_at IS NOT NULL))"
        " ORDER BY o.order_id LIMIT 1000",
        0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *status = v(res, r, 2);
        int refund = v(res, r, 3)[0] == 't';
        int closed = v(res, r, 5)[0] == 't', returned = !PQgetisnull(res, r, 6);
        if (strcmp(status, "paid") == 0)
            violation(rep, "order %s (sku %s) is paid and also %s", v(res, r, 0), v(res, r, 1),
                      returned ? "returned its stock (ledger row): paid and expired"
                      : closed ? "closed (closed_at set)"
                               : "marked refund_due");
        else if (strcmp(status, "pending") == 0)
            violation(rep, "order %s (sku %s) is pending but has a payment recorded%s",
                      v(res, r, 0), v(res, r, 1), refund ? " as refund_due" : "");
        else
            violation(rep, "order %s (sku %s) is %s with a payment (paid_at) not marked refund_due",
                      v(res, r, 0), v(res, r, 1), status);
    }
    PQclear(res);
    check_end(rep, before, "no order is both paid and expired; late payments are refund_due");
    return 0;
}

static int check_ledger(sp_reaper *rp, report *rep, char *errbuf, size_t errlen) {
    int before = check_begin(rep);
    PGresult *res = sp_reaper_query(rp,
                                    "SELECT o.order_id, o.sku_id, o.status FROM orders o"
                                    " WHERE o.status IN ('expired', 'cancelled')"
                                    "   AND NOT EXISTS (SELECT 1 FROM stock_returns r"
                                    "                    WHERE r.order_id = o.order_id)"
                                    " ORDER BY o.order_id LIMIT 1000",
                                    0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++)
        violation(rep,
                  "order %s (sku %s) is %s but has no row in the return ledger: its stock "
                  "never went back",
                  v(res, r, 0), v(res, r, 1), v(res, r, 2));
    PQclear(res);
    res = sp_reaper_query(rp,
                          "SELECT r.order_id, r.sku_id, r.reason, coalesce(o.status, '(no order)'),"
                          "       r.qty, o.qty, r.user_id, o.user_id, o.sku_id"
                          "  FROM stock_returns r LEFT JOIN orders o ON o.order_id = r.order_id"
                          " WHERE o.order_id IS NULL"
                          "    OR NOT ((o.status = 'expired' AND r.reason = 'expired')"
                          "         OR (o.status = 'cancelled' AND r.reason = 'voided'))"
                          "    OR o.qty <> r.qty OR o.user_id <> r.user_id OR o.sku_id <> r.sku_id"
                          " ORDER BY r.order_id LIMIT 1000",
                          0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++)
        violation(rep,
                  "ledger row %s (sku %s, reason %s, qty %s, user %s) does not match its order "
                  "(%s, qty %s, user %s, sku %s)",
                  v(res, r, 0), v(res, r, 1), v(res, r, 2), v(res, r, 4), v(res, r, 6),
                  v(res, r, 3), PQgetisnull(res, r, 5) ? "-" : v(res, r, 5),
                  PQgetisnull(res, r, 7) ? "-" : v(res, r, 7),
                  PQgetisnull(res, r, 8) ? "-" : v(res, r, 8));
    PQclear(res);
    check_end(rep, before, "every expired or cancelled order has exactly one matching ledger row");
    return 0;
}

/* ---- Redis ---- */

/* Why the system is not quiet ("" when it is): consumer lag, or ledger rows waiting. */
static int global_quiet(sp_reaper *rp, char *why, size_t whylen, char *errbuf, size_t errlen) {
    int n = 0;
    int64_t lag = 0, *high = NULL, *stored = NULL;
    why[0] = '\0';
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, WATERMARK_TIMEOUT_MS, &n, errbuf,
                                  errlen) != 0)
        return -1;
    high = calloc(n > 0 ? (size_t)n : 1, sizeof(*high));
    stored = calloc(n > 0 ? (size_t)n : 1, sizeof(*stored));
    int rc = high && stored ? read_positions(rp, n, high, stored, errbuf, errlen) : -1;
    if (!high || !stored) snprintf(errbuf, errlen, "out of memory");
    for (int p = 0; rc == 0 && p < n; p++)
        if (high[p] > stored[p]) lag += high[p] - stored[p];
    free(high);
    free(stored);
    if (rc != 0) return -1;
    if (lag > 0) {
        snprintf(why, whylen, "the consumer has %" PRId64 " events to apply", lag);
        return 0;
    }
    PGresult *res = sp_reaper_query(
        rp, "SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NULL", 0, NULL,
        errbuf, errlen);
    if (res == NULL) return -1;
    int64_t owed = strtoll(v(res, 0, 0), NULL, 10);
    PQclear(res);
    if (owed > 0)
        snprintf(why, whylen, "%" PRId64 " ledger rows wait to be given back to Redis", owed);
    return 0;
}

/* Compares one SKU's per-user counts; *nbad counts mismatches, printed only when rep. A sale over
 * nshards > 1 shards keeps each user's count on the user's home shard (sp_stock_home_shard): each
 * is read there, and the users counted are those of every shard. */
static int compare_users(sp_reaper *rp, int64_t sku_id, int nshards, report *rep, int *nbad,
                         char *errbuf, size_t errlen) {
    char key[SP_STOCK_KEY_MAX];
    int64_t last = 0, nusers = 0;
    long long hlen = 0;
    const char **argv = malloc((2 + SP_REAPER_USER_PAGE) * sizeof(*argv));
    int *rowof = malloc(SP_REAPER_USER_PAGE * sizeof(*rowof)); /* argv[2 + j]: row rowof[j] */
    int rc = -1;
    if (argv == NULL || rowof == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    if (nshards < 1) nshards = 1;
    for (;;) {
        PGconn *pg = sp_reaper_pg(rp, errbuf, errlen);
        PGresult *res = pg ? sp_reaper_user_units_page(pg, sku_id, last, errbuf, errlen) : NULL;
        if (res == NULL && pg) sp_reaper_pg_failed(rp);
        if (res == NULL) goto out;
        int n = PQntuples(res);
        nusers += n;
        for (int k = 0; k < nshards && n > 0; k++) {
            int m = 0;
            for (int i = 0; i < n; i++)
                if (sp_stock_home_shard(strtoll(v(res, i, 0), NULL, 10), nshards) == k)
                    rowof[m] = i, argv[2 + m++] = v(res, i, 0);
            if (m == 0) continue;
            sp_stock_shard_key(key, sku_id, k, "users");
            argv[0] = "HMGET", argv[1] = key;
            redisReply *r = sp_reaper_redis_argv(rp, 2 + m, argv, REDIS_REPLY_ARRAY, errbuf,
                                                 errlen);
            if (r == NULL || r->elements != (size_t)m) {
                if (r) snprintf(errbuf, errlen, "HMGET %s: unexpected reply", key);
                freeReplyObject(r);
                PQclear(res);
                goto out;
            }
            for (int j = 0; j < m; j++) {
                int i = rowof[j];
                const char *got = r->element[j]->type == REDIS_REPLY_STRING ? r->element[j]->str
                                                                            : "0";
                if (strcmp(got, v(res, i, 1)) != 0) {
                    (*nbad)++;
                    if (rep && nshards > 1)
                        violation(rep,
                                  "sku %" PRId64 ": Redis counts %s units for user %s on its home "
                                  "shard %d of %d, PostgreSQL's pending and paid orders %s",
                                  sku_id, got, v(res, i, 0), k, nshards, v(res, i, 1));
                    else if (rep)
                        violation(rep,
                                  "sku %" PRId64 ": Redis counts %s units for user %s, "
                                  "PostgreSQL's pending and paid orders %s",
                                  sku_id, got, v(res, i, 0), v(res, i, 1));
                }
            }
            freeReplyObject(r);
        }
        if (n > 0) last = strtoll(v(res, n - 1, 0), NULL, 10);
        PQclear(res);
        if (n < SP_REAPER_USER_PAGE) break;
    }
    for (int k = 0; k < nshards; k++) {
        long long here = 0;
        sp_stock_shard_key(key, sku_id, k, "users");
        if (redis_int(rp, "HLEN", key, &here, errbuf, errlen) != 0) goto out;
        hlen += here;
    }
    if (hlen != nusers) {
        (*nbad)++;
        if (rep)
            violation(rep,
                      "sku %" PRId64 ": Redis counts units for %lld users%s, PostgreSQL's "
                      "pending and paid orders belong to %" PRId64 " users",
                      sku_id, hlen, nshards > 1 ? " over its shards" : "", nusers);
    }
    rc = 0;
out:
    free(argv);
    free(rowof);
    return rc;
}

/* One pass over every SKU. *nbusy: SKUs not quiet (reservations in flight, paused); *nbad:
 * mismatches. With rep, mismatches and busy SKUs are reported as violations. */
static int compare_pass(sp_reaper *rp, report *rep, int *nbusy, int *nbad, char *errbuf,
                        size_t errlen) {
    char after[24], limit[24];
    int64_t last = 0;
    *nbusy = *nbad = 0;
    for (;;) {
        const char *params[] = {sp_reaper_i64(after, last), sp_reaper_i64(limit, SKU_PAGE)};
        PGresult *res = sp_reaper_query(
            rp,
            "SELECT sku_id, stock, supplied, per_user_limit, shards FROM inventory"
            " WHERE sku_id > $1::bigint ORDER BY sku_id LIMIT $2::int",
            2, params, errbuf, errlen);
        if (res == NULL) return -1;
        int n = PQntuples(res);
        for (int i = 0; i < n; i++) {
            int64_t sku = strtoll(v(res, i, 0), NULL, 10);
            int shards = atoi(v(res, i, 4));
            char over[40] = ""; /* a sharded sale's figures are summed over its shards */
            sale_view sv;
            last = sku;
            if (shards > 1) snprintf(over, sizeof(over), " summed over %d shards", shards);
            if (read_sale(rp, sku, shards, &sv, errbuf, errlen) != 0) {
                PQclear(res);
                return -1;
            }
            const char *stock = sv.stock, *supplied = sv.supplied;
            if (sv.paused || sv.inflight > 0) {
                (*nbusy)++;
                if (rep)
                    violation(rep, "sku %" PRId64 ": never quiet within AUDIT_WAIT_MS (%s)", sku,
                              sv.paused ? "paused by a reconcile" : "reservations in flight");
                continue;
            }
            if (!sv.exists) {
                (*nbad)++;
                if (rep && shards > 1)
                    violation(rep,
                              "sku %" PRId64 ": PostgreSQL has it on sale over %d Redis shards, "
                              "Redis has no shard %d",
                              sku, shards, sv.missing);
                else if (rep)
                    violation(rep, "sku %" PRId64 ": PostgreSQL has it on sale, Redis has no sale",
                              sku);
                continue;
            }
            if (strcmp(stock, v(res, i, 1)) != 0 || strcmp(supplied, v(res, i, 2)) != 0) {
                (*nbad)++;
                if (rep)
                    violation(rep,
                              "sku %" PRId64 ": Redis stock %s (supplied %s)%s != PostgreSQL "
                              "stock %s (supplied %s)",
                              sku, stock, supplied[0] ? supplied : "-", over, v(res, i, 1),
                              v(res, i, 2));
            }
            /* Redis keeps per-user counts only for a sale with a per-user limit. */
            if (strcmp(v(res, i, 3), "0") != 0 &&
                compare_users(rp, sku, shards, rep, nbad, errbuf, errlen) != 0) {
                PQclear(res);
                return -1;
            }
        }
        PQclear(res);
        if (n < SKU_PAGE) return 0;
    }
}

static int check_redis(sp_reaper *rp, report *rep, char *errbuf, size_t errlen) {
    char why[256];
    int nbusy = 0, nbad = 0;
    int64_t deadline = sp_clock_mono_ms() + rp->cfg->audit_wait_ms;
    int before = check_begin(rep);
    for (;;) {
        if (global_quiet(rp, why, sizeof(why), errbuf, errlen) != 0) return -1;
        if (why[0] == '\0') {
            if (compare_pass(rp, NULL, &nbusy, &nbad, errbuf, errlen) != 0) return -1;
            if (nbusy == 0 && nbad == 0) break;
            if (nbusy == 0) {
                /* Mismatches on a quiet system: look again a second later, and report what is
                 * still there. */
                if (sp_reaper_sleep(1000) != 0) {
                    snprintf(errbuf, errlen, "stopped");
                    return -1;
                }
                if (global_quiet(rp, why, sizeof(why), errbuf, errlen) != 0) return -1;
                if (why[0] == '\0') {
                    if (compare_pass(rp, rep, &nbusy, &nbad, errbuf, errlen) != 0) return -1;
                    break;
                }
            }
        }
        if (sp_clock_mono_ms() >= deadline) {
            if (why[0])
                violation(rep, "never quiet within AUDIT_WAIT_MS: %s", why);
            else if (compare_pass(rp, rep, &nbusy, &nbad, errbuf, errlen) != 0)
                return -1;
            break;
        }
        if (sp_reaper_sleep(500) != 0) {
            snprintf(errbuf, errlen, "stopped");
            return -1;
        }
    }
    check_end(rep, before,
              "once quiet, Redis equals PostgreSQL: per SKU stock and supplied, per user units");
    return 0;
}

int sp_audit_run(sp_reaper *rp, const sp_audit_opts *opts, FILE *out, char *errbuf, size_t errlen) {
    report rep = {.out = out};
    PGresult *res = sp_reaper_query(
        rp,
        "SELECT (SELECT count(*) FROM inventory), (SELECT count(*) FROM orders),"
        "       (SELECT count(*) FROM stock_returns)",
        0, NULL, errbuf, errlen);
    if (res == NULL) goto failed;
    fprintf(out, "reaper audit: %s SKUs, %s orders, %s ledger rows (topic %s)\n", v(res, 0, 0),
            v(res, 0, 1), v(res, 0, 2), rp->cfg->kafka_topic);
    PQclear(res);
    if (check_supply(rp, &rep, errbuf, errlen) != 0 ||
        check_payments(rp, &rep, errbuf, errlen) != 0 ||
        check_ledger(rp, &rep, errbuf, errlen) != 0)
        goto failed;
    if (opts->pg_only)
        fprintf(out, "[skip] Redis not compared (--pg-only)\n");
    else if (check_redis(rp, &rep, errbuf, errlen) != 0)
        goto failed;
    if (rep.nviolations == 0)
        fprintf(out, "audit passed\n");
    else
        fprintf(out, "audit FAILED: %d violations\n", rep.nviolations);
    fflush(out);
    return rep.nviolations;
failed:
    fprintf(out, "audit could not finish: %s\n", errbuf);
    fflush(out);
    return -1;
}

/* ---- the periodic audit ---- */

/* One SKU's Redis sale against its PostgreSQL row, read between two looks at Redis (first, now):
 * counted in fig as unchecked (not quiet, or changing), differing, or equal. caught_up: the
 * consumer had stored the SKU's partition up to its end as of after the first look. */
static void judge(sp_reaper *rp, const sku_row *row, const sale_view *first, const sale_view *now,
                  int caught_up, sp_audit_figures *fig) {
    sp_log_ctx ctx = {.sku_id = row->sku_id};
    if (first->exists != now->exists || first->paused != now->paused ||
        first->inflight != now->inflight || strcmp(first->stock, now->stock) != 0 ||
        strcmp(first->supplied, now->supplied) != 0) {
        fig->nunchecked++; /* it moved while it was read */
        return;
    }
    if (!now->exists) {
        /* The producer opens the sale in Redis right after Kafka took its stock.set; the consumer
         * may store it first: only a sale missing for long is lost (as the reservation sweep). */
        if (row->open_for_ms <= rp->cfg->resv_lost_after_ms) {
            fig->nunchecked++;
            return;
        }
        fig->ndiffering++;
        fig->below += row->stock;
        if (fig->ndiffering <= LOGGED_MAX && row->shards > 1)
            SP_LOG_CTX(SP_LOG_WARN, &ctx,
                       "audit: PostgreSQL has the sale (stock %" PRId64 ") over %d Redis shards, "
                       "Redis has no shard %d",
                       row->stock, (int)row->shards, now->missing);
        else if (fig->ndiffering <= LOGGED_MAX)
            SP_LOG_CTX(SP_LOG_WARN, &ctx,
                       "audit: PostgreSQL has the sale (stock %" PRId64 "), Redis has none",
                       row->stock);
        return;
    }
    if (now->paused || now->inflight > 0 || row->owed > 0 || !caught_up) {
        fig->nunchecked++;
        return;
    }
    char *end = NULL;
    long long stock = strtoll(now->stock, &end, 10);
    int parsed = end != now->stock && *end == '\0';
    char pg_supplied[24];
    sp_reaper_i64(pg_supplied, row->supplied);
    if (parsed && stock == row->stock && strcmp(now->supplied, pg_supplied) == 0) return;
    fig->ndiffering++;
    if (parsed && stock > row->stock) fig->above += stock - row->stock;
    if (parsed && stock < row->stock) fig->below += row->stock - stock;
    if (fig->ndiffering <= LOGGED_MAX)
        SP_LOG_CTX(SP_LOG_WARN, &ctx,
                   "audit: Redis stock %s (supplied %s)%s != PostgreSQL stock %" PRId64
                   " (supplied %" PRId64 ")",
                   now->stock, now->supplied[0] ? now->supplied : "-",
                   row->shards > 1 ? " summed over its shards" : "", row->stock, row->supplied);
}

/* One page of SKUs (ids, n of them, their sales over shards[i] Redis shards) into fig. */
static int watch_page(sp_reaper *rp, const int64_t *ids, const int *shards, int n, int npartitions,
                      sale_view *first, sku_row *rows, int64_t *high, int64_t *stored,
                      sp_audit_figures *fig, char *errbuf, size_t errlen) {
    int nrows = 0;
    /* Redis first, then the end of each partition, then what the consumer stored and PostgreSQL's
     * rows: every event Kafka had taken before Redis was read is in those rows when the consumer
     * stored the partition up to that end (a restock reaches Redis only after Kafka took it). */
    for (int i = 0; i < n; i++)
        if (read_sale(rp, ids[i], shards[i], &first[i], errbuf, errlen) != 0) return -1;
    if (read_positions(rp, npartitions, high, stored, errbuf, errlen) != 0 ||
        read_skus(rp, ids, n, rows, &nrows, errbuf, errlen) != 0)
        return -1;
    for (int r = 0, i = 0; r < nrows; r++) {
        int64_t oversold, leaked;
        sale_view now;
        sp_log_ctx ctx = {.sku_id = rows[r].sku_id};
        while (i < n && ids[i] < rows[r].sku_id) i++; /* both by id */
        if (i == n) break;
        supply_of(&rows[r], &oversold, &leaked);
        fig->nskus++;
        fig->oversold += oversold;
        fig->leaked += leaked;
        if ((oversold || leaked) && ++fig->nsupply <= LOGGED_MAX)
            SP_LOG_CTX(SP_LOG_WARN, &ctx,
                       "audit: supplied %" PRId64 " != stock %" PRId64 " + pending/paid %" PRId64
                       " (%" PRId64 " units %s)",
                       rows[r].supplied, rows[r].stock, rows[r].held, oversold + leaked,
                       leaked ? "missing: leaked" : "too many: oversold");
        /* the shards of the first look: a sale's shards are fixed for its life */
        if (read_sale(rp, rows[r].sku_id, shards[i], &now, errbuf, errlen) != 0) return -1;
        int32_t p = sp_reaper_partition_in(rows[r].sku_id, npartitions);
        judge(rp, &rows[r], &first[i], &now, stored[p] >= high[p], fig);
    }
    return 0;
}

int sp_audit_watch(sp_reaper *rp, sp_audit_figures *fig, char *errbuf, size_t errlen) {
    int npartitions = 0, rc = -1;
    int64_t last = 0, *ids = NULL, *high = NULL, *stored = NULL;
    int *shards = NULL;
    sale_view *first = NULL;
    sku_row *rows = NULL;
    memset(fig, 0, sizeof(*fig));
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, WATERMARK_TIMEOUT_MS,
                                  &npartitions, errbuf, errlen) != 0)
        goto out;
    if (npartitions <= 0) {
        snprintf(errbuf, errlen, "topic %s has no partitions", rp->cfg->kafka_topic);
        goto out;
    }
    ids = malloc(SKU_PAGE * sizeof(*ids));
    shards = malloc(SKU_PAGE * sizeof(*shards));
    first = malloc(SKU_PAGE * sizeof(*first));
    rows = malloc(SKU_PAGE * sizeof(*rows));
    high = calloc((size_t)npartitions, sizeof(*high));
    stored = calloc((size_t)npartitions, sizeof(*stored));
    if (ids == NULL || shards == NULL || first == NULL || rows == NULL || high == NULL ||
        stored == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (;;) {
        char after[24], limit[24];
        const char *params[] = {sp_reaper_i64(after, last), sp_reaper_i64(limit, SKU_PAGE)};
        sp_health_beat();
        if (sp_signal_stop_requested()) {
            snprintf(errbuf, errlen, "stopped");
            goto out;
        }
        PGresult *res = sp_reaper_query(rp,
                                        "SELECT sku_id, shards FROM inventory"
                                        " WHERE sku_id > $1::bigint ORDER BY sku_id LIMIT $2::int",
                                        2, params, errbuf, errlen);
        if (res == NULL) goto out;
        int n = PQntuples(res);
        for (int i = 0; i < n; i++) {
            ids[i] = strtoll(v(res, i, 0), NULL, 10);
            shards[i] = atoi(v(res, i, 1));
        }
        PQclear(res);
        if (n > 0 && watch_page(rp, ids, shards, n, npartitions, first, rows, high, stored, fig,
                                errbuf, errlen) != 0)
            goto out;
        if (n < SKU_PAGE) break;
        last = ids[n - 1];
    }
    fig->clean = fig->oversold == 0 && fig->leaked == 0 && fig->ndiffering == 0;
    sp_metric_set(&m_oversold, fig->oversold);
    sp_metric_set(&m_leaked, fig->leaked);
    sp_metric_set(&m_above, fig->above);
    sp_metric_set(&m_below, fig->below);
    sp_metric_set(&m_differing, fig->ndiffering);
    sp_metric_set(&m_unchecked, fig->nunchecked);
    if (fig->clean) sp_metric_set(&m_last_clean, sp_clock_wall_ms() / 1000);
    rc = 0;
out:
    if (rc != 0 && !sp_signal_stop_requested()) sp_metric_inc(&m_errors);
    free(ids);
    free(shards);
    free(first);
    free(rows);
    free(high);
    free(stored);
    return rc;
}
