/* http.c - HTTP plumbing shared by the workers (libevent's evhttp): routes, JSON replies, bounds,
 *          and the /healthz /readyz /metrics endpoints every worker serves. */
#include "http.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "metrics.h"

typedef struct conn conn;
typedef struct route route;

struct sp_http {
    struct evhttp *evh;
    struct evhttp_bound_socket *listener;
    sp_http_handler fallback;
    void *fallback_arg;
    struct timeval timeout; /* options.timeout_s: to receive a whole request */
    int max_connections;
    int nopen;    /* connections open and admitted (refused ones are not counted) */
    conn *conns;  /* every record, so that sp_http_free can free them all */
    conn **slots; /* attached records by socket: a request finds its connection */
    size_t nslots;
    route *routes; /* every handler, behind dispatch() */
};

/* ---- health state ---- */

static pthread_mutex_t health_lock = PTHREAD_MUTEX_INITIALIZER;
static int health_ready = 0;
static char health_why[256] = "starting";
static _Atomic long health_last_beat = 0; /* CLOCK_MONOTONIC seconds; 0 = no beat yet */

static long monotonic_s(void) {
    return (long)(sp_clock_mono_ms() / 1000) + 1; /* never 0, which means "no beat yet" */
}

void sp_health_set_ready(int ready, const char *why) {
    pthread_mutex_lock(&health_lock);
    health_ready = ready;
    snprintf(health_why, sizeof(health_why), "%s", why ? why : "");
    pthread_mutex_unlock(&health_lock);
}

void sp_health_beat(void) {
    atomic_store_explicit(&health_last_beat, monotonic_s(), memory_order_relaxed);
}

/* ---- connections: the bound and the request deadline ----
 *
 * libevent 2.1's evhttp has neither a bound on connections nor a deadline for a whole request
 * (its timeout is an idle timeout: a client trickling one byte a second keeps it from firing), and
 * it tells a server nothing when a connection opens or closes. So the server hands evhttp each
 * connection's bufferevent itself (evhttp_set_bevcb) and keeps a record (conn) per connection:
 *   1. evhttp asks for the bufferevent right after accept(): the connection is counted, or refused
 *      when max_connections are open, and an event is made active;
 *   2. that event runs once evhttp has set the connection up (same loop turn): the record learns
 *      its evhttp_connection, whose close callback is the exact moment it ends (un-counted), and
 *      the deadline is armed, or the refused connection gets its 503 and is closed;
 *   3. a request reaching a handler (dispatch) stops the deadline; its answer sent re-arms it.
 * When the deadline passes, the connection is closed as evhttp closes one it timed out itself. */

static sp_metric m_conns_open = SP_METRIC_GAUGE(
    "stockpipe_http_connections", "HTTP connections open (HTTP_MAX_CONNECTIONS bounds them)", NULL);
static sp_metric m_conns_refused = SP_METRIC_COUNTER(
    "stockpipe_http_connections_refused_total",
    "HTTP connections answered 503 and closed at once because the most allowed were open", NULL);
static sp_metric m_request_timeouts = SP_METRIC_COUNTER(
    "stockpipe_http_request_timeouts_total",
    "HTTP connections closed because a request did not arrive in full in time (slow or silent "
    "clients)",
    NULL);

struct route {
    sp_http *h;
    sp_http_handler cb;
    void *arg;
    route *next;
};

struct conn {
    sp_http *h;
    struct bufferevent *bev; /* ours until attached (we hold a reference), then evhttp's */
    struct event *timer;     /* first attaches (made active), then the request deadline */
    int attached;            /* evhttp's close callback is set; bev is in h->slots */
    int refused;             /* over the bound: not in h->nopen, closed once attached */
    conn *prev, *next;       /* h->conns */
};

/* Sent to a connection over the bound, straight to its socket, before it is closed. */
static const char refused_reply[] =
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    "Cache-Control: no-store\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 33\r\n\r\n"
    "{\"error\":\"too_many_connections\"}\n";

