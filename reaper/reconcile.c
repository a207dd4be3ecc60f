/* reconcile.c - notices that Redis lost data and rebuilds sales in Redis from PostgreSQL. */
#include "reconcile.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "http.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "pg_store.h"
#include "signals.h"
#include "stock.h"
#include "stock_return.h"

#define EPOCH_KEY "stockpipe:reaper:epoch"
/* Set by the replica reconciling every SKU once its sales are paused, settled and caught up: the
 * other replicas help rebuild them (each under its SKU lock). */
#define RECOVERY_KEY         "stockpipe:reaper:recovery"
#define RECOVERY_TTL_S       "600"
#define RECOVERY_VALUE_MAX   (256 + SP_REDIS_IDENTITY_MAX) /* "token\nepoch\nreplid" */
#define SKU_PAGE             500                           /* SKUs per inventory page */
#define LEDGER_PAGE          1000                          /* ledger rows per query */
#define RESV_SCAN            256  /* resv entries asked for per HSCAN step */
#define STEP_MAX             1024 /* most resv entries looked up in one statement */
#define WATERMARK_TIMEOUT_MS 5000

static sp_metric m_reconciled = SP_METRIC_COUNTER(
    "stockpipe_reaper_reconciled_total",
    "SKUs whose Redis sale (stock, per-user counts) was rebuilt from PostgreSQL.", NULL);
static sp_metric m_data_loss = SP_METRIC_COUNTER(
    "stockpipe_reaper_redis_data_loss_total",
    "Times Redis was found emptied, restarted or failed over since the last reconcile of every "
    "SKU.",
    NULL);
static sp_metric m_recovery = SP_METRIC_GAUGE_SCALED(
    "stockpipe_reaper_recovery_seconds",
    "The last reconcile of every SKU: from its start (the loss noticed) until every open sale "
    "(units left or orders pending in PostgreSQL) was rebuilt and taking orders again.",
    NULL, 1e-3);
static sp_metric m_paused = SP_METRIC_GAUGE(
    "stockpipe_reaper_sales_paused",
    "Sales this reaper's reconcile of every SKU has paused and not rebuilt yet (orders for them "
    "are answered 503 recovering).",
    NULL);
static sp_metric m_errors = SP_REAPER_ERRORS("reconcile");

void sp_reconcile_register_metrics(void) {
    sp_metrics_register(&m_reconciled);
    sp_metrics_register(&m_data_loss);
    sp_metrics_register(&m_recovery);
    sp_metrics_register(&m_paused);
    sp_metrics_register(&m_errors);
}

/* A SKU's inventory row. */
typedef struct inv_row {
    int64_t stock, supplied;
    int32_t per_user_limit, pay_timeout_s;
    int32_t shards; /* its sale's shards in Redis (docs/reservation.md, "Hot-SKU sharding") */
} inv_row;

/* ---- Redis's identity ---- */

/* What changes when Redis loses data: a server's run id (a restart), its replication id (a
 * failover: a promoted replica takes a new one) and the epoch the last reconcile wrote into it
 * (gone after a FLUSHALL). A Redis Cluster's primaries each lose data on their own: its run and
 * replication ids are every primary's, joined by ',' in the order of their addresses (a reshard,
 * which moves slots between the same primaries, changes nothing here), and each primary keeps the
 * epoch under a key of a slot it serves (primary_key). */
typedef struct redis_identity {
    char epoch[64]; /* "" when missing, or when the primaries do not all hold the same */
    char run_id[SP_REDIS_IDENTITY_MAX], replid[SP_REDIS_IDENTITY_MAX];
} redis_identity;

/* The key primary i keeps base under (sp_redis_key_on): base on one server; in a cluster
 * base:{N} with the first N whose slot primary i serves. A slot that moves to another primary
 * takes its key along: the next check finds the epoch missing on the one and reconciles (what a
 * reshard costs once). -1 with errbuf when no N up to a bound lands there. */
static int primary_key(sp_reaper *rp, int i, const char *base, char *key, size_t cap, char *errbuf,
                       size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    return sp_redis_key_on(redis, i, base, key, cap, errbuf, errlen);
}

/* SET (value not NULL) or DEL the key every primary keeps base under. */
static int each_primary_set(sp_reaper *rp, const char *base, const char *value, char *errbuf,
                            size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    for (int i = 0, n = sp_redis_primaries(redis); i < n; i++) {
        char key[64];
        if (primary_key(rp, i, base, key, sizeof(key), errbuf, errlen) != 0) return -1;
        const char *argv[] = {value ? "SET" : "DEL", key, value};
        redisReply *r = sp_reaper_redis_argv_on(rp, i, value ? 3 : 2, argv, -1, errbuf, errlen);
        if (r == NULL) return -1;
        freeReplyObject(r);
    }
    return 0;
}

/* Appends ",value" (or "value" first) to a bounded list. */
static void join(char *list, size_t cap, const char *value) {
    size_t n = strlen(list);
    snprintf(list + n, cap - n, "%s%s", n ? "," : "", value);
}

/* Copies the value of "name:" from an INFO text. */
static void info_field(const char *info, const char *name, char *out, size_t outlen) {
    const char *p = strstr(info, name);
    size_t n = 0;
    out[0] = '\0';
    if (p == NULL) return;
    p += strlen(name);
    while (p[n] && p[n] != '\r' && p[n] != '\n' && n + 1 < outlen) n++;
    memcpy(out, p, n);
    out[n] = '\0';
}

/* Runs one Redis command from argv; -1 with errbuf on a failure or an error reply. */
static int redis_argv(sp_reaper *rp, int argc, const char **argv, char *errbuf, size_t errlen) {
    redisReply *r = sp_reaper_redis_argv(rp, argc, argv, -1, errbuf, errlen);
    freeReplyObject(r);
    return r ? 0 : -1;
}

/* Writes n pairs of a reconcile's snapshot into Redis (reconcile_stage.lua) for the reconcile that
 * owns the sale by token; -1 with errbuf when Redis failed or another reconcile paused the sale
 * since (this one lost its SKU lock: it must not write into the other one's rebuild). */
static int stage_write(sp_reaper *rp, int64_t sku_id, int shard, const char *token,
                       sp_stage_what what, const char *const *fields, const char *const *values,
                       size_t n, char *errbuf, size_t errlen) {
    int owned = 0;
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    if (sp_stock_reconcile_stage_on_shard(redis, sku_id, shard, token, what, fields, values, n,
                                          &owned, errbuf, errlen) != 0) {
        sp_reaper_redis_failed(rp);
        return -1;
    }
    if (!owned) {
        snprintf(errbuf, errlen,
                 "another reconcile paused the sale since (this one lost its SKU lock?); its "
                 "snapshot is not written");
        return -1;
    }
    return 0;
}

static int read_identity(sp_reaper *rp, redis_identity *id, char *errbuf, size_t errlen) {
    char key[64], value[64];
    memset(id, 0, sizeof(*id));
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return -1;
    int n = sp_redis_primaries(redis), same = n > 0;
    for (int i = 0; i < n; i++) {
        if (primary_key(rp, i, EPOCH_KEY, key, sizeof(key), errbuf, errlen) != 0) return -1;
        const char *what[][2] = {{"INFO", "server"}, {"INFO", "replication"}, {"GET", key}};
        for (int k = 0; k < 3; k++) {
            redisReply *r = sp_reaper_redis_argv_on(rp, i, 2, what[k], -1, errbuf, errlen);
            if (r == NULL) return -1;
            value[0] = '\0';
            if (k < 2 && r->type == REDIS_REPLY_STRING)
                info_field(r->str, k == 0 ? "run_id:" : "master_replid:", value, sizeof(value));
            else if (k == 2 && r->type == REDIS_REPLY_STRING)
                snprintf(value, sizeof(value), "%s", r->str);
            freeReplyObject(r);
            if (k == 0) join(id->run_id, sizeof(id->run_id), value);
            if (k == 1) join(id->replid, sizeof(id->replid), value);
            if (k == 2 && i == 0) snprintf(id->epoch, sizeof(id->epoch), "%s", value);
            if (k == 2 && strcmp(value, id->epoch) != 0) same = 0;
        }
    }
    if (!same) id->epoch[0] = '\0';
    return 0;
}

