/* audit.c - `reaper audit`: checks the invariants of the whole pipeline and reports each
 *           violation in a sentence. */
#include "audit.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "stock.h"

#define SHOWN_MAX            100 /* violations printed per check */
#define SKU_PAGE             500
#define WATERMARK_TIMEOUT_MS 5000

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

/* ---- PostgreSQL ---- */

static int check_supply(sp_reaper *rp, report *rep, char *errbuf, size_t errlen) {
    int before = check_begin(rep);
    PGresult *res = sp_reaper_query(rp,
                                    "SELECT i.sku_id, i.supplied, i.stock, coalesce(h.held, 0)"
                                    "  FROM inventory i LEFT JOIN ("
                                    "    SELECT sku_id, sum(qty) AS held FROM orders"
                                    "     WHERE status IN ('pending', 'paid') GROUP BY sku_id) h"
                                    "    ON h.sku_id = i.sku_id"
                                    " WHERE i.supplied <> i.stock + coalesce(h.held, 0)"
                                    " ORDER BY i.sku_id LIMIT 1000",
                                    0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    for (int r = 0; r < PQntuples(res); r++) {
        int64_t supplied = strtoll(v(res, r, 1), NULL, 10), stock = strtoll(v(res, r, 2), NULL, 10);
        int64_t held = strtoll(v(res, r, 3), NULL, 10);
        violation(rep,
                  "sku %s: supplied %" PRId64 " != stock %" PRId64 " + pending/paid %" PRId64
                  " (%" PRId64 " units %s)",
                  v(res, r, 0), supplied, stock, held, (int64_t)llabs(supplied - stock - held),
                  supplied > stock + held ? "missing" : "too many: oversold");
    }
    PQclear(res);
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
    int64_t lag = 0;
    why[0] = '\0';
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, WATERMARK_TIMEOUT_MS, &n, errbuf,
                                  errlen) != 0)
        return -1;
    const char *params[] = {rp->cfg->kafka_topic};
    PGresult *res = sp_reaper_query(
        rp, "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1", 1, params,
        errbuf, errlen);
    if (res == NULL) return -1;
    for (int p = 0; p < n; p++) {
        int64_t low = 0, high = 0, stored = 0;
        rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(
            rp->kafka, rp->cfg->kafka_topic, p, &low, &high, WATERMARK_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(errbuf, errlen, "watermarks of %s[%d]: %s", rp->cfg->kafka_topic, p,
                     rd_kafka_err2str(err));
            PQclear(res);
            return -1;
        }
        for (int r = 0; r < PQntuples(res); r++)
            if (atoi(v(res, r, 0)) == p) stored = strtoll(v(res, r, 1), NULL, 10);
        if (high > stored) lag += high - stored;
    }
    PQclear(res);
    if (lag > 0) {
        snprintf(why, whylen, "the consumer has %" PRId64 " events to apply", lag);
        return 0;
    }
    res = sp_reaper_query(rp,
                          "SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NULL",
                          0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int64_t owed = strtoll(v(res, 0, 0), NULL, 10);
    PQclear(res);
    if (owed > 0)
        snprintf(why, whylen, "%" PRId64 " ledger rows wait to be given back to Redis", owed);
    return 0;
}

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

