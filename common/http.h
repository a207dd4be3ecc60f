/* http.h - HTTP plumbing shared by the workers (libevent's evhttp): routes, JSON replies, bounds,
 *          and the /healthz /readyz /metrics endpoints every worker serves. */
#ifndef SP_HTTP_H
#define SP_HTTP_H

#include <stddef.h>

struct event_base;
struct evhttp;
struct evhttp_request;

typedef struct sp_http sp_http;
typedef void (*sp_http_handler)(struct evhttp_request *req, void *arg);

/* How a server listens. Its bounds, so that hostile clients cannot take it from well-behaved ones:
 *   - a request over max_body / max_headers is refused by evhttp before a handler runs (413 for a
 *     body, 400 for headers);
 *   - a client has timeout_s to send each request in full, counted from when the connection opens
 *     or its previous answer went out: a silent client, or a slow one trickling bytes (slowloris),
 *     is dropped then, however steadily it sends (stockpipe_http_request_timeouts_total); evhttp's
 *     idle timeout, one second longer, bounds writing an answer;
 *   - at most max_connections are open at once; one more is answered 503 and closed at once.
 * Handlers may take as long as they need: the clock stops while one runs. */
typedef struct sp_http_options {
    size_t max_body;     /* bytes */
    size_t max_headers;  /* bytes */
    int timeout_s;       /* to receive a whole request; (+1) idle, to write an answer */
    int max_connections; /* open at once */
    int reuse_port;      /* 1: SO_REUSEPORT, so several processes on one host share addr:port and
                          * the kernel spreads new connections over them (one per core) */
} sp_http_options;

/* clang-format 14 reads a braced initializer in a #define as a block: kept as written */
/* clang-format off */
#define SP_HTTP_OPTIONS_DEFAULT                                                                    \
    {.max_body = 4096, .max_headers = 8192, .timeout_s = 10, .max_connections = 10000,          \
     .reuse_port = 0}
/* clang-format on */

/* Serves /healthz, /readyz and /metrics on addr:port, driven by base (which the caller keeps
 * owning and must outlive the server). NULL with the reason in errbuf, e.g. a port in use. */
sp_http *sp_http_new(struct event_base *base, const char *addr, int port,
                     const sp_http_options *options, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Routes an exact path to cb; -1 if the path is taken. */
int sp_http_route(sp_http *h, const char *path, sp_http_handler cb, void *arg)
    __attribute__((warn_unused_result));

/* Handles every path no route matched (default: 404 {"error":"not_found"}). */
void sp_http_route_default(sp_http *h, sp_http_handler cb, void *arg);

/* Stops accepting: closes the listening socket; requests under way finish. */
void sp_http_stop_accepting(sp_http *h);

void sp_http_free(sp_http *h);

/* Replies with body (a JSON text) and code; sets Content-Type and Cache-Control. */
void sp_http_reply_json(struct evhttp_request *req, int code, const char *json);

/* Replies {"error":"<error>"} or {"error":"<error>","detail":"<detail>"}; detail is escaped. */
void sp_http_reply_error(struct evhttp_request *req, int code, const char *error,
                         const char *detail);

/* Readiness, read by /readyz: any thread may set it; why (copied, bounded) says what is missing. */
void sp_health_set_ready(int ready, const char *why);

/* The main loop calls this every turn; /healthz fails once no beat came for SP_HEALTH_STALL_S
 * seconds, so a wedged worker is restarted by its liveness probe. Before the first beat /healthz
 * answers ok. Thread-safe. */
#define SP_HEALTH_STALL_S 30
void sp_health_beat(void);

/* For workers whose main loop is not libevent (consumer, reaper): runs the same server on a thread
 * of its own. NULL with the reason in errbuf. Stop frees it. */
typedef struct sp_http_thread sp_http_thread;
sp_http_thread *sp_http_thread_start(const char *addr, int port, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
void sp_http_thread_stop(sp_http_thread *t);

#endif