/* What reaper_state recorded; *found = 0 when nothing (the first start). */
static int read_state(sp_reaper *rp, redis_identity *id, int *found, char *errbuf, size_t errlen) {
    PGresult *res = sp_reaper_query(rp,
                                    "SELECT name, value FROM reaper_state WHERE name IN "
                                    "('redis_epoch', 'redis_run_id', 'redis_replid')",
                                    0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    memset(id, 0, sizeof(*id));
    *found = PQntuples(res) > 0;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *name = PQgetvalue(res, r, 0), *v = PQgetvalue(res, r, 1);
        if (strcmp(name, "redis_epoch") == 0)
            snprintf(id->epoch, sizeof(id->epoch), "%s", v);
        else if (strcmp(name, "redis_run_id") == 0)
            snprintf(id->run_id, sizeof(id->run_id), "%s", v);
        else
            snprintf(id->replid, sizeof(id->replid), "%s", v);
    }
    PQclear(res);
    return 0;
}

static int write_state(sp_reaper *rp, const redis_identity *id, char *errbuf, size_t errlen) {
    const char *params[] = {id->epoch, id->run_id, id->replid};
    return sp_reaper_exec(
        rp,
        "INSERT INTO reaper_state (name, value, updated_at) VALUES"
        " ('redis_epoch', $1, now()), ('redis_run_id', $2, now()),"
        " ('redis_replid', $3, now())"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = now()",
        3, params, errbuf, errlen);
}

/* A fresh random epoch token, written to Redis. */
static int new_epoch(sp_reaper *rp, char *epoch, size_t len, char *errbuf, size_t errlen) {
    unsigned char raw[12];
    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw)) {
        snprintf(errbuf, errlen, "getrandom failed");
        return -1;
    }
    size_t n = 0;
    for (size_t i = 0; i < sizeof(raw) && n + 3 <= len; i++)
        n += (size_t)snprintf(epoch + n, len - n, "%02x", raw[i]);
    return each_primary_set(rp, EPOCH_KEY, epoch, errbuf, errlen);
}

/* SP_STOCK_REBUILT_KEY, on every primary: Redis holds every sale PostgreSQL has (Redis holds
 * epoch, the one of the last complete reconcile). One per primary, because a cluster's primaries
 * lose data one at a time: the producer asks the one of the missing sale's own primary, which
 * lost its marker with the sale. Taken back at once if Redis lost the epoch meanwhile. */
static int mark_rebuilt(sp_reaper *rp, const char *epoch, char *errbuf, size_t errlen) {
    redis_identity now;
    if (each_primary_set(rp, SP_STOCK_REBUILT_KEY, epoch, errbuf, errlen) != 0 ||
        read_identity(rp, &now, errbuf, errlen) != 0)
        return -1;
    if (strcmp(now.epoch, epoch) == 0) return 0;
    (void)each_primary_set(rp, SP_STOCK_REBUILT_KEY, NULL, errbuf, errlen);
    snprintf(errbuf, errlen, "Redis lost the epoch again; starting over");
    return -1;
}

/* ---- one SKU ---- */

/* Row 0 of (stock, supplied, per_user_limit, pay_timeout_s, shards). */
static void inv_read(PGresult *res, inv_row *inv) {
    inv->stock = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    inv->supplied = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    inv->per_user_limit = (int32_t)strtol(PQgetvalue(res, 0, 2), NULL, 10);
    inv->pay_timeout_s = (int32_t)strtol(PQgetvalue(res, 0, 3), NULL, 10);
    inv->shards = (int32_t)strtol(PQgetvalue(res, 0, 4), NULL, 10);
    if (inv->shards < 1 || inv->shards > SP_SHARDS_MAX) inv->shards = 1;
}

static int read_inventory(sp_reaper *rp, int64_t sku_id, inv_row *inv, int *found, char *errbuf,
                          size_t errlen) {
    char sku[24];
    const char *params[] = {sp_reaper_i64(sku, sku_id)};
    PGresult *res = sp_reaper_query(rp,
                                    "SELECT stock, supplied, per_user_limit, pay_timeout_s, shards"
                                    "  FROM inventory WHERE sku_id = $1::bigint",
                                    1, params, errbuf, errlen);
    if (res == NULL) return -1;
    *found = PQntuples(res) == 1;
    if (*found) inv_read(res, inv);
    PQclear(res);
    return 0;
}

/* Waits until the consumer stored each of the n partitions up to its end as of now (bounded by
 * RECONCILE_WAIT_MS; interrupted by SIGTERM). */
static int wait_partitions(sp_reaper *rp, const int32_t *parts, int n, char *errbuf,
                           size_t errlen) {
    int64_t *high = calloc(n > 0 ? (size_t)n : 1, sizeof(*high));
    int rc = -1;
    if (high == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int64_t low = 0;
        rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(
            rp->kafka, rp->cfg->kafka_topic, parts[i], &low, &high[i], WATERMARK_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(errbuf, errlen, "watermarks of %s[%d]: %s", rp->cfg->kafka_topic,
                     (int)parts[i], rd_kafka_err2str(err));
            goto out;
        }
    }
    const char *params[] = {rp->cfg->kafka_topic};
    int64_t deadline = sp_clock_mono_ms() + rp->cfg->reconcile_wait_ms;
    for (;;) {
        PGresult *res = sp_reaper_query(rp,
                                        "SELECT partition, next_offset FROM consumer_offsets"
                                        " WHERE topic = $1",
                                        1, params, errbuf, errlen);
        if (res == NULL) goto out;
        int behind = -1;
        int64_t stored = 0;
        for (int i = 0; i < n && behind < 0; i++) {
            stored = 0;
            for (int r = 0; r < PQntuples(res); r++)
                if (strtol(PQgetvalue(res, r, 0), NULL, 10) == parts[i])
                    stored = strtoll(PQgetvalue(res, r, 1), NULL, 10);
            if (stored < high[i]) behind = i;
        }
        PQclear(res);
        if (behind < 0) {
            rc = 0;
            goto out;
        }
        if (sp_clock_mono_ms() >= deadline) {
            snprintf(errbuf, errlen,
                     "the consumer stored partition %d up to %" PRId64 ", not %" PRId64
                     " within RECONCILE_WAIT_MS (%d ms)",
                     (int)parts[behind], stored, high[behind], rp->cfg->reconcile_wait_ms);
            goto out;
        }
        if (sp_reaper_sleep(20) != 0) {
            snprintf(errbuf, errlen, "stopped while waiting for the consumer");
            goto out;
        }
    }
out:
    free(high);
    return rc;
}

/* Waits until the consumer stored the SKU's partition up to its end as of now. */
static int wait_consumer(sp_reaper *rp, int64_t sku_id, char *errbuf, size_t errlen) {
    int32_t partition = 0;
    if (sp_reaper_partition_of(rp, sku_id, &partition, errbuf, errlen) != 0) return -1;
    return wait_partitions(rp, &partition, 1, errbuf, errlen);
}

