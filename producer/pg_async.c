/* pg_async.c - PostgreSQL queries from a libevent loop, pipelined on one connection.
 *
 * Each query is sent as PQsendQueryParams + PQpipelineSync, so one failing query aborts only
 * itself. libpq then hands back, per query and in order: its result, a NULL, and a
 * PGRES_PIPELINE_SYNC. The waiting queue is a fixed ring in the same order; its head's `stage`
 * follows those three steps.
 */
#include "pg_async.h"

#include <event2/event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"

#define WAITING_MAX 4096 /* queries sent and not yet answered; more are refused */
#define RETRY_MS    1000 /* between connection attempts */
#define CONNECT_MS  3000 /* a connection attempt that takes longer is abandoned */

typedef struct waiting {
    sp_pg_async_fn *fn;
    void *arg;
    int stage; /* 0: result owed; 1: result given, NULL owed; 2: sync owed */
} waiting;

struct sp_pg_async {
    struct event_base *base;
    char *dsn, *app;
    PGconn *conn;           /* NULL when there is none */
    int connected;          /* 1 after PQconnectPoll said OK, until dropped */
    int failing;            /* a connect failed and was logged: the next failures are not */
    struct event *ev_read;  /* the socket: connect steps, then results */
    struct event *ev_write; /* armed while libpq has output it could not send */
    int64_t retry_ms, connect_deadline_ms;
    waiting ring[WAITING_MAX];
    size_t head, n;
};

static void on_socket(evutil_socket_t fd, short what, void *arg);

/* libpq's messages end in a newline; a log line should not. */
static const char *trim(char *buf, size_t len, const char *msg) {
    snprintf(buf, len, "%s", msg && *msg ? msg : "connection lost");
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = '\0';
    return buf;
}

static void unwatch(sp_pg_async *pa) {
    if (pa->ev_read) event_free(pa->ev_read);
    if (pa->ev_write) event_free(pa->ev_write);
    pa->ev_read = pa->ev_write = NULL;
}

/* Watches the connection's socket: `what` (EV_READ or EV_WRITE) once while connecting, reads for
 * good once connected. -1 when libevent refuses. */
static int watch(sp_pg_async *pa, short what) {
    unwatch(pa);
    int fd = PQsocket(pa->conn);
    if (fd < 0) return -1;
    if (pa->connected) {
        pa->ev_read = event_new(pa->base, fd, EV_READ | EV_PERSIST, on_socket, pa);
        pa->ev_write = event_new(pa->base, fd, EV_WRITE, on_socket, pa);
        if (pa->ev_read == NULL || pa->ev_write == NULL) return -1;
        return event_add(pa->ev_read, NULL);
    }
    pa->ev_read = event_new(pa->base, fd, what, on_socket, pa);
    return pa->ev_read ? event_add(pa->ev_read, NULL) : -1;
}

/* Answers and forgets the oldest waiting query. */
static void pop(sp_pg_async *pa) {
    pa->head = (pa->head + 1) % WAITING_MAX;
    pa->n--;
}

/* Ends the connection: every waiting query fails with why, then a new attempt after RETRY_MS. */
static void drop(sp_pg_async *pa, const char *why) {
    char msg[300];
    trim(msg, sizeof(msg), why);
    if (pa->connected) {
        sp_warn("postgresql (async) connection lost: %s", msg);
    } else if (pa->conn && !pa->failing) {
        sp_warn("postgresql (async) cannot connect (retrying every %d ms): %s", RETRY_MS, msg);
        pa->failing = 1;
    }
    unwatch(pa);
    if (pa->conn) PQfinish(pa->conn);
    pa->conn = NULL;
    pa->connected = 0;
    pa->retry_ms = sp_clock_mono_ms() + RETRY_MS;
    while (pa->n > 0) {
        waiting w = pa->ring[pa->head];
        pop(pa);
        if (w.stage == 0) w.fn(NULL, msg, w.arg);
    }
}

/* Sends what libpq holds; arms the write event while some is left. */
static void flush(sp_pg_async *pa) {
    int rc = PQflush(pa->conn);
    if (rc < 0) {
        drop(pa, PQerrorMessage(pa->conn));
    } else if (rc > 0 && event_add(pa->ev_write, NULL) != 0) {
        drop(pa, "cannot watch the socket");
    }
}

