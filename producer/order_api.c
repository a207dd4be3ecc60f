/* order_api.c - the producer's HTTP API: open and restock sales, take orders, record payments.
 *
 * The life of one POST /v1/orders (one `call`):
 *   parse and check the body ── 400 ──────────────────────────────────────────────► reply
 *   reserve.lua in Redis ────── sold_out / limit / duplicate / recovering ────────► reply
 *        │ (one call per SKU for the orders of one event-loop turn: see reserves_send)
 *        ├─ unknown_sku ─────── EXISTS the reaper's rebuilt key: there 404, missing 503 ─► reply
 *        │ ok (units reserved under the new order id)
 *   produce order.created ───── refused at once ── release.lua ──────────────────► 503
 *        │ delivery report
 *        ├─ delivered ──────── confirm.lua (drops the reservation), then reply 202
 *        ├─ not persisted ──── release.lua (units back, once), reply 503
 *        └─ possibly persisted ─ reply 503; the reservation stays for the reaper to resolve
 * A call is freed after its last step; a client that hung up meanwhile is handled by evhttp
 * (replying to a request whose connection is gone just frees it).
 */
#include "order_api.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api_request.h"
#include "clock.h"
#include "clock_skew.h"
#include "event.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "order_id.h"
#include "pg_async.h"
#include "redis_async.h"
#include "redis_store.h"
#include "shard_refill.h"
#include "stock.h"

#define REDIS_CONNECT_TIMEOUT_MS 500
#define REDIS_STALL_MS           2000  /* replies owed for this long: the connection is dropped */
#define OPEN_CLAIM_MIN_MS        60000 /* an open's claim outlives the reaper's 40 s wait */
#define SOLDOUT_SLOTS            1024  /* local sold-out flags, a direct-mapped table by sku */
#define SOLDOUT_HOLD_MS          200   /* how long a flag answers without asking Redis */
/* Freed calls kept for reuse; none under AddressSanitizer, so that it still sees a call used
 * after it was freed. */
#ifdef __SANITIZE_ADDRESS__
#define SPARE_CALLS_MAX 0
#else
#define SPARE_CALLS_MAX 1024
#endif
#define USER_SLOTS 65536 /* per-user rate buckets, a direct-mapped table by user */
#define SHARDED_SLOTS                                                                              \
    1024               /* sharded sales seen, a direct-mapped table by sku (a miss costs one       \
                        * "moved" answer) */
#define SHARD_ROUNDS 3 /* a sharded order decided this often without an answer: 503 */
#define SHARD_MOVES  2 /* "moved" answers followed per order */
_Static_assert(USER_SLOTS == 1 << 16, "user_allowed() takes the top 16 bits of a hash");

/* ---- metrics ---- */

#define REQ(outcome)                                                                               \
    SP_METRIC_COUNTER("stockpipe_producer_requests_total", "API requests by outcome.",             \
                      "outcome=\"" outcome "\"")
static sp_metric m_accepted = REQ("accepted");
static sp_metric m_sold_out = REQ("sold_out");
static sp_metric m_limit = REQ("limit_exceeded");
static sp_metric m_unknown_sku = REQ("unknown_sku");
static sp_metric m_invalid = REQ("invalid_request");
static sp_metric m_unauthorized = REQ("unauthorized");
static sp_metric m_unavailable = REQ("unavailable");
static sp_metric m_in_progress = REQ("in_progress");
static sp_metric m_admin_ok = REQ("admin_ok");
static sp_metric m_paid = REQ("payment_recorded");
static sp_metric m_pay_closed = REQ("order_closed");
static sp_metric m_pay_mismatch = REQ("qty_mismatch");
static sp_metric m_not_found = REQ("not_found");
static sp_metric m_rate_limited = REQ("rate_limited");
static sp_metric m_lookup = REQ("lookup_ok");
static sp_metric m_recovering = REQ("recovering");
#undef REQ
static sp_metric m_latency = SP_METRIC_LATENCY("stockpipe_producer_order_seconds",
                                               "Time from request to answer for POST /v1/orders.");
static sp_metric m_redis_latency = SP_METRIC_LATENCY(
    "stockpipe_producer_reserve_seconds",
    "Time from request to reserve.lua's answer for POST /v1/orders (parse, queue, Redis).");
static sp_metric m_kafka_latency = SP_METRIC_LATENCY(
    "stockpipe_producer_kafka_ack_seconds",
    "Time from handing order.created to librdkafka to its delivery report.");
static sp_metric m_pg_errors = SP_METRIC_COUNTER(
    "stockpipe_producer_pg_errors_total", "PostgreSQL lookups that failed (GET order / sku).",
    NULL);
static sp_metric m_redis_errors = SP_METRIC_COUNTER("stockpipe_producer_redis_errors_total",
                                                    "Redis failures.", NULL);
static sp_metric m_kafka_errors = SP_METRIC_COUNTER("stockpipe_producer_kafka_errors_total",
                                                    "Events Kafka did not take.", NULL);
static sp_metric m_inflight = SP_METRIC_GAUGE("stockpipe_producer_inflight_publishes",
                                              "Events waiting for Kafka's acknowledgement.", NULL);
static sp_metric m_released = SP_METRIC_COUNTER(
    "stockpipe_producer_reservations_released_total",
    "Reservations given back because Kafka definitely refused the order.", NULL);
static sp_metric m_unknown = SP_METRIC_COUNTER(
    "stockpipe_producer_outcome_unknown_total",
    "Orders whose fate Kafka or Redis left unknown; their reservations wait for the reaper.", NULL);

static sp_metric *all_metrics[] = {
    &m_accepted,     &m_sold_out,     &m_limit,         &m_unknown_sku,   &m_invalid,
    &m_unauthorized, &m_unavailable,  &m_in_progress,   &m_admin_ok,      &m_paid,
    &m_pay_closed,   &m_pay_mismatch, &m_not_found,     &m_latency,       &m_redis_errors,
    &m_kafka_errors, &m_inflight,     &m_released,      &m_unknown,       &m_rate_limited,
    &m_lookup,       &m_pg_errors,    &m_redis_latency, &m_kafka_latency, &m_recovering};

/* ---- state ---- */

typedef enum {
    CALL_ORDER,
    CALL_OPEN,
    CALL_RESTOCK,
    CALL_PAY,
    CALL_GET_ORDER,
    CALL_GET_SKU
} call_kind;

/* A token bucket: `rate` tokens a second, at most `rate` held. */
typedef struct bucket {
    int64_t owner; /* the user it belongs to (user buckets); 0 for the worker's own */
    double tokens;
    int64_t last_us;
} bucket;

/* Calls waiting to be sent to Redis in batches, in arrival order (linked by call.next). */
typedef struct call_queue {
    struct call *head, *tail;
} call_queue;

struct sp_order_api {
    struct event_base *base;
    const sp_config *cfg;
    sp_redis_async *redis; /* the sale's data: one server, Sentinel's primary or a cluster; it
                            * reconnects itself (sp_redis_async_tick) */
    int64_t time_sent_ms;  /* when the clock-skew TIME went out; 0: none under way */
    int64_t time_next_ms;  /* when the next one goes */
    sp_pg_async *pg;       /* lookups for GET; orders never wait on it */
    rd_kafka_t *kafka;
    int kafka_pipe[2]; /* librdkafka writes here when its queue becomes non-empty */
    struct event *kafka_wakeup;
    int kafka_down; /* all brokers down (error callback), until one answers again;
                     * set at start, so /readyz waits for a first answer */
    int64_t kafka_probe_ms;
    int inflight;                /* calls not yet freed */
    call_queue confirms;         /* delivered orders whose confirm is not sent yet */
    call_queue reserves;         /* orders of this loop turn, not sent to Redis yet */
    struct event *reserve_flush; /* made active by the turn's first order: reserves_send() runs
                                  * after every connection that was readable in the turn */
    struct call *spare;          /* freed calls kept for reuse (a call is ~2 KiB: allocating one
                                  * per request made malloc consolidate its free lists each time) */
    int nspare;
    sp_order_ids ids;
    struct {
        int64_t sku_id, until_ms;
    } soldout[SOLDOUT_SLOTS];
    struct {
        int64_t sku_id;
        int nshards;
        char gen[64];
    } sharded[SHARDED_SLOTS];   /* what the shards of sharded sales answered */
    struct shard_short *shorts; /* (SKU, home shard) pairs with orders waiting for units */
    bucket orders_bucket;       /* ORDER_RATE_LIMIT */
    bucket users[USER_SLOTS];   /* USER_RATE_LIMIT; a colliding user takes the slot over */
};

typedef struct call {
    sp_order_api *api;
    struct evhttp_request *req; /* NULL once answered */
    call_kind kind;
    int64_t started_us;
    int64_t published_us;     /* when the event went to librdkafka */
    sp_reserve_request order; /* CALL_ORDER */
    sp_event ev;              /* the event to publish */
    sp_script_call script;    /* the Redis call under way (its script names the answer) */
    int keyed;                /* CALL_RESTOCK: the request id is the caller's Idempotency-Key */
    int rounds, moves;        /* CALL_ORDER on a sharded sale: decided again after a refill, sent
                               * to another shard after "moved" */
    struct call *next;        /* in the api's confirm list */
    /* GET: what Redis said, kept for the PostgreSQL step */
    int redis_failed;  /* Redis could not be asked: a "not found" is not trusted */
    char accepted[64]; /* CALL_GET_ORDER: an accepted {sku}:resv entry "user:qty:ts", or "" */
    char sale[3][24];  /* CALL_GET_SKU: stock, limit, pay_timeout_s; "" when absent */
    int paused;        /* CALL_GET_SKU: the sale has `paused` (a reconcile rebuilds it: its stock
                        * says nothing about what is left) */
    char closed[16];   /* CALL_PAY: the status of an order closed before its payment, or "" */
    int reserved;      /* CALL_PAY: Redis holds the order as reserved ('r:'), Kafka's answer not
                        * recorded yet */
    int reads_owed;    /* GET, CALL_PAY: Redis replies still to come (the order's shards) */
} call;

/* Appends c; returns 1 when the queue was empty before. */
static int queue_push(call_queue *q, call *c) {
    int was_empty = q->head == NULL;
    c->next = NULL;
    if (q->tail)
        q->tail->next = c;
    else
        q->head = c;
    q->tail = c;
    return was_empty;
}

/* Takes the first call of q and the later ones of the same SKU (and shard of a sharded sale), in
 * order, at most max of them, into out; returns how many (0 only when q is empty). One shard's
 * keys go in one script call. */