/* The same for every partition of the topic: after it, PostgreSQL holds every event Kafka had
 * when it was called, for every SKU at once. */
static int wait_consumer_all(sp_reaper *rp, char *errbuf, size_t errlen) {
    int n = 0;
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, WATERMARK_TIMEOUT_MS, &n, errbuf,
                                  errlen) != 0)
        return -1;
    int32_t *parts = calloc(n > 0 ? (size_t)n : 1, sizeof(*parts));
    if (parts == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < n; i++) parts[i] = i;
    int rc = wait_partitions(rp, parts, n, errbuf, errlen);
    free(parts);
    return rc;
}

/* Per-user units of pending and paid orders into users_rebuild, a page at a time (inside the
 * snapshot), each user's on its home shard. Only for a sale with a per-user limit: Redis keeps no
 * counts for one without. */
static int stage_users(sp_reaper *rp, int64_t sku_id, int nshards, const char *token, char *errbuf,
                       size_t errlen) {
    const char **users = malloc(4 * SP_REAPER_USER_PAGE * sizeof(*users));
    const char **units = users + SP_REAPER_USER_PAGE;
    const char **su = users + 2 * SP_REAPER_USER_PAGE, **sn = users + 3 * SP_REAPER_USER_PAGE;
    int64_t last = 0;
    int rc = -1;
    if (users == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (;;) {
        PGresult *res = sp_reaper_user_units_page(rp->pg, sku_id, last, errbuf, errlen);
        if (res == NULL) goto out;
        int n = PQntuples(res), failed = 0;
        for (int i = 0; i < n; i++) {
            users[i] = PQgetvalue(res, i, 0);
            units[i] = PQgetvalue(res, i, 1);
        }
        if (n > 0) last = strtoll(PQgetvalue(res, n - 1, 0), NULL, 10);
        for (int k = 0; k < nshards && !failed; k++) {
            size_t m = 0;
            for (int i = 0; i < n; i++)
                if (sp_stock_home_shard(strtoll(users[i], NULL, 10), nshards) == k)
                    su[m] = users[i], sn[m] = units[i], m++;
            failed = m > 0 && stage_write(rp, sku_id, k, token, SP_STAGE_USERS, su, sn, m, errbuf,
                                          errlen) != 0;
        }
        PQclear(res);
        if (failed) goto out;
        if (n < SP_REAPER_USER_PAGE) break;
    }
    rc = 0;
out:
    free(users);
    return rc;
}

/* Stages, for the reconcile of token, one mark per id that sql selects (inside the snapshot), a
 * page at a time: sql takes $1 sku_id, $2 the last id of the page before, $3 the page size and,
 * when nparams is 4, $4 IDEM_TTL_S; it returns ids in order, and when it returns a second column
 * (the row's user) each mark goes to that user's home shard of the nshards (else to shard 0).
 * value is what each mark holds. */
static int stage_marks(sp_reaper *rp, int64_t sku_id, int nshards, const char *token,
                       sp_stage_what what, const char *sql, int nparams, const char *value,
                       char *errbuf, size_t errlen) {
    char sku[24], limit[24], ttl[24];
    char last[SP_ORDER_ID_MAX + SP_REQUEST_ID_MAX + 2] = "";
    const char **ids = malloc(2 * LEDGER_PAGE * sizeof(*ids));
    const char **values = ids + LEDGER_PAGE;
    int rc = -1;
    if (ids == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (;;) {
        const char *params[] = {sp_reaper_i64(sku, sku_id), last, sp_reaper_i64(limit, LEDGER_PAGE),
                                sp_reaper_i64(ttl, rp->cfg->idem_ttl_s)};
        PGresult *res = sp_pg_query(rp->pg, sql, nparams, params, errbuf, errlen);
        if (res == NULL) goto out;
        int n = PQntuples(res), failed = 0, by_user = PQnfields(res) > 1;
        for (int k = 0; k < (by_user ? nshards : 1) && !failed; k++) {
            size_t m = 0;
            for (int i = 0; i < n; i++)
                if (!by_user ||
                    sp_stock_home_shard(strtoll(PQgetvalue(res, i, 1), NULL, 10), nshards) == k)
                    ids[m] = PQgetvalue(res, i, 0), values[m] = value, m++;
            failed = m > 0 &&
                     stage_write(rp, sku_id, k, token, what, ids, values, m, errbuf, errlen) != 0;
        }
        if (n > 0) snprintf(last, sizeof(last), "%s", PQgetvalue(res, n - 1, 0));
        PQclear(res);
        if (failed) goto out;
        if (n < LEDGER_PAGE) break;
    }
    rc = 0;
out:
    free(ids);
    return rc;
}

/* A marker for each ledger row not yet given back: the rebuild counts its units, so give_back.lua
 * must not give them again. */
static int mark_ledger(sp_reaper *rp, int64_t sku_id, int nshards, const char *token, char *errbuf,
                       size_t errlen) {
    char now[24];
    return stage_marks(rp, sku_id, nshards, token, SP_STAGE_MARKERS,
                       "SELECT order_id, user_id FROM stock_returns"
                       " WHERE sku_id = $1::bigint AND returned_to_redis_at IS NULL"
                       "   AND order_id > $2 ORDER BY order_id LIMIT $3::int",
                       3, sp_reaper_i64(now, sp_clock_wall_ms()), errbuf, errlen);
}

/* The request id of each restock the snapshot counts that Redis may be asked to add again: those
 * not yet stamped as given to Redis (the catch-up would add them) and those within IDEM_TTL_S (an
 * admin's retry with the same Idempotency-Key would): restock.lua finds the mark and adds
 * nothing. */
static int mark_restocks(sp_reaper *rp, int64_t sku_id, const char *token, char *errbuf,
                         size_t errlen) {
    char mark[32];
    snprintf(mark, sizeof(mark), "%" PRId64 ":", sp_clock_wall_ms());
    return stage_marks(/* on shard 0, where restock.lua adds */
                       rp, sku_id, 1, token, SP_STAGE_RESTOCKS,
                       "SELECT request_id FROM restocks WHERE sku_id = $1::bigint AND request_id > "
                       "$2"
                       "   AND (applied_to_redis_at IS NULL"
                       "        OR created_at > now() - make_interval(secs => $4::bigint))"
                       " ORDER BY request_id LIMIT $3::int",
                       4, mark, errbuf, errlen);
}

/* Splits n entries (field, value pairs of an HSCAN reply) of resv: entries the snapshot knows are
 * dropped, the others staged. */
static int stage_entries(sp_reaper *rp, int64_t sku_id, int shard, redisReply *const *kv, size_t n,
                         const char *token, int64_t *staged_units, char *errbuf, size_t errlen) {
    if (n == 0) return 0;
    const char **ids = calloc(n, sizeof(*ids)), **vals = calloc(n, sizeof(*vals));
    const char **sids = calloc(n, sizeof(*sids)), **svals = calloc(n, sizeof(*svals));
    char *array = NULL;
    PGresult *res = NULL;
    size_t nknown = 0, nstage = 0;
    int rc = -1, dropped = 0;
    if (ids == NULL || vals == NULL || sids == NULL || svals == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (kv[2 * i]->type != REDIS_REPLY_STRING || kv[2 * i + 1]->type != REDIS_REPLY_STRING) {
            snprintf(errbuf, errlen, "HSCAN: unexpected element");
            goto out;
        }
        ids[i] = kv[2 * i]->str;
        vals[i] = kv[2 * i + 1]->str;
    }
    if ((array = sp_reaper_text_array(ids, n)) == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    const char *params[] = {array};
    res = sp_pg_query(rp->pg, "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])", 1,
                      params, errbuf, errlen);
    if (res == NULL) goto out;
    /* Known entries go to the front of ids/vals (for the drop), the others into sids/svals. */
    for (size_t i = 0; i < n; i++) {
        int known = 0;
        for (int r = 0; r < PQntuples(res) && !known; r++)
            known = strcmp(ids[i], PQgetvalue(res, r, 0)) == 0;
        if (known) {
            ids[nknown] = ids[i], vals[nknown] = vals[i];
            nknown++;
        } else {
            sids[nstage] = ids[i], svals[nstage] = vals[i];
            nstage++;
            /* "r:user:qty:..." or "a:user:qty:...": the units the apply will count in flight */
            const char *q = strchr(vals[i], ':');
            q = q ? strchr(q + 1, ':') : NULL;
            if (q) *staged_units += strtoll(q + 1, NULL, 10);
        }
    }
    if (nstage > 0 && stage_write(rp, sku_id, shard, token, SP_STAGE_ENTRIES, sids, svals, nstage,
                                  errbuf, errlen) != 0)
        goto out;
    if (nknown > 0) {
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL || sp_stock_resv_drop_on_shard(redis, sku_id, shard, ids, vals, nknown,
                                                         &dropped, errbuf, errlen) != 0)
            goto out;
    }
    rc = 0;
out:
    PQclear(res);
    free(array);
    free(ids);
    free(vals);
    free(sids);
    free(svals);
    return rc;
}

typedef struct stage_ctx {
    int64_t sku_id;
    int shard;
    const char *token;
    int64_t staged_units; /* units of the entries staged (in flight as far as the snapshot goes) */
} stage_ctx;

static int stage_step(sp_reaper *rp, redisReply *const *kv, size_t n, void *arg, char *errbuf,
                      size_t errlen) {
    stage_ctx *sc = arg;
    return stage_entries(rp, sc->sku_id, sc->shard, kv, n, sc->token, &sc->staged_units, errbuf,
                         errlen);
}

/* Stages shard `shard`'s resv; *staged_units: the units of the entries staged. */
static int stage_resv(sp_reaper *rp, int64_t sku_id, int shard, const char *token,
                      int64_t *staged_units, char *errbuf, size_t errlen) {
    char key[SP_STOCK_KEY_MAX];
    stage_ctx sc = {.sku_id = sku_id, .shard = shard, .token = token};
    sp_stock_shard_key(key, sku_id, shard, "resv");
    int rc = sp_reaper_hscan(rp, key, RESV_SCAN, STEP_MAX, stage_step, &sc, errbuf, errlen);
    *staged_units = sc.staged_units;
    return rc;
}

/* Step 4: one REPEATABLE READ snapshot, written into Redis for the reconcile of token; *snap is its
 * inventory row; staged[k]: the units of shard k's entries staged (in flight). */
static int stage(sp_reaper *rp, int64_t sku_id, const char *token, inv_row *snap, int64_t *staged,
                 char *errbuf, size_t errlen) {
    char sku[24];
    const char *params[] = {sp_reaper_i64(sku, sku_id)};
    PGresult *res = NULL;
    if (sp_reaper_pg(rp, errbuf, errlen) == NULL) return -1;
    if (sp_pg_exec(rp->pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL, errbuf,
                   errlen) != 0)
        goto fail;
    res = sp_pg_query(rp->pg,
                      "SELECT stock, supplied, per_user_limit, pay_timeout_s, shards"
                      "  FROM inventory WHERE sku_id = $1::bigint",
                      1, params, errbuf, errlen);
    if (res == NULL) goto fail;
    if (PQntuples(res) != 1) {
        snprintf(errbuf, errlen, "the inventory row vanished");
        goto fail;
    }
    inv_read(res, snap);
    PQclear(res);
    res = NULL;
    for (int k = 0; k < snap->shards; k++)
        if (stage_write(rp, sku_id, k, token, SP_STAGE_CLEAR, NULL, NULL, 0, errbuf, errlen) != 0)
            goto fail;
    if ((snap->per_user_limit > 0 &&
         stage_users(rp, sku_id, snap->shards, token, errbuf, errlen) != 0) ||
        mark_ledger(rp, sku_id, snap->shards, token, errbuf, errlen) != 0 ||
        mark_restocks(rp, sku_id, token, errbuf, errlen) != 0)
        goto fail;
    for (int k = 0; k < snap->shards; k++)
        if (stage_resv(rp, sku_id, k, token, &staged[k], errbuf, errlen) != 0) goto fail;
    if (sp_pg_exec(rp->pg, "COMMIT", 0, NULL, errbuf, errlen) != 0) goto fail;
    return 0;
fail:
    PQclear(res);
    sp_reaper_pg_rollback(rp);
    return -1;
}

/* Step 6: staged entries that vanished before the rebuild and that the consumer stored after the
 * snapshot took stock neither the snapshot nor the in-flight entries counted. */
static int adjust_vanished(sp_reaper *rp, int64_t sku_id, int shard, const char *token,
                           const sp_vanished *v, size_t n, size_t *nadjusted, char *errbuf,
                           size_t errlen) {
    const char **ids = calloc(n, sizeof(*ids));
    char *array = NULL;
    PGresult *res = NULL;
    int rc = -1;
    *nadjusted = 0;
    if (ids == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) ids[i] = v[i].order_id;
    if ((array = sp_reaper_text_array(ids, n)) == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    const char *params[] = {array};
    res = sp_reaper_query(rp,
                          "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])"
                          "   AND status IN ('pending', 'paid', 'expired')",
                          1, params, errbuf, errlen);
    if (res == NULL) goto out;
    for (int r = 0; r < PQntuples(res); r++)
        for (size_t i = 0; i < n; i++) {
            int64_t stock = 0;
            int owned = 0;
            if (strcmp(v[i].order_id, PQgetvalue(res, r, 0)) != 0) continue;
            sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
            if (redis == NULL) goto out;
            if (sp_stock_reconcile_adjust_on_shard(redis, sku_id, shard, token, v[i].user_id,
                                                   v[i].qty, &owned, &stock, errbuf, errlen) != 0) {
                sp_reaper_redis_failed(rp);
                goto out;
            }
            if (!owned) {
                snprintf(errbuf, errlen,
                         "another reconcile paused the sale since (this one lost its SKU "
                         "lock?); its mend is not applied");
                goto out;
            }
            (*nadjusted)++;
        }
    rc = 0;
out:
    PQclear(res);
    free(array);
    free(ids);
    return rc;
}

/* Steps 1-6 for one SKU whose lock the caller holds, taken on the session open now. settle_until:
 * the monotonic time before which no high watermark may be taken (0: the pause's own time + the
 * message timeout + 1 s); caught_up: the consumer was found to have stored every partition up to
 * its end after that time (else the SKU's partition is waited for). Every write into Redis from
 * the pause on is refused once another
 * reconcile has paused the sale with its own token (the scripts check it), and the lock is asked
 * for again before the apply and before the mend: a reaper whose session died mid-rebuild (the
 * lock went with it, another replica may be rebuilding the sale) stops, writing nothing. */
static int rebuild(sp_reaper *rp, int64_t sku_id, int64_t settle_until, int caught_up,
                   const char *why, char *errbuf, size_t errlen) {
    inv_row inv, snap;
    char token[128];
    int found = 0, owned = 0;
    int64_t stock = 0, inflight = 0, staged[SP_SHARDS_MAX] = {0};
    sp_vanished *vanished = NULL;
    size_t nvanished = 0, nadjusted = 0, nsettled = 0;
    sp_log_ctx ctx = {.sku_id = sku_id};
    int rc = -1;

    uint64_t session = rp->pg_session; /* the one holding the SKU's lock */
    if (read_inventory(rp, sku_id, &inv, &found, errbuf, errlen) != 0) return -1;
    if (!found) {
        SP_LOG_CTX(SP_LOG_INFO, &ctx, "reconcile: PostgreSQL has no inventory row; nothing to do");
        return 0;
    }
    snprintf(token, sizeof(token), "%s:%" PRId64, rp->cfg->worker_id, sp_clock_wall_ms());
    /* Every shard of a sharded sale: the token is the rebuild's generation too, so a transfer
     * between shards begun before it gives and settles nothing; the sale's supplied on shard 0. */
    for (int k = 0; k < inv.shards; k++) {
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL || sp_stock_reconcile_pause_on_shard(
                                 redis, sku_id, k, inv.shards, token, inv.per_user_limit,
                                 inv.pay_timeout_s, k == 0 ? inv.supplied : 0, errbuf, errlen) != 0)
            return -1;
    }
    SP_LOG_CTX(SP_LOG_INFO, &ctx, "reconcile: sale paused (%s)", why);
    int64_t now = sp_clock_mono_ms();
    if (settle_until == 0) settle_until = now + rp->cfg->kafka_message_timeout_ms + 1000;
    if (settle_until > now && sp_reaper_sleep(settle_until - now) != 0) {
        snprintf(errbuf, errlen, "stopped while reservations settled; the sale stays paused");
        return -1;
    }
    if (!caught_up && wait_consumer(rp, sku_id, errbuf, errlen) != 0) return -1;
    if (stage(rp, sku_id, token, &snap, staged, errbuf, errlen) != 0) return -1;
    if (snap.shards != inv.shards) {
        snprintf(errbuf, errlen, "the sale's shards changed (%d, then %d)", inv.shards,
                 snap.shards);
        return -1;
    }
    if (sp_reaper_lock_held(rp, session, SP_LOCK_SKU, sku_id, errbuf, errlen) != 0) return -1;
    /* PostgreSQL's stock over the shards: each shard's entries in flight (they come off its own
     * stock in the apply), then what is left spread evenly (shard k: rest / N, plus one for
     * k < rest % N). More in flight than PostgreSQL holds: no shard gets more than its own in
     * flight, and the excess is rejected in PostgreSQL, as on an unsharded sale. */
    int64_t rest = snap.stock;
    for (int k = 0; k < snap.shards; k++) rest -= staged[k];
    if (rest < 0) rest = 0;
    for (int k = 0; k < snap.shards; k++) {
        int64_t share = rest / snap.shards + (k < rest % snap.shards ? 1 : 0);
        int64_t shard_stock = 0, shard_inflight = 0;
        size_t nadj = 0;
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL ||
            sp_stock_reconcile_apply_on_shard(
                redis, sku_id, k, token, snap.shards > 1 ? staged[k] + share : snap.stock,
                k == 0 ? snap.supplied : 0, snap.per_user_limit, snap.pay_timeout_s, &owned,
                &shard_stock, &shard_inflight, &vanished, &nvanished, errbuf, errlen) != 0)
            goto out;
        if (!owned) {
            snprintf(errbuf, errlen,
                     "the pause was lost (Redis lost data again?); tried again later");
            goto out;
        }
        stock += shard_stock, inflight += shard_inflight;
        /* The mend writes what only the lock's holder may write: the lock first. */
        if (sp_reaper_lock_held(rp, session, SP_LOCK_SKU, sku_id, errbuf, errlen) != 0) goto out;
        if (nvanished > 0 &&
            adjust_vanished(rp, sku_id, k, token, vanished, nvanished, &nadj, errbuf, errlen) != 0)
            goto out;
        nadjusted += nadj;
        free(vanished);
        vanished = NULL;
        nvanished = 0;
    }
    if (sp_stock_return_settle_markers(rp, sku_id, &nsettled, errbuf, errlen) != 0) goto out;
    /* Transfers between the shards from before the rebuild: their records go (the new generation
     * refuses them anyway). */
    for (int k = 0; snap.shards > 1 && k < snap.shards; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, sku_id, k, "xfer");
        const char *argv[] = {"DEL", key};
        if (redis_argv(rp, 2, argv, errbuf, errlen) != 0) goto out;
    }
    /* Only now: until here a failure leaves the sale paused, and it is rebuilt again. */
    for (int k = snap.shards - 1; k >= 0; k--) {
        sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
        if (redis == NULL ||
            sp_stock_reconcile_open_on_shard(redis, sku_id, k, token, &owned, errbuf, errlen) != 0)
            goto out;
        if (!owned) {
            snprintf(errbuf, errlen,
                     "the pause was lost before the sale reopened; tried again later");
            goto out;
        }
    }
    sp_metric_inc(&m_reconciled);
    SP_LOG_CTX(SP_LOG_INFO, &ctx,
               "reconcile: sale rebuilt and reopened: stock %" PRId64 " (PostgreSQL %" PRId64
               ", %" PRId64 " units in flight, %zu orders stored meanwhile, %d shard%s), %zu "
               "ledger rows counted as given back",
               stock, snap.stock, inflight, nadjusted, snap.shards, snap.shards > 1 ? "s" : "",
               nsettled);
    rc = 0;
out:
    free(vanished);
    return rc;
}