/* Forgets c and frees it: counts, slot, list. evhttp no longer knows its bufferevent. */
static void conn_free(conn *c) {
    sp_http *h = c->h;
    evutil_socket_t fd = c->attached ? bufferevent_getfd(c->bev) : -1;
    if (fd >= 0 && (size_t)fd < h->nslots && h->slots[fd] == c) h->slots[fd] = NULL;
    if (!c->refused) {
        h->nopen--;
        sp_metric_add(&m_conns_open, -1);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    if (!c->attached) bufferevent_decref(c->bev); /* the reference taken in on_conn_new */
    event_free(c->timer);
    free(c);
}

/* evhttp frees the connection (a close, an error, a timeout, or the server freed). */
static void on_conn_closed(struct evhttp_connection *evcon, void *arg) {
    (void)evcon;
    conn_free(arg);
}

/* Closes the connection the way evhttp closes one it timed out itself: its error callback, run
 * deferred (never inside our own callback), frees it, which calls on_conn_closed. */
static void conn_close(conn *c) {
    bufferevent_trigger_event(c->bev, BEV_EVENT_READING | BEV_EVENT_TIMEOUT,
                              BEV_TRIG_DEFER_CALLBACKS);
}

/* Step 2: evhttp has set the connection up, with the connection as its bufferevent's callback
 * argument (every libevent since 1.4 does; checked below through the public getter). */
static void conn_attach(conn *c) {
    sp_http *h = c->h;
    bufferevent_event_cb eventcb = NULL;
    void *cbarg = NULL;
    bufferevent_getcb(c->bev, NULL, NULL, &eventcb, &cbarg);
    struct evhttp_connection *evcon = cbarg;
    evutil_socket_t fd = bufferevent_getfd(c->bev);
    if (eventcb == NULL || evcon == NULL || evhttp_connection_get_bufferevent(evcon) != c->bev ||
        fd < 0) {
        conn_free(c); /* evhttp gave the connection up before it was set up: it is gone */
        return;
    }
    if ((size_t)fd >= h->nslots) {
        size_t n = h->nslots ? h->nslots : 1024;
        while (n <= (size_t)fd) n *= 2;
        conn **slots = realloc(h->slots, n * sizeof(*slots));
        if (slots == NULL) {
            if (!c->refused) { /* no room to watch it: refuse it rather than serve it unbounded */
                c->refused = 1;
                h->nopen--;
                sp_metric_add(&m_conns_open, -1);
            }
        } else {
            memset(slots + h->nslots, 0, (n - h->nslots) * sizeof(*slots));
            h->slots = slots;
            h->nslots = n;
        }
    }
    if ((size_t)fd < h->nslots) h->slots[fd] = c;
    evhttp_connection_set_closecb(evcon, on_conn_closed, c);
    c->attached = 1;
    bufferevent_decref(c->bev); /* evhttp's now; on_conn_closed tells when it goes */
    if (c->refused) {
        sp_metric_inc(&m_conns_refused);
        /* Best effort on a fresh socket (its send buffer is empty); what the client sent so far
         * is read and dropped, so that closing sends a FIN rather than a reset. */
        char sink[2048];
        (void)send(fd, refused_reply, sizeof(refused_reply) - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        for (int i = 0; i < 8 && recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0; i++) continue;
        conn_close(c);
        return;
    }
    evtimer_add(c->timer, &h->timeout);
}

static void on_conn_timer(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    conn *c = arg;
    if (!c->attached) {
        conn_attach(c);
        return;
    }
    /* The deadline: no whole request within the timeout. */
    sp_metric_inc(&m_request_timeouts);
    conn_close(c);
}

/* Step 1: evhttp accepted a connection and asks for its bufferevent (it sets the socket later).
 * Returning NULL makes evhttp make its own: on out of memory the connection is served, unbounded,
 * rather than dropped. */
static struct bufferevent *on_conn_new(struct event_base *base, void *arg) {
    sp_http *h = arg;
    conn *c = calloc(1, sizeof(*c));
    if (c == NULL) return NULL;
    /* Options 0 as evhttp's own: evhttp closes the socket itself when it frees the connection. */
    c->bev = bufferevent_socket_new(base, -1, 0);
    c->timer = evtimer_new(base, on_conn_timer, c);
    if (c->bev == NULL || c->timer == NULL) {
        if (c->bev) bufferevent_free(c->bev);
        if (c->timer) event_free(c->timer);
        free(c);
        return NULL;
    }
    bufferevent_incref(c->bev); /* valid in conn_attach even if evhttp freed it meanwhile */
    c->h = h;
    c->next = h->conns;
    if (h->conns) h->conns->prev = c;
    h->conns = c;
    if (h->nopen >= h->max_connections) {
        c->refused = 1;
    } else {
        h->nopen++;
        sp_metric_add(&m_conns_open, 1);
    }
    event_active(c->timer, EV_TIMEOUT, 1);
    return c->bev;
}

/* An answer went out in full: the client has the timeout for its next request (keep-alive). */
static void on_reply_sent(struct evhttp_request *req, void *arg) {
    (void)req;
    conn *c = arg;
    evtimer_add(c->timer, &c->h->timeout);
}

/* Step 3, in front of every handler: the request arrived in time, so its connection's deadline
 * stops until the answer is sent. */
static void dispatch(struct evhttp_request *req, void *arg) {
    route *r = arg;
    sp_http *h = r->h;
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    conn *c = fd >= 0 && (size_t)fd < h->nslots ? h->slots[fd] : NULL;
    if (c != NULL && c->bev == bev) {
        evtimer_del(c->timer);
        evhttp_request_set_on_complete_cb(req, on_reply_sent, c);
    }
    r->cb(req, r->arg);
}

/* Registers cb for path (NULL: every path no route matched) behind dispatch(); -1 if the path is
 * taken or out of memory. */
static int add_route(sp_http *h, const char *path, sp_http_handler cb, void *arg) {
    route *r = calloc(1, sizeof(*r));
    if (r == NULL) return -1;
    *r = (route){.h = h, .cb = cb, .arg = arg, .next = h->routes};
    if (path == NULL) {
        evhttp_set_gencb(h->evh, dispatch, r);
    } else if (evhttp_set_cb(h->evh, path, dispatch, r) != 0) {
        free(r);
        return -1;
    }
    h->routes = r;
    return 0;
}

/* ---- replies ---- */

void sp_http_reply_json(struct evhttp_request *req, int code, const char *json) {
    struct evkeyvalq *hdr = evhttp_request_get_output_headers(req);
    struct evbuffer *body = evhttp_request_get_output_buffer(req);
    evhttp_add_header(hdr, "Content-Type", "application/json");
    evhttp_add_header(hdr, "Cache-Control", "no-store");
    evbuffer_add(body, json, strlen(json));
    evbuffer_add(body, "\n", 1);
    evhttp_send_reply(req, code, NULL, NULL);
}

void sp_http_reply_error(struct evhttp_request *req, int code, const char *error,
                         const char *detail) {
    char buf[512];
    size_t pos = (size_t)snprintf(buf, sizeof(buf), "{\"error\":\"");
    sp_json_escape_append(buf, sizeof(buf) - 8, &pos, error);
    if (detail) {
        pos += (size_t)snprintf(buf + pos, sizeof(buf) - pos, "\",\"detail\":\"");
        sp_json_escape_append(buf, sizeof(buf) - 8, &pos, detail);
    }
    snprintf(buf + pos, sizeof(buf) - pos, "\"}");
    sp_http_reply_json(req, code, buf);
}

/* ---- built-in endpoints ---- */

static void on_healthz(struct evhttp_request *req, void *arg) {
    (void)arg;
    long last = atomic_load_explicit(&health_last_beat, memory_order_relaxed);
    if (last != 0 && monotonic_s() - last > SP_HEALTH_STALL_S) {
        sp_http_reply_json(req, 503, "{\"status\":\"stalled\"}");
        return;
    }
    sp_http_reply_json(req, 200, "{\"status\":\"ok\"}");
}

static void on_readyz(struct evhttp_request *req, void *arg) {
    (void)arg;
    char buf[400];
    size_t pos;
    pthread_mutex_lock(&health_lock);
    int ready = health_ready;
    pos = (size_t)snprintf(buf, sizeof(buf), "{\"status\":\"%s\",\"reason\":\"",
                           ready ? "ready" : "not_ready");
    sp_json_escape_append(buf, sizeof(buf) - 4, &pos, health_why);
    pthread_mutex_unlock(&health_lock);
    snprintf(buf + pos, sizeof(buf) - pos, "\"}");
    sp_http_reply_json(req, ready ? 200 : 503, buf);
}

static void on_metrics(struct evhttp_request *req, void *arg) {
    (void)arg;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f == NULL) {
        sp_http_reply_error(req, 500, "internal", "out of memory");
        return;
    }
    int rc = sp_metrics_render(f);
    if (fclose(f) != 0) rc = -1;
    if (rc != 0 || text == NULL) {
        free(text);
        sp_http_reply_error(req, 500, "internal", "metrics rendering failed");
        return;
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "text/plain; version=0.0.4");
    evbuffer_add(evhttp_request_get_output_buffer(req), text, len);
    free(text);
    evhttp_send_reply(req, 200, NULL, NULL);
}

static void on_unrouted(struct evhttp_request *req, void *arg) {
    sp_http *h = arg;
    if (h->fallback)
        h->fallback(req, h->fallback_arg);
    else
        sp_http_reply_error(req, 404, "not_found", NULL);
}

/* ---- server ---- */

/* Listens on addr:port with SO_REUSEPORT (and SO_REUSEADDR, as evhttp's own bind does): other
 * processes that do the same may listen there too. NULL when addr is not an address or the port
 * is taken by a socket without SO_REUSEPORT. */
static struct evhttp_bound_socket *bind_shared(struct evhttp *evh, struct event_base *base,
                                               const char *addr, int port) {
    char where[128];
    struct sockaddr_storage ss;
    int sslen = (int)sizeof(ss);
    snprintf(where, sizeof(where), strchr(addr, ':') ? "[%s]:%d" : "%s:%d", addr, port);
    if (evutil_parse_sockaddr_port(where, (struct sockaddr *)&ss, &sslen) != 0) return NULL;
    struct evconnlistener *l = evconnlistener_new_bind(
        base, NULL, NULL,
        LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_REUSEABLE | LEV_OPT_REUSEABLE_PORT,
        -1, (struct sockaddr *)&ss, sslen);
    if (l == NULL) return NULL;
    struct evhttp_bound_socket *bound = evhttp_bind_listener(evh, l);
    if (bound == NULL) evconnlistener_free(l);
    return bound;
}

sp_http *sp_http_new(struct event_base *base, const char *addr, int port,
                     const sp_http_options *options, char *errbuf, size_t errlen) {
    sp_http_options def = SP_HTTP_OPTIONS_DEFAULT;
    sp_http *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto fail;
    }
    if (options == NULL) options = &def;
    h->evh = evhttp_new(base);
    if (h->evh == NULL) {
        snprintf(errbuf, errlen, "evhttp_new failed");
        goto fail;
    }
    evhttp_set_max_body_size(h->evh, (ev_ssize_t)options->max_body);
    evhttp_set_max_headers_size(h->evh, (ev_ssize_t)options->max_headers);
    /* evhttp's own timeout is an idle one (reading or writing); one second longer than the
     * request deadline, so that while a request is awaited the deadline always fires first and
     * is counted, and it still bounds writing an answer. */
    evhttp_set_timeout(h->evh, options->timeout_s + 1);
    h->timeout = (struct timeval){.tv_sec = options->timeout_s};
    h->max_connections = options->max_connections;
    evhttp_set_bevcb(h->evh, on_conn_new, h);
    sp_metrics_register(&m_conns_open);
    sp_metrics_register(&m_conns_refused);
    sp_metrics_register(&m_request_timeouts);
    evhttp_set_allowed_methods(h->evh, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD);
    evhttp_set_default_content_type(h->evh, "application/json");
    if (add_route(h, "/healthz", on_healthz, NULL) != 0 ||
        add_route(h, "/readyz", on_readyz, NULL) != 0 ||
        add_route(h, "/metrics", on_metrics, NULL) != 0 ||
        add_route(h, NULL, on_unrouted, h) != 0) {
        snprintf(errbuf, errlen, "cannot register the health endpoints");
        goto fail;
    }
    h->listener = options->reuse_port
                      ? bind_shared(h->evh, base, addr, port)
                      : evhttp_bind_socket_with_handle(h->evh, addr, (ev_uint16_t)port);
    if (h->listener == NULL) {
        snprintf(errbuf, errlen,
                 "cannot listen on %s:%d (in use, or not an address of this host%s); "
                 "set HTTP_PORT / HTTP_ADDR",
                 addr, port,
                 options->reuse_port
                     ? "; to share a port, every process on it must set HTTP_REUSE_PORT=1"
                     : "");
        goto fail;
    }
    return h;
fail:
    sp_http_free(h);
    return NULL;
}

