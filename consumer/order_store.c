/* order_store.c - applies a batch of events to PostgreSQL in one transaction, exactly once: the
 *                 oversell guard, the order state machine's writes and the partitions' offsets.
 *
 * Every statement is prepared once per connection and takes its values as parameters: arrays in
 * PostgreSQL's text form expanded with unnest(), so a statement writes any number of rows in one
 * round trip. The new orders, the bulk of the writes, go in by COPY in binary format, which skips
 * both the SQL and the text parsing of each value. */
#include "order_store.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "pg_store.h"

/* ---- statements ---- */

enum {
    ST_LOCK_OFFSETS,
    ST_READ_INVENTORY,
    ST_READ_ORDERS,
    ST_READ_RESTOCKS,
    ST_OPEN_SKUS,
    ST_TAKE_STOCK,
    ST_UPDATE_ORDERS,
    ST_INSERT_RETURNS,
    ST_INSERT_RESTOCKS,
    ST_SAVE_OFFSETS,
    ST_STORED_OFFSETS,
    ST_NONEMPTY,
    NSTATEMENTS
};

/* clang-format off */
static const struct {
    const char *name;
    int nparams;
    const char *sql;
} statements[NSTATEMENTS] = {
    /* Takes the partitions' row locks in partition order (so two consumers never deadlock here)
     * and returns what is stored; a missing row is created at 0 (nothing applied yet). A consumer
     * that lost the partition waits here for the new owner's transaction, then sees its offset. */
    [ST_LOCK_OFFSETS] = {"sp_lock_offsets", 2,
        "INSERT INTO consumer_offsets AS c (topic, partition, next_offset) "
        "SELECT $1, p, 0 FROM unnest($2::integer[]) AS p ORDER BY p "
        "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = c.next_offset "
        "RETURNING partition, next_offset"},
    [ST_READ_INVENTORY] = {"sp_read_inventory", 1,
        "SELECT sku_id, stock, supplied, version, shards FROM inventory "
        "WHERE sku_id = ANY($1::bigint[])"},
    [ST_READ_ORDERS] = {"sp_read_orders", 1,
        "SELECT order_id, sku_id, user_id, qty, status, refund_due FROM orders "
        "WHERE order_id = ANY($1::text[])"},
    /* The (sku_id, request_id) pairs of the batch's keyed stock.add applied before. */
    [ST_READ_RESTOCKS] = {"sp_read_restocks", 2,
        "SELECT sku_id, request_id FROM restocks "
        "WHERE (sku_id, request_id) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))"},
    /* stock.set: the row as the event opened it; a row that appeared meanwhile is a conflict. */
    [ST_OPEN_SKUS] = {"sp_open_skus", 6,
        "INSERT INTO inventory (sku_id, stock, version, supplied, per_user_limit, pay_timeout_s, "
        "                       shards, created_at, updated_at) "
        "SELECT u.sku_id, u.stock, 0, u.stock, u.per_user_limit, u.pay_timeout_s, u.shards, u.ts, "
        "       u.ts "
        "FROM unnest($1::bigint[], $2::bigint[], $3::integer[], $4::integer[], $5::timestamptz[], "
        "            $6::integer[]) "
        "     AS u(sku_id, stock, per_user_limit, pay_timeout_s, ts, shards) "
        "ON CONFLICT (sku_id) DO NOTHING RETURNING sku_id"},
    /* The guard: per SKU, the net units n leave only if the row is still the version that was
     * read and still holds n. A row it does not return was touched by someone else. */
    [ST_TAKE_STOCK] = {"sp_take_stock", 6,
        "UPDATE inventory AS i SET stock = i.stock - u.n, version = i.version + u.changes, "
        "       supplied = i.supplied + u.added, updated_at = u.ts "
        "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], "
        "            $6::timestamptz[]) AS u(sku_id, version, n, added, changes, ts) "
        "WHERE i.sku_id = u.sku_id AND i.version = u.version AND i.stock >= u.n "
        "RETURNING i.sku_id, i.stock, i.supplied"},
    /* Every status change is conditional on the status it was decided from. */
    [ST_UPDATE_ORDERS] = {"sp_update_orders", 7,
        "UPDATE orders AS o SET status = u.status, paid_at = coalesce(u.paid_at, o.paid_at), "
        "       closed_at = coalesce(u.closed_at, o.closed_at), refund_due = u.refund_due "
        "FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::timestamptz[], "
        "            $6::timestamptz[], $7::boolean[]) "
        "     AS u(order_id, old_status, old_refund_due, status, paid_at, closed_at, refund_due) "
        "WHERE o.order_id = u.order_id AND o.status = u.old_status "
        "  AND o.refund_due = u.old_refund_due"},
    [ST_INSERT_RETURNS] = {"sp_insert_returns", 6,
        "INSERT INTO stock_returns (order_id, sku_id, user_id, qty, reason, created_at) "
        "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::integer[], $5::text[], "
        "                     $6::timestamptz[])"},
    /* The keyed restocks applied: a pair that appeared meanwhile is a conflict. */
    [ST_INSERT_RESTOCKS] = {"sp_insert_restocks", 6,
        "INSERT INTO restocks (sku_id, request_id, add_units, created_at, kafka_partition, "
        "                      kafka_offset) "
        "SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::timestamptz[], "
        "                     $5::integer[], $6::bigint[]) "
        "ON CONFLICT (sku_id, request_id) DO NOTHING"},
    [ST_SAVE_OFFSETS] = {"sp_save_offsets", 3,
        "UPDATE consumer_offsets AS c SET next_offset = u.next_offset, updated_at = now() "
        "FROM unnest($2::integer[], $3::bigint[]) AS u(partition, next_offset) "
        "WHERE c.topic = $1 AND c.partition = u.partition"},
    [ST_STORED_OFFSETS] = {"sp_stored_offsets", 2,
        "SELECT partition, next_offset FROM consumer_offsets "
        "WHERE topic = $1 AND partition = ANY($2::integer[])"},
    [ST_NONEMPTY] = {"sp_nonempty", 0,
        "SELECT EXISTS (SELECT 1 FROM orders), EXISTS (SELECT 1 FROM inventory)"},
};
/* clang-format on */