int sp_reconcile_sku(sp_reaper *rp, int64_t sku_id, const char *why, int wait_lock, int *busy,
                     char *errbuf, size_t errlen) {
    int got = 0;
    *busy = 0;
    int rc = wait_lock ? sp_reaper_lock(rp, SP_LOCK_SKU, sku_id, &got, errbuf, errlen)
                       : sp_reaper_lock_try(rp, SP_LOCK_SKU, sku_id, &got, errbuf, errlen);
    if (rc != 0) goto fail;
    if (!got) {
        *busy = 1;
        return 0;
    }
    rc = rebuild(rp, sku_id, 0, 0, why, errbuf, errlen);
    sp_reaper_unlock(rp, SP_LOCK_SKU, sku_id);
    if (rc == 0) return 0;
fail:
    sp_metric_inc(&m_errors);
    return -1;
}

/* A reconcile of every SKU under way: what its steps share. */
typedef struct recovery {
    const char *why;
    const char *token;      /* the reconcile of every SKU's pause token */
    const char *late_token; /* its pause of the sales PostgreSQL got during its wait */
    int64_t *first;         /* the SKUs its first pass paused, ascending */
    size_t nfirst, first_cap;
    char epoch[64], replid[SP_REDIS_IDENTITY_MAX]; /* the Redis it paused: epoch, replication
                                                    * id(s) */
    int changed;                                   /* Redis is not that one any more: stop */
    uint64_t session; /* the PostgreSQL session holding SP_LOCK_RECONCILE */
    int64_t settle_until;
    size_t nskus, nfailed, nbusy;
    int64_t *busy; /* SKUs whose lock another replica held: asked for again, waiting, at the end */
    size_t nbusy_kept, busy_cap;
} recovery;

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Pauses the sales of a page of inventory rows (sku_id, supplied, per_user_limit, pay_timeout_s,
 * shards: every shard of a sharded sale)
 * in one pipelined round trip for token. The first pass (late 0) records their ids in
 * rc->first (ascending, as the pages come); the second (late 1) pauses only the others. */
