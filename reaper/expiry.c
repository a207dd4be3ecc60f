/* expiry.c - expires unpaid orders: publishes order.expired for every pending order past its
 *            deadline, once per EXPIRY_RETRY_MS however many reapers run. */
#include "expiry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "reaper_requests.h"
#include "signals.h"

/* How late an order's expiry was, in ms (rendered in seconds): 100 ms .. 1 h. */
static const int64_t lateness_ms_bounds[] = {100,   250,   500,   1000,   2500,   5000,
                                             10000, 30000, 60000, 300000, 900000, 3600000};

static sp_metric m_expired = SP_METRIC_COUNTER(
    "stockpipe_reaper_expired_total",
    "order.expired events published for unpaid orders past their deadline and acknowledged by "
    "Kafka.",
    NULL);
static sp_metric m_lateness = SP_METRIC_HISTOGRAM(
    "stockpipe_reaper_expiry_lateness_seconds",
    "How long after its deadline (expires_at) an order's order.expired was acknowledged by Kafka.",
    NULL, lateness_ms_bounds, 12, 1e-3);
static sp_metric m_errors = SP_REAPER_ERRORS("expire");

void sp_expiry_register_metrics(void) {
    sp_metrics_register(&m_expired);
    sp_metrics_register(&m_lateness);
    sp_metrics_register(&m_errors);
}

/* Claims due orders ($1 at most; $2 = EXPIRY_RETRY_MS; $3 = this worker): one statement, so one
 * short transaction. An order another replica claimed within $2 is left out; one claimed before
 * that is claimed again (that replica died, or Kafka never took its event). When two replicas
 * insert the same order at once, the second waits for the first's commit and then its WHERE is
 * false: the row comes back to one of them only. */
static const char claim_sql[] =
    "WITH due AS ("
    "  SELECT o.order_id, o.sku_id FROM orders o"
    "   WHERE o.status = 'pending' AND o.expires_at <= now()"
    "     AND NOT EXISTS (SELECT 1 FROM reaper_requests q"
    "                      WHERE q.order_id = o.order_id AND q.kind = 'expire'"
    "                        AND q.requested_at > now() - $2::bigint * interval '1 millisecond')"
    "   ORDER BY o.expires_at"
    "   LIMIT $1::int) "
    "INSERT INTO reaper_requests AS r (order_id, kind, sku_id, requested_at, requested_by) "
    "SELECT order_id, 'expire', sku_id, now(), $3 FROM due "
    "ON CONFLICT (order_id, kind) DO UPDATE"
    "   SET requested_at = now(), requested_by = excluded.requested_by,"
    "       attempts = r.attempts + 1"
    " WHERE r.requested_at <= now() - $2::bigint * interval '1 millisecond' "
    "RETURNING r.order_id, r.sku_id,"
    "  (SELECT (extract(epoch FROM o.expires_at) * 1000)::bigint"
    "     FROM orders o WHERE o.order_id = r.order_id)";

/* Claims one batch and publishes it. *nclaimed, *nacked. */
static int expire_batch(sp_reaper *rp, size_t *nclaimed, size_t *nacked, char *errbuf,
                        size_t errlen) {
    char limit[24], retry[24];
    const char *params[] = {sp_reaper_i64(limit, rp->cfg->reaper_batch),
                            sp_reaper_i64(retry, rp->cfg->expiry_retry_ms), rp->cfg->worker_id};
    sp_event *evs = NULL;
    int64_t *due_ms = NULL;
    int *acked = NULL;
    const char **failed = NULL;
    PGresult *res = NULL;
    int rc = -1;
    *nclaimed = *nacked = 0;

    res = sp_reaper_query(rp, claim_sql, 3, params, errbuf, errlen);
    if (res == NULL) return -1;
    size_t n = (size_t)PQntuples(res);
    if (n == 0) {
        rc = 0;
        goto out;
    }
    evs = calloc(n, sizeof(*evs));
    due_ms = calloc(n, sizeof(*due_ms));
    acked = calloc(n, sizeof(*acked));
    failed = calloc(n, sizeof(*failed));
    if (evs == NULL || due_ms == NULL || acked == NULL || failed == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    int64_t now = sp_clock_wall_ms();
    for (size_t i = 0; i < n; i++) {
        evs[i].type = SP_EV_ORDER_EXPIRED;
        evs[i].ts_ms = now;
        evs[i].sku_id = strtoll(PQgetvalue(res, (int)i, 1), NULL, 10);
        snprintf(evs[i].order_id, sizeof(evs[i].order_id), "%s", PQgetvalue(res, (int)i, 0));
        due_ms[i] = PQgetisnull(res, (int)i, 2) ? now
                                                : strtoll(PQgetvalue(res, (int)i, 2), NULL, 10);
    }
    *nclaimed = n;
    *nacked = sp_reaper_publish(rp, evs, n, acked);
    int64_t acked_at = sp_clock_wall_ms();
    size_t nfailed = 0;
    for (size_t i = 0; i < n; i++) {
        if (acked[i]) {
            sp_metric_inc(&m_expired);
            sp_metric_observe(&m_lateness, acked_at > due_ms[i] ? acked_at - due_ms[i] : 0);
        } else {
            failed[nfailed++] = evs[i].order_id;
        }
    }
    if (nfailed > 0) {
        sp_metric_inc(&m_errors);
        sp_warn("expiry: kafka did not acknowledge %zu of %zu order.expired; they are tried again",
                nfailed, n);
        sp_requests_unclaim(rp, "expire", failed, nfailed);
    }
    sp_debug("expiry: %zu orders claimed, %zu order.expired acknowledged", n, *nacked);
    rc = 0;
out:
    PQclear(res);
    free(evs);
    free(due_ms);
    free(acked);
    free(failed);
    return rc;
}

int sp_expiry_sweep(sp_reaper *rp, int64_t budget_ms, size_t *nexpired, char *errbuf,
                    size_t errlen) {
    int64_t until = sp_clock_mono_ms() + budget_ms;
    size_t total = 0, nclaimed = 0, nacked = 0;
    do {
        sp_health_beat();
        if (expire_batch(rp, &nclaimed, &nacked, errbuf, errlen) != 0) {
            sp_metric_inc(&m_errors);
            *nexpired = total;
            return -1;
        }
        total += nacked;
    } while (nclaimed == (size_t)rp->cfg->reaper_batch && sp_clock_mono_ms() < until &&
             !sp_signal_stop_requested());
    *nexpired = total;
    return 0;
}
