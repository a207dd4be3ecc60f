/* reaper_ctx.c - what every step of the reaper shares: its settings, one Redis connection, one
 *                PostgreSQL session, an idempotent Kafka producer with a bounded wait for its
 *                acknowledgements, and the advisory locks that split the work among replicas. */
#include "reaper_ctx.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "http.h"
#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "signals.h"
#include "stock.h"

#define REDIS_TIMEOUT_MS    2000
#define METADATA_TIMEOUT_MS 5000

/* Statement and lock bounds of the reaper's session: a sweep never waits long on a lock another
 * replica holds, and a replica that hangs inside a transaction loses it (and its row locks). */
static const char session_setup[] = "SET statement_timeout = '60s'; SET lock_timeout = '10s'; "
                                    "SET idle_in_transaction_session_timeout = '60s'";

/* The events published together, and what their delivery reports said. */
typedef struct sp_reaper_batch {
    uint64_t first_seq;
    size_t n;
    int *acked; /* the caller's array: 1 acknowledged, 0 not (yet) */
    size_t nacked;
} sp_reaper_batch;

int sp_reaper_sleep(int64_t ms) {
    int64_t until = sp_clock_mono_ms() + ms;
    for (;;) {
        sp_health_beat();
        if (sp_signal_stop_requested()) return -1;
        int64_t left = until - sp_clock_mono_ms();
        if (left <= 0) return 0;
        if (left > 50) left = 50;
        struct timespec ts = {0, (long)left * 1000000L};
        nanosleep(&ts, NULL);
    }
}

const char *sp_reaper_i64(char *buf, int64_t v) {
    snprintf(buf, 24, "%" PRId64, v);
    return buf;
}

PGresult *sp_reaper_user_units_page(PGconn *pg, int64_t sku_id, int64_t after_user, char *errbuf,
                                    size_t errlen) {
    char sku[24], after[24], limit[24];
    const char *params[] = {sp_reaper_i64(sku, sku_id), sp_reaper_i64(after, after_user),
                            sp_reaper_i64(limit, SP_REAPER_USER_PAGE)};
    return sp_pg_query(pg,
                       "SELECT user_id, sum(qty) FROM orders"
                       " WHERE sku_id = $1::bigint AND user_id > $2::bigint"
                       "   AND status IN ('pending', 'paid')"
                       " GROUP BY user_id ORDER BY user_id LIMIT $3::int",
                       3, params, errbuf, errlen);
}

char *sp_reaper_text_array(const char *const *items, size_t n) {
    size_t cap = 3, len = 0;
    for (size_t i = 0; i < n; i++) cap += 2 * strlen(items[i]) + 3;
    char *out = malloc(cap);
    if (out == NULL) return NULL;
    out[len++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (i) out[len++] = ',';
        out[len++] = '"';
        for (const char *p = items[i]; *p; p++) {
            if (*p == '"' || *p == '\\') out[len++] = '\\';
            out[len++] = *p;
        }
        out[len++] = '"';
    }
    out[len++] = '}';
    out[len] = '\0';
    return out;
}

/* Delivery report: exactly once per message, on this thread (from rd_kafka_poll/flush). A report
 * of a batch that stopped waiting is ignored: its seq is outside the current batch. */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    sp_reaper *rp = opaque;
    sp_reaper_batch *b = rp->batch;
    uint64_t seq = (uint64_t)(uintptr_t)m->_private;
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        sp_warn("kafka did not take an event of the reaper: %s", rd_kafka_err2str(m->err));
        return;
    }
    if (b == NULL || seq < b->first_seq || seq >= b->first_seq + b->n) return;
    if (!b->acked[seq - b->first_seq]) {
        b->acked[seq - b->first_seq] = 1;
        b->nacked++;
    }
}

int sp_reaper_init(sp_reaper *rp, const sp_config *cfg, int with_kafka, char *errbuf,
                   size_t errlen) {
    char timeout[16], linger[16];
    memset(rp, 0, sizeof(*rp));
    rp->cfg = cfg;
    rp->next_seq = 1;
    if (sp_redis_parse_url(cfg->redis_url, &rp->redis_target, errbuf, errlen) != 0) return -1;
    if (!with_kafka) return 0;
    rd_kafka_conf_t *conf = sp_kafka_conf_new(cfg->kafka_brokers, cfg->worker_id, cfg, errbuf,
                                              errlen);
    if (conf == NULL) return -1;
    snprintf(timeout, sizeof(timeout), "%d", cfg->kafka_message_timeout_ms);
    snprintf(linger, sizeof(linger), "%d", cfg->kafka_linger_ms);
    if (sp_kafka_conf_set(conf, "message.timeout.ms", timeout, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "linger.ms", linger, errbuf, errlen) != 0) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_opaque(conf, rp);
    rp->kafka = sp_kafka_producer_new(&conf, errbuf, errlen); /* takes conf on every path */
    return rp->kafka ? 0 : -1;
}