static int queue_take_sku(call_queue *q, call **out, int max) {
    int n = 0;
    call **link = &q->head;
    int64_t sku = q->head ? q->head->order.sku_id : 0;
    int32_t shard = q->head ? q->head->order.shard : 0;
    q->tail = NULL;
    for (call *c = q->head; c != NULL; c = *link) {
        if (n < max && c->order.sku_id == sku && c->order.shard == shard) {
            out[n++] = c;
            *link = c->next;
        } else {
            q->tail = c;
            link = &c->next;
        }
    }
    return n;
}

/* ---- replies ---- */

/* Bookkeeping of an answer just sent: the call has no request any more. */
static void answered(call *c, sp_metric *outcome) {
    c->req = NULL;
    sp_metric_inc(outcome);
    if (c->kind == CALL_ORDER) sp_metric_observe(&m_latency, sp_clock_mono_us() - c->started_us);
}

static void answer(call *c, int code, const char *json, sp_metric *outcome) {
    if (c->req == NULL) return;
    sp_http_reply_json(c->req, code, json);
    answered(c, outcome);
}

static void answer_error(call *c, int code, const char *error, const char *detail,
                         sp_metric *outcome) {
    if (c->req == NULL) return;
    sp_http_reply_error(c->req, code, error, detail);
    answered(c, outcome);
}

/* 503 "recovering" with Retry-After: 1 for an order: Redis lost the sale (or a reconcile has it
 * paused) and the reaper is rebuilding it from PostgreSQL, which may hold unsold units. Neither a
 * "sold out" nor an "unknown SKU" would be true, and nothing is pinned, so a retry is decided
 * afresh. */
static void answer_recovering(call *c) {
    if (c->req == NULL) return;
    evhttp_add_header(evhttp_request_get_output_headers(c->req), "Retry-After", "1");
    answer_error(c, 503, "recovering", NULL, &m_recovering);
}

static void answer_order(call *c, int code, const char *order_id, const char *status,
                         sp_metric *outcome) {
    char body[160];
    snprintf(body, sizeof(body), "{\"order_id\":\"%s\",\"status\":\"%s\"}", order_id, status);
    answer(c, code, body, outcome);
}

static call *call_new(sp_order_api *api, struct evhttp_request *req, call_kind kind) {
    call *c = api->spare;
    if (c != NULL) {
        api->spare = c->next;
        api->nspare--;
        memset(c, 0, sizeof(*c));
    } else {
        c = calloc(1, sizeof(*c));
    }
    if (c == NULL) {
        sp_http_reply_error(req, 503, "unavailable", "out of memory");
        sp_metric_inc(&m_unavailable);
        return NULL;
    }
    c->api = api;
    c->req = req;
    c->kind = kind;
    c->started_us = sp_clock_mono_us();
    api->inflight++;
    return c;
}

static void call_free(call *c) {
    if (c == NULL) return;
    answer_error(c, 503, "unavailable", NULL, &m_unavailable); /* never leave a buyer hanging */
    sp_order_api *api = c->api;
    api->inflight--;
    if (api->nspare < SPARE_CALLS_MAX) {
        c->next = api->spare;
        api->spare = c;
        api->nspare++;
    } else {
        free(c);
    }
}

/* ---- request bodies ---- */

/* The request's Content-Type and its body as one contiguous run of bytes (evhttp bounds the body;
 * a pullup of a single-chain buffer copies nothing). */
static const char *body_of(struct evhttp_request *req, const char **ctype, size_t *len) {
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    *ctype = evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type");
    *len = evbuffer_get_length(in);
    const char *p = (const char *)evbuffer_pullup(in, -1);
    return p ? p : "";
}

/* Checks "Authorization: Bearer <token>"; answers 401 when it is not so. An unset token refuses
 * everyone (an open admin API is worse than a closed one). */
static int authorized(call *c, const char *token) {
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(c->req), "Authorization");
    if (token[0] != '\0' && h != NULL && strncmp(h, "Bearer ", 7) == 0 && strcmp(h + 7, token) == 0)
        return 1;
    answer_error(c, 401, "unauthorized", NULL, &m_unauthorized);
    return 0;
}

/* ---- sold-out flags ---- */

static int soldout_flagged(sp_order_api *api, int64_t sku) {
    size_t i = (size_t)sku % SOLDOUT_SLOTS;
    return api->soldout[i].sku_id == sku && api->soldout[i].until_ms > sp_clock_wall_ms();
}

static void soldout_set(sp_order_api *api, int64_t sku, int flagged) {
    size_t i = (size_t)sku % SOLDOUT_SLOTS;
    if (flagged) {
        api->soldout[i].sku_id = sku;
        api->soldout[i].until_ms = sp_clock_wall_ms() + SOLDOUT_HOLD_MS;
    } else if (api->soldout[i].sku_id == sku) {
        api->soldout[i].until_ms = 0;
    }
}

/* ---- rate limits ---- */

/* Takes one token from b (refilled at rate/s, holding at most rate); 0 when it is empty. */
static int bucket_take(bucket *b, int rate, int64_t now_us) {
    double refill = (double)(now_us - b->last_us) * rate / 1e6;
    b->tokens = b->tokens + refill > rate ? rate : b->tokens + refill;
    b->last_us = now_us;
    if (b->tokens < 1.0) return 0;
    b->tokens -= 1.0;
    return 1;
}

/* USER_RATE_LIMIT: one user's requests on this worker. A slot another user held starts full. */
static int user_allowed(sp_order_api *api, int64_t user, int64_t now_us) {
    int rate = api->cfg->user_rate_limit;
    if (rate == 0) return 1;
    bucket *b = &api->users[(uint64_t)user * 0x9E3779B97F4A7C15u >> 48]; /* 16 bits: USER_SLOTS */
    if (b->owner != user) *b = (bucket){.owner = user, .tokens = rate, .last_us = now_us};
    return bucket_take(b, rate, now_us);
}

/* ORDER_RATE_LIMIT and MAX_INFLIGHT: what this worker sends on to Redis and Kafka. */
static int worker_allowed(sp_order_api *api, int64_t now_us) {
    if (api->inflight > api->cfg->max_inflight) return 0; /* this call is counted already */
    return api->cfg->order_rate_limit == 0 ||
           bucket_take(&api->orders_bucket, api->cfg->order_rate_limit, now_us);
}

/* ---- Redis ---- */

/* A reply arrived (NULL: the connection ended with the command in flight, its outcome unknown):
 * counts a failure or an error reply. NOSCRIPT, cluster redirects and a demoted primary (READONLY,
 * NOREPLICAS: the connection is dropped, the next one asks Sentinel again) are handled in
 * redis_async.c before a reply gets here. */
static void reply_arrived(const redisReply *r) {
    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
        sp_metric_inc(&m_redis_errors);
        if (r) sp_warn("redis error: %s", r->str);
    }
}

/* Sends c->script; on failure to queue, returns -1 (the caller answers 503). */
static int redis_send(call *c, sp_redis_async_fn *fn) {
    if (sp_redis_async_eval_call(c->api->redis, &c->script, fn, c) != 0) {
        sp_metric_inc(&m_redis_errors);
        return -1;
    }
    return 0;
}

/* Sends a plain command for call c: fmt names key with its first %s and may take one more string
 * argument; -1 when it could not be queued. */
static int redis_command(call *c, sp_redis_async_fn *fn, const char *fmt, const char *key,
                         const char *arg) {
    if (sp_redis_async_send(c->api->redis, fn, c, key, fmt, key, arg) != 0) {
        sp_metric_inc(&m_redis_errors);
        return -1;
    }
    return 0;
}

#ifdef SP_TEST_FAULTS
/* Test builds only (bin/test/producer, built with -DSP_TEST_FAULTS; never the shipped binary):
 * SP_FAULT_DIE_AFTER_RESERVE=N kills the process with SIGKILL right after the N-th successful
 * reserve.lua, before its order.created reaches librdkafka: the crash the reaper's lost-
 * reservation sweep exists for. SP_FAULT_DIE_AFTER_ACK=N kills it when Kafka has acknowledged
 * the N-th order, before its confirm and its answer: the order is in the log, its reservation
 * and Idempotency-Key still say pending. */
#include <signal.h>
static void fault_die_at(const char *setting, long *seen) {
    const char *n = getenv(setting);
    if (n != NULL && ++*seen == strtol(n, NULL, 10)) raise(SIGKILL);
}
static void fault_after_reserve(void) {
    static long seen;
    fault_die_at("SP_FAULT_DIE_AFTER_RESERVE", &seen);
}
static void fault_after_ack(void) {
    static long seen;
    fault_die_at("SP_FAULT_DIE_AFTER_ACK", &seen);
}
#else
static void fault_after_reserve(void) {}
static void fault_after_ack(void) {}
#endif

/* ---- Kafka ---- */

static int publish(call *c) {
    char err[256];
    c->ev.ts_ms = c->ev.ts_ms ? c->ev.ts_ms : sp_clock_wall_ms();
    if (c->api->kafka_down || sp_kafka_produce_event(c->api->kafka, c->api->cfg->kafka_topic,
                                                     &c->ev, c, err, sizeof(err)) != 0) {
        sp_metric_inc(&m_kafka_errors);
        if (!c->api->kafka_down) sp_warn("publish %s: %s", sp_event_type_name(c->ev.type), err);
        return -1;
    }
    sp_metric_inc(&m_inflight);
    c->published_us = sp_clock_mono_us();
    return 0;
}

static void on_release(redisReply *reply, void *data);
static void on_unclaimed(redisReply *reply, void *data);
static void confirms_send(sp_order_api *api);
static void on_sale_written(redisReply *reply, void *data);

/* Gives an order's reservation back (Kafka definitely did not take it), then frees the call. */
static void release_order(call *c) {
    sp_stock_release_call(&c->script, &c->order);
    if (redis_send(c, on_release) != 0) {
        sp_metric_inc(&m_unknown); /* the reaper will find the reservation */
        call_free(c);
    }
}

/* A sharded sale's stock.set is in the log: its shards open in turn (sale_open.lua each, with the
 * claim's token as the sale's generation), from the last to shard 0, whose reply answers the
 * call (on_sale_written); shard 0 holds the claim and is what says the sale exists. A failure
 * midway leaves shard 0 unopened: the sale is the reaper's to rebuild from PostgreSQL, as any
 * sale whose open did not reach Redis. */
static void open_shard_next(call *c);

static void on_shard_opened(redisReply *reply, void *data) {
    call *c = data;
    long long v;
    char err[256];
    reply_arrived(reply);
    if (sp_stock_integer_parse(reply, "sale_open", &v, err, sizeof(err)) != 0) {
        sp_warn("sku %" PRId64 ": shard %d not opened after the event was logged: %s", c->ev.sku_id,
                c->rounds, err);
        call_free(c); /* 503 */
        return;
    }
    c->rounds--;
    open_shard_next(c);
}

