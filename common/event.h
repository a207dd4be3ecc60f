/* event.h - the one codec for stockpipe's versioned JSON events (see docs/events.md).
 *
 * Every message on the events topic is one JSON object, keyed by the decimal sku_id so that all
 * events of one SKU share a partition and keep their order. The consumer takes every decision from
 * these events in partition order, which is what makes a replay of the log deterministic.
 *
 * Decoding never trusts its input: bad JSON, a missing field, a wrong type, an out-of-range number,
 * an unknown type or version all give -1 and a readable reason, never a crash or a partly filled
 * event. Both functions are pure and thread-safe; neither keeps a pointer to its arguments.
 */
#ifndef SP_EVENT_H
#define SP_EVENT_H

#include <stddef.h>
#include <stdint.h>

#define SP_EVENT_VERSION 1

/* Bounds that encode and decode both enforce. Ids stay within JavaScript's exact integer range so
 * every JSON client reads them back unchanged. */
#define SP_ID_MAX          INT64_C(9007199254740991) /* 2^53 - 1; sku_id, user_id are 1..this */
#define SP_QTY_MAX         1000                      /* units in one order */
#define SP_STOCK_MAX       INT64_C(1000000000000)    /* stock.set stock, stock.add add */
#define SP_PER_USER_MAX    1000000                   /* per_user_limit; 0 means no limit */
#define SP_PAY_TIMEOUT_MAX 604800                    /* pay_timeout_s, seconds (one week) */
#define SP_TS_MAX          INT64_C(253402300799999)  /* ms since the epoch, up to year 9999 */
#define SP_ORDER_ID_MAX    64                        /* bytes; [A-Za-z0-9._-] only */
#define SP_REASON_MAX      128                       /* bytes of a free-text reason */
#define SP_REQUEST_ID_MAX  64   /* bytes of a request id: printable ASCII without blanks */
#define SP_SHARDS_MAX      16   /* stock.set shards: the Redis shards of a hot SKU's sale */
#define SP_EVENT_MAX       1024 /* an encoded event never exceeds this */

typedef enum sp_event_type {
    SP_EV_NONE = 0,
    SP_EV_STOCK_SET,     /* "stock.set":     open a sale: stock, per_user_limit, pay_timeout_s */
    SP_EV_STOCK_ADD,     /* "stock.add":     restock: add, request_id (optional) */
    SP_EV_ORDER_CREATED, /* "order.created": order_id, user_id, qty, expires_ms */
    SP_EV_ORDER_PAID,    /* "order.paid":    order_id */
    SP_EV_ORDER_EXPIRED, /* "order.expired": order_id */
    SP_EV_ORDER_VOIDED,  /* "order.voided":  order_id, user_id, qty, reason: a reservation whose
                          * order.created may never have reached the log */
} sp_event_type;

/* One decoded event. Fields a type does not carry are zero / empty. */
typedef struct sp_event {
    sp_event_type type;
    int64_t ts_ms;  /* when the event was made (producer's clock), ms since the epoch */
    int64_t sku_id; /* every event */
    char order_id[SP_ORDER_ID_MAX + 1]; /* order.* */
    int64_t user_id;                    /* order.created, order.voided */
    int32_t qty;                        /* order.created, order.voided */
    int64_t expires_ms;     /* order.created: pay-by deadline, ms since the epoch, >= ts_ms */
    int64_t stock;          /* stock.set: units put on sale; stock.add: units added (>= 1) */
    int32_t per_user_limit; /* stock.set */
    int32_t pay_timeout_s;  /* stock.set, >= 1 */
    int32_t shards; /* stock.set: 1..SP_SHARDS_MAX shards of the sale in Redis (docs/reservation.md,
                     * "Hot-SKU sharding"); optional on the wire, 1 when absent; 0 encodes as 1 */
    char reason[SP_REASON_MAX + 1]; /* order.voided: why (optional on decode, may be empty) */
    /* stock.add: the admin call's Idempotency-Key, or an id the producer made for it; the
     * consumer applies one request id once per SKU. Optional: empty in events from before it. */
    char request_id[SP_REQUEST_ID_MAX + 1];
} sp_event;

/* "order.created" for SP_EV_ORDER_CREATED and so on; NULL for an unknown value. */
const char *sp_event_type_name(sp_event_type type);

/* Encodes ev as one JSON object into buf (NUL-terminated). Checks every field against the bounds
 * above first, so an event that encodes always decodes. Returns 0 and sets *len (bytes, without
 * the NUL); on a field out of range or a buffer too small returns -1, writes the reason into
 * errbuf and leaves *len untouched. */
int sp_event_encode(const sp_event *ev, char *buf, size_t buflen, size_t *len, char *errbuf,
                    size_t errlen) __attribute__((warn_unused_result));

/* Decodes len bytes of data (need not be NUL-terminated) into *ev. Returns 0 on success; -1 with
 * the reason in errbuf (and *ev zeroed) for anything else. Unknown extra fields are ignored, so a
 * newer producer can add optional fields without breaking older consumers; a higher "v" than
 * SP_EVENT_VERSION is refused. */
int sp_event_decode(const char *data, size_t len, sp_event *ev, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* True when s is a well-formed order id: 1..SP_ORDER_ID_MAX bytes of [A-Za-z0-9._-]. */
int sp_order_id_valid(const char *s);

/* True when s is a well-formed request id (and Idempotency-Key): 1..SP_REQUEST_ID_MAX bytes of
 * printable ASCII without blanks. */
int sp_request_id_valid(const char *s);

#endif