int sp_reaper_close(sp_reaper *rp) {
    int left = 0;
    if (rp->kafka) {
        rd_kafka_flush(rp->kafka, rp->cfg->kafka_message_timeout_ms + 1000);
        left = rd_kafka_outq_len(rp->kafka);
        rd_kafka_destroy(rp->kafka);
    }
    if (rp->redis) sp_redis_close(rp->redis);
    if (rp->pg) PQfinish(rp->pg);
    memset(rp, 0, sizeof(*rp));
    return left;
}

sp_redis *sp_reaper_redis(sp_reaper *rp, char *errbuf, size_t errlen) {
    if (rp->redis) return rp->redis;
    sp_health_beat(); /* a connect may take its whole timeout */
    sp_redis *c = sp_redis_open(&rp->redis_target, REDIS_TIMEOUT_MS, errbuf, errlen);
    if (c == NULL) return NULL;
    /* A new server (restarted, failed over) has an empty script cache. */
    if (sp_stock_scripts_load(c, errbuf, errlen) != 0) {
        sp_redis_close(c);
        return NULL;
    }
    rp->redis = c;
    return c;
}

void sp_reaper_redis_failed(sp_reaper *rp) {
    if (rp->redis) sp_redis_close(rp->redis);
    rp->redis = NULL;
}