static void open_shard_next(call *c) {
    sp_stock_open_shard_call(&c->script, c->ev.sku_id, c->rounds, c->ev.shards, c->ev.stock,
                             c->ev.per_user_limit, c->ev.pay_timeout_s, c->order.order_id,
                             c->rounds == 0 ? c->order.order_id : "");
    if (redis_send(c, c->rounds == 0 ? on_sale_written : on_shard_opened) != 0) call_free(c);
}

/* Delivery report: exactly once per message, on the loop thread (from rd_kafka_poll). */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk, (void)opaque;
    call *c = m->_private;
    sp_log_ctx ctx = {.order_id = c->order.order_id[0] ? c->order.order_id : NULL,
                      .sku_id = c->ev.sku_id,
                      .has_kafka = 1,
                      .partition = m->partition,
                      .offset = m->offset};
    sp_metric_add(&m_inflight, -1);
    sp_metric_observe(&m_kafka_latency, sp_clock_mono_us() - c->published_us);
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        c->api->kafka_down = 0;
        switch (c->kind) {
        case CALL_ORDER:
            fault_after_ack();
            /* Confirm before answering: once the buyer holds a 202, a replay of its
             * Idempotency-Key on any producer must find "accepted", not "pending". A failed
             * confirm still answers 202 (Kafka has the order) and only leaves a reservation whose
             * order is in the log: the reaper's void for it changes nothing. */
            sp_stock_confirm_call(&c->script, &c->order, m->partition, m->offset);
            queue_push(&c->api->confirms, c);
            return; /* confirms_send() after the poll sends them in batches */
        case CALL_OPEN:
        case CALL_RESTOCK:
            if (c->kind == CALL_OPEN && c->ev.shards > 1) {
                c->rounds = c->ev.shards - 1; /* the shards opened in turn, shard 0 last */
                open_shard_next(c);
                return;
            }
            if (c->kind == CALL_OPEN)
                sp_stock_open_call(&c->script, c->ev.sku_id, c->ev.stock, c->ev.per_user_limit,
                                   c->ev.pay_timeout_s, c->order.order_id);
            else
                sp_stock_restock_call(&c->script, c->ev.sku_id, c->ev.stock, c->ev.request_id);
            if (redis_send(c, on_sale_written) != 0) call_free(c);
            return;
        case CALL_PAY:
            if (c->closed[0]) {
                /* Recorded (refund_due) and refused: the order was closed before it. */
                char body[256];
                snprintf(body, sizeof(body),
                         "{\"error\":\"order_closed\",\"order_id\":\"%s\",\"status\":\"%s\","
                         "\"refund_due\":true}",
                         c->ev.order_id, c->closed);
                answer(c, 409, body, &m_pay_closed);
            } else {
                answer_order(c, 202, c->ev.order_id, "payment_recorded", &m_paid);
            }
            call_free(c);
            return;
        case CALL_GET_ORDER:
        case CALL_GET_SKU:
            break; /* lookups publish nothing */
        }
    }
    sp_metric_inc(&m_kafka_errors);
    rd_kafka_msg_status_t status = rd_kafka_message_status(m);
    SP_LOG_CTX(SP_LOG_WARN, &ctx, "kafka did not take %s: %s (%s)", sp_event_type_name(c->ev.type),
               rd_kafka_err2str(m->err),
               status == RD_KAFKA_MSG_STATUS_NOT_PERSISTED ? "not persisted"
                                                           : "possibly persisted");
    answer_error(c, 503, "unavailable", "the event log did not acknowledge the request",
                 &m_unavailable);
    if (c->kind == CALL_ORDER && status == RD_KAFKA_MSG_STATUS_NOT_PERSISTED) {
        release_order(c);
        return;
    }
    /* An open whose stock.set is definitely not in the log gives its claim up, so a retry need
     * not wait for it to expire; one that may be in the log keeps it until it expires. */
    if (c->kind == CALL_OPEN && status == RD_KAFKA_MSG_STATUS_NOT_PERSISTED) {
        sp_stock_unclaim_call(&c->script, c->ev.sku_id, c->order.order_id);
        if (redis_send(c, on_unclaimed) == 0) return;
    }
    if (c->kind == CALL_ORDER) sp_metric_inc(&m_unknown);
    call_free(c);
}

static void on_kafka_error(rd_kafka_t *rk, int err, const char *reason, void *opaque) {
    (void)rk;
    sp_order_api *api = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        if (!api->kafka_down) sp_warn("kafka: all brokers down: %s", reason);
        api->kafka_down = 1;
    }
}

/* librdkafka wrote to the pipe: its queue has reports for us. */
static void on_kafka_wakeup(evutil_socket_t fd, short what, void *arg) {
    (void)what;
    sp_order_api *api = arg;
    char drain[64];
    while (read(fd, drain, sizeof(drain)) > 0) {}
    rd_kafka_poll(api->kafka, 0);
    confirms_send(api);
}

/* Confirms of one SKU sent together: Kafka acknowledges in bursts, so one script call per SKU
 * per burst instead of one per order. */
typedef struct confirm_batch {
    sp_order_api *api;
    sp_confirm_batch b;
    call *calls[SP_CONFIRM_BATCH_MAX];
} confirm_batch;

/* Every order of the batch gets its 202: Kafka has them. A failed confirm only leaves
 * reservations whose orders are in the log (the consumer removes them; the reaper's void for one
 * changes nothing). */
static void confirm_batch_done(confirm_batch *cb) {
    for (int i = 0; i < cb->b.n; i++) {
        answer_order(cb->calls[i], 202, cb->calls[i]->order.order_id, "accepted", &m_accepted);
        call_free(cb->calls[i]);
    }
    free(cb);
}

static void on_confirm_batch(redisReply *reply, void *data) {
    confirm_batch *cb = data;
    reply_arrived(reply);
    confirm_batch_done(cb);
}

/* One confirm.lua call for cb's orders; 0 when sent (on_confirm_batch follows). */
static int confirm_batch_send(sp_order_api *api, confirm_batch *cb) {
    const char *argv[1 + 4 * SP_CONFIRM_BATCH_MAX];
    size_t argvlen[1 + 4 * SP_CONFIRM_BATCH_MAX];
    sp_redis_script *script;
    int argc = sp_stock_confirm_batch_argv(&cb->b, &script, argv, argvlen);
    return sp_redis_async_eval(api->redis, script, cb->b.nkeys, argc, argv, argvlen,
                               on_confirm_batch, cb);
}

/* Sends the confirms queued by delivery reports, one script call per SKU (up to
 * SP_CONFIRM_BATCH_MAX orders each). Called after every rd_kafka_poll. */
static void confirms_send(sp_order_api *api) {
    call *taken[SP_CONFIRM_BATCH_MAX];
    int n;
    while ((n = queue_take_sku(&api->confirms, taken, SP_CONFIRM_BATCH_MAX)) > 0) {
        confirm_batch *cb = malloc(sizeof(*cb));
        if (cb != NULL) {
            cb->api = api;
            cb->b.n = 0;
        }
        for (int i = 0; i < n; i++) {
            if (cb && sp_stock_confirm_batch_add(&cb->b, taken[i]->order.sku_id,
                                                 &taken[i]->script) == 0) {
                cb->calls[cb->b.n - 1] = taken[i];
                continue;
            }
            /* answered without a confirm: it stays a reservation whose order is in the log */
            answer_order(taken[i], 202, taken[i]->order.order_id, "accepted", &m_accepted);
            call_free(taken[i]);
        }
        if (cb == NULL) continue;
        if (api->redis == NULL || confirm_batch_send(api, cb) != 0) confirm_batch_done(cb);
    }
}

static void on_release(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    long long qty = 0;
    char err[256];
    reply_arrived(r);
    if (sp_stock_integer_parse(r, "release", &qty, err, sizeof(err)) != 0) {
        sp_metric_inc(&m_unknown); /* the reservation stays; the reaper gives it back */
    } else if (qty > 0) {
        sp_metric_inc(&m_released);
        soldout_set(c->api, c->order.sku_id, 0);
    }
    call_free(c);
}

/* ---- POST /v1/orders ---- */

/* ---- sharded sales (docs/reservation.md, "Hot-SKU sharding") ----
 *
 * A buyer's orders go to their home shard (sp_stock_home_shard), once this worker knows the sale
 * is sharded: a shard's reply says so (reserve.lua's head), and an order sent to the wrong shard
 * (a sale not seen yet: shard 0) is answered "moved" there, changing nothing. A home shard that
 * is short does not make a sold_out: the order waits while a refill (shard_refill.c) moves units
 * to that shard, then is decided again; it is refused sold_out only when nothing could be moved
 * and two reads of every shard found fewer than its qty units, with no shard's stock risen
 * between them. After SHARD_ROUNDS decisions without an answer, 503 recovering. The sold-out flag
 * is set only when those reads found no unit at all. */

/* The sale's shards as this worker last heard them (1: unsharded, or not heard of). */
static int sharded_shards(sp_order_api *api, int64_t sku) {
    size_t i = (size_t)((uint64_t)sku % SHARDED_SLOTS);
    return api->sharded[i].sku_id == sku ? api->sharded[i].nshards : 1;
}

static void sharded_learn(sp_order_api *api, int64_t sku, const sp_reserve_result *res) {
    size_t i = (size_t)((uint64_t)sku % SHARDED_SLOTS);
    api->sharded[i].sku_id = sku;
    api->sharded[i].nshards = res->nshards;
    snprintf(api->sharded[i].gen, sizeof(api->sharded[i].gen), "%s", res->gen);
}

/* The orders of one (SKU, home shard) waiting for units: `serving` those the running refill is
 * for, `later` those that found the shard short while it ran (their refill comes next: reads
 * made before an order was refused say nothing about it). */
typedef struct shard_short {
    sp_order_api *api;
    struct shard_short *next;
    int64_t sku_id;
    int home, nshards;
    char gen[64];
    call_queue serving, later;
} shard_short;

static void reserves_send(sp_order_api *api);

/* Queues order c for this turn's reserve.lua calls (reserves_send); 503 when the primary of its
 * shard is down (argv[0] is the shard's sale key: in a cluster, only its SKUs fail). Takes c. */
static void reserve_enqueue(call *c) {
    sp_order_api *api = c->api;
    sp_stock_reserve_call(&c->script, &c->order);
    if (!sp_redis_async_usable_for(api->redis, c->script.argv[0])) {
        sp_metric_inc(&m_redis_errors);
        answer_error(c, 503, "unavailable", "stock store is unreachable", &m_unavailable);
        call_free(c);
        return;
    }
    if (queue_push(&api->reserves, c)) event_active(api->reserve_flush, EV_TIMEOUT, 0);
}

