/* pg_async.c - PostgreSQL queries from a libevent loop, pipelined on one connection.
 *
 * Each query is sent as PQsendQueryParams + PQpipelineSync, so one failing query aborts only
 * itself. libpq then hands back, per query and in order: its result, a NULL, and a
 * PGRES_PIPELINE_SYNC. The waiting queue is a fixed ring in the same order; its head's `stage`
 * follows those three steps.
 *
 * A DSN may name several hosts (a primary and its standbys, with target_session_attrs=read-write:
 * libpq tries them in turn and keeps the one that takes writes). PQconnectPoll ignores
 * connect_timeout, so the bound on an attempt is ours, per host: a host that never answers (a
 * dead machine, a hung server) costs CONNECT_MS, and the next attempt starts at the host after
 * it, as the DSN's list would never get past it otherwise. An attempt that connected makes its
 * host the first one tried after the connection is lost.
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
#define CONNECT_MS  3000 /* a host that takes longer to connect to is abandoned */
#define HOSTS_MAX   16   /* hosts of a DSN that are taken in turn (more: libpq's order only) */

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
    /* The DSN's hosts, so that an attempt can start at any of them: nhosts is 0 for a DSN of one
     * host (or one libpq's own order serves). port[i] is NULL when the DSN names no port. */
    int nhosts;
    char *host[HOSTS_MAX], *port[HOSTS_MAX];
    int first;  /* the host the next attempt starts at */
    int trying; /* the host the attempt under way is at; -1 when not known */
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

/* The i-th item of a comma-separated list, malloc'd; NULL when out of memory. */
static char *list_item(const char *list, int i) {
    while (i-- > 0) list = strchr(list, ',') + 1;
    const char *end = strchr(list, ',');
    return strndup(list, end ? (size_t)(end - list) : strlen(list));
}

static int list_count(const char *list) {
    int n = 0;
    if (list == NULL || *list == '\0') return 0;
    for (n = 1; *list; list++) n += *list == ',';
    return n;
}

/* Fills pa->host/port from the DSN when it names 2..HOSTS_MAX hosts, each with a port of its own
 * or one port for all (with hostaddr, or another shape, libpq's own order is kept). A DSN libpq
 * cannot parse is left alone: the connection attempt says what is wrong with it. */
static void parse_hosts(sp_pg_async *pa) {
    char *err = NULL;
    const char *host = NULL, *hostaddr = NULL, *port = NULL;
    PQconninfoOption *opts = PQconninfoParse(pa->dsn, &err);
    if (opts == NULL) {
        PQfreemem(err);
        return;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, "host") == 0) host = o->val;
        if (strcmp(o->keyword, "hostaddr") == 0) hostaddr = o->val;
        if (strcmp(o->keyword, "port") == 0) port = o->val;
    }
    int n = list_count(host), nports = list_count(port);
    if (n >= 2 && n <= HOSTS_MAX && list_count(hostaddr) == 0 && (nports <= 1 || nports == n)) {
        int ok = 1;
        for (int i = 0; i < n; i++) {
            pa->host[i] = list_item(host, i);
            pa->port[i] = nports ? list_item(port, nports == 1 ? 0 : i) : NULL;
            ok = ok && pa->host[i] && (nports == 0 || pa->port[i]);
        }
        pa->nhosts = n;
        if (!ok) pa->nhosts = 0; /* out of memory: libpq's order (the strings are freed at free) */
    }
    PQconninfoFree(opts);
}

/* The hosts (or ports) from pa->first on, wrapping round, as one comma-separated list in buf. */
static const char *rotated(sp_pg_async *pa, char *const *items, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int k = 0; k < pa->nhosts; k++) {
        const char *item = items[(pa->first + k) % pa->nhosts];
        int w = snprintf(buf + used, len - used, "%s%s", k ? "," : "", item);
        if (w < 0 || (size_t)w >= len - used) return NULL;
        used += (size_t)w;
    }
    return buf;
}

/* Which of pa->host the attempt is at now (libpq's PQhost and PQport name the host it tries);
 * -1 when it cannot be told. */
static int host_now(const sp_pg_async *pa) {
    const char *h = PQhost(pa->conn), *p = PQport(pa->conn);
    for (int k = 0; k < pa->nhosts; k++) {
        int i = (pa->first + k) % pa->nhosts;
        if (h && strcmp(h, pa->host[i]) == 0 &&
            (pa->port[i] == NULL || (p && strcmp(p, pa->port[i]) == 0)))
            return i;
    }
    return -1;
}

/* One step of the non-blocking connect. */
static void connect_step(sp_pg_async *pa) {
    PostgresPollingStatusType st = PQconnectPoll(pa->conn);
    if (pa->nhosts > 0 && st != PGRES_POLLING_FAILED) {
        int i = host_now(pa);
        if (i != pa->trying) { /* on to the next host: its own CONNECT_MS */
            pa->trying = i;
            pa->connect_deadline_ms = sp_clock_mono_ms() + CONNECT_MS;
        }
    }
    switch (st) {
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
        if (pa->trying >= 0) pa->first = pa->trying; /* after a loss, this host is tried first */
        if (watch(pa, EV_READ) != 0) {
            drop(pa, "cannot watch the socket");
            return;
        }
        sp_info("postgresql (async) connected to %s:%s", PQhost(pa->conn), PQport(pa->conn));
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
    pa->trying = -1;
    if (pa->dsn == NULL || pa->app == NULL) {
        sp_pg_async_free(pa);
        return NULL;
    }
    parse_hosts(pa);
    return pa;
}

int sp_pg_async_ready(const sp_pg_async *pa) { return pa->connected; }

void sp_pg_async_tick(sp_pg_async *pa) {
    int64_t now = sp_clock_mono_ms();
    if (pa->conn && !pa->connected && now > pa->connect_deadline_ms) {
        char why[300];
        if (pa->trying >= 0) {
            /* The next attempt starts past the host that does not answer. */
            snprintf(why, sizeof(why), "connect timed out: %s:%s did not answer within %d ms",
                     pa->host[pa->trying], pa->port[pa->trying] ? pa->port[pa->trying] : "",
                     CONNECT_MS);
            pa->first = (pa->trying + 1) % pa->nhosts;
        } else {
            snprintf(why, sizeof(why), "connect timed out");
        }
        drop(pa, why);
        return;
    }
    if (pa->conn || now < pa->retry_ms) return;
    /* expand_dbname=1: "dbname" holds the whole conninfo; what follows it is added to it, and
     * wins: application_name, and for a DSN of several hosts their list from pa->first on. */
    char hosts[1024], ports[512];
    const char *keys[] = {"dbname", "application_name", NULL, NULL, NULL};
    const char *values[] = {pa->dsn, pa->app, NULL, NULL, NULL};
    if (pa->nhosts > 0) {
        keys[2] = "host";
        values[2] = rotated(pa, pa->host, hosts, sizeof(hosts));
        if (pa->port[0] != NULL) {
            keys[3] = "port";
            values[3] = rotated(pa, pa->port, ports, sizeof(ports));
        }
        if (values[2] == NULL || (keys[3] && values[3] == NULL)) /* too long: libpq's order */
            keys[2] = NULL;
    }
    pa->trying = -1;
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
    for (int i = 0; i < HOSTS_MAX; i++) {
        free(pa->host[i]);
        free(pa->port[i]);
    }
    free(pa->dsn);
    free(pa->app);
    free(pa);
}