static void pause_page(sp_reaper *rp, PGresult *res, const char *token, int late, recovery *rc) {
    int n = PQntuples(res), k = 0;
    char err[512];
    sp_pause_sale *sales = calloc((size_t)n + 1, sizeof(*sales));
    if (sales != NULL && !late && rc->nfirst + (size_t)n > rc->first_cap) {
        size_t cap = rc->first_cap ? 2 * rc->first_cap : 1024;
        while (cap < rc->nfirst + (size_t)n) cap *= 2;
        int64_t *f = realloc(rc->first, cap * sizeof(*f));
        if (f == NULL) {
            free(sales);
            sales = NULL;
        } else {
            rc->first = f, rc->first_cap = cap;
        }
    }
    if (sales == NULL) {
        sp_warn("reconcile: pause: out of memory");
        rc->nfailed += (size_t)n;
        return;
    }
    for (int i = 0; i < n; i++) {
        int64_t sku = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (late && bsearch(&sku, rc->first, rc->nfirst, sizeof(sku), cmp_i64) != NULL) continue;
        sales[k++] = (sp_pause_sale){
            .sku_id = sku,
            .supplied = strtoll(PQgetvalue(res, i, 1), NULL, 10),
            .per_user_limit = (int32_t)strtol(PQgetvalue(res, i, 2), NULL, 10),
            .pay_timeout_s = (int32_t)strtol(PQgetvalue(res, i, 3), NULL, 10),
            .shards = (int32_t)strtol(PQgetvalue(res, i, 4), NULL, 10)};
    }
    sp_redis *redis = k > 0 ? sp_reaper_redis(rp, err, sizeof(err)) : NULL;
    if (k > 0 && (redis == NULL || sp_stock_reconcile_pause_many(redis, sales, (size_t)k, token,
                                                                 err, sizeof(err)) != 0)) {
        if (redis) sp_reaper_redis_failed(rp);
        sp_warn("reconcile: pausing %d sales failed: %s", k, err);
        rc->nfailed += (size_t)k;
    } else {
        sp_metric_add(&m_paused, k);
        for (int i = 0; !late && i < k; i++) rc->first[rc->nfirst++] = sales[i].sku_id;
    }
    free(sales);
}