/* Sends order c to Redis again (its home shard, or the shard "moved" named); 503 recovering after
 * SHARD_ROUNDS decisions. Takes c. */
static void order_again(call *c, int new_round) {
    if (new_round && ++c->rounds > SHARD_ROUNDS) {
        answer_recovering(c); /* units kept moving under it: try again */
        call_free(c);
        return;
    }
    reserve_enqueue(c);
}

static int shard_refill_begin(shard_short *ss);

static void shard_short_free(shard_short *ss) {
    for (shard_short **p = &ss->api->shorts; *p; p = &(*p)->next)
        if (*p == ss) {
            *p = ss->next;
            break;
        }
    free(ss);
}

/* Answers (503) and frees every order of q. */
static void shard_queue_refused(call_queue *q) {
    for (call *c = q->head, *next; c != NULL; c = next) {
        next = c->next;
        answer_error(c, 503, "unavailable", "stock store is unreachable", &m_unavailable);
        call_free(c);
    }
    q->head = q->tail = NULL;
}

/* A refill ended: each order it served is decided from what it found. */
static void on_refill_done(const sp_refill_result *r, void *data) {
    shard_short *ss = data;
    sp_order_api *api = ss->api;
    call *c = ss->serving.head, *next;
    ss->serving.head = ss->serving.tail = NULL;
    for (; c != NULL; c = next) {
        next = c->next;
        if (r->failed) {
            answer_error(c, 503, "unavailable", "stock store is unreachable", &m_unavailable);
            call_free(c);
        } else if (r->collected && r->stable && r->units < c->order.qty) {
            if (r->units == 0) soldout_set(api, c->order.sku_id, 1); /* the whole sale is out */
            answer_error(c, 409, "sold_out", NULL, &m_sold_out);
            call_free(c);
        } else {
            order_again(c, 1); /* units came, or may remain: decide it again */
        }
    }
    if (ss->later.head == NULL) {
        shard_short_free(ss);
        return;
    }
    ss->serving = ss->later;
    ss->later.head = ss->later.tail = NULL;
    if (shard_refill_begin(ss) != 0) {
        shard_queue_refused(&ss->serving);
        shard_short_free(ss);
    }
}

/* Starts the refill of ss->serving: the units its orders ask for. */
static int shard_refill_begin(shard_short *ss) {
    int64_t want = 0;
    for (call *c = ss->serving.head; c != NULL; c = c->next) want += c->order.qty;
    return sp_refill_start(ss->api->redis, &ss->api->ids, ss->sku_id, ss->nshards, ss->gen,
                           ss->home, want, on_refill_done, ss);
}

/* Order c found its home shard short (res: the shard's sold_out): it waits for units. */
static void shard_short_wait(call *c, const sp_reserve_result *res) {
    sp_order_api *api = c->api;
    shard_short *ss;
    for (ss = api->shorts; ss; ss = ss->next)
        if (ss->sku_id == c->order.sku_id && ss->home == c->order.shard) break;
    if (ss != NULL) { /* a refill runs: the next one is this order's */
        snprintf(ss->gen, sizeof(ss->gen), "%s", res->gen);
        queue_push(&ss->later, c);
        return;
    }
    ss = calloc(1, sizeof(*ss));
    if (ss == NULL) {
        answer_error(c, 503, "unavailable", "out of memory", &m_unavailable);
        call_free(c);
        return;
    }
    *ss = (shard_short){.api = api,
                        .sku_id = c->order.sku_id,
                        .home = c->order.shard,
                        .nshards = res->nshards};
    snprintf(ss->gen, sizeof(ss->gen), "%s", res->gen);
    queue_push(&ss->serving, c);
    ss->next = api->shorts;
    api->shorts = ss;
    if (shard_refill_begin(ss) != 0) {
        sp_metric_inc(&m_redis_errors);
        shard_queue_refused(&ss->serving);
        shard_short_free(ss);
    }
}

/* The i-th answer of a reserve reply r, for the order of call c. An unknown_sku is not answered
 * here: c goes onto the list *unknown (linked by next) for the rebuilt check (rebuilt_ask). */
static void reserve_answered(call *c, const redisReply *r, size_t i, call **unknown) {
    sp_reserve_result res;
    char err[256];
    if (r == NULL) { /* the connection ended: the script may or may not have run */
        sp_metric_inc(&m_unknown);
        call_free(c);
        return;
    }
    if (sp_stock_reserve_parse(r, i, &res, err, sizeof(err)) != 0) {
        sp_warn("reserve: %s", err);
        call_free(c);
        return;
    }
    sp_metric_observe(&m_redis_latency, sp_clock_mono_us() - c->started_us);
    switch (res.outcome) {
    case SP_RESERVE_OK:
        /* a shard's last unit is not the sale's: other shards may hold units */
        if (res.stock_left == 0 && res.nshards == 0) soldout_set(c->api, c->order.sku_id, 1);
        c->ev = (sp_event){.type = SP_EV_ORDER_CREATED,
                           .ts_ms = c->order.ts_ms,
                           .sku_id = c->order.sku_id,
                           .user_id = c->order.user_id,
                           .qty = c->order.qty,
                           .expires_ms = c->order.ts_ms + (int64_t)res.pay_timeout_s * 1000};
        memcpy(c->ev.order_id, c->order.order_id, sizeof(c->ev.order_id));
        fault_after_reserve();
        if (publish(c) != 0) {
            answer_error(c, 503, "unavailable", "the event log is unreachable", &m_unavailable);
            release_order(c);
        }
        return; /* the delivery report goes on */
    case SP_RESERVE_DUP:
        if (strcmp(res.dup_state, "accepted") == 0)
            answer_order(c, 202, res.order_id, "accepted", &m_accepted);
        else if (strcmp(res.dup_state, "pending") == 0) {
            char body[160];
            snprintf(body, sizeof(body), "{\"error\":\"in_progress\",\"order_id\":\"%s\"}",
                     res.order_id);
            answer(c, 409, body, &m_in_progress);
        } else if (strcmp(res.dup_state, "limit_exceeded") == 0)
            answer_error(c, 409, "limit_exceeded", NULL, &m_limit);
        else
            answer_error(c, 409, "sold_out", NULL, &m_sold_out);
        break;
    case SP_RESERVE_UNKNOWN_SKU:
        c->next = *unknown;
        *unknown = c;
        return; /* rebuilt_ask answers it */
    case SP_RESERVE_SOLD_OUT:
        if (res.nshards > 1) { /* one shard short: units may move to it */
            sharded_learn(c->api, c->order.sku_id, &res);
            shard_short_wait(c, &res);
            return;
        }
        soldout_set(c->api, c->order.sku_id, 1);
        answer_error(c, 409, "sold_out", NULL, &m_sold_out);
        break;
    case SP_RESERVE_MOVED: /* a sharded sale this worker did not know (or forgot) */
        sharded_learn(c->api, c->order.sku_id, &res);
        c->order.shard = sp_stock_home_shard(c->order.user_id, res.nshards);
        if (++c->moves > SHARD_MOVES) {
            answer_recovering(c);
            break;
        }
        order_again(c, 0);
        return;
    case SP_RESERVE_LIMIT:
        answer_error(c, 409, "limit_exceeded", NULL, &m_limit);
        break;
    case SP_RESERVE_RECOVERING:
        answer_recovering(c); /* never the sold-out flag: PostgreSQL may hold unsold units */
        break;
    }
    call_free(c);
}

/* Answers the calls of the list unknown (linked by next; their SKU has no sale in Redis) from
 * the reply r to EXISTS SP_STOCK_REBUILT_KEY, and frees them: 404 unknown_sku when the key is
 * there (the reaper has reconciled every sale since Redis last lost its data, so the SKU is not
 * on sale), 503 recovering when it is missing (Redis lost its data and the reaper has not rebuilt
 * every sale yet: this one may be among them). 503 unavailable when Redis did not answer. */
static void rebuilt_answered(call *unknown, const redisReply *r) {
    while (unknown != NULL) {
        call *c = unknown;
        unknown = c->next;
        if (r && r->type == REDIS_REPLY_INTEGER && r->integer == 0)
            answer_recovering(c);
        else if (r && r->type == REDIS_REPLY_INTEGER)
            answer_error(c, 404, "unknown_sku", NULL, &m_unknown_sku);
        call_free(c); /* 503 unavailable if nothing was answered */
    }
}

static void on_rebuilt_read(redisReply *reply, void *data) {
    call *unknown = data;
    reply_arrived(reply);
    rebuilt_answered(unknown, reply);
}

/* A sale missing from Redis is either unknown or lost with Redis's data: one EXISTS of the
 * reaper's rebuilt key on the SKU's own primary (each primary keeps one and loses it with its
 * data) tells them apart for every unknown_sku of one reserve call (the list unknown, linked by
 * next, its first call the command's data; all of sku_id). Only this miss path asks: an order
 * that found its sale never waits for it. */
static void rebuilt_ask(call *unknown, int64_t sku_id) {
    char sale[SP_STOCK_KEY_MAX], key[SP_STOCK_KEY_MAX];
    /* the shard the batch asked (a sharded sale's shards sit on other primaries) */
    sp_stock_shard_key(sale, sku_id, unknown->order.shard, "sale");
    if (sp_redis_async_key_near(unknown->api->redis, sale, SP_STOCK_REBUILT_KEY, key,
                                sizeof(key)) != 0 ||
        redis_command(unknown, on_rebuilt_read, "EXISTS %s", key, NULL) != 0)
        rebuilt_answered(unknown, NULL);
}

/* The orders of one SKU sent in one reserve.lua call. */
typedef struct reserve_batch {
    sp_order_api *api;
    sp_reserve_batch b;
    call *calls[SP_RESERVE_BATCH_MAX];
} reserve_batch;

/* The batch could not be sent to Redis: nothing was
 * reserved for its orders; each is answered 503. */
static void reserve_batch_refused(reserve_batch *rb) {
    sp_metric_inc(&m_redis_errors);
    for (int i = 0; i < rb->b.n; i++) {
        answer_error(rb->calls[i], 503, "unavailable", "stock store is unreachable",
                     &m_unavailable);
        call_free(rb->calls[i]);
    }
    free(rb);
}

static void on_reserve_batch(redisReply *reply, void *data) {
    reserve_batch *rb = data;
    redisReply *r = reply;
    reply_arrived(r);
    call *unknown = NULL;
    for (int i = 0; i < rb->b.n; i++) reserve_answered(rb->calls[i], r, (size_t)i, &unknown);
    free(rb);
    if (unknown) rebuilt_ask(unknown, unknown->order.sku_id);
}

