/* producer/main.c - the producer worker: the HTTP order API in front of Redis and Kafka.
 *
 * Foundation stage: one libevent loop serves /healthz /readyz /metrics and reports whether Redis,
 * Kafka and PostgreSQL answer. The order API (atomic Redis pre-deduct, durable Kafka publish)
 * lands with issue #3. */
#include <event2/event.h>
#include <stdio.h>

#include "http.h"
#include "log.h"
#include "signals.h"
#include "worker.h"

typedef struct producer {
    struct event_base *base;
    sp_http *http;
    sp_backends backends;
    int ticks;
    int was_ready;
} producer;

/* Every 100 ms: beat, notice SIGTERM (the handler only counts it), and once a second re-check
 * the backends for /readyz. */
static void on_tick(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    producer *p = arg;
    char why[600];
    sp_health_beat();
    if (sp_signal_stop_requested()) {
        sp_info("stop requested; no new connections, finishing requests under way");
        sp_http_stop_accepting(p->http);
        event_base_loopexit(p->base, NULL);
        return;
    }
    if (p->ticks++ % 10 == 0) {
        int ready = sp_backends_check(&p->backends, why, sizeof(why)) == 0;
        if (ready != p->was_ready) {
            if (ready) sp_info("ready: every backend answers");
            else sp_warn("not ready: %s", why);
            p->was_ready = ready;
        }
    }
}

int main(int argc, char **argv) {
    producer p = {.was_ready = -1};
    sp_config cfg;
    struct event *tick = NULL;
    struct timeval every = {0, 100 * 1000};
    char err[512];
    int status = 2;

    if (sp_worker_setup("producer", SP_WORKER_PRODUCER, argc, argv, "", &cfg, &status) != 0)
        return status;
    sp_config_log(&cfg, SP_WORKER_PRODUCER);
    if (sp_backends_init(&p.backends, &cfg, SP_BACKEND_REDIS | SP_BACKEND_KAFKA | SP_BACKEND_PG,
                         err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        return 2;
    }
    p.base = event_base_new();
    if (p.base == NULL) {
        sp_error("cannot start: event_base_new failed");
        goto out;
    }
    p.http = sp_http_new(p.base, cfg.http_addr, cfg.http_port, NULL, err, sizeof(err));
    if (p.http == NULL) {
        sp_error("cannot start: %s", err);
        goto out;
    }
    tick = event_new(p.base, -1, EV_PERSIST, on_tick, &p);
    if (tick == NULL || event_add(tick, &every) != 0) {
        sp_error("cannot start: cannot arm the main timer");
        goto out;
    }
    sp_info("producer started; HTTP on %s:%d", cfg.http_addr, cfg.http_port);
    event_base_dispatch(p.base);
    status = 0;
out:
    if (tick) event_free(tick);
    sp_http_free(p.http);
    if (p.base) event_base_free(p.base);
    sp_backends_close(&p.backends);
    sp_info("producer stopped");
    return status;
}