/* A reply of the wanted type (want < 0: any but an error), else NULL with errbuf. */
static redisReply *wanted(redisReply *r, int argc, const char **argv, int want, char *errbuf,
                          size_t errlen) {
    if (r->type == REDIS_REPLY_ERROR || (want >= 0 && r->type != want)) {
        snprintf(errbuf, errlen, "%s %s: %s", argv[0], argc > 1 ? argv[1] : "",
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

redisReply *sp_reaper_redis_argv_on(sp_reaper *rp, int i, int argc, const char **argv, int want,
                                    char *errbuf, size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return NULL;
    redisReply *r = sp_redis_argv_on(redis, i, argc, argv, errbuf, errlen);
    if (r == NULL) {
        sp_reaper_redis_failed(rp);
        return NULL;
    }
    return wanted(r, argc, argv, want, errbuf, errlen);
}

redisReply *sp_reaper_redis_argv(sp_reaper *rp, int argc, const char **argv, int want, char *errbuf,
                                 size_t errlen) {
    sp_redis *redis = sp_reaper_redis(rp, errbuf, errlen);
    if (redis == NULL) return NULL;
    /* argv[1] is the key, but for INFO (a section: what the server it runs on says) */
    const char *key = argc > 1 && strcasecmp(argv[0], "INFO") != 0 ? argv[1] : NULL;
    redisReply *r = sp_redis_argv(redis, key, argc, argv, NULL, errbuf, errlen);
    if (r == NULL) {
        sp_reaper_redis_failed(rp);
        return NULL;
    }
    return wanted(r, argc, argv, want, errbuf, errlen);
}

int sp_reaper_hscan(sp_reaper *rp, const char *key, int count, size_t max_pairs,
                    sp_reaper_hscan_fn *fn, void *arg, char *errbuf, size_t errlen) {
    char cursor[32] = "0", n[16];
    snprintf(n, sizeof(n), "%d", count);
    do {
        const char *scan[] = {"HSCAN", key, cursor, "COUNT", n};
        redisReply *r = sp_reaper_redis_argv(rp, 5, scan, REDIS_REPLY_ARRAY, errbuf, errlen);
        if (r == NULL) return -1;
        if (r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
            r->element[1]->type != REDIS_REPLY_ARRAY) {
            snprintf(errbuf, errlen, "HSCAN %s: unexpected reply", key);
            freeReplyObject(r);
            return -1;
        }
        snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
        size_t pairs = r->element[1]->elements / 2;
        int rc = 0;
        for (size_t off = 0; off < pairs && rc == 0; off += max_pairs)
            rc = fn(rp, &r->element[1]->element[2 * off],
                    pairs - off < max_pairs ? pairs - off : max_pairs, arg, errbuf, errlen);
        freeReplyObject(r);
        if (rc != 0) return rc < 0 ? -1 : 0;
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

PGconn *sp_reaper_pg(sp_reaper *rp, char *errbuf, size_t errlen) {
    if (rp->pg) {
        if (PQstatus(rp->pg) == CONNECTION_OK) return rp->pg;
        sp_reaper_pg_failed(rp);
    }
    if (rp->nlocks > 0) {
        snprintf(errbuf, errlen,
                 "the PostgreSQL session that held %d advisory lock(s) is gone, and the locks "
                 "with it; the step stops here",
                 rp->nlocks);
        return NULL;
    }
    sp_health_beat(); /* a connect may take its whole connect_timeout */
    PGconn *pg = sp_pg_connect(rp->cfg->pg_dsn, rp->cfg->worker_id, errbuf, errlen);
    if (pg == NULL) return NULL;
    PGresult *res = PQexec(pg, session_setup);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        snprintf(errbuf, errlen, "postgresql session setup: %s", PQerrorMessage(pg));
        PQclear(res);
        PQfinish(pg);
        return NULL;
    }
    PQclear(res);
    rp->pg = pg;
    rp->pg_session++;
    return pg;
}

void sp_reaper_pg_failed(sp_reaper *rp) {
    if (rp->pg) PQfinish(rp->pg);
    rp->pg = NULL;
}

void sp_reaper_pg_rollback(sp_reaper *rp) {
    char err[256];
    if (rp->pg == NULL || PQtransactionStatus(rp->pg) == PQTRANS_IDLE) return;
    if (sp_pg_exec(rp->pg, "ROLLBACK", 0, NULL, err, sizeof(err)) != 0) sp_reaper_pg_failed(rp);
}

PGresult *sp_reaper_query(sp_reaper *rp, const char *sql, int nparams, const char *const *params,
                          char *errbuf, size_t errlen) {
    PGconn *pg = sp_reaper_pg(rp, errbuf, errlen);
    if (pg == NULL) return NULL;
    PGresult *res = sp_pg_query(pg, sql, nparams, params, errbuf, errlen);
    if (res == NULL) sp_reaper_pg_failed(rp);
    return res;
}

int sp_reaper_exec(sp_reaper *rp, const char *sql, int nparams, const char *const *params,
                   char *errbuf, size_t errlen) {
    PGresult *res = sp_reaper_query(rp, sql, nparams, params, errbuf, errlen);
    if (res == NULL) return -1;
    PQclear(res);
    return 0;
}

size_t sp_reaper_publish(sp_reaper *rp, const sp_event *evs, size_t n, int *acked) {
    char err[256];
    sp_reaper_batch b = {.first_seq = rp->next_seq, .n = n, .acked = acked};
    memset(acked, 0, n * sizeof(*acked));
    rp->next_seq += n;
    rp->batch = &b;
    int64_t deadline = sp_clock_mono_ms() + rp->cfg->kafka_message_timeout_ms + 1000;
    for (size_t i = 0; i < n; i++) {
        void *opaque = (void *)(uintptr_t)(b.first_seq + i);
        sp_log_ctx ctx = {.order_id = evs[i].order_id[0] ? evs[i].order_id : NULL,
                          .sku_id = evs[i].sku_id};
        while (sp_kafka_produce_event(rp->kafka, rp->cfg->kafka_topic, &evs[i], opaque, err,
                                      sizeof(err)) != 0) {
            if (strstr(err, "Queue full") == NULL || sp_clock_mono_ms() >= deadline) {
                SP_LOG_CTX(SP_LOG_WARN, &ctx, "cannot publish %s: %s",
                           sp_event_type_name(evs[i].type), err);
                break;
            }
            rd_kafka_poll(rp->kafka, 50);
        }
    }
    while (b.nacked < n && sp_clock_mono_ms() < deadline && rd_kafka_outq_len(rp->kafka) > 0) {
        sp_health_beat();
        rd_kafka_poll(rp->kafka, 50);
    }
    rd_kafka_poll(rp->kafka, 0);
    rp->batch = NULL;
    return b.nacked;
}

int32_t sp_reaper_partition_in(int64_t sku_id, int npartitions) {
    char key[24];
    int keylen = snprintf(key, sizeof(key), "%" PRId64, sku_id);
    /* The partitioner ignores its topic argument; this is what librdkafka does for every keyed
     * message of a producer that sets no partitioner of its own (none of ours does). */
    return rd_kafka_msg_partitioner_consistent_random(NULL, key, (size_t)keylen, npartitions, NULL,
                                                      NULL);
}

int sp_reaper_partition_of(sp_reaper *rp, int64_t sku_id, int32_t *partition, char *errbuf,
                           size_t errlen) {
    int npartitions = 0;
    if (sp_kafka_topic_partitions(rp->kafka, rp->cfg->kafka_topic, METADATA_TIMEOUT_MS,
                                  &npartitions, errbuf, errlen) != 0)
        return -1;
    if (npartitions <= 0) {
        snprintf(errbuf, errlen, "topic %s has no partitions", rp->cfg->kafka_topic);
        return -1;
    }
    *partition = sp_reaper_partition_in(sku_id, npartitions);
    return 0;
}

/* Runs one lock function; *got from its boolean result (or 1 for the blocking form). */
static int lock_call(sp_reaper *rp, const char *sql, int32_t lock_class, int64_t key, int *got,
                     char *errbuf, size_t errlen) {
    char c[24], k[24];
    const char *params[] = {sp_reaper_i64(c, lock_class), sp_reaper_i64(k, key & 0x7fffffff)};
    PGconn *pg = sp_reaper_pg(rp, errbuf, errlen);
    if (pg == NULL) return -1;
    PGresult *res = sp_pg_query(pg, sql, 2, params, errbuf, errlen);
    if (res == NULL) {
        /* A lock_timeout is an answer (not got), not a broken session. */
        if (strstr(errbuf, "lock timeout") != NULL) {
            *got = 0;
            return 0;
        }
        sp_reaper_pg_failed(rp);
        return -1;
    }
    *got = PQntuples(res) == 1 && PQgetvalue(res, 0, 0)[0] == 't';
    PQclear(res);
    if (*got) rp->nlocks++;
    return 0;
}

int sp_reaper_lock_try(sp_reaper *rp, int32_t lock_class, int64_t key, int *got, char *errbuf,
                       size_t errlen) {
    return lock_call(rp, "SELECT pg_try_advisory_lock($1::int, $2::int)", lock_class, key, got,
                     errbuf, errlen);
}

int sp_reaper_lock(sp_reaper *rp, int32_t lock_class, int64_t key, int *got, char *errbuf,
                   size_t errlen) {
    return lock_call(rp, "SELECT true FROM pg_advisory_lock($1::int, $2::int)", lock_class, key,
                     got, errbuf, errlen);
}

void sp_reaper_unlock(sp_reaper *rp, int32_t lock_class, int64_t key) {
    char c[24], k[24], err[256];
    const char *params[] = {sp_reaper_i64(c, lock_class), sp_reaper_i64(k, key & 0x7fffffff)};
    if (rp->nlocks > 0) rp->nlocks--;
    if (rp->pg == NULL) return; /* the session, and its locks, are gone */
    if (sp_pg_exec(rp->pg, "SELECT pg_advisory_unlock($1::int, $2::int)", 2, params, err,
                   sizeof(err)) != 0)
        sp_reaper_pg_failed(rp);
}

int sp_reaper_lock_held(sp_reaper *rp, uint64_t session, int32_t lock_class, int64_t key,
                        char *errbuf, size_t errlen) {
    char c[24], k[24];
    const char *params[] = {sp_reaper_i64(c, lock_class), sp_reaper_i64(k, key & 0x7fffffff)};
    if (!sp_reaper_on_session(rp, session)) {
        snprintf(errbuf, errlen,
                 "the PostgreSQL session that took the lock is gone, and the lock "
                 "with it");
        return -1;
    }
    /* pg_advisory_lock(int, int) shows as classid = the first key, objid = the second,
     * objsubid = 2. */
    PGresult *res = sp_pg_query(rp->pg,
                                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                "   AND pid = pg_backend_pid() AND granted AND objsubid = 2"
                                "   AND classid = $1::int::oid AND objid = $2::int::oid",
                                2, params, errbuf, errlen);
    if (res == NULL) {
        sp_reaper_pg_failed(rp);
        return -1;
    }
    int held = strtoll(PQgetvalue(res, 0, 0), NULL, 10) > 0;
    PQclear(res);
    if (!held) {
        snprintf(errbuf, errlen, "this PostgreSQL session no longer holds the lock");
        return -1;
    }
    return 0;
}