/* Compares one SKU's per-user counts; *nbad counts mismatches, printed only when rep. */
static int compare_users(sp_reaper *rp, int64_t sku_id, report *rep, int *nbad, char *errbuf,
                         size_t errlen) {
    char key[SP_STOCK_KEY_MAX];
    int64_t last = 0, nusers = 0;
    long long hlen = 0;
    const char **argv = malloc((2 + SP_REAPER_USER_PAGE) * sizeof(*argv));
    int rc = -1;
    if (argv == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    sp_stock_key(key, sku_id, "users");
    for (;;) {
        PGconn *pg = sp_reaper_pg(rp, errbuf, errlen);
        PGresult *res = pg ? sp_reaper_user_units_page(pg, sku_id, last, errbuf, errlen) : NULL;
        if (res == NULL && pg) sp_reaper_pg_failed(rp);
        if (res == NULL) goto out;
        int n = PQntuples(res);
        nusers += n;
        if (n > 0) {
            argv[0] = "HMGET", argv[1] = key;
            for (int i = 0; i < n; i++) argv[2 + i] = v(res, i, 0);
            redisReply *r = sp_reaper_redis_argv(rp, 2 + n, argv, REDIS_REPLY_ARRAY, errbuf,
                                                 errlen);
            if (r == NULL || r->elements != (size_t)n) {
                if (r) snprintf(errbuf, errlen, "HMGET %s: unexpected reply", key);
                freeReplyObject(r);
                PQclear(res);
                goto out;
            }
            for (int i = 0; i < n; i++) {
                const char *got = r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str
                                                                            : "0";
                if (strcmp(got, v(res, i, 1)) != 0) {
                    (*nbad)++;
                    if (rep)
                        violation(rep,
                                  "sku %" PRId64 ": Redis counts %s units for user %s, "
                                  "PostgreSQL's pending and paid orders %s",
                                  sku_id, got, v(res, i, 0), v(res, i, 1));
                }
            }
            freeReplyObject(r);
            last = strtoll(v(res, n - 1, 0), NULL, 10);
        }
        PQclear(res);
        if (n < SP_REAPER_USER_PAGE) break;
    }
    if (redis_int(rp, "HLEN", key, &hlen, errbuf, errlen) != 0) goto out;
    if (hlen != nusers) {
        (*nbad)++;
        if (rep)
            violation(rep,
                      "sku %" PRId64 ": Redis counts units for %lld users, PostgreSQL's "
                      "pending and paid orders belong to %" PRId64 " users",
                      sku_id, hlen, nusers);
    }
    rc = 0;
out:
    free(argv);
    return rc;
}

/* One pass over every SKU. *nbusy: SKUs not quiet (reservations in flight, paused); *nbad:
 * mismatches. With rep, mismatches and busy SKUs are reported as violations. */
static int compare_pass(sp_reaper *rp, report *rep, int *nbusy, int *nbad, char *errbuf,
                        size_t errlen) {
    char after[24], limit[24], key[SP_STOCK_KEY_MAX];
    int64_t last = 0;
    *nbusy = *nbad = 0;
    for (;;) {
        const char *params[] = {sp_reaper_i64(after, last), sp_reaper_i64(limit, SKU_PAGE)};
        PGresult *res = sp_reaper_query(rp,
                                        "SELECT sku_id, stock, supplied FROM inventory"
                                        " WHERE sku_id > $1::bigint ORDER BY sku_id LIMIT $2::int",
                                        2, params, errbuf, errlen);
        if (res == NULL) return -1;
        int n = PQntuples(res);
        for (int i = 0; i < n; i++) {
            int64_t sku = strtoll(v(res, i, 0), NULL, 10);
            long long inflight = 0;
            last = sku;
            sp_stock_key(key, sku, "sale");
            const char *hmget[] = {"HMGET", key, "stock", "supplied", "paused"};
            redisReply *r = sp_reaper_redis_argv(rp, 5, hmget, REDIS_REPLY_ARRAY, errbuf, errlen);
            if (r == NULL || r->elements != 3) {
                if (r) snprintf(errbuf, errlen, "HMGET %s: unexpected reply", key);
                freeReplyObject(r);
                PQclear(res);
                return -1;
            }
            sp_stock_key(key, sku, "resv");
            int missing = r->element[0]->type != REDIS_REPLY_STRING;
            int paused = r->element[2]->type == REDIS_REPLY_STRING;
            char stock[32], supplied[32];
            snprintf(stock, sizeof(stock), "%s", missing ? "" : r->element[0]->str);
            snprintf(supplied, sizeof(supplied), "%s",
                     r->element[1]->type == REDIS_REPLY_STRING ? r->element[1]->str : "");
            freeReplyObject(r);
            if (redis_int(rp, "HLEN", key, &inflight, errbuf, errlen) != 0) {
                PQclear(res);
                return -1;
            }
            if (paused || inflight > 0) {
                (*nbusy)++;
                if (rep)
                    violation(rep, "sku %" PRId64 ": never quiet within AUDIT_WAIT_MS (%s)", sku,
                              paused ? "paused by a reconcile" : "reservations in flight");
                continue;
            }
            if (missing) {
                (*nbad)++;
                if (rep)
                    violation(rep, "sku %" PRId64 ": PostgreSQL has it on sale, Redis has no sale",
                              sku);
                continue;
            }
            if (strcmp(stock, v(res, i, 1)) != 0 || strcmp(supplied, v(res, i, 2)) != 0) {
                (*nbad)++;
                if (rep)
                    violation(rep,
                              "sku %" PRId64 ": Redis stock %s (supplied %s) != PostgreSQL stock "
                              "%s (supplied %s)",
                              sku, stock, supplied[0] ? supplied : "-", v(res, i, 1), v(res, i, 2));
            }
            if (compare_users(rp, sku, rep, nbad, errbuf, errlen) != 0) {
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