/* Hands every complete result to its query, in order. */
static void read_results(sp_pg_async *pa) {
    char msg[300];
    if (!PQconsumeInput(pa->conn) || PQstatus(pa->conn) == CONNECTION_BAD) {
        drop(pa, PQerrorMessage(pa->conn));
        return;
    }
    while (pa->n > 0 && !PQisBusy(pa->conn)) {
        waiting *w = &pa->ring[pa->head];
        PGresult *res = PQgetResult(pa->conn);
        if (res == NULL) {
            if (w->stage != 1) break; /* nothing more has arrived */
            w->stage = 2;
            continue;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            waiting done = *w;
            pop(pa);
            if (done.stage == 0) done.fn(NULL, "no result", done.arg);
        } else if (w->stage == 0) {
            w->stage = 1;
            if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
                w->fn(res, NULL, w->arg);
            else
                w->fn(NULL, trim(msg, sizeof(msg), PQresultErrorMessage(res)), w->arg);
        }
        PQclear(res);
        if (pa->conn == NULL) return; /* a callback's query dropped the connection */
    }
}

/* One step of the non-blocking connect. */
static void connect_step(sp_pg_async *pa) {
    switch (PQconnectPoll(pa->conn)) {
    case PGRES_POLLING_READING:
        if (watch(pa, EV_READ) != 0) drop(pa, "cannot watch the socket");
        return;
    case PGRES_POLLING_WRITING:
        if (watch(pa, EV_WRITE) != 0) drop(pa, "cannot watch the socket");
        return;
    case PGRES_POLLING_OK:
        if (PQsetnonblocking(pa->conn, 1) != 0 || PQenterPipelineMode(pa->conn) != 1) {
            drop(pa, PQerrorMessage(pa->conn));
            return;
        }
        pa->connected = 1;
        pa->failing = 0;
        if (watch(pa, EV_READ) != 0) {
            drop(pa, "cannot watch the socket");
            return;
        }
        sp_info("postgresql (async) connected");
        return;
    default:
        drop(pa, PQerrorMessage(pa->conn));
        return;
    }
}

static void on_socket(evutil_socket_t fd, short what, void *arg) {
    (void)fd;
    sp_pg_async *pa = arg;
    if (!pa->connected) {
        connect_step(pa);
        return;
    }
    if (what & EV_WRITE) flush(pa);
    if (pa->conn && (what & EV_READ)) read_results(pa);
}

sp_pg_async *sp_pg_async_new(struct event_base *base, const char *dsn,
                             const char *application_name) {
    sp_pg_async *pa = calloc(1, sizeof(*pa));
    if (pa == NULL) return NULL;
    pa->base = base;
    pa->dsn = strdup(dsn);
    pa->app = strdup(application_name);
    if (pa->dsn == NULL || pa->app == NULL) {
        sp_pg_async_free(pa);
        return NULL;
    }
    return pa;
}

int sp_pg_async_ready(const sp_pg_async *pa) { return pa->connected; }

void sp_pg_async_tick(sp_pg_async *pa) {
    int64_t now = sp_clock_mono_ms();
    if (pa->conn && !pa->connected && now > pa->connect_deadline_ms) {
        drop(pa, "connect timed out");
        return;
    }
    if (pa->conn || now < pa->retry_ms) return;
    /* expand_dbname=1: "dbname" holds the whole conninfo; application_name is added beside it. */
    const char *const keys[] = {"dbname", "application_name", NULL};
    const char *const values[] = {pa->dsn, pa->app, NULL};
    pa->conn = PQconnectStartParams(keys, values, 1);
    pa->connect_deadline_ms = now + CONNECT_MS;
    if (pa->conn == NULL) {
        pa->retry_ms = now + RETRY_MS;
        return;
    }
    if (PQstatus(pa->conn) == CONNECTION_BAD) {
        drop(pa, PQerrorMessage(pa->conn));
        return;
    }
    connect_step(pa);
}

int sp_pg_async_query(sp_pg_async *pa, const char *sql, int nparams, const char *const *params,
                      sp_pg_async_fn *fn, void *arg) {
    if (!pa->connected || pa->n >= WAITING_MAX) return -1;
    if (!PQsendQueryParams(pa->conn, sql, nparams, NULL, params, NULL, NULL, 0) ||
        !PQpipelineSync(pa->conn)) {
        drop(pa, PQerrorMessage(pa->conn));
        return -1;
    }
    pa->ring[(pa->head + pa->n) % WAITING_MAX] = (waiting){.fn = fn, .arg = arg};
    pa->n++;
    /* Sending the rest (or finding the connection broken) is left to the loop, so fn never runs
     * before this function has returned. */
    if (PQflush(pa->conn) != 0) event_add(pa->ev_write, NULL);
    return 0;
}

void sp_pg_async_free(sp_pg_async *pa) {
    if (pa == NULL) return;
    drop(pa, "shutting down");
    free(pa->dsn);
    free(pa->app);
    free(pa);
}