/* A page of inventory rows after sku_id `after`: sku_id, supplied, per_user_limit,
 * pay_timeout_s, shards. */
static PGresult *inventory_page(sp_reaper *rp, int64_t after, char *errbuf, size_t errlen) {
    char a[24], limit[24];
    const char *params[] = {sp_reaper_i64(a, after), sp_reaper_i64(limit, SKU_PAGE)};
    return sp_reaper_query(rp,
                           "SELECT sku_id, supplied, per_user_limit, pay_timeout_s, shards"
                           "  FROM inventory WHERE sku_id > $1::bigint"
                           " ORDER BY sku_id LIMIT $2::int",
                           2, params, errbuf, errlen);
}

/* Pauses every sale of PostgreSQL's inventory, a page at a time: the first pass for rc->token;
 * the second (late), after the wait for the consumer, the sales PostgreSQL got since, for
 * rc->late_token (they took reservations until now, which the run's settle wait does not cover:
 * each is rebuilt with its own settle and wait). -1 with errbuf when PostgreSQL failed or a pause
 * did (the sales paused so far stay so: a reconcile that went on without all of them paused would
 * skip a sale still taking orders against stale stock). */
static int pause_all(sp_reaper *rp, recovery *rc, int late, char *errbuf, size_t errlen) {
    size_t failed = rc->nfailed;
    for (int64_t last = 0;;) {
        PGresult *res = inventory_page(rp, last, errbuf, errlen);
        if (res == NULL) return -1;
        int n = PQntuples(res);
        if (n > 0) {
            pause_page(rp, res, late ? rc->late_token : rc->token, late, rc);
            last = strtoll(PQgetvalue(res, n - 1, 0), NULL, 10);
        }
        PQclear(res);
        sp_health_beat();
        if (rc->nfailed > failed) {
            snprintf(errbuf, errlen, "sales could not be paused; starting over");
            return -1;
        }
        if (n < SKU_PAGE) return 0;
    }
}

/* True while Redis is the one the reconcile paused (same epoch, same replication id): a second
 * loss meanwhile (a flush, a failover to a replica that had not all the writes) would leave sales
 * the settle and the wait for the consumer did not cover; then rc->changed is set, and the
 * reconcile stops (the next check starts over). A failure to ask is reported in errbuf. */
static int redis_unchanged(sp_reaper *rp, recovery *rc, char *errbuf, size_t errlen) {
    redis_identity now;
    if (read_identity(rp, &now, errbuf, errlen) != 0) {
        rc->changed = 1;
        return 0;
    }
    int same = strcmp(now.epoch, rc->epoch) == 0 && strcmp(now.replid, rc->replid) == 0;
    if (!same) {
        rc->changed = 1;
        snprintf(errbuf, errlen, "Redis changed again during the reconcile; starting over");
    }
    return same;
}

/* Rebuilds one SKU of a reconcile of every SKU, unless another replica holds its lock (it is
 * rebuilding it) or it is no longer paused (rebuilt already); its lock is taken here. */
static void rebuild_one(sp_reaper *rp, int64_t sku, recovery *rc, int wait_lock) {
    char err[512] = "", key[SP_STOCK_KEY_MAX];
    int got = 0, rebuilt = 0;
    sp_log_ctx ctx = {.sku_id = sku};
    sp_health_beat();
    if ((wait_lock ? sp_reaper_lock(rp, SP_LOCK_SKU, sku, &got, err, sizeof(err))
                   : sp_reaper_lock_try(rp, SP_LOCK_SKU, sku, &got, err, sizeof(err))) != 0)
        goto failed;
    if (!got && wait_lock) {
        /* Still held after lock_timeout: another replica is rebuilding the sale with its own
         * settle wait (a sale missing, or paused late). It reopens it, or, if it dies, the sweep
         * finds the sale left paused; either way the run need not start over for it. */
        SP_LOG_CTX(SP_LOG_INFO, &ctx, "reconcile: left to the replica holding the SKU's lock");
        return;
    }
    if (got && !redis_unchanged(rp, rc, err, sizeof(err))) {
        sp_reaper_unlock(rp, SP_LOCK_SKU, sku);
        return;
    }
    if (!got) {
        rc->nbusy++;
        if (rc->nbusy_kept == rc->busy_cap) {
            size_t cap = rc->busy_cap ? 2 * rc->busy_cap : 64;
            int64_t *b = realloc(rc->busy, cap * sizeof(*b));
            if (b == NULL) goto failed;
            rc->busy = b, rc->busy_cap = cap;
        }
        rc->busy[rc->nbusy_kept++] = sku;
        return;
    }
    /* Paused by this reconcile: the settle and the wait for the consumer done for every SKU
     * hold for it. Not paused: rebuilt already (every sale PostgreSQL had after that wait was
     * paused), or opened since (its stock.set came after the loss: its Redis sale is whole).
     * Missing, or paused by another reconcile since: rebuilt with its own settle and wait. */
    sp_stock_key(key, sku, "sale");
    const char *argv[] = {"HMGET", key, "stock", "paused"};
    redisReply *r = sp_reaper_redis_argv(rp, 4, argv, REDIS_REPLY_ARRAY, err, sizeof(err));
    if (r == NULL) goto failed;
    int ours = 0;
    if (r->elements == 2) {
        rebuilt = r->element[0]->type == REDIS_REPLY_STRING &&
                  r->element[1]->type == REDIS_REPLY_NIL;
        ours = r->element[1]->type == REDIS_REPLY_STRING &&
               strcmp(r->element[1]->str, rc->token) == 0;
    }
    freeReplyObject(r);
    if (!rebuilt) {
        rc->nskus++;
        if (rebuild(rp, sku, ours ? rc->settle_until : 0, ours, rc->why, err, sizeof(err)) != 0)
            goto failed;
    }
    if (rc->session) sp_metric_add(&m_paused, -1); /* the gauge of the replica that paused */
    sp_reaper_unlock(rp, SP_LOCK_SKU, sku);
    return;
failed:
    SP_LOG_CTX(SP_LOG_WARN, &ctx, "reconcile failed: %s", err[0] ? err : "SKU lock not got");
    sp_metric_inc(&m_errors);
    rc->nfailed++;
    if (got) sp_reaper_unlock(rp, SP_LOCK_SKU, sku);
}

