/* reaper_ctx.h - what every step of the reaper shares: its settings, one Redis connection, one
 *                PostgreSQL session, an idempotent Kafka producer with a bounded wait for its
 *                acknowledgements, and the advisory locks that split the work among replicas.
 *
 * The steps (expiry.h, stock_return.h, resv_sweep.h, reconcile.h, audit.h) each take an
 * sp_reaper and run to completion on the calling thread; the reaper's main loop (reaper.h) calls
 * them in turn. Connections are made on demand and dropped after a failure, so a step that found a
 * backend down fails (logged, counted) and the next sweep reconnects.
 *
 * Owned by one thread: the reaper's main thread.
 */
#ifndef SP_REAPER_CTX_H
#define SP_REAPER_CTX_H

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>

#include "clock.h"
#include "config.h"
#include "event.h"
#include "metrics.h"
#include "redis_cluster.h"
#include "redis_store.h"

/* Advisory lock classes (the first key of pg_advisory_lock(int, int)); the second key is a SKU
 * (modulo 2^31: two SKUs sharing a key only take turns) or 0. */
#define SP_LOCK_SKU       0x53500501 /* one SKU's Redis repairs: resv sweep, reconcile */
#define SP_LOCK_RECONCILE 0x53500502 /* the reconcile of every SKU after Redis lost data */

struct sp_reaper_batch; /* the publish batch waiting for its delivery reports */

/* A Redis's run id (or replication id): one server's, or a cluster's primaries' joined by ','
 * (reconcile.c). */
#define SP_REDIS_IDENTITY_MAX (SP_CLUSTER_NODES_MAX * 41)

typedef struct sp_reaper {
    const sp_config *cfg;
    sp_redis_target redis_target;
    sp_redis *redis;     /* NULL while disconnected: sp_reaper_redis() connects */
    PGconn *pg;          /* NULL while disconnected: sp_reaper_pg() connects; a new session
                          * has none of the old one's advisory locks */
    uint64_t pg_session; /* counts the sessions made: a step holding a lock checks that it is
                          * still on the session that took it */
    int nlocks;          /* advisory locks taken and not yet released. While it is not 0 no new
                          * session is made: a step under a lock whose session died must fail,
                          * not go on without the lock on a new one (another replica may hold
                          * it by then) */
    rd_kafka_t *kafka;   /* NULL when the caller asked for no Kafka */
    uint64_t next_seq;   /* numbers the messages published, for their delivery reports */
    struct sp_reaper_batch *batch;
    /* What reconcile.c last found Redis to be, after a check that needed no reconcile: while
     * Redis still says the same, the check costs no PostgreSQL round trip. */
    struct {
        int known;
        char epoch[64], run_id[SP_REDIS_IDENTITY_MAX], replid[SP_REDIS_IDENTITY_MAX];
    } seen;
} sp_reaper;

/* Prepares rp for cfg (parses REDIS_URL; with_kafka: creates the producer, which also serves
 * metadata and watermark queries). Connects nothing else yet. -1 with errbuf. */