int sp_http_route(sp_http *h, const char *path, sp_http_handler cb, void *arg) {
    return add_route(h, path, cb, arg);
}

void sp_http_route_default(sp_http *h, sp_http_handler cb, void *arg) {
    h->fallback = cb;
    h->fallback_arg = arg;
}

void sp_http_stop_accepting(sp_http *h) {
    if (h && h->listener) {
        evhttp_del_accept_socket(h->evh, h->listener);
        h->listener = NULL;
    }
}

void sp_http_free(sp_http *h) {
    if (h == NULL) return;
    /* evhttp_free frees every connection, whose close callbacks free their records; those left
     * were not attached yet (their connection is gone with the rest). */
    if (h->evh) evhttp_free(h->evh);
    while (h->conns) conn_free(h->conns);
    free(h->slots);
    for (route *r = h->routes, *next; r; r = next) {
        next = r->next;
        free(r);
    }
    free(h);
}

/* ---- the server on a thread of its own ---- */

struct sp_http_thread {
    struct event_base *base;
    struct event *tick;
    sp_http *http;
    pthread_t tid;
    atomic_int stop;
};

/* The stop flag is polled by a timer inside the loop's own thread, so no cross-thread libevent
 * call (and no libevent locking) is ever needed. */
static void on_thread_tick(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    sp_http_thread *t = arg;
    if (atomic_load(&t->stop)) event_base_loopbreak(t->base);
}

