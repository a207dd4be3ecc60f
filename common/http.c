/* http.c - HTTP plumbing shared by the workers (libevent's evhttp): routes, JSON replies, bounds,
 *          and the /healthz /readyz /metrics endpoints every worker serves. */
#include "http.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "metrics.h"

struct sp_http {
    struct evhttp *evh;
    struct evhttp_bound_socket *listener;
    sp_http_handler fallback;
    void *fallback_arg;
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

void sp_health_beat(void) { atomic_store_explicit(&health_last_beat, monotonic_s(), memory_order_relaxed); }

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
    if (h->fallback) h->fallback(req, h->fallback_arg);
    else sp_http_reply_error(req, 404, "not_found", NULL);
}

/* ---- server ---- */

sp_http *sp_http_new(struct event_base *base, const char *addr, int port,
                     const sp_http_limits *limits, char *errbuf, size_t errlen) {
    sp_http_limits def = SP_HTTP_LIMITS_DEFAULT;
    sp_http *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto fail;
    }
    if (limits == NULL) limits = &def;
    h->evh = evhttp_new(base);
    if (h->evh == NULL) {
        snprintf(errbuf, errlen, "evhttp_new failed");
        goto fail;
    }
    evhttp_set_max_body_size(h->evh, (ev_ssize_t)limits->max_body);
    evhttp_set_max_headers_size(h->evh, (ev_ssize_t)limits->max_headers);
    evhttp_set_timeout(h->evh, limits->timeout_s);
    evhttp_set_allowed_methods(h->evh, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD);
    evhttp_set_default_content_type(h->evh, "application/json");
    if (evhttp_set_cb(h->evh, "/healthz", on_healthz, NULL) != 0 ||
        evhttp_set_cb(h->evh, "/readyz", on_readyz, NULL) != 0 ||
        evhttp_set_cb(h->evh, "/metrics", on_metrics, NULL) != 0) {
        snprintf(errbuf, errlen, "cannot register the health endpoints");
        goto fail;
    }
    evhttp_set_gencb(h->evh, on_unrouted, h);
    h->listener = evhttp_bind_socket_with_handle(h->evh, addr, (ev_uint16_t)port);
    if (h->listener == NULL) {
        snprintf(errbuf, errlen,
                 "cannot listen on %s:%d (in use, or not an address of this host); "
                 "set HTTP_PORT / HTTP_ADDR",
                 addr, port);
        goto fail;
    }
    return h;
fail:
    sp_http_free(h);
    return NULL;
}

int sp_http_route(sp_http *h, const char *path, sp_http_handler cb, void *arg) {
    return evhttp_set_cb(h->evh, path, cb, arg) == 0 ? 0 : -1;
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
    if (h->evh) evhttp_free(h->evh);
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