/* One reserve.lua call for rb's orders; 0 when sent (on_reserve_batch follows). */
static int reserve_batch_send(sp_order_api *api, reserve_batch *rb) {
    const char *argv[SP_REDIS_SCRIPT_ARGV_MAX];
    size_t argvlen[SP_REDIS_SCRIPT_ARGV_MAX];
    sp_redis_script *script;
    int argc = sp_stock_reserve_batch_argv(&rb->b, &script, argv, argvlen);
    return sp_redis_async_eval(api->redis, script, rb->b.nkeys, argc, argv, argvlen,
                               on_reserve_batch, rb);
}

/* Sends the orders queued in this loop turn: one reserve.lua call per SKU (up to
 * SP_RESERVE_BATCH_MAX orders each), in arrival order within a SKU. A flash sale sends most of
 * its orders to one SKU, so Redis runs a script per turn instead of one per order. */
static void reserves_send(sp_order_api *api) {
    call *taken[SP_RESERVE_BATCH_MAX];
    int n;
    while ((n = queue_take_sku(&api->reserves, taken, SP_RESERVE_BATCH_MAX)) > 0) {
        reserve_batch *rb = malloc(sizeof(*rb));
        if (rb != NULL) {
            rb->api = api;
            rb->b.n = 0;
        }
        for (int i = 0; i < n; i++) {
            if (rb &&
                sp_stock_reserve_batch_add(&rb->b, &taken[i]->order, &taken[i]->script) == 0) {
                rb->calls[rb->b.n - 1] = taken[i];
                continue;
            }
            /* out of memory, or a call over the script's bounds: nothing reserved for it */
            answer_error(taken[i], 503, "unavailable", rb ? "order not sendable" : "out of memory",
                         &m_unavailable);
            call_free(taken[i]);
        }
        if (rb == NULL) continue;
        if (reserve_batch_send(api, rb) != 0) reserve_batch_refused(rb);
    }
}

static void on_reserve_flush(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    reserves_send(arg);
}

static void post_order(sp_order_api *api, struct evhttp_request *req) {
    int64_t user, sku, qty;
    call *c = call_new(api, req, CALL_ORDER);
    if (c == NULL) return;
    const char *ctype;
    size_t len;
    const char *bytes = body_of(req, &ctype, &len);
    sp_order_body body;
    char detail[SP_API_DETAIL_MAX];
    if (sp_order_body_parse(ctype, bytes, len, &body, detail, sizeof(detail)) != 0) {
        answer_error(c, 400, "invalid_request", detail, &m_invalid);
        goto done;
    }
    user = body.user_id, sku = body.sku_id, qty = body.qty;
    const char *idem = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    if (idem != NULL && !sp_idem_key_valid(idem)) {
        answer_error(c, 400, "invalid_request",
                     "Idempotency-Key must be 1..64 printable ASCII characters without blanks",
                     &m_invalid);
        goto done;
    }
    if (!user_allowed(api, user, c->started_us)) {
        answer_error(c, 429, "rate_limited", "too many requests from this user", &m_rate_limited);
        goto done;
    }
    /* A retry must get its first answer, so only key-less requests take the local shortcut. */
    if (idem == NULL && soldout_flagged(api, sku)) {
        answer_error(c, 409, "sold_out", NULL, &m_sold_out);
        goto done;
    }
    if (!worker_allowed(api, c->started_us)) {
        answer_error(c, 429, "rate_limited", "this worker is at its order rate limit",
                     &m_rate_limited);
        goto done;
    }
    if (api->kafka_down) {
        answer_error(c, 503, "unavailable", "the event log is unreachable", &m_unavailable);
        goto done;
    }
    c->order = (sp_reserve_request){.sku_id = sku,
                                    .user_id = user,
                                    .qty = (int32_t)qty,
                                    .ts_ms = sp_clock_wall_ms()};
    if (idem) snprintf(c->order.idem_key, sizeof(c->order.idem_key), "%s", idem);
    c->order.shard = sp_stock_home_shard(user, sharded_shards(api, sku));
    sp_order_id_next(&api->ids, c->order.ts_ms, sku, c->order.order_id);
    reserve_enqueue(c);
    return; /* reserves_send, then on_reserve_batch go on */
done:
    call_free(c);
}

/* ---- admin: POST /v1/skus, POST /v1/skus/{id}/restock, GET /v1/skus/{id} ---- */

/* A restock's answer from restock.lua's reply: 200 with the stock once its units are in Redis
 * (added now, or before under the same request id); 503 otherwise (the stock.add is in the log,
 * so PostgreSQL gets it, and the reaper gives Redis what it missed; a retry with the same
 * Idempotency-Key adds nothing more). */
static void answer_restock(call *c, const redisReply *reply) {
    sp_restock_status st;
    int64_t stock;
    char err[256], body[200];
    if (sp_stock_restock_parse(reply, &st, &stock, err, sizeof(err)) != 0) {
        sp_warn("sku %" PRId64 ": redis not updated after the stock.add was logged: %s",
                c->ev.sku_id, err);
        return; /* 503 */
    }
    if (st == SP_RESTOCK_PAUSED || st == SP_RESTOCK_NO_SALE) {
        if (c->req != NULL)
            evhttp_add_header(evhttp_request_get_output_headers(c->req), "Retry-After", "2");
        answer_error(c, 503, "recovering",
                     c->keyed ? "the sale is being rebuilt in Redis; the restock is logged and "
                                "will be applied: a retry with the same Idempotency-Key adds "
                                "nothing more"
                              : "the sale is being rebuilt in Redis; the restock is logged and "
                                "will be applied: sent again (without an Idempotency-Key) it "
                                "would add its units again",
                     &m_recovering);
        return;
    }
    soldout_set(c->api, c->ev.sku_id, 0);
    snprintf(body, sizeof(body), "{\"sku_id\":%" PRId64 ",\"available\":%" PRId64 "}", c->ev.sku_id,
             stock);
    answer(c, 200, body, &m_admin_ok);
}

/* Kafka has the stock.set / stock.add; Redis now says what the sale holds. */
static void on_sale_written(redisReply *reply, void *data) {
    call *c = data;
    long long v;
    char err[256], body[200];
    reply_arrived(reply);
    if (c->kind == CALL_RESTOCK) {
        answer_restock(c, reply);
    } else if (sp_stock_integer_parse(reply, c->script.script->name, &v, err, sizeof(err)) != 0) {
        /* The event is in the log, so PostgreSQL gets it; Redis lags until reconcile. */
        sp_warn("sku %" PRId64 ": redis not updated after the event was logged: %s", c->ev.sku_id,
                err);
    } else if (v == 0) {
        answer_error(c, 409, "exists", NULL, &m_admin_ok);
    } else {
        snprintf(body, sizeof(body), "{\"sku_id\":%" PRId64 ",\"available\":%" PRId64 "}",
                 c->ev.sku_id, c->ev.stock);
        answer(c, 201, body, &m_admin_ok);
    }
    call_free(c);
}

/* The open's claim is given up (Kafka definitely did not take its stock.set; answered already). */
static void on_unclaimed(redisReply *reply, void *data) {
    call *c = data;
    reply_arrived(reply);
    call_free(c);
}

/* An open goes on to Kafka only with the claim (sale_claim.lua): of two opens racing, the one
 * without it is answered 409 and publishes nothing, so the log holds one stock.set. */
static void on_sale_claimed(redisReply *reply, void *data) {
    call *c = data;
    long long v;
    char err[256];
    reply_arrived(reply);
    if (sp_stock_integer_parse(reply, c->script.script->name, &v, err, sizeof(err)) != 0) {
        sp_metric_inc(&m_redis_errors);
        sp_warn("sku %" PRId64 ": open not claimed: %s", c->ev.sku_id, err);
    } else if (v == 0) {
        answer_error(c, 409, "exists", NULL, &m_admin_ok);
    } else if (v < 0) {
        answer_error(c, 409, "exists", "another open of this SKU is under way", &m_admin_ok);
    } else if (publish(c) == 0) {
        return; /* the delivery report goes on */
    } else {
        /* Not in the log: the claim is given up, so that a retry need not wait for it to expire. */
        answer_error(c, 503, "unavailable", "the event log is unreachable", &m_unavailable);
        sp_stock_unclaim_call(&c->script, c->ev.sku_id, c->order.order_id);
        if (redis_send(c, on_unclaimed) == 0) return;
    }
    call_free(c); /* 503 if nothing was answered */
}

/* An open goes on to its claim only for a SKU PostgreSQL has no sale of: a sale Redis lost (or
 * never got, its producer dying after Kafka's ack) is the reaper's to rebuild from PostgreSQL, and
 * a second stock.set for it would leave Redis on other stock than PostgreSQL, for good. The claim
 * lasts longer than the reaper waits before it rebuilds a missing sale (RESV_LOST_AFTER_MS, 40 s
 * by default), and at least twice Kafka's message timeout. */
static void on_open_inventory(const PGresult *res, const char *err, void *arg) {
    call *c = arg;
    sp_order_api *api = c->api;
    if (res == NULL) {
        sp_metric_inc(&m_pg_errors);
        sp_warn("sku %" PRId64 ": open: inventory lookup failed: %s", c->ev.sku_id, err);
        call_free(c); /* 503 */
        return;
    }
    if (PQntuples(res) > 0) {
        answer_error(c, 409, "exists", NULL, &m_admin_ok);
        call_free(c);
        return;
    }
    /* The claim's token: unique to this call (an order id of this worker). */
    sp_order_id_next(&api->ids, sp_clock_wall_ms(), c->ev.sku_id, c->order.order_id);
    int64_t claim_ms = 2 * (int64_t)api->cfg->kafka_message_timeout_ms + 5000;
    if (claim_ms < OPEN_CLAIM_MIN_MS) claim_ms = OPEN_CLAIM_MIN_MS;
    sp_stock_claim_call(&c->script, c->ev.sku_id, c->order.order_id, claim_ms);
    if (redis_send(c, on_sale_claimed) != 0) call_free(c);
}

/* Answers a restock PostgreSQL has applied already with the sale's stock now (HGET's reply). */
static void on_restock_stock(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    char body[200];
    reply_arrived(r);
    if (r != NULL && r->type == REDIS_REPLY_STRING) {
        snprintf(body, sizeof(body), "{\"sku_id\":%" PRId64 ",\"available\":%s}", c->ev.sku_id,
                 r->str);
        answer(c, 200, body, &m_admin_ok);
    }
    call_free(c); /* 503 if nothing was answered */
}

/* Redis does not know the request id: PostgreSQL may. Applied there and stamped given to Redis:
 * Redis forgot the id after IDEM_TTL_S, nothing is published or added again. Applied there and
 * not stamped: Redis never got the units (its write failed after the first attempt's publish):
 * restock.lua adds them now, once (the reaper's catch-up then finds the id). Not there: the
 * restock goes on to Kafka. */