/* The session's bounds, set once per connection (parameterized: set_config, not SET). */
static const char session_sql[] =
    "SELECT set_config('statement_timeout', $1, false), set_config('lock_timeout', $2, false), "
    "set_config('idle_in_transaction_session_timeout', $3, false)";

static const char copy_orders_sql[] =
    "COPY orders (order_id, user_id, sku_id, qty, status, reject_reason, created_at, expires_at, "
    "paid_at, closed_at, refund_due, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";
#define COPY_ORDER_FIELDS 13
#define COPY_CHUNK        (256 * 1024) /* bytes handed to libpq at a time */
#define MAX_PARAMS        8

/* ---- growable buffers (array literals, COPY data) ---- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom; /* an append failed: the content is incomplete and must not be used */
} sbuf;

static void sbuf_reserve(sbuf *b, size_t more) {
    if (b->oom || b->len + more + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void sbuf_put(sbuf *b, const void *data, size_t n) {
    sbuf_reserve(b, n);
    if (b->oom) return;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sbuf_puts(sbuf *b, const char *s) { sbuf_put(b, s, strlen(s)); }

static void sbuf_reset(sbuf *b) {
    b->len = 0;
    b->oom = 0;
    if (b->p) b->p[0] = '\0';
}

/* ---- array literals: {1,2,3}, {"a","b"}, NULL elements ---- */

static void arr_begin(sbuf *b) {
    sbuf_reset(b);
    sbuf_put(b, "{", 1);
}

static void arr_sep(sbuf *b) {
    if (b->len > 1) sbuf_put(b, ",", 1);
}

static void arr_end(sbuf *b) { sbuf_put(b, "}", 1); }

static void arr_int(sbuf *b, int64_t v) {
    char num[24];
    int n = snprintf(num, sizeof(num), "%" PRId64, v);
    arr_sep(b);
    sbuf_put(b, num, (size_t)n);
}

static void arr_null(sbuf *b) {
    arr_sep(b);
    sbuf_put(b, "NULL", 4);
}

/* A quoted element: backslash and double quote are escaped; anything else goes as it is. */
static void arr_text(sbuf *b, const char *s) {
    arr_sep(b);
    sbuf_put(b, "\"", 1);
    for (const char *start = s;; s++) {
        if (*s == '"' || *s == '\\' || *s == '\0') {
            sbuf_put(b, start, (size_t)(s - start));
            if (*s == '\0') break;
            sbuf_put(b, "\\", 1);
            start = s;
        }
    }
    sbuf_put(b, "\"", 1);
}

static void arr_bool(sbuf *b, int v) {
    arr_sep(b);
    sbuf_put(b, v ? "t" : "f", 1);
}

/* ms since the epoch as "YYYY-MM-DD HH:MM:SS.mmm+00", or NULL for ms < 0. */
static void arr_ts(sbuf *b, int64_t ms) {
    char text[48];
    struct tm tm;
    time_t secs = (time_t)(ms / 1000);
    if (ms < 0) {
        arr_null(b);
        return;
    }
    gmtime_r(&secs, &tm);
    snprintf(text, sizeof(text), "%04d-%02d-%02d %02d:%02d:%02d.%03d+00", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    arr_text(b, text);
}

/* ---- binary COPY fields (network byte order) ---- */

static void put_u16(sbuf *b, uint16_t v) {
    unsigned char x[2] = {(unsigned char)(v >> 8), (unsigned char)v};
    sbuf_put(b, x, 2);
}

static void put_u32(sbuf *b, uint32_t v) {
    unsigned char x[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    sbuf_put(b, x, 4);
}

static void put_u64(sbuf *b, uint64_t v) {
    put_u32(b, (uint32_t)(v >> 32));
    put_u32(b, (uint32_t)v);
}

static void field_null(sbuf *b) { put_u32(b, UINT32_MAX); } /* length -1 */

static void field_text(sbuf *b, const char *s) {
    if (s == NULL) {
        field_null(b);
        return;
    }
    size_t n = strlen(s);
    put_u32(b, (uint32_t)n);
    sbuf_put(b, s, n);
}

static void field_i64(sbuf *b, int64_t v) {
    put_u32(b, 8);
    put_u64(b, (uint64_t)v);
}

static void field_i32(sbuf *b, int32_t v) {
    put_u32(b, 4);
    put_u32(b, (uint32_t)v);
}

static void field_bool(sbuf *b, int v) {
    unsigned char x = v ? 1 : 0;
    put_u32(b, 1);
    sbuf_put(b, &x, 1);
}

/* timestamptz: microseconds since 2000-01-01 00:00:00 UTC; NULL for ms < 0. */
#define PG_EPOCH_US INT64_C(946684800000000)
static void field_ts(sbuf *b, int64_t ms) {
    if (ms < 0)
        field_null(b);
    else
        field_i64(b, ms * 1000 - PG_EPOCH_US);
}

/* ---- the store ---- */

enum { RETRY_NONE = 0, RETRY_REDECIDE, RETRY_LOOKUP_ALL };

struct sp_order_store {
    char *dsn, *app, *topic;
    sp_store_bounds bounds;
    PGconn *pg; /* NULL while disconnected; in libpq's nonblocking mode, so no wait is unbounded */
    sp_rules *rules;
    sbuf arg[MAX_PARAMS]; /* parameter texts of the statement being built */
    sbuf copy;            /* COPY data */
    char sqlstate[6];     /* of the last failed statement; "" when none */
    int commit_sent;      /* the attempt under way has sent its COMMIT */
    int in_doubt;         /* the last apply lost its connection after sending COMMIT */
};

sp_order_store *sp_order_store_new(const char *dsn, const char *application_name, const char *topic,
                                   size_t batch_max, const sp_store_bounds *bounds) {
    sp_order_store *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    s->bounds = *bounds;
    s->dsn = strdup(dsn);
    s->app = strdup(application_name);
    s->topic = strdup(topic);
    s->rules = sp_rules_new(batch_max);
    if (s->dsn == NULL || s->app == NULL || s->topic == NULL || s->rules == NULL) {
        sp_order_store_free(s);
        return NULL;
    }
    return s;
}

void sp_order_store_free(sp_order_store *s) {
    if (s == NULL) return;
    if (s->pg) PQfinish(s->pg);
    sp_rules_free(s->rules);
    for (int i = 0; i < MAX_PARAMS; i++) free(s->arg[i].p);
    free(s->copy.p);
    free(s->dsn);
    free(s->app);
    free(s->topic);
    free(s);
}

/* libpq's messages end in a newline; a log line should not. */
static void pg_error(sp_order_store *s, const PGresult *res, const char *what, char *errbuf,
                     size_t errlen) {
    const char *msg = res ? PQresultErrorMessage(res) : NULL;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (msg == NULL || *msg == '\0') msg = s->pg ? PQerrorMessage(s->pg) : "not connected";
    snprintf(s->sqlstate, sizeof(s->sqlstate), "%s", state ? state : "");
    snprintf(errbuf, errlen, "postgresql %s: %s", what, msg);
    size_t n = strlen(errbuf);
    while (n > 0 && (errbuf[n - 1] == '\n' || errbuf[n - 1] == ' ')) errbuf[--n] = '\0';
}

static void disconnect(sp_order_store *s) {
    if (s->pg) PQfinish(s->pg);
    s->pg = NULL;
}

static int64_t deadline_of(const sp_order_store *s) {
    return sp_clock_mono_ms() + s->bounds.answer_ms;
}

/* Sends what libpq holds for the server and, with until_result, reads until a result can be taken
 * without blocking, never past deadline (monotonic ms). 0; or -1 with errbuf and the connection
 * closed: it broke, or the server did not answer in time. That is the one bound on a server that
 * does not run (stopped, hung, cut off while the kernel still holds the connection): its own
 * timeouts need it to run, and TCP sees nothing wrong. A session whose round trip was given up is
 * in an unknown state and never used again; if it held a transaction the server rolls it back
 * once it runs (the client is gone; its timeouts expired meanwhile). */
static int pump(sp_order_store *s, int until_result, int64_t deadline, const char *what,
                char *errbuf, size_t errlen) {
    for (;;) {
        int pending = PQflush(s->pg);
        if (pending < 0 || PQsocket(s->pg) < 0) break;
        if (pending == 0 && (!until_result || !PQisBusy(s->pg))) return 0;
        int64_t left = deadline - sp_clock_mono_ms();
        if (left <= 0) {
            snprintf(errbuf, errlen,
                     "postgresql %s: no answer within %d ms (the server is stalled or cut off); "
                     "connection closed",
                     what, s->bounds.answer_ms);
            s->sqlstate[0] = '\0';
            disconnect(s);
            return -1;
        }
        /* Readable too while sending: libpq must read what the server says meanwhile. */
        struct pollfd pfd = {.fd = PQsocket(s->pg),
                             .events = (short)(POLLIN | (pending ? POLLOUT : 0))};
        int n = poll(&pfd, 1, (int)(left < 60000 ? left : 60000));
        if (n < 0 && errno != EINTR) break;
        if (n > 0 && (pfd.revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL)) &&
            !PQconsumeInput(s->pg))
            break;
    }
    pg_error(s, NULL, what, errbuf, errlen);
    disconnect(s);
    return -1;
}

static int result_ok(const PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
}

/* The result of the command sent last, once the server has sent all of it (the first failed one
 * when there are several), or COPY's PGRES_COPY_IN, after which the server waits for the data.
 * NULL with errbuf when the connection broke or the deadline passed (it is closed then); else
 * the caller PQclears. */
static PGresult *take_result(sp_order_store *s, int64_t deadline, const char *what, char *errbuf,
                             size_t errlen) {
    PGresult *kept = NULL, *res;
    for (;;) {
        if (pump(s, 1, deadline, what, errbuf, errlen) != 0) {
            PQclear(kept);
            return NULL;
        }
        if ((res = PQgetResult(s->pg)) == NULL) break;
        if (PQresultStatus(res) == PGRES_COPY_IN) {
            PQclear(kept);
            return res;
        }
        if (kept == NULL || result_ok(kept)) {
            PQclear(kept);
            kept = res;
        } else {
            PQclear(res);
        }
    }
    if (kept == NULL) pg_error(s, NULL, what, errbuf, errlen);
    return kept;
}

/* Sends sql (no parameters but params, may be NULL) and takes its result: 0 when it succeeded,
 * -1 with errbuf and s->sqlstate. */
static int exec_bounded(sp_order_store *s, const char *sql, int nparams, const char *const *params,
                        const char *what, char *errbuf, size_t errlen) {
    int64_t deadline = deadline_of(s);
    s->sqlstate[0] = '\0';
    if (!PQsendQueryParams(s->pg, sql, nparams, NULL, params, NULL, NULL, 0)) {
        pg_error(s, NULL, what, errbuf, errlen);
        return -1;
    }
    PGresult *res = take_result(s, deadline, what, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = 0;
    if (!result_ok(res)) {
        pg_error(s, res, what, errbuf, errlen);
        rc = -1;
    }
    PQclear(res);
    return rc;
}

/* Connects (within bounds.connect_timeout_s), bounds the session and prepares every statement,
 * unless the connection is up. */
static int ensure_connected(sp_order_store *s, char *errbuf, size_t errlen) {
    char statement[16], lock[16], idle[16];
    if (s->pg && PQstatus(s->pg) == CONNECTION_OK) return 0;
    disconnect(s);
    s->pg = sp_pg_connect_timeout(s->dsn, s->app, s->bounds.connect_timeout_s, errbuf, errlen);
    if (s->pg == NULL) return -1;
    if (PQsetnonblocking(s->pg, 1) != 0) {
        pg_error(s, NULL, "nonblocking mode", errbuf, errlen);
        disconnect(s);
        return -1;
    }
    snprintf(statement, sizeof(statement), "%d", s->bounds.statement_timeout_ms);
    snprintf(lock, sizeof(lock), "%d", s->bounds.lock_timeout_ms);
    snprintf(idle, sizeof(idle), "%d", s->bounds.idle_in_tx_ms);
    const char *bounds[] = {statement, lock, idle};
    if (exec_bounded(s, session_sql, 3, bounds, "session timeouts", errbuf, errlen) != 0) {
        disconnect(s);
        return -1;
    }
    for (int i = 0; i < NSTATEMENTS; i++) {
        int64_t deadline = deadline_of(s);
        PGresult *res = NULL;
        if (!PQsendPrepare(s->pg, statements[i].name, statements[i].sql, statements[i].nparams,
                           NULL))
            pg_error(s, NULL, statements[i].name, errbuf, errlen);
        else if ((res = take_result(s, deadline, statements[i].name, errbuf, errlen)) != NULL &&
                 !result_ok(res))
            pg_error(s, res, statements[i].name, errbuf, errlen);
        int ok = res != NULL && result_ok(res);
        PQclear(res);
        if (!ok) {
            disconnect(s);
            return -1;
        }
    }
    return 0;
}

/* Runs prepared statement st with the texts in s->arg[0..nparams) (or params when given).
 * Returns the result (caller PQclears) or NULL with errbuf and s->sqlstate. */
static PGresult *run(sp_order_store *s, int st, const char *const *params, char *errbuf,
                     size_t errlen) {
    const char *texts[MAX_PARAMS];
    int n = statements[st].nparams;
    s->sqlstate[0] = '\0';
    if (params == NULL) {
        for (int i = 0; i < n; i++) {
            if (s->arg[i].oom) {
                snprintf(errbuf, errlen, "%s: out of memory", statements[st].name);
                return NULL;
            }
            texts[i] = s->arg[i].p;
        }
        params = texts;
    }
    int64_t deadline = deadline_of(s);
    if (!PQsendQueryPrepared(s->pg, statements[st].name, n, params, NULL, NULL, 0)) {
        pg_error(s, NULL, statements[st].name, errbuf, errlen);
        return NULL;
    }
    PGresult *res = take_result(s, deadline, statements[st].name, errbuf, errlen);
    if (res != NULL && !result_ok(res)) {
        pg_error(s, res, statements[st].name, errbuf, errlen);
        PQclear(res);
        return NULL;
    }
    return res;
}

static int run_simple(sp_order_store *s, const char *sql, char *errbuf, size_t errlen) {
    return exec_bounded(s, sql, 0, NULL, sql, errbuf, errlen);
}

int sp_order_store_ping(sp_order_store *s, char *errbuf, size_t errlen) {
    if (ensure_connected(s, errbuf, errlen) != 0) return -1;
    if (run_simple(s, "SELECT 1", errbuf, errlen) != 0) {
        if (PQstatus(s->pg) != CONNECTION_OK) disconnect(s);
        return -1;
    }
    return 0;
}

/* ---- the steps of one attempt ---- */

/* Step 1: lock and read the stored offsets of the batch's partitions. A batch may start past a
 * partition's stored offset only where its reader found the offsets in between empty (gap_from):
 * otherwise they are events nobody applied (the reader's position was ahead of PostgreSQL's, as
 * after a restore or with a stale position), and applying the batch would skip them for good.
 * Such a batch is refused (-1), with read_again_from set on each partition where it happened. A
 * partition with nothing stored yet (0) is no exception: its batch must start at offset 0, or
 * where its reader found everything before empty (the log's start, past what retention deleted).
 * A new or restored database under a running consumer, or a consumer that started from Kafka's
 * committed offset, would otherwise skip the partition's early events for good. */
static int lock_offsets(sp_order_store *s, sp_batch *b, char *errbuf, size_t errlen) {
    arr_begin(&s->arg[1]);
    for (size_t i = 0; i < b->nparts; i++) arr_int(&s->arg[1], b->parts[i].partition);
    arr_end(&s->arg[1]);
    sbuf_reset(&s->arg[0]);
    sbuf_puts(&s->arg[0], s->topic);
    PGresult *res = run(s, ST_LOCK_OFFSETS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    if ((size_t)PQntuples(res) != b->nparts) {
        snprintf(errbuf, errlen, "locking offsets: %d rows for %zu partitions", PQntuples(res),
                 b->nparts);
        PQclear(res);
        return -1;
    }
    for (int row = 0; row < PQntuples(res); row++) {
        int32_t p = (int32_t)strtol(PQgetvalue(res, row, 0), NULL, 10);
        int64_t next = strtoll(PQgetvalue(res, row, 1), NULL, 10);
        for (size_t i = 0; i < b->nparts; i++)
            if (b->parts[i].partition == p) b->parts[i].stored = next;
    }
    PQclear(res);
    int refused = 0;
    for (size_t i = 0; i < b->nparts; i++) {
        sp_batch_partition *p = &b->parts[i];
        p->read_again_from = -1;
        if (p->first_offset <= p->stored || p->gap_from <= p->stored) continue;
        p->read_again_from = p->stored;
        if (refused++ == 0)
            snprintf(errbuf, errlen,
                     "offsets %" PRId64 "..%" PRId64 " of %s [%" PRId32 "] were never applied "
                     "(the batch starts at %" PRId64 ", PostgreSQL's stored offset is %" PRId64
                     "): refused, to be read again from %" PRId64,
                     p->stored, p->first_offset - 1, s->topic, p->partition, p->first_offset,
                     p->stored, p->stored);
    }
    if (refused > 1) {
        size_t n = strlen(errbuf);
        snprintf(errbuf + n, errlen - n, " (and %d more partitions)", refused - 1);
    }
    return refused ? -1 : 0;
}

/* Step 2a: the inventory rows of the batch's SKUs. */
static int read_inventory(sp_order_store *s, char *errbuf, size_t errlen) {
    sp_rules *r = s->rules;
    if (r->nskus == 0) return 0;
    arr_begin(&s->arg[0]);
    for (size_t k = 0; k < r->nskus; k++) arr_int(&s->arg[0], r->skus[k].sku_id);
    arr_end(&s->arg[0]);
    PGresult *res = run(s, ST_READ_INVENTORY, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    for (int row = 0; row < PQntuples(res); row++) {
        sp_rules_sku *sk = sp_rules_find_sku(r, strtoll(PQgetvalue(res, row, 0), NULL, 10));
        if (sk == NULL) continue;
        sk->in_db = 1;
        sk->stock = strtoll(PQgetvalue(res, row, 1), NULL, 10);
        sk->supplied = strtoll(PQgetvalue(res, row, 2), NULL, 10);
        sk->version = strtoll(PQgetvalue(res, row, 3), NULL, 10);
        sk->shards = (int32_t)strtol(PQgetvalue(res, row, 4), NULL, 10);
    }
    PQclear(res);
    return 0;
}

static int names_order(const sp_batch_item *it) {
    return it->ev.type == SP_EV_ORDER_CREATED || it->ev.type == SP_EV_ORDER_PAID ||
           it->ev.type == SP_EV_ORDER_EXPIRED || it->ev.type == SP_EV_ORDER_VOIDED;
}

/* Step 2b: the existing orders the batch's events name (order.created's ids only when
 * lookup_all: they are new unless the log repeats itself). */
static int read_orders(sp_order_store *s, const sp_batch *b, int lookup_all, char *errbuf,
                       size_t errlen) {
    size_t nids = 0;
    arr_begin(&s->arg[0]);
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        if (it->outcome != SP_ITEM_APPLIED || !names_order(it)) continue;
        if (it->ev.type == SP_EV_ORDER_CREATED && !lookup_all) continue;
        arr_text(&s->arg[0], it->ev.order_id);
        nids++;
    }
    arr_end(&s->arg[0]);
    if (nids == 0) return 0;
    PGresult *res = run(s, ST_READ_ORDERS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = 0;
    for (int row = 0; row < PQntuples(res) && rc == 0; row++) {
        sp_order_status st = sp_order_status_parse(PQgetvalue(res, row, 4));
        rc = sp_rules_add_order(s->rules, PQgetvalue(res, row, 0),
                                strtoll(PQgetvalue(res, row, 1), NULL, 10),
                                strtoll(PQgetvalue(res, row, 2), NULL, 10),
                                (int32_t)strtol(PQgetvalue(res, row, 3), NULL, 10), st,
                                PQgetvalue(res, row, 5)[0] == 't');
        if (rc != 0) snprintf(errbuf, errlen, "more orders read than the batch can name");
    }
    PQclear(res);
    return rc;
}

static int keyed_restock(const sp_batch_item *it) {
    return it->ev.type == SP_EV_STOCK_ADD && it->ev.request_id[0] != '\0';
}

/* Step 2c: the restocks applied before among the batch's keyed stock.add; no statement for a
 * batch without one (the common case: orders). */
static int read_restocks(sp_order_store *s, const sp_batch *b, char *errbuf, size_t errlen) {
    size_t npairs = 0;
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        if (it->outcome != SP_ITEM_APPLIED || !keyed_restock(it)) continue;
        if (npairs++ == 0) {
            arr_begin(&s->arg[0]);
            arr_begin(&s->arg[1]);
        }
        arr_int(&s->arg[0], it->ev.sku_id);
        arr_text(&s->arg[1], it->ev.request_id);
    }
    if (npairs == 0) return 0;
    arr_end(&s->arg[0]);
    arr_end(&s->arg[1]);
    PGresult *res = run(s, ST_READ_RESTOCKS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = 0;
    for (int row = 0; row < PQntuples(res) && rc == 0; row++) {
        rc = sp_rules_add_restock(s->rules, strtoll(PQgetvalue(res, row, 0), NULL, 10),
                                  PQgetvalue(res, row, 1));
        if (rc != 0) snprintf(errbuf, errlen, "more restocks read than the batch can name");
    }
    PQclear(res);
    return rc;
}

/* Checks that a statement touched exactly `want` rows; a shortfall is a conflict to redo. */
static int expect_rows(PGresult *res, long want, const char *what, int *retry, char *errbuf,
                       size_t errlen) {
    const char *t = PQcmdTuples(res);
    long got = t && *t ? strtol(t, NULL, 10) : PQntuples(res);
    if (got == want) return 0;
    snprintf(errbuf, errlen, "%s: %ld of %ld rows matched (another writer changed them)", what, got,
             want);
    *retry = RETRY_REDECIDE;
    return -1;
}

/* Step 4a: the rows stock.set opened. */
static int open_skus(sp_order_store *s, int *retry, char *errbuf, size_t errlen) {
    sp_rules *r = s->rules;
    long n = 0;
    for (int i = 0; i < 6; i++) arr_begin(&s->arg[i]);
    for (size_t k = 0; k < r->nskus; k++) {
        const sp_rules_sku *sk = &r->skus[k];
        if (!sk->opened) continue;
        arr_int(&s->arg[0], sk->sku_id);
        arr_int(&s->arg[1], sk->open_stock);
        arr_int(&s->arg[2], sk->per_user_limit);
        arr_int(&s->arg[3], sk->pay_timeout_s);
        arr_ts(&s->arg[4], sk->open_ms);
        arr_int(&s->arg[5], sk->shards);
        n++;
    }
    if (n == 0) return 0;
    for (int i = 0; i < 6; i++) arr_end(&s->arg[i]);
    PGresult *res = run(s, ST_OPEN_SKUS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = expect_rows(res, n, "opening skus", retry, errbuf, errlen);
    PQclear(res);
    return rc;
}

/* Step 4b: the guarded, versioned update of every SKU whose row the batch changed. */
static int take_stock(sp_order_store *s, sp_batch *b, int *retry, char *errbuf, size_t errlen) {
    sp_rules *r = s->rules;
    long n = 0;
    for (int i = 0; i < 6; i++) arr_begin(&s->arg[i]);
    for (size_t k = 0; k < r->nskus; k++) {
        const sp_rules_sku *sk = &r->skus[k];
        if (sk->changes == 0) continue;
        arr_int(&s->arg[0], sk->sku_id);
        arr_int(&s->arg[1], sk->opened ? 0 : sk->version);
        arr_int(&s->arg[2], sk->taken - sk->returned - sk->added);
        arr_int(&s->arg[3], sk->added);
        arr_int(&s->arg[4], sk->changes);
        arr_ts(&s->arg[5], sk->updated_ms);
        n++;
    }
    if (n == 0) return 0;
    for (int i = 0; i < 6; i++) arr_end(&s->arg[i]);
    PGresult *res = run(s, ST_TAKE_STOCK, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = expect_rows(res, n, "guarded stock update", retry, errbuf, errlen);
    for (int row = 0; rc == 0 && row < PQntuples(res); row++) {
        sp_rules_sku *sk = sp_rules_find_sku(r, strtoll(PQgetvalue(res, row, 0), NULL, 10));
        if (sk == NULL) continue;
        b->skus[sk - r->skus].stock = strtoll(PQgetvalue(res, row, 1), NULL, 10);
        b->skus[sk - r->skus].supplied = strtoll(PQgetvalue(res, row, 2), NULL, 10);
    }
    PQclear(res);
    return rc;
}

/* Hands the COPY data gathered so far to libpq and sends it, by the deadline. -1 with errbuf
 * (s->pg is NULL then when the connection was closed). */
static int copy_flush(sp_order_store *s, int64_t deadline, char *errbuf, size_t errlen) {
    if (s->copy.oom) {
        snprintf(errbuf, errlen, "COPY orders: out of memory");
        return -1;
    }
    if (s->copy.len > 0) {
        /* Nonblocking: 0 is "buffers full, try again once some was sent". */
        int rc;
        while ((rc = PQputCopyData(s->pg, s->copy.p, (int)s->copy.len)) == 0)
            if (pump(s, 0, deadline, "COPY orders", errbuf, errlen) != 0) return -1;
        if (rc < 0) {
            pg_error(s, NULL, "COPY orders", errbuf, errlen);
            return -1;
        }
    }
    sbuf_reset(&s->copy);
    return pump(s, 0, deadline, "COPY orders", errbuf, errlen);
}

/* Step 4c: the new orders, by binary COPY. A duplicate id (an order.created the log repeats, not
 * looked up) fails it with unique_violation: the batch is redone with every id looked up. */
static int copy_orders(sp_order_store *s, int *retry, char *errbuf, size_t errlen) {
    static const char header[] = "PGCOPY\n\377\r\n"; /* + its NUL: 11 bytes */
    const sp_rules *r = s->rules;
    long n = 0;
    for (size_t i = 0; i < r->norders; i++) n += r->orders[i].status_db == SP_ORDER_NONE;
    if (n == 0) return 0;

    /* The whole COPY is one statement: one deadline. */
    int64_t deadline = deadline_of(s);
    if (!PQsendQuery(s->pg, copy_orders_sql)) {
        pg_error(s, NULL, "COPY orders", errbuf, errlen);
        return -1;
    }
    PGresult *res = take_result(s, deadline, "COPY orders", errbuf, errlen);
    if (res == NULL) return -1;
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        pg_error(s, res, "COPY orders", errbuf, errlen);
        PQclear(res);
        return -1;
    }
    PQclear(res);
    sbuf_reset(&s->copy);
    sbuf_put(&s->copy, header, sizeof(header));
    put_u32(&s->copy, 0); /* flags */
    put_u32(&s->copy, 0); /* header extension */
    int failed = 0;
    for (size_t i = 0; i < r->norders && !failed; i++) {
        const sp_rules_order *o = &r->orders[i];
        if (o->status_db != SP_ORDER_NONE) continue;
        sbuf *c = &s->copy;
        put_u16(c, COPY_ORDER_FIELDS);
        field_text(c, o->order_id);
        field_i64(c, o->user_id);
        field_i64(c, o->sku_id);
        field_i32(c, o->qty);
        field_text(c, sp_order_status_name(o->status));
        field_text(c, o->reject_reason);
        field_ts(c, o->created_ms);
        field_ts(c, o->expires_ms);
        field_ts(c, o->paid_ms);
        field_ts(c, o->closed_ms);
        field_bool(c, o->refund_due);
        if (o->partition >= 0) {
            field_i32(c, o->partition);
            field_i64(c, o->offset);
        } else {
            field_null(c);
            field_null(c);
        }
        if (c->len >= COPY_CHUNK && copy_flush(s, deadline, errbuf, errlen) != 0) failed = 1;
    }
    if (!failed) {
        put_u16(&s->copy, UINT16_MAX); /* trailer: -1 */
        if (copy_flush(s, deadline, errbuf, errlen) != 0) failed = 1;
    }
    if (s->pg == NULL) return -1; /* closed: no answer in time */
    char ignored[256];
    int rc;
    while ((rc = PQputCopyEnd(s->pg, failed ? "the consumer gave up" : NULL)) == 0)
        if (pump(s, 0, deadline, "COPY orders", failed ? ignored : errbuf,
                 failed ? sizeof(ignored) : errlen) != 0)
            return -1;
    if (rc < 0) {
        if (!failed) pg_error(s, NULL, "COPY orders", errbuf, errlen);
        return -1;
    }
    if (failed) {
        /* The server's answer to the abort says nothing new; the reason is in errbuf. */
        PQclear(take_result(s, deadline, "COPY orders", ignored, sizeof(ignored)));
        return -1;
    }
    res = take_result(s, deadline, "COPY orders", errbuf, errlen);
    if (res == NULL) return -1;
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_error(s, res, "COPY orders", errbuf, errlen);
        if (strcmp(s->sqlstate, "23505") == 0) *retry = RETRY_LOOKUP_ALL;
        failed = 1;
    }
    if (!failed && expect_rows(res, n, "COPY orders", retry, errbuf, errlen) != 0) failed = 1;
    PQclear(res);
    return failed ? -1 : 0;
}

/* Step 4d: status changes of orders that existed before the batch. */
static int update_orders(sp_order_store *s, int *retry, char *errbuf, size_t errlen) {
    const sp_rules *r = s->rules;
    long n = 0;
    for (int i = 0; i < 7; i++) arr_begin(&s->arg[i]);
    for (size_t i = 0; i < r->norders; i++) {
        const sp_rules_order *o = &r->orders[i];
        if (o->status_db == SP_ORDER_NONE || !o->changed) continue;
        arr_text(&s->arg[0], o->order_id);
        arr_text(&s->arg[1], sp_order_status_name(o->status_db));
        arr_bool(&s->arg[2], o->refund_due_db);
        arr_text(&s->arg[3], sp_order_status_name(o->status));
        arr_ts(&s->arg[4], o->paid_ms);
        arr_ts(&s->arg[5], o->closed_ms);
        arr_bool(&s->arg[6], o->refund_due);
        n++;
    }
    if (n == 0) return 0;
    for (int i = 0; i < 7; i++) arr_end(&s->arg[i]);
    PGresult *res = run(s, ST_UPDATE_ORDERS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = expect_rows(res, n, "order status update", retry, errbuf, errlen);
    PQclear(res);
    return rc;
}

/* Step 4e: the return ledger. */
static int insert_returns(sp_order_store *s, char *errbuf, size_t errlen) {
    const sp_rules *r = s->rules;
    if (r->nreturns == 0) return 0;
    for (int i = 0; i < 6; i++) arr_begin(&s->arg[i]);
    for (size_t i = 0; i < r->nreturns; i++) {
        const sp_rules_return *ret = &r->returns[i];
        const sp_rules_order *o = &r->orders[ret->order];
        arr_text(&s->arg[0], o->order_id);
        arr_int(&s->arg[1], o->sku_id);
        arr_int(&s->arg[2], o->user_id);
        arr_int(&s->arg[3], o->qty);
        arr_text(&s->arg[4], ret->reason);
        arr_ts(&s->arg[5], ret->ts_ms);
    }
    for (int i = 0; i < 6; i++) arr_end(&s->arg[i]);
    PGresult *res = run(s, ST_INSERT_RETURNS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    PQclear(res);
    return 0;
}

/* Step 4f: the keyed restocks applied, one row each. */
static int insert_restocks(sp_order_store *s, int *retry, char *errbuf, size_t errlen) {
    const sp_rules *r = s->rules;
    long n = 0;
    for (size_t i = 0; i < r->nrestocks; i++) {
        const sp_rules_restock *rs = &r->restocks[i];
        if (!rs->is_new) continue;
        if (n++ == 0)
            for (int j = 0; j < 6; j++) arr_begin(&s->arg[j]);
        arr_int(&s->arg[0], rs->sku_id);
        arr_text(&s->arg[1], rs->request_id);
        arr_int(&s->arg[2], rs->add);
        arr_ts(&s->arg[3], rs->ts_ms);
        arr_int(&s->arg[4], rs->partition);
        arr_int(&s->arg[5], rs->offset);
    }
    if (n == 0) return 0;
    for (int j = 0; j < 6; j++) arr_end(&s->arg[j]);
    PGresult *res = run(s, ST_INSERT_RESTOCKS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int rc = expect_rows(res, n, "inserting restocks", retry, errbuf, errlen);
    PQclear(res);
    return rc;
}

/* Step 6: each partition's next offset: past the batch, never backwards. */
static int save_offsets(sp_order_store *s, sp_batch *b, char *errbuf, size_t errlen) {
    sbuf_reset(&s->arg[0]);
    sbuf_puts(&s->arg[0], s->topic);
    arr_begin(&s->arg[1]);
    arr_begin(&s->arg[2]);
    for (size_t i = 0; i < b->nparts; i++) {
        sp_batch_partition *p = &b->parts[i];
        p->next_offset = p->last_offset + 1 > p->stored ? p->last_offset + 1 : p->stored;
        arr_int(&s->arg[1], p->partition);
        arr_int(&s->arg[2], p->next_offset);
    }
    arr_end(&s->arg[1]);
    arr_end(&s->arg[2]);
    PGresult *res = run(s, ST_SAVE_OFFSETS, NULL, errbuf, errlen);
    if (res == NULL) return -1;
    int ignored = 0;
    int rc = expect_rows(res, (long)b->nparts, "saving offsets", &ignored, errbuf, errlen);
    PQclear(res);
    return rc;
}

/* One transaction. On failure *retry says whether deciding again may succeed. */
static int attempt(sp_order_store *s, sp_batch *b, int lookup_all, sp_store_hook hook, void *arg,
                   int *retry, char *errbuf, size_t errlen) {
    *retry = RETRY_NONE;
    s->commit_sent = 0;
    if (run_simple(s, "BEGIN", errbuf, errlen) != 0) return -1;
    if (lock_offsets(s, b, errbuf, errlen) != 0) return -1;
    sp_rules_begin(s->rules, b);
    if (read_inventory(s, errbuf, errlen) != 0 ||
        read_orders(s, b, lookup_all, errbuf, errlen) != 0 ||
        read_restocks(s, b, errbuf, errlen) != 0)
        return -1;
    sp_rules_decide(s->rules, b);
    if (open_skus(s, retry, errbuf, errlen) != 0 || take_stock(s, b, retry, errbuf, errlen) != 0 ||
        copy_orders(s, retry, errbuf, errlen) != 0 ||
        update_orders(s, retry, errbuf, errlen) != 0 || insert_returns(s, errbuf, errlen) != 0 ||
        insert_restocks(s, retry, errbuf, errlen) != 0)
        return -1;
    if (hook && hook(b, arg, errbuf, errlen) != 0) return -1;
    if (save_offsets(s, b, errbuf, errlen) != 0) return -1;
    s->commit_sent = 1;
    return run_simple(s, "COMMIT", errbuf, errlen);
}

int sp_order_store_apply(sp_order_store *s, sp_batch *b, sp_store_hook before_commit, void *arg,
                         char *errbuf, size_t errlen) {
    int lookup_all = 0, retry = RETRY_NONE;
    sp_batch_index_partitions(b);
    b->attempts = b->conflicts = 0;
    s->in_doubt = 0;
    if (b->n == 0) return 0;
    if (ensure_connected(s, errbuf, errlen) != 0) return -1;
    for (;;) {
        b->attempts++;
        if (attempt(s, b, lookup_all, before_commit, arg, &retry, errbuf, errlen) == 0) return 0;
        /* Deadlocks and serialization failures are worth another try as much as conflicts. */
        if (retry == RETRY_NONE &&
            (strcmp(s->sqlstate, "40P01") == 0 || strcmp(s->sqlstate, "40001") == 0))
            retry = RETRY_REDECIDE;
        if (PQstatus(s->pg) != CONNECTION_OK) { /* broke, or closed: no answer in time */
            /* After its COMMIT went out the server may have committed it (the primary died). */
            s->in_doubt = s->commit_sent;
            disconnect(s);
            return -1;
        }
        char ignored[256];
        if (run_simple(s, "ROLLBACK", ignored, sizeof(ignored)) != 0) {
            disconnect(s); /* a connection that cannot roll back is not trusted again */
            return -1;
        }
        if (retry == RETRY_NONE || b->attempts >= SP_STORE_ATTEMPTS) return -1;
        if (retry == RETRY_LOOKUP_ALL) lookup_all = 1;
        b->conflicts++;
        sp_debug("batch of %zu events redone (attempt %d): %s", b->n, b->attempts + 1, errbuf);
    }
}

int sp_order_store_in_doubt(const sp_order_store *s) { return s->in_doubt; }

int sp_order_store_offsets(sp_order_store *s, const int32_t *partitions, size_t n, int64_t *next,
                           char *errbuf, size_t errlen) {
    if (ensure_connected(s, errbuf, errlen) != 0) return -1;
    sbuf_reset(&s->arg[0]);
    sbuf_puts(&s->arg[0], s->topic);
    arr_begin(&s->arg[1]);
    for (size_t i = 0; i < n; i++) {
        next[i] = -1;
        arr_int(&s->arg[1], partitions[i]);
    }
    arr_end(&s->arg[1]);
    PGresult *res = run(s, ST_STORED_OFFSETS, NULL, errbuf, errlen);
    if (res == NULL) {
        if (PQstatus(s->pg) != CONNECTION_OK) disconnect(s);
        return -1;
    }
    for (int row = 0; row < PQntuples(res); row++) {
        int32_t p = (int32_t)strtol(PQgetvalue(res, row, 0), NULL, 10);
        for (size_t i = 0; i < n; i++)
            if (partitions[i] == p) next[i] = strtoll(PQgetvalue(res, row, 1), NULL, 10);
    }
    PQclear(res);
    return 0;
}

int sp_order_store_nonempty(sp_order_store *s, int *has_orders, int *has_inventory, char *errbuf,
                            size_t errlen) {
    if (ensure_connected(s, errbuf, errlen) != 0) return -1;
    PGresult *res = run(s, ST_NONEMPTY, (const char *const[]){NULL}, errbuf, errlen);
    if (res == NULL) return -1;
    *has_orders = PQgetvalue(res, 0, 0)[0] == 't';
    *has_inventory = PQgetvalue(res, 0, 1)[0] == 't';
    PQclear(res);
    return 0;
}