static void *http_thread_main(void *arg) {
    sp_http_thread *t = arg;
    event_base_dispatch(t->base);
    return NULL;
}

sp_http_thread *sp_http_thread_start(const char *addr, int port, char *errbuf, size_t errlen) {
    struct timeval every = {0, 100 * 1000};
    sp_http_thread *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&t->stop, 0);
    t->base = event_base_new();
    if (t->base == NULL) {
        snprintf(errbuf, errlen, "event_base_new failed");
        goto fail;
    }
    t->http = sp_http_new(t->base, addr, port, NULL, errbuf, errlen);
    if (t->http == NULL) goto fail;
    t->tick = event_new(t->base, -1, EV_PERSIST, on_thread_tick, t);
    if (t->tick == NULL || event_add(t->tick, &every) != 0) {
        snprintf(errbuf, errlen, "cannot arm the HTTP thread's timer");
        goto fail;
    }
    if (pthread_create(&t->tid, NULL, http_thread_main, t) != 0) {
        snprintf(errbuf, errlen, "cannot start the HTTP thread");
        goto fail;
    }
    return t;
fail:
    if (t->tick) event_free(t->tick);
    sp_http_free(t->http);
    if (t->base) event_base_free(t->base);
    free(t);
    return NULL;
}

void sp_http_thread_stop(sp_http_thread *t) {
    if (t == NULL) return;
    atomic_store(&t->stop, 1);
    pthread_join(t->tid, NULL);
    event_free(t->tick);
    sp_http_free(t->http);
    event_base_free(t->base);
    free(t);
}