static void on_restock_logged(const PGresult *res, const char *err, void *arg) {
    call *c = arg;
    char key[SP_STOCK_KEY_MAX];
    if (res == NULL) {
        sp_metric_inc(&m_pg_errors);
        sp_warn("sku %" PRId64 ": restock lookup failed: %s", c->ev.sku_id, err);
    } else if (PQntuples(res) > 0 && PQgetvalue(res, 0, 0)[0] == 't') {
        sp_stock_key(key, c->ev.sku_id, "sale");
        if (redis_command(c, on_restock_stock, "HGET %s stock", key, NULL) == 0) return;
    } else if (PQntuples(res) > 0) {
        sp_stock_restock_call(&c->script, c->ev.sku_id, c->ev.stock, c->ev.request_id);
        if (redis_send(c, on_sale_written) == 0) return;
    } else if (publish(c) == 0) {
        return; /* the delivery report goes on */
    }
    call_free(c); /* 503 */
}

/* A restock whose request id Redis has counted already (an admin's retry with the same
 * Idempotency-Key) publishes nothing more: restock.lua answers the first outcome. One it has not
 * is looked up in PostgreSQL (on_restock_logged), then goes on to Kafka (if the first attempt's
 * stock.add is in the log, the consumer applies the request id once; restock.lua adds it to
 * Redis once, whoever runs it first). */
static void on_restock_seen(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    reply_arrived(r);
    if (r == NULL || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_NIL)) {
        call_free(c);
        return;
    }
    if (r->type == REDIS_REPLY_STRING) {
        sp_stock_restock_call(&c->script, c->ev.sku_id, c->ev.stock, c->ev.request_id);
        if (redis_send(c, on_sale_written) == 0) return;
    } else {
        char sku[24];
        snprintf(sku, sizeof(sku), "%" PRId64, c->ev.sku_id);
        const char *params[] = {sku, c->ev.request_id};
        if (sp_pg_async_query(c->api->pg,
                              "SELECT applied_to_redis_at IS NOT NULL FROM restocks"
                              " WHERE sku_id = $1::bigint AND request_id = $2",
                              2, params, on_restock_logged, c) == 0)
            return; /* on_restock_logged goes on */
        sp_metric_inc(&m_pg_errors);
    }
    call_free(c);
}

/* The SKU's sale exists or not; decides whether a restock goes on (to its request id's check
 * when the call has an Idempotency-Key, else to Kafka). */
static void on_sale_exists(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    reply_arrived(r);
    if (r == NULL || r->type != REDIS_REPLY_INTEGER) {
        call_free(c);
        return;
    }
    if (r->integer == 0) {
        /* No sale in Redis: unknown, or lost with Redis's data (then 503 recovering). */
        c->next = NULL;
        rebuilt_ask(c, c->ev.sku_id);
        return;
    } else if (c->keyed) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_key(key, c->ev.sku_id, "restocks");
        if (redis_command(c, on_restock_seen, "HGET %s %s", key, c->ev.request_id) == 0) return;
    } else if (publish(c) == 0) {
        return; /* the delivery report goes on */
    }
    call_free(c);
}

/* Open and restock: admin only; the body fills c->ev; then an open claims the SKU
 * (on_sale_claimed goes on) and a restock asks Redis whether the sale exists (on_sale_exists). */
static void post_sale_change(sp_order_api *api, struct evhttp_request *req, call_kind kind,
                             int64_t sku) {
    int64_t stock, limit = 0, timeout = 0, shards = 1;
    char key[SP_STOCK_KEY_MAX], detail[SP_API_DETAIL_MAX];
    call *c = call_new(api, req, kind);
    if (c == NULL) return;
    if (!authorized(c, api->cfg->admin_token)) goto done;
    const char *ctype;
    size_t len;
    const char *bytes = body_of(req, &ctype, &len);
    int rc;
    if (kind == CALL_OPEN) {
        sp_sale_body b;
        rc = sp_sale_body_parse(ctype, bytes, len, &b, detail, sizeof(detail));
        if (rc == 0)
            sku = b.sku_id, stock = b.stock, limit = b.per_user_limit, timeout = b.pay_timeout_s,
            shards = b.shards;
        if (rc == 0 && shards > api->cfg->sale_shards_max) {
            snprintf(detail, sizeof(detail),
                     "field \"shards\" must be at most %d on this fleet (SALE_SHARDS_MAX)",
                     api->cfg->sale_shards_max);
            rc = -1;
        }
    } else {
        rc = sp_restock_body_parse(ctype, bytes, len, &stock, detail, sizeof(detail));
    }
    if (rc != 0) {
        answer_error(c, 400, "invalid_request", detail, &m_invalid);
        goto done;
    }
    c->ev = (sp_event){.type = kind == CALL_OPEN ? SP_EV_STOCK_SET : SP_EV_STOCK_ADD,
                       .sku_id = sku,
                       .stock = stock,
                       .per_user_limit = (int32_t)limit,
                       .pay_timeout_s = (int32_t)timeout,
                       .shards = (int32_t)shards};
    if (kind == CALL_RESTOCK) {
        /* The request id: the Idempotency-Key, or a fresh id (a call without a key is a new
         * restock each time; its id still lets the reaper give Redis a restock it missed). */
        const char *idem = evhttp_find_header(evhttp_request_get_input_headers(req),
                                              "Idempotency-Key");
        if (idem != NULL && !sp_request_id_valid(idem)) {
            answer_error(c, 400, "invalid_request",
                         "Idempotency-Key must be 1..64 printable ASCII characters without blanks",
                         &m_invalid);
            goto done;
        }
        c->keyed = idem != NULL;
        if (idem)
            snprintf(c->ev.request_id, sizeof(c->ev.request_id), "%s", idem);
        else
            sp_order_id_next(&api->ids, sp_clock_wall_ms(), sku, c->ev.request_id);
    }
    if (kind == CALL_OPEN) {
        char sku_text[24];
        snprintf(sku_text, sizeof(sku_text), "%" PRId64, sku);
        const char *params[] = {sku_text};
        if (sp_pg_async_query(api->pg, "SELECT 1 FROM inventory WHERE sku_id = $1::bigint", 1,
                              params, on_open_inventory, c) == 0)
            return; /* on_open_inventory goes on */
        sp_metric_inc(&m_pg_errors);
        goto done;
    }
    sp_stock_key(key, sku, "sale");
    if (redis_command(c, on_sale_exists, "EXISTS %s", key, NULL) == 0) return;
done:
    call_free(c);
}

/* Answers a GET whose PostgreSQL step is done: json (owned, may be NULL) or the failure. */
static void answer_lookup(call *c, json_t *json) {
    char *text = json ? json_dumps(json, JSON_COMPACT) : NULL;
    if (text) answer(c, 200, text, &m_lookup);
    free(text);
    json_decref(json);
    call_free(c); /* 503 if nothing was answered */
}

/* PostgreSQL's inventory row (or none), joined with what Redis said. "recovering" is true while
 * Redis's sale is paused by a reconcile, or missing while PostgreSQL has the SKU (Redis lost it,
 * the reaper rebuilds it): `available` is null then, as Redis's stock says nothing yet. */
static void on_inventory_row(const PGresult *res, const char *err, void *arg) {
    call *c = arg;
    int in_redis = c->sale[0][0] != '\0', in_pg = res && PQntuples(res) == 1;
    int recovering = !c->redis_failed && (in_redis ? c->paused : in_pg);
    if (res == NULL) {
        sp_metric_inc(&m_pg_errors);
        sp_warn("sku %" PRId64 ": inventory lookup failed: %s", c->ev.sku_id, err);
    }
    if (!in_redis && !in_pg) {
        if (res && !c->redis_failed) answer_error(c, 404, "unknown_sku", NULL, &m_unknown_sku);
        call_free(c);
        return;
    }
    /* Either side may be missing (PostgreSQL down or behind, Redis down or reset): null then. */
    json_t *j = json_pack("{sI}", "sku_id", (json_int_t)c->ev.sku_id);
    const char *names[] = {"available", "per_user_limit", "pay_timeout_s"};
    for (int i = 0; j && i < 3; i++)
        json_object_set_new(j, names[i],
                            in_redis && !(i == 0 && recovering)
                                ? json_integer(strtoll(c->sale[i], NULL, 10))
                                : json_null());
    if (j) {
        json_object_set_new(j, "recovering", json_boolean(recovering));
        json_object_set_new(j, "stock",
                            in_pg ? json_integer(strtoll(PQgetvalue(res, 0, 0), NULL, 10))
                                  : json_null());
        json_object_set_new(j, "supplied",
                            in_pg ? json_integer(strtoll(PQgetvalue(res, 0, 1), NULL, 10))
                                  : json_null());
    }
    answer_lookup(c, j);
}

static void lookup_inventory(call *c) {
    char sku[24];
    snprintf(sku, sizeof(sku), "%" PRId64, c->ev.sku_id);
    const char *params[] = {sku};
    if (sp_pg_async_query(c->api->pg, "SELECT stock, supplied FROM inventory WHERE sku_id = $1", 1,
                          params, on_inventory_row, c) != 0)
        on_inventory_row(NULL, "not connected", c);
}

/* Shard k > 0 of a sharded sale: its stock (and units moving out of it) add to what the sale
 * holds; a shard paused or missing makes the sale's figure unknown. */
static void on_sku_shard_read(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    reply_arrived(r);
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
        r->element[0]->type == REDIS_REPLY_STRING) {
        int64_t units = strtoll(r->element[0]->str, NULL, 10);
        if (r->element[1]->type == REDIS_REPLY_STRING)
            units += strtoll(r->element[1]->str, NULL, 10);
        snprintf(c->sale[0], sizeof(c->sale[0]), "%" PRId64,
                 (int64_t)strtoll(c->sale[0], NULL, 10) + units);
        if (r->element[2]->type == REDIS_REPLY_STRING) c->paused = 1;
    } else if (r && r->type == REDIS_REPLY_ARRAY) {
        c->paused = 1; /* a shard missing: Redis lost it, the reaper rebuilds the sale */
    } else {
        c->redis_failed = 1;
    }
    if (--c->reads_owed == 0) lookup_inventory(c);
}

