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

/* Keys in insertion order, no whitespace: the output is deterministic, byte for byte. */
#define ENCODE_FLAGS (JSON_COMPACT | JSON_PRESERVE_ORDER)

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

    if (errbuf == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* Copies at most dstlen-1 bytes of src into dst, each byte outside printable ASCII replaced by
 * '?', so that untrusted text quoted in an error message cannot forge log lines or carry
 * terminal escapes. */
static void printable(char *dst, size_t dstlen, const char *src, size_t srclen) {
    size_t i;

    if (srclen > dstlen - 1)
        srclen = dstlen - 1;
    for (i = 0; i < srclen; i++)
        dst[i] = (src[i] >= 0x20 && src[i] <= 0x7e) ? src[i] : '?';
    dst[i] = '\0';
}

static const char *type_name(sp_event_type type) {
    size_t i;

    for (i = 0; i < NTYPES; i++)
        if (types[i].type == type)
            return types[i].name;
    return NULL;
}

static sp_event_type type_from_name(const char *name) {
    size_t i;

    for (i = 0; i < NTYPES; i++)
        if (strcmp(types[i].name, name) == 0)
            return types[i].type;
    return SP_EV_NONE;
}

const char *sp_event_type_name(sp_event_type type) {
    return type_name(type);
}

int sp_order_id_valid(const char *s) {
    size_t n;

    if (s == NULL)
        return 0;
    /* Stops at the first bad byte, so it never reads past SP_ORDER_ID_MAX + 1 bytes. */
    for (n = 0; s[n] != '\0'; n++) {
        char c = s[n];

        if (n == SP_ORDER_ID_MAX)
            return 0;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return n > 0;
}

/* True when s holds a NUL within SP_REASON_MAX + 1 bytes and every byte before it is printable
 * ASCII (which also keeps it valid UTF-8). */
static int reason_valid(const char *s) {
    size_t n;

    for (n = 0; s[n] != '\0'; n++)
        if (n == SP_REASON_MAX || s[n] < 0x20 || s[n] > 0x7e)
            return 0;
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
                0)
            return -1;
        break;
    case SP_EV_STOCK_ADD:
        /* stored in ev->stock, called "add" on the wire */
        if (check_int("add", ev->stock, 1, SP_STOCK_MAX, errbuf, errlen) != 0)
            return -1;
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
        if (check_order_id(ev->order_id, errbuf, errlen) != 0)
            return -1;
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

/* Keys are our own ASCII literals and string values have been validated as printable ASCII, so
 * the _nocheck variants (which skip jansson's UTF-8 scan) are safe here. json_object_set_new
 * steals the value, and frees it even when it fails. */
static int put_int(json_t *obj, const char *key, int64_t v) {
    return json_object_set_new_nocheck(obj, key, json_integer((json_int_t)v));
}

static int put_str(json_t *obj, const char *key, const char *s) {
    return json_object_set_new_nocheck(obj, key, json_string_nocheck(s));
}

int sp_event_encode(const sp_event *ev, char *buf, size_t buflen, size_t *len, char *errbuf,
                    size_t errlen) {
    json_t *obj = NULL;
    char tmp[SP_EVENT_MAX];
    size_t n;
    int rc = -1, bad = 0;

    if (ev == NULL || buf == NULL || len == NULL) {
        seterr(errbuf, errlen, "encode: NULL argument");
        goto out;
    }
    if (check_event(ev, errbuf, errlen) != 0)
        goto out;

    if ((obj = json_object()) == NULL) {
        seterr(errbuf, errlen, "encode: out of memory");
        goto out;
    }
    /* Key order follows docs/events.md: envelope first, then the type's fields. */
    bad |= put_int(obj, "v", SP_EVENT_VERSION);
    bad |= put_str(obj, "type", type_name(ev->type));
    bad |= put_int(obj, "ts_ms", ev->ts_ms);
    bad |= put_int(obj, "sku_id", ev->sku_id);
    switch (ev->type) {
    case SP_EV_STOCK_SET:
        bad |= put_int(obj, "stock", ev->stock);
        bad |= put_int(obj, "per_user_limit", ev->per_user_limit);
        bad |= put_int(obj, "pay_timeout_s", ev->pay_timeout_s);
        break;
    case SP_EV_STOCK_ADD:
        bad |= put_int(obj, "add", ev->stock);
        break;
    case SP_EV_ORDER_CREATED:
        bad |= put_str(obj, "order_id", ev->order_id);
        bad |= put_int(obj, "user_id", ev->user_id);
        bad |= put_int(obj, "qty", ev->qty);
        bad |= put_int(obj, "expires_ms", ev->expires_ms);
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        bad |= put_str(obj, "order_id", ev->order_id);
        break;
    case SP_EV_ORDER_VOIDED:
        bad |= put_str(obj, "order_id", ev->order_id);
        bad |= put_int(obj, "user_id", ev->user_id);
        bad |= put_int(obj, "qty", ev->qty);
        if (ev->reason[0] != '\0')
            bad |= put_str(obj, "reason", ev->reason);
        break;
    case SP_EV_NONE:
        break; /* refused by check_event */
    }
    if (bad) {
        seterr(errbuf, errlen, "encode: out of memory");
        goto out;
    }

    /* Dump into a local buffer first so that buf is only written on success. The bounds keep
     * every event well under SP_EVENT_MAX; n > sizeof(tmp) would be a bug in those bounds. */
    n = json_dumpb(obj, tmp, sizeof(tmp), ENCODE_FLAGS);
    if (n == 0 || n > sizeof(tmp)) {
        seterr(errbuf, errlen, "encode: event exceeds %d bytes", SP_EVENT_MAX);
        goto out;
    }
    if (n >= buflen) {
        seterr(errbuf, errlen, "encode: buffer too small (%zu bytes, need %zu)", buflen, n + 1);
        goto out;
    }
    memcpy(buf, tmp, n);
    buf[n] = '\0';
    *len = n;
    rc = 0;

out:
    json_decref(obj);
    return rc;
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
    if (check_int(key, v, min, max, errbuf, errlen) != 0)
        return -1;
    *out = v;
    return 0;
}

/* Like get_int for the int32_t fields; max must fit in an int32_t. */
static int get_int32(const json_t *obj, const char *key, int64_t min, int64_t max, int32_t *out,
                     char *errbuf, size_t errlen) {
    int64_t v;

    if (get_int(obj, key, min, max, &v, errbuf, errlen) != 0)
        return -1;
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

    if (val == NULL)
        return 0;
    if (!json_is_string(val)) {
        seterr(errbuf, errlen, "field \"reason\": must be a string");
        return -1;
    }
    if (json_string_length(val) > SP_REASON_MAX || !reason_valid(json_string_value(val)))
        return reason_error(errbuf, errlen);
    memcpy(ev->reason, json_string_value(val), json_string_length(val) + 1);
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
        seterr(errbuf, errlen, "field \"v\": unsupported version %" JSON_INTEGER_FORMAT
               " (this build reads up to %d)", json_integer_value(val), SP_EVENT_VERSION);
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
        break;
    case SP_EV_STOCK_ADD:
        if (get_int(obj, "add", 1, SP_STOCK_MAX, &ev->stock, errbuf, errlen) != 0)
            goto out;
        break;
    case SP_EV_ORDER_CREATED:
        if (get_order_id(obj, ev, errbuf, errlen) != 0 ||
            get_int(obj, "user_id", 1, SP_ID_MAX, &ev->user_id, errbuf, errlen) != 0 ||
            get_int32(obj, "qty", 1, SP_QTY_MAX, &ev->qty, errbuf, errlen) != 0 ||
            get_int(obj, "expires_ms", ev->ts_ms, SP_TS_MAX, &ev->expires_ms, errbuf, errlen) !=
                0)
            goto out;
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        if (get_order_id(obj, ev, errbuf, errlen) != 0)
            goto out;
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
    if (rc != 0)
        memset(ev, 0, sizeof(*ev)); /* never hand back a partly filled event */
    json_decref(obj);
    return rc;
}