/* The SKUs of open sales: units left, or orders pending (whose expiry gives units back), sorted;
 * *open (malloc'd) and *n. */
static int open_skus(sp_reaper *rp, int64_t **open, size_t *n, char *errbuf, size_t errlen) {
    PGresult *res = sp_reaper_query(rp,
                                    "SELECT sku_id FROM inventory WHERE stock > 0"
                                    " UNION SELECT DISTINCT sku_id FROM orders"
                                    "  WHERE status = 'pending' ORDER BY 1",
                                    0, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    *n = (size_t)PQntuples(res);
    *open = malloc((*n ? *n : 1) * sizeof(**open));
    if (*open == NULL) {
        PQclear(res);
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < *n; i++) (*open)[i] = strtoll(PQgetvalue(res, (int)i, 0), NULL, 10);
    PQclear(res);
    qsort(*open, *n, sizeof(**open), cmp_i64);
    return 0;
}

/* Steps 4 and 5 of a reconcile of every SKU, by the replica doing it or one helping (rc->session 0:
 * no reconcile lock to keep): the open sales (sorted), then every other one, each rebuilt unless
 * another replica holds its lock or it is rebuilt already. started: the reconcile's start, for
 * the recovery gauge (0: a helper). -1 with errbuf when the reconcile lock's session was lost or
 * PostgreSQL failed; SKUs that failed are counted in rc->nfailed. */
static int rebuild_paused(sp_reaper *rp, recovery *rc, const int64_t *open, size_t nopen,
                          int64_t started, char *errbuf, size_t errlen) {
    for (size_t i = 0; i < nopen && !sp_signal_stop_requested() && !rc->changed; i++) {
        if (rc->session && !sp_reaper_on_session(rp, rc->session)) goto lost_session;
        rebuild_one(rp, open[i], rc, 0);
    }
    if (started && !sp_signal_stop_requested()) {
        sp_metric_set(&m_recovery, sp_clock_mono_ms() - started);
        sp_info("reconcile: the %zu open sales are back %" PRId64 " ms after the loss was "
                "noticed (%zu failed, %zu left to other replicas); the finished ones follow",
                nopen, sp_clock_mono_ms() - started, rc->nfailed, rc->nbusy);
    }
    for (int64_t last = 0; !sp_signal_stop_requested();) {
        PGresult *res = inventory_page(rp, last, errbuf, errlen);
        if (res == NULL) return -1;
        int n = PQntuples(res);
        for (int i = 0; i < n && !sp_signal_stop_requested() && !rc->changed; i++) {
            int64_t sku = strtoll(PQgetvalue(res, i, 0), NULL, 10);
            last = sku;
            if (bsearch(&sku, open, nopen, sizeof(*open), cmp_i64) != NULL) continue;
            if (rc->session && !sp_reaper_on_session(rp, rc->session)) {
                PQclear(res);
                goto lost_session;
            }
            rebuild_one(rp, sku, rc, 0);
        }
        PQclear(res);
        if (n < SKU_PAGE) break;
    }
    /* The replica reconciling every SKU waits for the locks it did not get (another replica
     * rebuilding the sale, or sweeping it for a moment): each is rebuilt then if still paused. */
    for (size_t i = 0;
         rc->session && i < rc->nbusy_kept && !sp_signal_stop_requested() && !rc->changed; i++) {
        if (!sp_reaper_on_session(rp, rc->session)) goto lost_session;
        rebuild_one(rp, rc->busy[i], rc, 1);
    }
    if (rc->changed) {
        snprintf(errbuf, errlen, "Redis changed again during the reconcile; starting over");
        return -1;
    }
    return 0;
lost_session:
    snprintf(errbuf, errlen,
             "the PostgreSQL session, and the reconcile lock, were lost; starting over on the "
             "next check");
    return -1;
}

/* Helps the replica reconciling every SKU, when it says so (RECOVERY_KEY): rebuilds the paused
 * sales whose locks are free. Its settle and its wait for the consumer hold for every SKU. */
static void help_recovery(sp_reaper *rp) {
    static char helped[RECOVERY_VALUE_MAX]; /* the last reconcile helped: one pass each */
    char err[512], value[RECOVERY_VALUE_MAX];
    const char *get[] = {"GET", RECOVERY_KEY};
    redisReply *r = sp_reaper_redis_argv(rp, 2, get, -1, err, sizeof(err));
    int under_way = r && r->type == REDIS_REPLY_STRING && strcmp(r->str, helped) != 0;
    if (under_way) snprintf(helped, sizeof(helped), "%s", r->str);
    freeReplyObject(r);
    if (!under_way) return;
    /* "token\nepoch\nreplid": the reconcile's pause token and the Redis it paused. */
    snprintf(value, sizeof(value), "%s", helped);
    char *epoch = strchr(value, '\n'), *replid = epoch ? strchr(epoch + 1, '\n') : NULL;
    if (replid == NULL) return;
    *epoch++ = '\0';
    *replid++ = '\0';
    recovery rc = {.why = "helping another replica's reconcile of every SKU",
                   .token = value,
                   .settle_until = sp_clock_mono_ms()};
    snprintf(rc.epoch, sizeof(rc.epoch), "%s", epoch);
    snprintf(rc.replid, sizeof(rc.replid), "%s", replid);
    int64_t *open = NULL;
    size_t nopen = 0;
    if (open_skus(rp, &open, &nopen, err, sizeof(err)) != 0 ||
        rebuild_paused(rp, &rc, open, nopen, 0, err, sizeof(err)) != 0)
        sp_warn("helping the reconcile of every SKU failed: %s", err);
    else if (rc.nskus > 0)
        sp_info("helped the reconcile of every SKU: %zu SKUs rebuilt (%zu failed)", rc.nskus,
                rc.nfailed);
    free(open);
    free(rc.busy);
}

/* Every SKU: all paused at once (pipelined, a page at a time), one settle wait and one wait for
 * the consumer for all of them, then the open sales rebuilt first and the finished ones after;
 * the caller holds SP_LOCK_RECONCILE. The time to bring the open sales back does not grow with
 * the catalog: only the pause (a pipelined script call per SKU) does. */
static int reconcile_every_sku(sp_reaper *rp, const char *why, char *errbuf, size_t errlen) {
    char token[128], late_token[140];
    redis_identity before;
    int64_t started = sp_clock_mono_ms();
    recovery rc = {.why = why,
                   .token = token,
                   .late_token = late_token,
                   .session = rp->pg_session,
                   .settle_until = started + rp->cfg->kafka_message_timeout_ms + 1000};
    int64_t *open = NULL;
    size_t nopen = 0;
    int ret = -1;
    /* A new epoch goes to Redis first: if Redis loses data again while this runs, the epoch goes
     * with it and the next check starts over; reaper_state gets it only at the end. */
    if (each_primary_set(rp, SP_STOCK_REBUILT_KEY, NULL, errbuf, errlen) != 0 ||
        read_identity(rp, &before, errbuf, errlen) != 0 ||
        new_epoch(rp, before.epoch, sizeof(before.epoch), errbuf, errlen) != 0)
        return -1;
    snprintf(token, sizeof(token), "all:%s:%" PRId64, rp->cfg->worker_id, sp_clock_wall_ms());
    snprintf(late_token, sizeof(late_token), "%s:late", token);
    snprintf(rc.epoch, sizeof(rc.epoch), "%s", before.epoch);
    snprintf(rc.replid, sizeof(rc.replid), "%s", before.replid);
    sp_warn("reconcile of every SKU: %s", why);
    sp_metric_set(&m_paused, 0);
    /* 1. Pause every sale, so none admits orders against what Redis lost. */
    if (pause_all(rp, &rc, 0, errbuf, errlen) != 0) goto out;
    sp_info("reconcile: %" PRId64 " sales paused in %" PRId64 " ms", sp_metric_get(&m_paused),
            sp_clock_mono_ms() - started);
    /* 2. One settle wait, 3. one wait for the consumer, for all of them. */
    int64_t now = sp_clock_mono_ms();
    if (rc.settle_until > now && sp_reaper_sleep(rc.settle_until - now) != 0) {
        snprintf(errbuf, errlen, "stopped while reservations settled; the sales stay paused");
        goto out;
    }
    if (wait_consumer_all(rp, errbuf, errlen) != 0) goto out;
    /* Sales PostgreSQL got meanwhile (their stock.set stored during the wait) are paused now, by
     * the late token: each is rebuilt with its own settle and wait. From here every sale in
     * PostgreSQL is paused or rebuilt, so one found open is rebuilt already (or opened since). */
    if (pause_all(rp, &rc, 1, errbuf, errlen) != 0 ||
        open_skus(rp, &open, &nopen, errbuf, errlen) != 0)
        goto out;
    /* The other replicas help from here (each SKU under its lock). */
    char value[RECOVERY_VALUE_MAX];
    snprintf(value, sizeof(value), "%s\n%s\n%s", token, rc.epoch, rc.replid);
    const char *set[] = {"SET", RECOVERY_KEY, value, "EX", RECOVERY_TTL_S};
    if (redis_argv(rp, 5, set, errbuf, errlen) != 0) goto out;
    /* 4. The open sales first, 5. then the finished ones. */
    int lost = rebuild_paused(rp, &rc, open, nopen, started, errbuf, errlen);
    const char *del[] = {"DEL", RECOVERY_KEY};
    char ignored[256];
    (void)redis_argv(rp, 2, del, ignored, sizeof(ignored));
    if (lost) goto out;
    if (sp_signal_stop_requested()) {
        snprintf(errbuf, errlen, "stopped half-way; the paused sales are finished later");
        goto out;
    }
    if (rc.nfailed > 0) {
        snprintf(errbuf, errlen, "%zu of %zu SKUs not reconciled; tried again on the next check",
                 rc.nfailed, rc.nskus);
        goto out;
    }
    /* Only if Redis still holds the epoch written at the start did it keep everything since. */
    redis_identity after_id;
    if (read_identity(rp, &after_id, errbuf, errlen) != 0) goto out;
    if (strcmp(after_id.epoch, before.epoch) != 0 || strcmp(after_id.run_id, before.run_id) != 0) {
        snprintf(errbuf, errlen, "Redis changed again during the reconcile; starting over");
        goto out;
    }
    if (write_state(rp, &before, errbuf, errlen) != 0 ||
        mark_rebuilt(rp, before.epoch, errbuf, errlen) != 0)
        goto out;
    rp->seen.known = 1;
    snprintf(rp->seen.epoch, sizeof(rp->seen.epoch), "%s", before.epoch);
    snprintf(rp->seen.run_id, sizeof(rp->seen.run_id), "%s", before.run_id);
    snprintf(rp->seen.replid, sizeof(rp->seen.replid), "%s", before.replid);
    sp_info("reconcile of every SKU done: %zu SKUs rebuilt in %" PRId64 " ms; Redis epoch %s",
            rc.nskus, sp_clock_mono_ms() - started, before.epoch);
    ret = 0;
out:
    free(open);
    free(rc.busy);
    free(rc.first);
    return ret;
}

int sp_reconcile_all(sp_reaper *rp, const char *why, int *busy, char *errbuf, size_t errlen) {
    int got = 0;
    *busy = 0;
    if (sp_reaper_lock_try(rp, SP_LOCK_RECONCILE, 0, &got, errbuf, errlen) != 0) goto fail;
    if (!got) {
        *busy = 1;
        return 0;
    }
    int rc = reconcile_every_sku(rp, why, errbuf, errlen);
    sp_reaper_unlock(rp, SP_LOCK_RECONCILE, 0);
    if (rc == 0) return 0;
fail:
    sp_metric_inc(&m_errors);
    return -1;
}

int sp_reconcile_check(sp_reaper *rp, char *errbuf, size_t errlen) {
    redis_identity now, rec;
    int got = 0, found = 0, rc = -1;
    char why[256];
    if (read_identity(rp, &now, errbuf, errlen) != 0) goto fail;
    if (rp->seen.known && now.epoch[0] && strcmp(now.epoch, rp->seen.epoch) == 0 &&
        strcmp(now.run_id, rp->seen.run_id) == 0 && strcmp(now.replid, rp->seen.replid) == 0)
        return 0;
    rp->seen.known = 0; /* until this check (or another replica's reconcile) says otherwise */
    if (sp_reaper_lock_try(rp, SP_LOCK_RECONCILE, 0, &got, errbuf, errlen) != 0) goto fail;
    if (!got) { /* another replica is checking, or reconciling: help it */
        help_recovery(rp);
        return 0;
    }
    if (read_state(rp, &rec, &found, errbuf, errlen) != 0) goto out;
    if (!found || strcmp(now.epoch, rec.epoch) != 0 || strcmp(now.run_id, rec.run_id) != 0 ||
        strcmp(now.replid, rec.replid) != 0) {
        /* Nothing recorded is a database the reaper never ran on: a new deployment (nothing to
         * rebuild) or one rebuilt from the log, whose ledger rows have lost their stamps: Redis
         * must be rebuilt from it before any row is given back again. */
        snprintf(why, sizeof(why), "%s",
                 !found ? "nothing recorded about Redis in this database (first start, or a "
                          "database rebuilt from the log)"
                 : strcmp(now.epoch, rec.epoch) != 0
                     ? (now.epoch[0] ? "Redis holds another epoch than the last reconcile wrote"
                                     : "Redis lost the epoch the last reconcile wrote: it was "
                                       "emptied or replaced")
                 : strcmp(now.run_id, rec.run_id) != 0
                     ? "Redis restarted or failed over (new run_id): writes of its last moments "
                       "may be lost"
                     : "Redis failed over (new replication id): the new primary may have missed "
                       "writes");
        if (found) sp_metric_inc(&m_data_loss);
        if (reconcile_every_sku(rp, why, errbuf, errlen) != 0) goto out;
        rc = 0;
        goto out;
    }
    if (mark_rebuilt(rp, now.epoch, errbuf, errlen) != 0) goto out;
    rp->seen.known = 1;
    snprintf(rp->seen.epoch, sizeof(rp->seen.epoch), "%s", now.epoch);
    snprintf(rp->seen.run_id, sizeof(rp->seen.run_id), "%s", now.run_id);
    snprintf(rp->seen.replid, sizeof(rp->seen.replid), "%s", now.replid);
    rc = 0;
out:
    sp_reaper_unlock(rp, SP_LOCK_RECONCILE, 0);
    if (rc == 0) return 0;
fail:
    sp_metric_inc(&m_errors);
    return -1;
}
