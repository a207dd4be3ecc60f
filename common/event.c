/* event.c - encode and decode stockpipe's versioned JSON events (jansson). */
#include "event.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

/* Largest input decode will parse. An encoded event never exceeds SP_EVENT_MAX; the slack leaves
 * room for optional fields a newer producer may add, while a bounded input also bounds jansson's
 * memory and nesting (JSON_PARSER_MAX_DEPTH) on hostile data. */
#define DECODE_MAX (SP_EVENT_MAX * 4)

/* Longest piece of untrusted text (an unknown type name) quoted back in an error message. */
#define QUOTE_MAX 32

/* Parse flags: duplicate keys make an event ambiguous, so refuse them. The EOF check stays on
 * (no JSON_DISABLE_EOF_CHECK) so trailing garbage is refused, and JSON_ALLOW_NUL stays off so a
 * "\u0000" never truncates a string behind our back. JSON_DECODE_ANY only lets a scalar top level
 * through the parser so that we can refuse it with a clear message of our own. */
#define DECODE_FLAGS (JSON_REJECT_DUPLICATES | JSON_DECODE_ANY)

/* The one type <-> name table, used by encode, decode and sp_event_type_name. */
static const struct {
    sp_event_type type;
    const char *name;
} types[] = {
    {SP_EV_STOCK_SET, "stock.set"},         {SP_EV_STOCK_ADD, "stock.add"},
    {SP_EV_ORDER_CREATED, "order.created"}, {SP_EV_ORDER_PAID, "order.paid"},
    {SP_EV_ORDER_EXPIRED, "order.expired"}, {SP_EV_ORDER_VOIDED, "order.voided"},
};

#define NTYPES (sizeof(types) / sizeof(types[0]))