static void on_sku_read(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    reply_arrived(r);
    c->reads_owed = 1; /* held until the shards' reads are sent */
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 6) {
        for (size_t i = 0; i < 3; i++)
            if (r->element[i]->type == REDIS_REPLY_STRING)
                snprintf(c->sale[i], sizeof(c->sale[i]), "%s", r->element[i]->str);
        c->paused = r->element[3]->type == REDIS_REPLY_STRING;
        if (c->sale[0][0] && r->element[4]->type == REDIS_REPLY_STRING) /* moving */
            snprintf(
                c->sale[0], sizeof(c->sale[0]), "%" PRId64,
                (int64_t)(strtoll(c->sale[0], NULL, 10) + strtoll(r->element[4]->str, NULL, 10)));
        /* a sharded sale: what it holds is the sum over its shards */
        int n = r->element[5]->type == REDIS_REPLY_STRING
                    ? (int)strtol(r->element[5]->str, NULL, 10)
                    : 1;
        for (int k = 1; c->sale[0][0] && k < n && k < SP_SHARDS_MAX; k++) {
            char key[SP_STOCK_KEY_MAX];
            sp_stock_shard_key(key, c->ev.sku_id, k, "sale");
            if (redis_command(c, on_sku_shard_read, "HMGET %s stock moving paused", key, NULL) == 0)
                c->reads_owed++;
            else
                c->redis_failed = 1;
        }
    } else {
        c->redis_failed = 1;
    }
    if (--c->reads_owed == 0) lookup_inventory(c);
}

static void get_sku(sp_order_api *api, struct evhttp_request *req, int64_t sku) {
    char key[SP_STOCK_KEY_MAX];
    call *c = call_new(api, req, CALL_GET_SKU);
    if (c == NULL) return;
    c->ev.sku_id = sku;
    sp_stock_key(key, sku, "sale");
    if (redis_command(c, on_sku_read, "HMGET %s stock limit pay_timeout_s paused moving shards",
                      key, NULL) != 0) {
        c->redis_failed = 1;
        lookup_inventory(c);
    }
}

/* ---- GET /v1/orders/{order_id} ---- */

/* Times are ms since the epoch, as in the events. */
#define ORDER_SQL                                                                                  \
    "SELECT status, user_id, sku_id, qty, reject_reason, refund_due,"                              \
    " (extract(epoch FROM created_at) * 1000)::bigint,"                                            \
    " (extract(epoch FROM expires_at) * 1000)::bigint,"                                            \
    " (extract(epoch FROM paid_at) * 1000)::bigint,"                                               \
    " (extract(epoch FROM closed_at) * 1000)::bigint"                                              \
    " FROM orders WHERE order_id = $1"

static json_t *int_or_null(const PGresult *res, int col) {
    return PQgetisnull(res, 0, col) ? json_null()
                                    : json_integer(strtoll(PQgetvalue(res, 0, col), NULL, 10));
}

static void decide_pay(call *c, const PGresult *res);

/* The order as PostgreSQL has it, or (not there yet) as the producer's accepted entry says. */
static void on_order_row(const PGresult *res, const char *err, void *arg) {
    call *c = arg;
    json_t *j = NULL;
    if (res == NULL) {
        sp_metric_inc(&m_pg_errors);
        sp_warn("order %s: lookup failed: %s", c->order.order_id, err);
    }
    if (c->kind == CALL_PAY) {
        decide_pay(c, res);
        return;
    }
    if (res && PQntuples(res) == 1) {
        j = json_pack("{ss ss so so so so so so so so so}", "order_id", c->order.order_id, "status",
                      PQgetvalue(res, 0, 0), "sku_id", int_or_null(res, 2), "user_id",
                      int_or_null(res, 1), "qty", int_or_null(res, 3), "created_ms",
                      int_or_null(res, 6), "expires_ms", int_or_null(res, 7), "paid_ms",
                      int_or_null(res, 8), "closed_ms", int_or_null(res, 9), "refund_due",
                      json_boolean(PQgetvalue(res, 0, 5)[0] == 't'), "reject_reason",
                      PQgetisnull(res, 0, 4) ? json_null() : json_string(PQgetvalue(res, 0, 4)));
    } else if (c->accepted[0]) {
        long long user = 0, qty = 0, ts = 0;
        if (sscanf(c->accepted, "%lld:%lld:%lld", &user, &qty, &ts) == 3)
            j = json_pack("{ss ss sI sI sI sI}", "order_id", c->order.order_id, "status",
                          "accepted", "sku_id", (json_int_t)c->order.sku_id, "user_id",
                          (json_int_t)user, "qty", (json_int_t)qty, "created_ms", (json_int_t)ts);
    } else if (res && !c->redis_failed) {
        answer_error(c, 404, "unknown_order", NULL, &m_not_found);
    }
    answer_lookup(c, j);
}

static void lookup_order(call *c) {
    const char *params[] = {c->order.order_id};
    if (sp_pg_async_query(c->api->pg, ORDER_SQL, 1, params, on_order_row, c) != 0)
        on_order_row(NULL, "not connected", c);
}

/* Redis first, PostgreSQL second: the consumer removes an accepted entry only after its commit,
 * so an order missing from the first look is found by the second. The entry is on the buyer's
 * home shard, which the order id does not say: shard 0's entry and the sale's `shards` are read
 * together, and on a sharded sale whose shard 0 has no entry every other shard is asked (each
 * reply one read of c->reads_owed). */
static void resv_entry_seen(call *c, const redisReply *r) {
    if (r && r->type == REDIS_REPLY_STRING) {
        /* "a:user:qty:ts" is an accepted order; "r:…" is still waiting for Kafka: the buyer has
         * no answer yet, so for GET it does not exist yet. */
        if (strncmp(r->str, "a:", 2) == 0)
            snprintf(c->accepted, sizeof(c->accepted), "%s", r->str + 2);
        if (strncmp(r->str, "r:", 2) == 0) c->reserved = 1;
    } else if (r == NULL || r->type != REDIS_REPLY_NIL) {
        c->redis_failed = 1;
    }
}

static void on_accepted_read(redisReply *reply, void *data) {
    call *c = data;
    reply_arrived(reply);
    resv_entry_seen(c, reply);
    if (--c->reads_owed == 0) lookup_order(c);
}

/* The sale's `shards` (shard 0's sale hash): a sharded sale's other shards are asked too. */
static void on_lookup_shards(redisReply *reply, void *data) {
    call *c = data;
    redisReply *r = reply;
    reply_arrived(r);
    int n = r && r->type == REDIS_REPLY_STRING ? (int)strtol(r->str, NULL, 10) : 1;
    if (r == NULL || r->type == REDIS_REPLY_ERROR) c->redis_failed = 1;
    for (int k = 1; k < n && k < SP_SHARDS_MAX; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, c->order.sku_id, k, "resv");
        if (redis_command(c, on_accepted_read, "HGET %s %s", key, c->order.order_id) == 0)
            c->reads_owed++;
        else
            c->redis_failed = 1;
    }
    if (--c->reads_owed == 0) lookup_order(c);
}

/* Looks c->order up: Redis's accepted entry (on_accepted_read), then PostgreSQL (on_order_row,
 * which answers a GET or hands a payment to decide_pay). */
static void look_up_order(call *c) {
    char key[SP_STOCK_KEY_MAX], sale[SP_STOCK_KEY_MAX];
    sp_stock_key(key, c->order.sku_id, "resv");
    sp_stock_key(sale, c->order.sku_id, "sale");
    c->reads_owed = 1; /* held until both are sent */
    if (redis_command(c, on_accepted_read, "HGET %s %s", key, c->order.order_id) == 0)
        c->reads_owed++;
    else
        c->redis_failed = 1;
    if (redis_command(c, on_lookup_shards, "HGET %s shards", sale, NULL) == 0)
        c->reads_owed++;
    else
        c->redis_failed = 1;
    if (--c->reads_owed == 0) lookup_order(c);
}

static void get_order(sp_order_api *api, struct evhttp_request *req, const char *order_id,
                      size_t len) {
    call *c = call_new(api, req, CALL_GET_ORDER);
    if (c == NULL) return;
    memcpy(c->order.order_id, order_id, len);
    c->order.order_id[len] = '\0';
    if (!sp_order_id_valid(c->order.order_id) ||
        sp_order_id_sku(c->order.order_id, &c->order.sku_id) != 0) {
        answer_error(c, 404, "unknown_order", NULL, &m_not_found);
        call_free(c);
        return;
    }
    look_up_order(c);
}

/* ---- POST /v1/orders/{order_id}/pay ---- */

/* A payment names its order and its units; it is looked up as GET does (Redis's accepted entry,
 * then PostgreSQL). Unknown: 404, nothing published. Other units than the order's: 409
 * qty_mismatch, nothing published. Open (accepted, pending, paid): order.paid is published and
 * the answer is 202 once Kafka has it (whether it beat an expiry racing it is decided in log order
 * downstream: then it is recorded refund_due). Closed before it (expired, cancelled, rejected):
 * order.paid is published all the same, so PostgreSQL records the payment as refund_due, and the
 * answer is 409 order_closed. */
static void decide_pay(call *c, const PGresult *res) {
    char status[16] = "";
    long long qty = -1;
    if (res && PQntuples(res) == 1) {
        snprintf(status, sizeof(status), "%s", PQgetvalue(res, 0, 0));
        qty = PQgetisnull(res, 0, 3) ? -1 : strtoll(PQgetvalue(res, 0, 3), NULL, 10);
    } else if (c->accepted[0]) {
        long long user;
        if (sscanf(c->accepted, "%lld:%lld", &user, &qty) == 2)
            snprintf(status, sizeof(status), "accepted");
    } else if (c->reserved) {
        /* Reserved, and its 202 may be out: Kafka's answer is not recorded yet (a confirm still
         * under way or failed) and the consumer has not stored it. Never "unknown". */
        answer_error(c, 409, "in_progress", "the order is still being recorded; pay again shortly",
                     &m_in_progress);
    } else if (res && !c->redis_failed) {
        answer_error(c, 404, "unknown_order", NULL, &m_not_found);
    }
    if (status[0] == '\0') {
        call_free(c); /* 503 if nothing was answered: neither store could say */
        return;
    }
    if (qty != c->order.qty) {
        char detail[96];
        snprintf(detail, sizeof(detail), "the order is for %lld units", qty);
        answer_error(c, 409, "qty_mismatch", detail, &m_pay_mismatch);
        call_free(c);
        return;
    }
    if (strcmp(status, "expired") == 0 || strcmp(status, "cancelled") == 0 ||
        strcmp(status, "rejected") == 0)
        snprintf(c->closed, sizeof(c->closed), "%s", status);
    if (publish(c) == 0) return; /* the delivery report answers */
    call_free(c);
}