int sp_reaper_init(sp_reaper *rp, const sp_config *cfg, int with_kafka, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Waits up to the message timeout for what Kafka still holds, then closes everything. Returns the
 * number of events Kafka had not acknowledged (0 normally). */
int sp_reaper_close(sp_reaper *rp);

/* The Redis connection, connecting (and loading the scripts) when there is none; NULL with
 * errbuf when Redis cannot be reached. */
sp_redis *sp_reaper_redis(sp_reaper *rp, char *errbuf, size_t errlen);

/* The Redis connection failed mid-step: drop it (the next sp_reaper_redis reconnects). */
void sp_reaper_redis_failed(sp_reaper *rp);

/* Runs one command (argv, argc words) on the reaper's Redis connection, connecting when needed.
 * Returns the reply (caller frees) when it is of type want (a REDIS_REPLY_* value; -1: any type
 * but an error). NULL with errbuf otherwise; a failed connection is dropped. */
/* The same on the i-th primary (sp_redis_primaries), no redirect followed. */
redisReply *sp_reaper_redis_argv_on(sp_reaper *rp, int i, int argc, const char **argv, int want,
                                    char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
redisReply *sp_reaper_redis_argv(sp_reaper *rp, int argc, const char **argv, int want, char *errbuf,
                                 size_t errlen) __attribute__((warn_unused_result));

/* One step's worth of a hash's entries: kv holds npairs (field, value) replies in turn, valid
 * until fn returns. Return 0 to go on, 1 to end the scan early (not a failure), -1 with errbuf. */
typedef int sp_reaper_hscan_fn(sp_reaper *rp, redisReply *const *kv, size_t npairs, void *arg,
                               char *errbuf, size_t errlen);

/* HSCANs key, asking for count entries per step, and hands them to fn in chunks of at most
 * max_pairs (a small hash answers whole in one step, however many entries it holds). 0 when the
 * scan ended (or fn ended it); -1 with errbuf when Redis or fn failed. */
int sp_reaper_hscan(sp_reaper *rp, const char *key, int count, size_t max_pairs,
                    sp_reaper_hscan_fn *fn, void *arg, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* The PostgreSQL session, connecting when there is none (with statement, lock and
 * idle-in-transaction timeouts, so nothing the reaper does can hold a lock for long); NULL with
 * errbuf when PostgreSQL cannot be reached, or when the session is gone while advisory locks
 * taken on it are not released yet (rp->nlocks): the step that holds them stops there instead of
 * going on without them. */
PGconn *sp_reaper_pg(sp_reaper *rp, char *errbuf, size_t errlen);

/* The session failed mid-step (or is in an unknown transaction state): drop it. Its advisory
 * locks and any open transaction end with it. */
void sp_reaper_pg_failed(sp_reaper *rp);

/* Rolls back whatever transaction is open on the session (after a failed statement); drops the
 * session when even that fails. */
void sp_reaper_pg_rollback(sp_reaper *rp);

/* Runs one parameterized statement (sp_pg_query) on the session, connecting when there is none.
 * Returns its rows (caller PQclears), or NULL with errbuf; a session the statement failed on is
 * dropped. Not for the statements of an open transaction (BEGIN is fine): a session that had
 * gone would be replaced by a new one, outside the transaction. */
PGresult *sp_reaper_query(sp_reaper *rp, const char *sql, int nparams, const char *const *params,
                          char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* The same for a statement whose rows are not wanted: 0, or -1 with errbuf. */
int sp_reaper_exec(sp_reaper *rp, const char *sql, int nparams, const char *const *params,
                   char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Publishes n events (key = sku_id) with the acks=all idempotent producer and waits for their
 * delivery reports, at most the message timeout plus a second. acked[i] is 1 when Kafka
 * acknowledged evs[i], 0 when it did not or did not say in time (the event may still be
 * delivered later: every event the reaper publishes is harmless twice). Returns how many were
 * acknowledged. */
size_t sp_reaper_publish(sp_reaper *rp, const sp_event *evs, size_t n, int *acked);

/* The partition of the events topic that holds sku_id's events: librdkafka's default
 * partitioner (CRC32 of the key, the decimal sku_id), which every producer uses. -1 with errbuf
 * when the topic's metadata cannot be read. */
int sp_reaper_partition_of(sp_reaper *rp, int64_t sku_id, int32_t *partition, char *errbuf,
                           size_t errlen) __attribute__((warn_unused_result));

/* The same, for a topic of npartitions partitions (> 0) already known. */
int32_t sp_reaper_partition_in(int64_t sku_id, int npartitions);

/* Tries the session-level advisory lock (lock_class, key) without waiting: *got is 1 when this
 * session holds it now. Session locks outlive transactions and end with the session, so a
 * replica that dies releases them at once. -1 with errbuf when PostgreSQL failed. */
int sp_reaper_lock_try(sp_reaper *rp, int32_t lock_class, int64_t key, int *got, char *errbuf,
                       size_t errlen) __attribute__((warn_unused_result));

/* Takes the lock, waiting up to the session's lock_timeout; *got as above. */
int sp_reaper_lock(sp_reaper *rp, int32_t lock_class, int64_t key, int *got, char *errbuf,
                   size_t errlen) __attribute__((warn_unused_result));

/* Releases a lock this session holds (nothing when the session is gone: so is the lock). Every
 * lock taken is released by its step, whatever happened, so that rp->nlocks goes back to 0. */
void sp_reaper_unlock(sp_reaper *rp, int32_t lock_class, int64_t key);

/* Whether the session that took a lock (session: rp->pg_session then) is still the one open, with
 * no round trip. */
static inline int sp_reaper_on_session(const sp_reaper *rp, uint64_t session) {
    return rp->pg != NULL && rp->pg_session == session;
}

/* Asks PostgreSQL whether this session (which must be session) still holds the advisory lock
 * (lock_class, key), without ever connecting anew: 0 when it does; -1 with errbuf when it does not
 * or the session is gone (dropped then). A step checks this before it writes what only the lock's
 * holder may write. */
int sp_reaper_lock_held(sp_reaper *rp, uint64_t session, int32_t lock_class, int64_t key,
                        char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Sleeps up to ms in short slices, beating /healthz; returns early (-1) once SIGTERM arrived. */
int sp_reaper_sleep(int64_t ms);

/* Every step counts its failures in one family, stockpipe_reaper_errors_total{step=...}. */
#define SP_REAPER_ERRORS(step)                                                                     \
    SP_METRIC_COUNTER("stockpipe_reaper_errors_total",                                             \
                      "Steps of the reaper that failed (a backend down, a bad row); retried on "   \
                      "the next sweep.",                                                           \
                      "step=\"" step "\"")

/* Formats a decimal int64 into buf (at least 24 bytes) and returns buf: text parameters. */
const char *sp_reaper_i64(char *buf, int64_t v);

/* The per-user units of a SKU's pending and paid orders, what Redis's {sku:ID}:users must hold:
 * one page of (user_id, units) rows with user_id > after_user, by user_id, at most
 * SP_REAPER_USER_PAGE of them (fewer: the last page). Used by the reconcile's rebuild and by the
 * audit. NULL with errbuf when the query failed (the connection is left to the caller). */
#define SP_REAPER_USER_PAGE 1000
PGresult *sp_reaper_user_units_page(PGconn *pg, int64_t sku_id, int64_t after_user, char *errbuf,
                                    size_t errlen) __attribute__((warn_unused_result));

/* A PostgreSQL text[] literal {"a","b"} of n strings, for `= ANY($1::text[])`; malloc'd (caller
 * frees), NULL when out of memory. The strings must be order ids ([A-Za-z0-9._-]), which need no
 * escaping inside quotes. */
char *sp_reaper_text_array(const char *const *items, size_t n) __attribute__((warn_unused_result));

#endif