static void seterr(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *errbuf, size_t errlen, const char *fmt, ...) {
    va_list ap;

    if (errbuf == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* Copies at most dstlen-1 bytes of src into dst, each byte outside printable ASCII replaced by
 * '?', so that untrusted text quoted in an error message cannot forge log lines or carry
 * terminal escapes. */
static void printable(char *dst, size_t dstlen, const char *src, size_t srclen) {
    size_t i;

    if (srclen > dstlen - 1) srclen = dstlen - 1;
    for (i = 0; i < srclen; i++) dst[i] = (src[i] >= 0x20 && src[i] <= 0x7e) ? src[i] : '?';
    dst[i] = '\0';
}

static const char *type_name(sp_event_type type) {
    size_t i;

    for (i = 0; i < NTYPES; i++)
        if (types[i].type == type) return types[i].name;
    return NULL;
}

static sp_event_type type_from_name(const char *name) {
    size_t i;

    for (i = 0; i < NTYPES; i++)
        if (strcmp(types[i].name, name) == 0) return types[i].type;
    return SP_EV_NONE;
}

const char *sp_event_type_name(sp_event_type type) { return type_name(type); }

int sp_order_id_valid(const char *s) {
    size_t n;

    if (s == NULL) return 0;
    /* Stops at the first bad byte, so it never reads past SP_ORDER_ID_MAX + 1 bytes. */
    for (n = 0; s[n] != '\0'; n++) {
        char c = s[n];

        if (n == SP_ORDER_ID_MAX) return 0;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return n > 0;
}

int sp_request_id_valid(const char *s) {
    size_t n = 0;
    if (s == NULL) return 0;
    for (; s[n] != '\0'; n++)
        if (n == SP_REQUEST_ID_MAX || s[n] <= ' ' || s[n] > '~') return 0;
    return n > 0;
}

/* True when s holds a NUL within SP_REASON_MAX + 1 bytes and every byte before it is printable
 * ASCII (which also keeps it valid UTF-8). */
static int reason_valid(const char *s) {
    size_t n;

    for (n = 0; s[n] != '\0'; n++)
        if (n == SP_REASON_MAX || s[n] < 0x20 || s[n] > 0x7e) return 0;
    return 1;
}

/* ---- validation, shared by encode (on the struct) and decode (on the parsed values) ---- */

/* Each error helper writes the one message for its kind of bad field and returns -1. */
static int int_error(const char *key, int64_t min, int64_t max, char *errbuf, size_t errlen) {
    seterr(errbuf, errlen, "field \"%s\": must be an integer in %" PRId64 "..%" PRId64, key, min,
           max);
    return -1;
}

static int order_id_error(char *errbuf, size_t errlen) {
    seterr(errbuf, errlen, "field \"order_id\": must be 1..%d bytes of [A-Za-z0-9._-]",
           SP_ORDER_ID_MAX);
    return -1;
}

static int reason_error(char *errbuf, size_t errlen) {
    seterr(errbuf, errlen, "field \"reason\": must be at most %d bytes of printable ASCII",
           SP_REASON_MAX);
    return -1;
}

static int request_id_error(char *errbuf, size_t errlen) {
    seterr(errbuf, errlen,
           "field \"request_id\": must be 1..%d bytes of printable ASCII without blanks",
           SP_REQUEST_ID_MAX);
    return -1;
}

static int check_int(const char *key, int64_t v, int64_t min, int64_t max, char *errbuf,
                     size_t errlen) {
    return (v < min || v > max) ? int_error(key, min, max, errbuf, errlen) : 0;
}

static int check_order_id(const char *s, char *errbuf, size_t errlen) {
    return sp_order_id_valid(s) ? 0 : order_id_error(errbuf, errlen);
}

static int check_reason(const char *s, char *errbuf, size_t errlen) {
    return reason_valid(s) ? 0 : reason_error(errbuf, errlen);
}

/* Checks every field that ev's type carries; fields it does not carry are not looked at (encode
 * does not write them). */
static int check_event(const sp_event *ev, char *errbuf, size_t errlen) {
    if (type_name(ev->type) == NULL) {
        seterr(errbuf, errlen, "unknown event type %d", (int)ev->type);
        return -1;
    }
    if (check_int("ts_ms", ev->ts_ms, 0, SP_TS_MAX, errbuf, errlen) != 0 ||
        check_int("sku_id", ev->sku_id, 1, SP_ID_MAX, errbuf, errlen) != 0)
        return -1;

    switch (ev->type) {
    case SP_EV_STOCK_SET:
        if (check_int("stock", ev->stock, 0, SP_STOCK_MAX, errbuf, errlen) != 0 ||
            check_int("per_user_limit", ev->per_user_limit, 0, SP_PER_USER_MAX, errbuf, errlen) !=
                0 ||
            check_int("pay_timeout_s", ev->pay_timeout_s, 1, SP_PAY_TIMEOUT_MAX, errbuf, errlen) !=
                0 ||
            (ev->shards != 0 &&
             check_int("shards", ev->shards, 1, SP_SHARDS_MAX, errbuf, errlen) != 0))
            return -1;
        break;
    case SP_EV_STOCK_ADD:
        /* stored in ev->stock, called "add" on the wire */
        if (check_int("add", ev->stock, 1, SP_STOCK_MAX, errbuf, errlen) != 0) return -1;
        if (ev->request_id[0] != '\0' && !sp_request_id_valid(ev->request_id))
            return request_id_error(errbuf, errlen);
        break;
    case SP_EV_ORDER_CREATED:
        if (check_order_id(ev->order_id, errbuf, errlen) != 0 ||
            check_int("user_id", ev->user_id, 1, SP_ID_MAX, errbuf, errlen) != 0 ||
            check_int("qty", ev->qty, 1, SP_QTY_MAX, errbuf, errlen) != 0 ||
            check_int("expires_ms", ev->expires_ms, ev->ts_ms, SP_TS_MAX, errbuf, errlen) != 0)
            return -1;
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        if (check_order_id(ev->order_id, errbuf, errlen) != 0) return -1;
        break;
    case SP_EV_ORDER_VOIDED:
        if (check_order_id(ev->order_id, errbuf, errlen) != 0 ||
            check_int("user_id", ev->user_id, 1, SP_ID_MAX, errbuf, errlen) != 0 ||
            check_int("qty", ev->qty, 1, SP_QTY_MAX, errbuf, errlen) != 0 ||
            check_reason(ev->reason, errbuf, errlen) != 0)
            return -1;
        break;
    case SP_EV_NONE:
        break; /* refused above */
    }
    return 0;
}

/* ---- encode ---- */

/* Events are written directly, not built as a jansson object and dumped: the producer encodes
 * one per accepted order, and the object with its allocations, key sorting and printf-formatted
 * numbers cost more than everything else it does for an order in user space. The output is
 * exactly jansson's compact form (JSON_COMPACT | JSON_PRESERVE_ORDER) of the same object: keys in
 * docs/events.md's order, "," and ":" without blanks, integers in decimal, strings with '"' and
 * '\\' escaped (every string value was checked to be printable ASCII, and an order id holds
 * neither). The unit tests compare it with jansson's dump. */
typedef struct json_writer {
    char *p, *end; /* end: one past the last byte usable */
    int nkeys;     /* keys written so far */
    int overflow;
} json_writer;

static void w_bytes(json_writer *w, const char *s, size_t n) {
    if (w->overflow || (size_t)(w->end - w->p) < n) {
        w->overflow = 1;
        return;
    }
    memcpy(w->p, s, n);
    w->p += n;
}

/* '{' before the first key, ',' before the others, then "key": */
static void w_key(json_writer *w, const char *key) {
    w_bytes(w, w->nkeys++ == 0 ? "{\"" : ",\"", 2);
    w_bytes(w, key, strlen(key));
    w_bytes(w, "\":", 2);
}

static void w_int(json_writer *w, const char *key, int64_t v) {
    char digits[24], *d = digits + sizeof(digits);
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        *--d = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--d = '-';
    w_key(w, key);
    w_bytes(w, d, (size_t)(digits + sizeof(digits) - d));
}

static void w_str(json_writer *w, const char *key, const char *s) {
    w_key(w, key);
    w_bytes(w, "\"", 1);
    for (const char *run = s;; s++) {
        if (*s == '"' || *s == '\\' || *s == '\0') {
            w_bytes(w, run, (size_t)(s - run));
            if (*s == '\0') break;
            w_bytes(w, *s == '"' ? "\\\"" : "\\\\", 2);
            run = s + 1;
        }
    }
    w_bytes(w, "\"", 1);
}

int sp_event_encode(const sp_event *ev, char *buf, size_t buflen, size_t *len, char *errbuf,
                    size_t errlen) {
    char tmp[SP_EVENT_MAX];
    json_writer w = {.p = tmp, .end = tmp + sizeof(tmp)};

    if (ev == NULL || buf == NULL || len == NULL) {
        seterr(errbuf, errlen, "encode: NULL argument");
        return -1;
    }
    if (check_event(ev, errbuf, errlen) != 0) return -1;

    /* Key order follows docs/events.md: envelope first, then the type's fields. */
    w_int(&w, "v", SP_EVENT_VERSION);
    w_str(&w, "type", type_name(ev->type));
    w_int(&w, "ts_ms", ev->ts_ms);
    w_int(&w, "sku_id", ev->sku_id);
    switch (ev->type) {
    case SP_EV_STOCK_SET:
        w_int(&w, "stock", ev->stock);
        w_int(&w, "per_user_limit", ev->per_user_limit);
        w_int(&w, "pay_timeout_s", ev->pay_timeout_s);
        if (ev->shards > 1) w_int(&w, "shards", ev->shards); /* absent: 1, as before it existed */
        break;
    case SP_EV_STOCK_ADD:
        w_int(&w, "add", ev->stock);
        if (ev->request_id[0] != '\0') w_str(&w, "request_id", ev->request_id);
        break;
    case SP_EV_ORDER_CREATED:
        w_str(&w, "order_id", ev->order_id);
        w_int(&w, "user_id", ev->user_id);
        w_int(&w, "qty", ev->qty);
        w_int(&w, "expires_ms", ev->expires_ms);
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        w_str(&w, "order_id", ev->order_id);
        break;
    case SP_EV_ORDER_VOIDED:
        w_str(&w, "order_id", ev->order_id);
        w_int(&w, "user_id", ev->user_id);
        w_int(&w, "qty", ev->qty);
        if (ev->reason[0] != '\0') w_str(&w, "reason", ev->reason);
        break;
    case SP_EV_NONE:
        break; /* refused by check_event */
    }
    w_bytes(&w, "}", 1);

    /* Written into a local buffer first so that buf is only written on success. The bounds keep
     * every event well under SP_EVENT_MAX; an overflow would be a bug in those bounds. */
    size_t n = (size_t)(w.p - tmp);
    if (w.overflow) {
        seterr(errbuf, errlen, "encode: event exceeds %d bytes", SP_EVENT_MAX);
        return -1;
    }
    if (n >= buflen) {
        seterr(errbuf, errlen, "encode: buffer too small (%zu bytes, need %zu)", buflen, n + 1);
        return -1;
    }
    memcpy(buf, tmp, n);
    buf[n] = '\0';
    *len = n;
    return 0;
}

/* ---- decode ---- */

/* Reads obj[key] as a JSON integer in min..max. Reals, strings, booleans and null are refused:
 * accepting 1.0 or "1" would let two producers write the same event two ways. */
static int get_int(const json_t *obj, const char *key, int64_t min, int64_t max, int64_t *out,
                   char *errbuf, size_t errlen) {
    const json_t *val = json_object_get(obj, key);
    int64_t v;

    if (val == NULL) {
        seterr(errbuf, errlen, "field \"%s\": missing", key);
        return -1;
    }
    if (!json_is_integer(val))
        return int_error(key, min, max, errbuf, errlen); /* same message as a range miss */
    v = (int64_t)json_integer_value(val);
    if (check_int(key, v, min, max, errbuf, errlen) != 0) return -1;
    *out = v;
    return 0;
}

/* Like get_int for the int32_t fields; max must fit in an int32_t. */
static int get_int32(const json_t *obj, const char *key, int64_t min, int64_t max, int32_t *out,
                     char *errbuf, size_t errlen) {
    int64_t v;

    if (get_int(obj, key, min, max, &v, errbuf, errlen) != 0) return -1;
    *out = (int32_t)v;
    return 0;
}

/* Reads obj["order_id"] into ev->order_id. A string that is not a valid id (too long included)
 * gets the one message that says what a valid id is. */
static int get_order_id(const json_t *obj, sp_event *ev, char *errbuf, size_t errlen) {
    const json_t *val = json_object_get(obj, "order_id");

    if (val == NULL) {
        seterr(errbuf, errlen, "field \"order_id\": missing");
        return -1;
    }
    if (!json_is_string(val)) {
        seterr(errbuf, errlen, "field \"order_id\": must be a string");
        return -1;
    }
    /* With JSON_ALLOW_NUL off a string holds no NUL, so its length is its strlen. */
    if (json_string_length(val) > SP_ORDER_ID_MAX || !sp_order_id_valid(json_string_value(val)))
        return order_id_error(errbuf, errlen);
    memcpy(ev->order_id, json_string_value(val), json_string_length(val) + 1);
    return 0;
}

/* Reads the optional obj["reason"] into ev->reason; absent leaves it empty. */
static int get_reason(const json_t *obj, sp_event *ev, char *errbuf, size_t errlen) {
    const json_t *val = json_object_get(obj, "reason");

    if (val == NULL) return 0;
    if (!json_is_string(val)) {
        seterr(errbuf, errlen, "field \"reason\": must be a string");
        return -1;
    }
    if (json_string_length(val) > SP_REASON_MAX || !reason_valid(json_string_value(val)))
        return reason_error(errbuf, errlen);
    memcpy(ev->reason, json_string_value(val), json_string_length(val) + 1);
    return 0;
}

/* Reads the optional obj["request_id"] into ev->request_id; absent leaves it empty. */
static int get_request_id(const json_t *obj, sp_event *ev, char *errbuf, size_t errlen) {
    const json_t *val = json_object_get(obj, "request_id");

    if (val == NULL) return 0;
    if (!json_is_string(val)) {
        seterr(errbuf, errlen, "field \"request_id\": must be a string");
        return -1;
    }
    if (json_string_length(val) > SP_REQUEST_ID_MAX || !sp_request_id_valid(json_string_value(val)))
        return request_id_error(errbuf, errlen);
    memcpy(ev->request_id, json_string_value(val), json_string_length(val) + 1);
    return 0;
}

int sp_event_decode(const char *data, size_t len, sp_event *ev, char *errbuf, size_t errlen) {
    json_t *obj = NULL;
    json_error_t jerr;
    const json_t *val;
    const char *nul;
    char quoted[QUOTE_MAX + 1];
    char text[JSON_ERROR_TEXT_LENGTH];
    int rc = -1;

    if (ev == NULL) {
        seterr(errbuf, errlen, "decode: NULL event");
        return -1;
    }
    memset(ev, 0, sizeof(*ev));
    if (len == 0) {
        seterr(errbuf, errlen, "empty event");
        goto out;
    }
    if (data == NULL) {
        seterr(errbuf, errlen, "decode: NULL data");
        goto out;
    }
    if (len > DECODE_MAX) {
        seterr(errbuf, errlen, "event too large (%zu bytes > %d)", len, DECODE_MAX);
        goto out;
    }

    /* A raw NUL is never valid JSON, but jansson 2.14 silently drops one that directly follows
     * a number or a literal ("[1\0]" parses as [1]; akheron/jansson#331,
     * n_multidigit_number_then_00). Refuse it here so that two different byte strings never
     * decode to the same event. */
    if ((nul = memchr(data, '\0', len)) != NULL) {
        seterr(errbuf, errlen, "invalid JSON: NUL byte at offset %zu", (size_t)(nul - data));
        goto out;
    }

    if ((obj = json_loadb(data, len, DECODE_FLAGS, &jerr)) == NULL) {
        /* jerr.text may quote raw input ("near '...'"), so it goes through printable() */
        printable(text, sizeof(text), jerr.text, strlen(jerr.text));
        seterr(errbuf, errlen, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
               text);
        goto out;
    }
    if (!json_is_object(obj)) {
        seterr(errbuf, errlen, "event must be a JSON object");
        goto out;
    }

    /* The version comes first: a newer version may have changed any other field's meaning. */
    if ((val = json_object_get(obj, "v")) == NULL) {
        seterr(errbuf, errlen, "field \"v\": missing");
        goto out;
    }
    if (!json_is_integer(val) || json_integer_value(val) < 1) {
        seterr(errbuf, errlen, "field \"v\": must be an integer in 1..%d", SP_EVENT_VERSION);
        goto out;
    }
    if (json_integer_value(val) > SP_EVENT_VERSION) {
        seterr(errbuf, errlen,
               "field \"v\": unsupported version %" JSON_INTEGER_FORMAT
               " (this build reads up to %d)",
               json_integer_value(val), SP_EVENT_VERSION);
        goto out;
    }

    if ((val = json_object_get(obj, "type")) == NULL) {
        seterr(errbuf, errlen, "field \"type\": missing");
        goto out;
    }
    if (!json_is_string(val)) {
        seterr(errbuf, errlen, "field \"type\": must be a string");
        goto out;
    }
    if ((ev->type = type_from_name(json_string_value(val))) == SP_EV_NONE) {
        printable(quoted, sizeof(quoted), json_string_value(val), json_string_length(val));
        seterr(errbuf, errlen, "unknown event type \"%s\"", quoted);
        goto out;
    }

    if (get_int(obj, "ts_ms", 0, SP_TS_MAX, &ev->ts_ms, errbuf, errlen) != 0 ||
        get_int(obj, "sku_id", 1, SP_ID_MAX, &ev->sku_id, errbuf, errlen) != 0)
        goto out;

    switch (ev->type) {
    case SP_EV_STOCK_SET:
        if (get_int(obj, "stock", 0, SP_STOCK_MAX, &ev->stock, errbuf, errlen) != 0 ||
            get_int32(obj, "per_user_limit", 0, SP_PER_USER_MAX, &ev->per_user_limit, errbuf,
                      errlen) != 0 ||
            get_int32(obj, "pay_timeout_s", 1, SP_PAY_TIMEOUT_MAX, &ev->pay_timeout_s, errbuf,
                      errlen) != 0)
            goto out;
        ev->shards = 1;
        if (json_object_get(obj, "shards") != NULL &&
            get_int32(obj, "shards", 1, SP_SHARDS_MAX, &ev->shards, errbuf, errlen) != 0)
            goto out;
        break;
    case SP_EV_STOCK_ADD:
        if (get_int(obj, "add", 1, SP_STOCK_MAX, &ev->stock, errbuf, errlen) != 0 ||
            get_request_id(obj, ev, errbuf, errlen) != 0)
            goto out;
        break;
    case SP_EV_ORDER_CREATED:
        if (get_order_id(obj, ev, errbuf, errlen) != 0 ||
            get_int(obj, "user_id", 1, SP_ID_MAX, &ev->user_id, errbuf, errlen) != 0 ||
            get_int32(obj, "qty", 1, SP_QTY_MAX, &ev->qty, errbuf, errlen) != 0 ||
            get_int(obj, "expires_ms", ev->ts_ms, SP_TS_MAX, &ev->expires_ms, errbuf, errlen) != 0)
            goto out;
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        if (get_order_id(obj, ev, errbuf, errlen) != 0) goto out;
        break;
    case SP_EV_ORDER_VOIDED:
        if (get_order_id(obj, ev, errbuf, errlen) != 0 ||
            get_int(obj, "user_id", 1, SP_ID_MAX, &ev->user_id, errbuf, errlen) != 0 ||
            get_int32(obj, "qty", 1, SP_QTY_MAX, &ev->qty, errbuf, errlen) != 0 ||
            get_reason(obj, ev, errbuf, errlen) != 0)
            goto out;
        break;
    case SP_EV_NONE:
        goto out; /* not reached: type_from_name never returns it for a match */
    }
    rc = 0;

out:
    if (rc != 0) memset(ev, 0, sizeof(*ev)); /* never hand back a partly filled event */
    json_decref(obj);
    return rc;
}