static void post_pay(sp_order_api *api, struct evhttp_request *req, const char *order_id) {
    char detail[SP_API_DETAIL_MAX];
    int64_t qty;
    const char *ctype;
    size_t len;
    call *c = call_new(api, req, CALL_PAY);
    if (c == NULL) return;
    if (!authorized(c, api->cfg->payment_token)) goto done;
    const char *bytes = body_of(req, &ctype, &len);
    if (sp_pay_body_parse(ctype, bytes, len, &qty, detail, sizeof(detail)) != 0) {
        answer_error(c, 400, "invalid_request", detail, &m_invalid);
        goto done;
    }
    snprintf(c->order.order_id, sizeof(c->order.order_id), "%s", order_id);
    if (!sp_order_id_valid(order_id) || sp_order_id_sku(order_id, &c->order.sku_id) != 0) {
        answer_error(c, 404, "unknown_order", NULL, &m_not_found);
        goto done;
    }
    c->order.qty = (int32_t)qty;
    c->ev = (sp_event){.type = SP_EV_ORDER_PAID, .sku_id = c->order.sku_id};
    snprintf(c->ev.order_id, sizeof(c->ev.order_id), "%s", order_id);
    look_up_order(c);
    return; /* on_accepted_read, lookup_order, decide_pay go on */
done:
    call_free(c);
}

/* ---- routing ---- */

static int is_post(struct evhttp_request *req) {
    if (evhttp_request_get_command(req) == EVHTTP_REQ_POST) return 1;
    sp_http_reply_error(req, 405, "method_not_allowed", NULL);
    return 0;
}

static void route_orders(struct evhttp_request *req, void *arg) {
    if (is_post(req)) post_order(arg, req);
}

static void route_skus(struct evhttp_request *req, void *arg) {
    if (is_post(req)) post_sale_change(arg, req, CALL_OPEN, 0);
}

/* Parses a positive decimal id of n bytes; 0 when it is not one. */
static int64_t parse_id(const char *s, size_t n) {
    int64_t v = 0;
    if (n == 0 || n > 16 || s[0] == '0') return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    return v <= SP_ID_MAX ? v : 0;
}

/* /v1/skus/{id}, /v1/skus/{id}/restock, /v1/orders/{id}/pay */
static void route_other(struct evhttp_request *req, void *arg) {
    sp_order_api *api = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    if (path && strncmp(path, "/v1/skus/", 9) == 0) {
        const char *id = path + 9, *slash = strchr(id, '/');
        int64_t sku = parse_id(id, slash ? (size_t)(slash - id) : strlen(id));
        if (sku && slash == NULL && evhttp_request_get_command(req) == EVHTTP_REQ_GET) {
            get_sku(api, req, sku);
            return;
        }
        if (sku && slash && strcmp(slash, "/restock") == 0) {
            if (is_post(req)) post_sale_change(api, req, CALL_RESTOCK, sku);
            return;
        }
    } else if (path && strncmp(path, "/v1/orders/", 11) == 0) {
        const char *id = path + 11, *slash = strchr(id, '/');
        if (slash == NULL && strlen(id) <= SP_ORDER_ID_MAX &&
            evhttp_request_get_command(req) == EVHTTP_REQ_GET) {
            get_order(api, req, id, strlen(id));
            return;
        }
        if (slash && strcmp(slash, "/pay") == 0 && (size_t)(slash - id) <= SP_ORDER_ID_MAX) {
            char order_id[SP_ORDER_ID_MAX + 1];
            memcpy(order_id, id, (size_t)(slash - id));
            order_id[slash - id] = '\0';
            if (is_post(req)) post_pay(api, req, order_id);
            return;
        }
    }
    sp_metric_inc(&m_not_found);
    sp_http_reply_error(req, 404, "not_found", NULL);
}

/* ---- life cycle ---- */

/* Redis's TIME, asked once a second: this host's offset from Redis's clock (clock_skew.h). */
static void on_redis_time(redisReply *reply, void *data) {
    sp_order_api *api = data;
    int64_t redis_ms;
    reply_arrived(reply);
    if (reply && api->time_sent_ms > 0 && sp_clock_redis_time_ms(reply, &redis_ms) == 0)
        sp_clock_skew_record(api->time_sent_ms, sp_clock_wall_ms(), redis_ms);
    api->time_sent_ms = 0;
}

static void clock_skew_tick(sp_order_api *api, int64_t now) {
    if (!sp_redis_async_usable(api->redis) || now < api->time_next_ms) return;
    if (api->time_sent_ms > 0 && now - api->time_sent_ms < REDIS_STALL_MS) return;
    api->time_next_ms = now + 1000;
    if (sp_redis_async_send(api->redis, on_redis_time, api, NULL, "TIME") != 0) return;
    api->time_sent_ms = now;
}

void sp_order_api_tick(sp_order_api *api) {
    int64_t now = sp_clock_wall_ms();
    char why[300], err[256];
    int n;
    /* Reconnects what is down; a server that stopped answering without closing has what it owes
     * failed (each caller answers 503, the reaper resolves any reservation left). */
    sp_redis_async_tick(api->redis);
    clock_skew_tick(api, now);
    sp_pg_async_tick(api->pg);
    rd_kafka_poll(api->kafka, 0);
    confirms_send(api);
    if (api->kafka_down && now >= api->kafka_probe_ms) {
        api->kafka_probe_ms = now + 1000;
        if (sp_kafka_topic_partitions(api->kafka, api->cfg->kafka_topic, 200, &n, err,
                                      sizeof(err)) == 0) {
            api->kafka_down = 0;
            sp_info("kafka reachable again");
        }
    }
    if (!sp_redis_async_usable(api->redis))
        snprintf(why, sizeof(why), "redis unreachable");
    else if (api->kafka_down)
        snprintf(why, sizeof(why), "kafka unreachable");
    else if (!sp_clock_skew_exceeded(api->cfg->clock_skew_max_ms, why, sizeof(why)))
        why[0] = '\0';
    sp_health_set_ready(why[0] == '\0', why);
}

int sp_order_api_inflight(const sp_order_api *api) { return api->inflight; }

int sp_order_api_flush(sp_order_api *api, int timeout_ms) {
    rd_kafka_flush(api->kafka, timeout_ms);
    return rd_kafka_outq_len(api->kafka);
}

sp_order_api *sp_order_api_new(struct event_base *base, sp_http *http, const sp_config *cfg,
                               char *errbuf, size_t errlen) {
    char timeout[16], linger[16];
    sp_redis_target target;
    rd_kafka_conf_t *conf = NULL;
    rd_kafka_queue_t *mainq = NULL;
    sp_order_api *api = calloc(1, sizeof(*api));
    if (api == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    api->base = base;
    api->cfg = cfg;
    api->kafka_pipe[0] = api->kafka_pipe[1] = -1;
    api->kafka_down = 1; /* until the tick's probe has seen the topic (else ready before Kafka) */
    for (size_t i = 0; i < sizeof(all_metrics) / sizeof(all_metrics[0]); i++)
        sp_metrics_register(all_metrics[i]);
    sp_clock_skew_register_metrics();
    sp_stock_idem_ttls(cfg->idem_ttl_s, cfg->idem_refusal_ttl_s);
    sp_order_ids_init(&api->ids, cfg->worker_id);
    if (sp_redis_parse_url(cfg->redis_url, &target, errbuf, errlen) != 0) goto fail;
    api->redis = sp_redis_async_open(&target, base, REDIS_CONNECT_TIMEOUT_MS, REDIS_STALL_MS,
                                     errbuf, errlen);
    if (api->redis == NULL) goto fail;
    api->pg = sp_pg_async_new(base, cfg->pg_dsn, cfg->worker_id);
    if (api->pg == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto fail;
    }

    conf = sp_kafka_conf_new(cfg->kafka_brokers, cfg->worker_id, cfg, errbuf, errlen);
    snprintf(timeout, sizeof(timeout), "%d", cfg->kafka_message_timeout_ms);
    snprintf(linger, sizeof(linger), "%d", cfg->kafka_linger_ms);
    if (conf == NULL ||
        sp_kafka_conf_set(conf, "message.timeout.ms", timeout, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "linger.ms", linger, errbuf, errlen) != 0)
        goto fail;
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_error_cb(conf, on_kafka_error);
    rd_kafka_conf_set_opaque(conf, api);
    api->kafka = sp_kafka_producer_new(&conf, errbuf, errlen);
    if (api->kafka == NULL) goto fail;

    if (pipe2(api->kafka_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(errbuf, errlen, "pipe: %s", strerror(errno));
        goto fail;
    }
    mainq = rd_kafka_queue_get_main(api->kafka);
    rd_kafka_queue_io_event_enable(mainq, api->kafka_pipe[1], "1", 1);
    rd_kafka_queue_destroy(mainq);
    api->kafka_wakeup = event_new(base, api->kafka_pipe[0], EV_READ | EV_PERSIST, on_kafka_wakeup,
                                  api);
    if (api->kafka_wakeup == NULL || event_add(api->kafka_wakeup, NULL) != 0) {
        snprintf(errbuf, errlen, "cannot watch the kafka pipe");
        goto fail;
    }
    api->reserve_flush = event_new(base, -1, 0, on_reserve_flush, api);
    if (api->reserve_flush == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto fail;
    }
    if (sp_http_route(http, "/v1/orders", route_orders, api) != 0 ||
        sp_http_route(http, "/v1/skus", route_skus, api) != 0) {
        snprintf(errbuf, errlen, "cannot route the API");
        goto fail;
    }
    sp_http_route_default(http, route_other, api);
    return api;
fail:
    if (conf) rd_kafka_conf_destroy(conf);
    sp_order_api_free(api);
    return NULL;
}

void sp_order_api_free(sp_order_api *api) {
    if (api == NULL) return;
    if (api->kafka) {
        /* Whatever Kafka still holds gets its delivery report now (purged: not persisted, or
         * possibly persisted if it was on the wire), so every call is answered and freed. */
        rd_kafka_purge(api->kafka, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(api->kafka, 0);
        confirms_send(api);
    }
    while (api->reserves.head) { /* orders not sent to Redis yet: nothing reserved for them */
        call *c = api->reserves.head;
        api->reserves.head = c->next;
        call_free(c);
    }
    sp_redis_async_close(api->redis); /* pending callbacks run with NULL and free their calls */
    api->redis = NULL;
    sp_pg_async_free(api->pg); /* after Redis: a GET's Redis callback may still query */
    if (api->kafka_wakeup) event_free(api->kafka_wakeup);
    if (api->reserve_flush) event_free(api->reserve_flush);
    if (api->kafka) rd_kafka_destroy(api->kafka);
    if (api->kafka_pipe[0] >= 0) close(api->kafka_pipe[0]);
    if (api->kafka_pipe[1] >= 0) close(api->kafka_pipe[1]);
    while (api->spare) {
        call *c = api->spare;
        api->spare = c->next;
        free(c);
    }
    free(api);
}
