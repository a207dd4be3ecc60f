/* reaper_requests.c - the events the reaper published and waits to see applied (the table
 *                     reaper_requests): claiming, unclaiming, forgetting. */
#include "reaper_requests.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "pg_store.h"

int sp_requests_claim_voids(sp_reaper *rp, int64_t sku_id, const char *const *ids, size_t n,
                            int *won, char *errbuf, size_t errlen) {
    char sku[24], retry[24];
    char *array = NULL;
    PGresult *res = NULL;
    int rc = -1;
    memset(won, 0, n * sizeof(*won));
    if (n == 0) return 0;
    if ((array = sp_reaper_text_array(ids, n)) == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    const char *params[] = {array, sp_reaper_i64(sku, sku_id),
                            sp_reaper_i64(retry, rp->cfg->expiry_retry_ms), rp->cfg->worker_id};
    /* As the expiry's claim: a conflicting insert waits for the other replica's commit, then its
     * WHERE is false and the row is not returned. */
    res = sp_reaper_query(rp,
                          "INSERT INTO reaper_requests AS r"
                          "  (order_id, kind, sku_id, requested_at, requested_by) "
                          "SELECT DISTINCT unnest($1::text[]), 'void', $2::bigint, now(), $4 "
                          "ON CONFLICT (order_id, kind) DO UPDATE"
                          "   SET requested_at = now(), requested_by = excluded.requested_by,"
                          "       attempts = r.attempts + 1"
                          " WHERE r.requested_at <= now() - $3::bigint * interval '1 millisecond' "
                          "RETURNING r.order_id",
                          4, params, errbuf, errlen);
    if (res == NULL) goto out;
    for (int r = 0; r < PQntuples(res); r++)
        for (size_t i = 0; i < n; i++)
            if (strcmp(ids[i], PQgetvalue(res, r, 0)) == 0) won[i] = 1;
    rc = 0;
out:
    PQclear(res);
    free(array);
    return rc;
}

void sp_requests_unclaim(sp_reaper *rp, const char *kind, const char *const *ids, size_t n) {
    char err[512];
    char *array = n ? sp_reaper_text_array(ids, n) : NULL;
    const char *params[] = {kind, array, rp->cfg->worker_id};
    if (array == NULL) return;
    if (rp->pg && sp_pg_exec(rp->pg,
                             "DELETE FROM reaper_requests WHERE kind = $1"
                             " AND order_id = ANY($2::text[]) AND requested_by = $3",
                             3, params, err, sizeof(err)) != 0)
        sp_warn("cannot unclaim %zu %s requests: %s", n, kind, err);
    free(array);
}

int sp_requests_forget_decided(sp_reaper *rp, int limit, size_t *ndeleted, char *errbuf,
                               size_t errlen) {
    char n[24];
    const char *params[] = {sp_reaper_i64(n, limit)};
    PGresult *res = sp_reaper_query(
        rp,
        "DELETE FROM reaper_requests WHERE (order_id, kind) IN ("
        "  SELECT q.order_id, q.kind FROM reaper_requests q"
        "    LEFT JOIN orders o ON o.order_id = q.order_id"
        "   WHERE (q.kind = 'expire' AND o.status IS DISTINCT FROM 'pending')"
        "      OR (q.kind = 'void' AND (o.order_id IS NOT NULL"
        "                               OR q.requested_at < now() - interval '1 day'))"
        "   LIMIT $1::int)",
        1, params, errbuf, errlen);
    if (res == NULL) return -1;
    *ndeleted = (size_t)strtoull(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    return 0;
}
