/* unit_event.c - unit tests for the event codec: round trips, exact output, and every way an
 * event on the wire can be wrong. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "event.h"

#define DECODE_MAX (SP_EVENT_MAX * 4) /* the input bound documented in docs/events.md */

/* ---- building test JSON ---- */

/* One event shape on the wire: its fields in encode order, each with a valid raw JSON value. */
struct field {
    const char *key;
    const char *raw;
};

struct shape {
    sp_event_type type;
    const struct field *fields;
    size_t nfields;
};

static const struct field f_stock_set[] = {
    {"v", "1"},       {"type", "\"stock.set\""}, {"ts_ms", "1732240000000"}, {"sku_id", "1001"},
    {"stock", "500"}, {"per_user_limit", "2"},   {"pay_timeout_s", "600"},
};
static const struct field f_stock_add[] = {
    {"v", "1"},    {"type", "\"stock.add\""}, {"ts_ms", "1732240000000"}, {"sku_id", "1001"},
    {"add", "50"},
};
static const struct field f_created[] = {
    {"v", "1"},         {"type", "\"order.created\""},   {"ts_ms", "1732240000000"},
    {"sku_id", "1001"}, {"order_id", "\"o-1\""},         {"user_id", "42"},
    {"qty", "1"},       {"expires_ms", "1732240600000"},
};
static const struct field f_paid[] = {
    {"v", "1"},         {"type", "\"order.paid\""}, {"ts_ms", "1732240000000"},
    {"sku_id", "1001"}, {"order_id", "\"o-1\""},
};
static const struct field f_expired[] = {
    {"v", "1"},         {"type", "\"order.expired\""}, {"ts_ms", "1732240000000"},
    {"sku_id", "1001"}, {"order_id", "\"o-1\""},
};
static const struct field f_voided[] = {
    {"v", "1"},         {"type", "\"order.voided\""}, {"ts_ms", "1732240000000"},
    {"sku_id", "1001"}, {"order_id", "\"o-1\""},      {"user_id", "42"},
    {"qty", "3"},       {"reason", "\"kafka-down\""},
};

/* clang-format 14 reads a braced initializer in a #define as a block: kept as written */
/* clang-format off */
#define SHAPE(t, f) {t, f, sizeof(f) / sizeof(f[0])}
/* clang-format on */
static const struct shape shapes[] = {
    SHAPE(SP_EV_STOCK_SET, f_stock_set),   SHAPE(SP_EV_STOCK_ADD, f_stock_add),
    SHAPE(SP_EV_ORDER_CREATED, f_created), SHAPE(SP_EV_ORDER_PAID, f_paid),
    SHAPE(SP_EV_ORDER_EXPIRED, f_expired), SHAPE(SP_EV_ORDER_VOIDED, f_voided),
};
#define NSHAPES (sizeof(shapes) / sizeof(shapes[0]))

static const struct shape *shape_of(sp_event_type type) {
    for (size_t i = 0; i < NSHAPES; i++)
        if (shapes[i].type == type) return &shapes[i];
    fail_msg("no shape for type %d", (int)type);
    return NULL;
}

/* Writes sh's JSON into out with key's value replaced by raw (raw NULL: key left out). */
static void build(char *out, size_t outlen, const struct shape *sh, const char *key,
                  const char *raw) {
    size_t n = 0;
    int first = 1;

    n += (size_t)snprintf(out + n, outlen - n, "{");
    for (size_t i = 0; i < sh->nfields; i++) {
        const char *val = sh->fields[i].raw;

        if (key != NULL && strcmp(key, sh->fields[i].key) == 0) {
            if (raw == NULL) continue;
            val = raw;
        }
        n += (size_t)snprintf(out + n, outlen - n, "%s\"%s\":%s", first ? "" : ",",
                              sh->fields[i].key, val);
        first = 0;
    }
    n += (size_t)snprintf(out + n, outlen - n, "}");
    assert_true(n < outlen);
}

/* ---- decode helpers ---- */

static int is_zero(const sp_event *ev) {
    static const sp_event zero;

    return memcmp(ev, &zero, sizeof(zero)) == 0;
}

/* Decodes len bytes into *ev (pre-filled with junk so that zeroing is observable). */
static int decode_n(const char *data, size_t len, sp_event *ev, char *err, size_t errlen) {
    memset(ev, 0x5a, sizeof(*ev));
    err[0] = '\0';
    return sp_event_decode(data, len, ev, err, errlen);
}

/* Asserts data is refused, *ev comes back zeroed and the reason contains needle. */
static void refused_n(const char *data, size_t len, const char *needle) {
    sp_event ev;
    char err[256];

    if (decode_n(data, len, &ev, err, sizeof(err)) != -1)
        fail_msg("accepted: %.*s", (int)len, data);
    assert_true(is_zero(&ev));
    if (strstr(err, needle) == NULL)
        fail_msg("reason \"%s\" does not mention \"%s\" (input %.*s)", err, needle, (int)len, data);
}

static void refused(const char *json, const char *needle) { refused_n(json, strlen(json), needle); }

static void accepted(const char *json, sp_event *ev) {
    char err[256];

    if (decode_n(json, strlen(json), ev, err, sizeof(err)) != 0)
        fail_msg("refused (%s): %s", err, json);
}

/* ---- sample events ---- */

static sp_event sample(sp_event_type type) {
    sp_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.type = type;
    ev.ts_ms = INT64_C(1732240000000);
    ev.sku_id = 1001;
    switch (type) {
    case SP_EV_STOCK_SET:
        ev.stock = 500;
        ev.per_user_limit = 2;
        ev.pay_timeout_s = 600;
        ev.shards = 1;
        break;
    case SP_EV_STOCK_ADD:
        ev.stock = 50;
        break;
    case SP_EV_ORDER_CREATED:
        strcpy(ev.order_id, "o-1");
        ev.user_id = 42;
        ev.qty = 1;
        ev.expires_ms = INT64_C(1732240600000);
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        strcpy(ev.order_id, "o-1");
        break;
    case SP_EV_ORDER_VOIDED:
        strcpy(ev.order_id, "o-1");
        ev.user_id = 42;
        ev.qty = 3;
        strcpy(ev.reason, "kafka-down");
        break;
    case SP_EV_NONE:
        break;
    }
    return ev;
}

static void assert_event_equal(const sp_event *a, const sp_event *b) {
    assert_int_equal(a->type, b->type);
    assert_int_equal(a->ts_ms, b->ts_ms);
    assert_int_equal(a->sku_id, b->sku_id);
    assert_string_equal(a->order_id, b->order_id);
    assert_int_equal(a->user_id, b->user_id);
    assert_int_equal(a->qty, b->qty);
    assert_int_equal(a->expires_ms, b->expires_ms);
    assert_int_equal(a->stock, b->stock);
    assert_int_equal(a->per_user_limit, b->per_user_limit);
    assert_int_equal(a->pay_timeout_s, b->pay_timeout_s);
    assert_int_equal(a->shards, b->shards);
    assert_string_equal(a->reason, b->reason);
    assert_string_equal(a->request_id, b->request_id);
}

/* Encodes ev, asserting success; returns the length. */
static size_t encode_ok(const sp_event *ev, char *buf, size_t buflen) {
    char err[256] = "";
    size_t len = 0;

    if (sp_event_encode(ev, buf, buflen, &len, err, sizeof(err)) != 0)
        fail_msg("encode refused: %s", err);
    assert_int_equal(strlen(buf), len);
    return len;
}

/* Asserts encode refuses ev with a reason containing needle, leaving *len and buf alone. */
static void encode_refused(const sp_event *ev, const char *needle) {
    char buf[SP_EVENT_MAX], err[256] = "";
    size_t len = 777;

    memset(buf, 'x', sizeof(buf));
    assert_int_equal(sp_event_encode(ev, buf, sizeof(buf), &len, err, sizeof(err)), -1);
    assert_int_equal(len, 777);
    assert_int_equal(buf[0], 'x');
    if (strstr(err, needle) == NULL) fail_msg("reason \"%s\" does not mention \"%s\"", err, needle);
}

/* ---- tests ---- */

static void test_type_names(void **state) {
    (void)state;
    assert_string_equal(sp_event_type_name(SP_EV_STOCK_SET), "stock.set");
    assert_string_equal(sp_event_type_name(SP_EV_STOCK_ADD), "stock.add");
    assert_string_equal(sp_event_type_name(SP_EV_ORDER_CREATED), "order.created");
    assert_string_equal(sp_event_type_name(SP_EV_ORDER_PAID), "order.paid");
    assert_string_equal(sp_event_type_name(SP_EV_ORDER_EXPIRED), "order.expired");
    assert_string_equal(sp_event_type_name(SP_EV_ORDER_VOIDED), "order.voided");
    assert_null(sp_event_type_name(SP_EV_NONE));
    assert_null(sp_event_type_name((sp_event_type)99));
}

static void test_round_trip_every_type(void **state) {
    (void)state;
    for (size_t i = 0; i < NSHAPES; i++) {
        sp_event in = sample(shapes[i].type), out;
        char buf[SP_EVENT_MAX], err[256];
        size_t len = encode_ok(&in, buf, sizeof(buf));

        assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
        assert_event_equal(&in, &out);
    }
}

static void test_round_trip_extremes(void **state) {
    sp_event in, out;
    char buf[SP_EVENT_MAX], err[256];
    size_t len;

    (void)state;
    /* every field at its maximum, a 64-byte id and a 128-byte reason that needs escaping: the
     * largest event there is must still fit in SP_EVENT_MAX */
    in = sample(SP_EV_ORDER_VOIDED);
    in.ts_ms = SP_TS_MAX;
    in.sku_id = SP_ID_MAX;
    in.user_id = SP_ID_MAX;
    in.qty = SP_QTY_MAX;
    memset(in.order_id, 'z', SP_ORDER_ID_MAX);
    in.order_id[SP_ORDER_ID_MAX] = '\0';
    for (int i = 0; i < SP_REASON_MAX; i++) in.reason[i] = (i % 2) ? '"' : '\\';
    in.reason[SP_REASON_MAX] = '\0';
    len = encode_ok(&in, buf, sizeof(buf));
    assert_true(len < SP_EVENT_MAX);
    assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
    assert_event_equal(&in, &out);

    in = sample(SP_EV_STOCK_SET);
    in.ts_ms = 0;
    in.stock = SP_STOCK_MAX;
    in.per_user_limit = SP_PER_USER_MAX;
    in.pay_timeout_s = SP_PAY_TIMEOUT_MAX;
    len = encode_ok(&in, buf, sizeof(buf));
    assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
    assert_event_equal(&in, &out);

    in.stock = 0;
    in.per_user_limit = 0;
    in.pay_timeout_s = 1;
    len = encode_ok(&in, buf, sizeof(buf));
    assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
    assert_event_equal(&in, &out);
}

/* stock.set's optional shards: 1..SP_SHARDS_MAX, written only above 1 (a one-shard sale encodes
 * as it did before the field), read as 1 when absent; anything else refused both ways. */
static void test_stock_set_shards(void **state) {
    sp_event in, out;
    char buf[SP_EVENT_MAX], err[256];
    size_t len;

    (void)state;
    in = sample(SP_EV_STOCK_SET);
    len = encode_ok(&in, buf, sizeof(buf));
    assert_null(strstr(buf, "shards"));
    in.shards = 0; /* an event built without the field: one shard */
    len = encode_ok(&in, buf, sizeof(buf));
    assert_null(strstr(buf, "shards"));
    assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
    assert_int_equal(out.shards, 1);
    in.shards = SP_SHARDS_MAX;
    len = encode_ok(&in, buf, sizeof(buf));
    assert_non_null(strstr(buf, ",\"shards\":16}"));
    assert_int_equal(decode_n(buf, len, &out, err, sizeof(err)), 0);
    assert_event_equal(&in, &out);
    in.shards = SP_SHARDS_MAX + 1;
    encode_refused(&in, "field \"shards\"");
    in.shards = -1;
    encode_refused(&in, "field \"shards\"");

    accepted("{\"v\":1,\"type\":\"stock.set\",\"ts_ms\":1,\"sku_id\":1,\"stock\":5,"
             "\"per_user_limit\":0,\"pay_timeout_s\":1,\"shards\":2}",
             &out);
    assert_int_equal(out.shards, 2);
    refused("{\"v\":1,\"type\":\"stock.set\",\"ts_ms\":1,\"sku_id\":1,\"stock\":5,"
            "\"per_user_limit\":0,\"pay_timeout_s\":1,\"shards\":0}",
            "field \"shards\"");
    refused("{\"v\":1,\"type\":\"stock.set\",\"ts_ms\":1,\"sku_id\":1,\"stock\":5,"
            "\"per_user_limit\":0,\"pay_timeout_s\":1,\"shards\":17}",
            "field \"shards\"");
    refused("{\"v\":1,\"type\":\"stock.set\",\"ts_ms\":1,\"sku_id\":1,\"stock\":5,"
            "\"per_user_limit\":0,\"pay_timeout_s\":1,\"shards\":\"2\"}",
            "field \"shards\"");
}

static void test_encode_exact_json(void **state) {
    sp_event ev;
    char buf[SP_EVENT_MAX];

    (void)state;
    ev = sample(SP_EV_ORDER_CREATED);
    strcpy(ev.order_id, "01JDX3F6K2ZQ8T4V9B7N5M1C0A");
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"order.created\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"order_id\":\"01JDX3F6K2ZQ8T4V9B7N5M1C0A\","
                             "\"user_id\":42,\"qty\":1,\"expires_ms\":1732240600000}");

    ev = sample(SP_EV_STOCK_SET);
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"stock.set\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"stock\":500,\"per_user_limit\":2,"
                             "\"pay_timeout_s\":600}");

    ev = sample(SP_EV_STOCK_ADD);
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"stock.add\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"add\":50}");

    ev = sample(SP_EV_ORDER_VOIDED);
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"order.voided\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"order_id\":\"o-1\",\"user_id\":42,\"qty\":3,"
                             "\"reason\":\"kafka-down\"}");

    /* an empty reason is left out */
    ev.reason[0] = '\0';
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"order.voided\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"order_id\":\"o-1\",\"user_id\":42,\"qty\":3}");

    /* fields the type does not carry are not written */
    ev = sample(SP_EV_ORDER_PAID);
    ev.user_id = 7;
    ev.stock = 9;
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"order.paid\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"order_id\":\"o-1\"}");
}

/* The encoder writes JSON itself; jansson's compact dump of the same object (the encoder's
 * former implementation) is the oracle, over every type, the ranges' ends, and every printable
 * character in a reason (the only field that can hold '"' or '\\'). */
static json_t *oracle_object(const sp_event *ev) {
    json_t *o = json_object();
    json_object_set_new(o, "v", json_integer(SP_EVENT_VERSION));
    json_object_set_new(o, "type", json_string(sp_event_type_name(ev->type)));
    json_object_set_new(o, "ts_ms", json_integer(ev->ts_ms));
    json_object_set_new(o, "sku_id", json_integer(ev->sku_id));
    switch (ev->type) {
    case SP_EV_STOCK_SET:
        json_object_set_new(o, "stock", json_integer(ev->stock));
        json_object_set_new(o, "per_user_limit", json_integer(ev->per_user_limit));
        json_object_set_new(o, "pay_timeout_s", json_integer(ev->pay_timeout_s));
        if (ev->shards > 1) json_object_set_new(o, "shards", json_integer(ev->shards));
        break;
    case SP_EV_STOCK_ADD:
        json_object_set_new(o, "add", json_integer(ev->stock));
        if (ev->request_id[0]) json_object_set_new(o, "request_id", json_string(ev->request_id));
        break;
    case SP_EV_ORDER_CREATED:
        json_object_set_new(o, "order_id", json_string(ev->order_id));
        json_object_set_new(o, "user_id", json_integer(ev->user_id));
        json_object_set_new(o, "qty", json_integer(ev->qty));
        json_object_set_new(o, "expires_ms", json_integer(ev->expires_ms));
        break;
    case SP_EV_ORDER_PAID:
    case SP_EV_ORDER_EXPIRED:
        json_object_set_new(o, "order_id", json_string(ev->order_id));
        break;
    case SP_EV_ORDER_VOIDED:
        json_object_set_new(o, "order_id", json_string(ev->order_id));
        json_object_set_new(o, "user_id", json_integer(ev->user_id));
        json_object_set_new(o, "qty", json_integer(ev->qty));
        if (ev->reason[0]) json_object_set_new(o, "reason", json_string(ev->reason));
        break;
    case SP_EV_NONE:
        break;
    }
    return o;
}

static void assert_encodes_as_jansson(const sp_event *ev) {
    char buf[SP_EVENT_MAX];
    json_t *o = oracle_object(ev);
    char *want = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    assert_non_null(want);
    encode_ok(ev, buf, sizeof(buf));
    assert_string_equal(buf, want);
    free(want);
    json_decref(o);
}

static void test_encode_matches_jansson(void **state) {
    static const sp_event_type types[] = {SP_EV_STOCK_SET,     SP_EV_STOCK_ADD,
                                          SP_EV_ORDER_CREATED, SP_EV_ORDER_PAID,
                                          SP_EV_ORDER_EXPIRED, SP_EV_ORDER_VOIDED};
    (void)state;
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        sp_event ev = sample(types[t]);
        assert_encodes_as_jansson(&ev);
        /* the ranges' low and high ends */
        ev.ts_ms = 0, ev.expires_ms = 0, ev.sku_id = 1, ev.user_id = 1, ev.qty = 1;
        ev.stock = types[t] == SP_EV_STOCK_ADD ? 1 : 0, ev.per_user_limit = 0, ev.pay_timeout_s = 1;
        assert_encodes_as_jansson(&ev);
        ev.ts_ms = SP_TS_MAX, ev.expires_ms = SP_TS_MAX, ev.sku_id = SP_ID_MAX;
        ev.user_id = SP_ID_MAX, ev.qty = SP_QTY_MAX, ev.stock = SP_STOCK_MAX;
        ev.per_user_limit = SP_PER_USER_MAX, ev.pay_timeout_s = SP_PAY_TIMEOUT_MAX;
        memset(ev.order_id, 0, sizeof(ev.order_id));
        for (int i = 0; i < SP_ORDER_ID_MAX; i++) ev.order_id[i] = "aZ09._-"[i % 7];
        assert_encodes_as_jansson(&ev);
    }
    /* every printable character in a reason, in runs of up to SP_REASON_MAX */
    sp_event ev = sample(SP_EV_ORDER_VOIDED);
    for (int c = 0x20; c <= 0x7e; c += SP_REASON_MAX) {
        memset(ev.reason, 0, sizeof(ev.reason));
        for (int i = 0; i < SP_REASON_MAX && c + i <= 0x7e; i++) ev.reason[i] = (char)(c + i);
        assert_encodes_as_jansson(&ev);
    }
    strcpy(ev.reason, "\"\\\"\\\\");
    assert_encodes_as_jansson(&ev);
    ev.reason[0] = '\0';
    assert_encodes_as_jansson(&ev);
}

static void test_decode_example(void **state) {
    sp_event ev;

    (void)state;
    accepted("{\"v\":1,\"type\":\"order.created\",\"ts_ms\":1732240000000,\"sku_id\":1001,"
             "\"order_id\":\"A.b_c-9\",\"user_id\":42,\"qty\":1,\"expires_ms\":1732240600000}",
             &ev);
    assert_int_equal(ev.type, SP_EV_ORDER_CREATED);
    assert_int_equal(ev.ts_ms, INT64_C(1732240000000));
    assert_int_equal(ev.sku_id, 1001);
    assert_string_equal(ev.order_id, "A.b_c-9");
    assert_int_equal(ev.user_id, 42);
    assert_int_equal(ev.qty, 1);
    assert_int_equal(ev.expires_ms, INT64_C(1732240600000));
    assert_int_equal(ev.stock, 0);
    assert_string_equal(ev.reason, "");

    /* whitespace and key order do not matter */
    accepted(" {\n \"add\" : 7 , \"sku_id\":5,\"ts_ms\":0,\"type\":\"stock.add\",\"v\":1 }\n\t",
             &ev);
    assert_int_equal(ev.type, SP_EV_STOCK_ADD);
    assert_int_equal(ev.stock, 7);
    assert_int_equal(ev.sku_id, 5);
}

static void test_every_shape_decodes(void **state) {
    char json[512];
    sp_event ev;

    (void)state;
    for (size_t i = 0; i < NSHAPES; i++) {
        sp_event want = sample(shapes[i].type);

        build(json, sizeof(json), &shapes[i], NULL, NULL);
        accepted(json, &ev);
        assert_event_equal(&ev, &want);
    }
}

static void test_field_missing(void **state) {
    char json[512], needle[64];

    (void)state;
    for (size_t i = 0; i < NSHAPES; i++) {
        for (size_t j = 0; j < shapes[i].nfields; j++) {
            const char *key = shapes[i].fields[j].key;

            if (strcmp(key, "reason") == 0) continue; /* optional, see test_reason */
            build(json, sizeof(json), &shapes[i], key, NULL);
            snprintf(needle, sizeof(needle), "field \"%s\": missing", key);
            refused(json, needle);
        }
    }
}

static int is_string_field(const char *key) {
    return strcmp(key, "type") == 0 || strcmp(key, "order_id") == 0 || strcmp(key, "reason") == 0;
}

static void test_field_wrong_type(void **state) {
    static const char *not_int[] = {"\"5\"", "\"\"", "1.0", "1e3", "5.5", "true",
                                    "false", "null", "{}",  "[]",  "[1]", "{\"a\":1}"};
    static const char *not_str[] = {"5",    "0",  "1.0", "true",     "false",
                                    "null", "{}", "[]",  "[\"o-1\"]"};
    char json[512], needle[64];

    (void)state;
    for (size_t i = 0; i < NSHAPES; i++) {
        for (size_t j = 0; j < shapes[i].nfields; j++) {
            const char *key = shapes[i].fields[j].key;
            const char **bad = is_string_field(key) ? not_str : not_int;
            size_t nbad = is_string_field(key) ? sizeof(not_str) / sizeof(not_str[0])
                                               : sizeof(not_int) / sizeof(not_int[0]);

            snprintf(needle, sizeof(needle), "field \"%s\"", key);
            for (size_t k = 0; k < nbad; k++) {
                build(json, sizeof(json), &shapes[i], key, bad[k]);
                refused(json, needle);
            }
        }
    }
}

static void test_integer_message(void **state) {
    char json[512];

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "qty", "1001");
    refused(json, "field \"qty\": must be an integer in 1..1000");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "qty", "\"5\"");
    refused(json, "field \"qty\": must be an integer in 1..1000");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "order_id", NULL);
    refused(json, "field \"order_id\": missing");
}

struct bound {
    sp_event_type type;
    const char *key;
    int64_t min, max;
};

static void test_bounds(void **state) {
    static const struct bound bounds[] = {
        {SP_EV_STOCK_SET, "ts_ms", 0, SP_TS_MAX},
        {SP_EV_STOCK_SET, "sku_id", 1, SP_ID_MAX},
        {SP_EV_STOCK_SET, "stock", 0, SP_STOCK_MAX},
        {SP_EV_STOCK_SET, "per_user_limit", 0, SP_PER_USER_MAX},
        {SP_EV_STOCK_SET, "pay_timeout_s", 1, SP_PAY_TIMEOUT_MAX},
        {SP_EV_STOCK_ADD, "add", 1, SP_STOCK_MAX},
        {SP_EV_ORDER_CREATED, "user_id", 1, SP_ID_MAX},
        {SP_EV_ORDER_CREATED, "qty", 1, SP_QTY_MAX},
        {SP_EV_ORDER_CREATED, "expires_ms", INT64_C(1732240000000), SP_TS_MAX}, /* >= ts_ms */
        {SP_EV_ORDER_VOIDED, "user_id", 1, SP_ID_MAX},
        {SP_EV_ORDER_VOIDED, "qty", 1, SP_QTY_MAX},
        {SP_EV_ORDER_PAID, "sku_id", 1, SP_ID_MAX},
    };
    char json[512], raw[32], needle[64];
    sp_event ev;

    (void)state;
    for (size_t i = 0; i < sizeof(bounds) / sizeof(bounds[0]); i++) {
        const struct bound *b = &bounds[i];
        const struct shape *sh = shape_of(b->type);
        int64_t ok[] = {b->min, b->max};
        int64_t bad[] = {b->min - 1, b->max + 1, -1, INT64_MIN, INT64_MAX};

        snprintf(needle, sizeof(needle), "field \"%s\": must be an integer in", b->key);
        for (size_t k = 0; k < 2; k++) {
            snprintf(raw, sizeof(raw), "%" PRId64, ok[k]);
            build(json, sizeof(json), sh, b->key, raw);
            accepted(json, &ev);
        }
        for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
            if (bad[k] >= b->min && bad[k] <= b->max)
                continue; /* a generic bad value that is in range for this field */
            snprintf(raw, sizeof(raw), "%" PRId64, bad[k]);
            build(json, sizeof(json), sh, b->key, raw);
            refused(json, needle);
        }
    }

    /* decoded values land in the right fields, including "add" -> stock */
    build(json, sizeof(json), shape_of(SP_EV_STOCK_ADD), "add", "1000000000000");
    accepted(json, &ev);
    assert_int_equal(ev.stock, SP_STOCK_MAX);
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "user_id", "9007199254740991");
    accepted(json, &ev);
    assert_int_equal(ev.user_id, SP_ID_MAX);

    /* integers beyond 64 bits, and negative zero */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "qty", "99999999999999999999999");
    refused(json, "invalid JSON");
    build(json, sizeof(json), shape_of(SP_EV_STOCK_SET), "stock", "-0");
    accepted(json, &ev);
    assert_int_equal(ev.stock, 0);
}

static void test_unknown_type(void **state) {
    char json[512];

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"order.foo\"");
    refused(json, "unknown event type \"order.foo\"");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"\"");
    refused(json, "unknown event type \"\"");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"ORDER.PAID\"");
    refused(json, "unknown event type");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"order.paid \"");
    refused(json, "unknown event type");

    /* untrusted text quoted back is made printable and cut short */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"a\\u001b[31mb\\nc\"");
    refused(json, "unknown event type \"a?[31mb?c\"");
    {
        char long_type[300];
        sp_event ev;
        char err[256];

        memset(long_type, 'q', sizeof(long_type));
        long_type[0] = '"';
        long_type[298] = '"';
        long_type[299] = '\0';
        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", long_type);
        assert_int_equal(decode_n(json, strlen(json), &ev, err, sizeof(err)), -1);
        assert_true(strlen(err) < 80);
    }
}

static void test_version(void **state) {
    static const char *bad[] = {"0", "-1", "\"1\"", "1.0", "true", "null", "[1]", "{}"};
    char json[512];
    sp_event ev;

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "v", NULL);
    refused(json, "field \"v\": missing");
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "v", bad[i]);
        refused(json, "field \"v\"");
    }
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "v", "2");
    refused(json, "unsupported version 2");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "v", "9223372036854775807");
    refused(json, "unsupported version");

    /* the version is checked before the type: a v2 event of a type we do not know yet is
     * refused for its version */
    refused("{\"v\":2,\"type\":\"order.refunded\"}", "unsupported version 2");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "v", "1");
    accepted(json, &ev);
}

static void test_not_an_object(void **state) {
    static const char *bad[] = {"[]",   "[{\"v\":1}]", "5",  "\"order.paid\"",
                                "null", "true",        "-1", "1.5"};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        refused(bad[i], "must be a JSON object");
    refused("{}", "field \"v\": missing");
}

static void test_truncated(void **state) {
    sp_event ev = sample(SP_EV_ORDER_CREATED);
    char buf[SP_EVENT_MAX];
    size_t len = encode_ok(&ev, buf, sizeof(buf));

    (void)state;
    for (size_t n = 1; n < len; n++) refused_n(buf, n, "invalid JSON");
    refused("{\"v\":1,\"type\":\"order.pa", "invalid JSON at line 1 column");
}

static void test_trailing_garbage(void **state) {
    static const char *tails[] = {"x", "}", "{}", " ]", ",", "\n{\"v\":1}", "0", "\x01"};
    sp_event ev;
    char json[512], buf[640];

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), NULL, NULL);
    for (size_t i = 0; i < sizeof(tails) / sizeof(tails[0]); i++) {
        snprintf(buf, sizeof(buf), "%s%s", json, tails[i]);
        refused(buf, "invalid JSON");
    }
    /* trailing whitespace (a newline from a text tool) is not garbage */
    snprintf(buf, sizeof(buf), "%s \r\n\t", json);
    accepted(buf, &ev);
    assert_int_equal(ev.type, SP_EV_ORDER_PAID);
}

static void test_duplicate_keys(void **state) {
    (void)state;
    refused("{\"v\":1,\"type\":\"order.created\",\"ts_ms\":1,\"sku_id\":1,\"order_id\":\"a\","
            "\"user_id\":1,\"qty\":1,\"qty\":2,\"expires_ms\":1}",
            "duplicate");
    refused("{\"v\":1,\"v\":1,\"type\":\"order.paid\",\"ts_ms\":1,\"sku_id\":1,\"order_id\":\"a\"}",
            "duplicate");
    /* even an unknown field may not repeat */
    refused("{\"v\":1,\"type\":\"order.paid\",\"ts_ms\":1,\"sku_id\":1,\"order_id\":\"a\","
            "\"x\":1,\"x\":1}",
            "duplicate");
}

static void test_empty_input(void **state) {
    (void)state;
    refused_n("", 0, "empty");
    refused_n(NULL, 0, "empty");
    refused("   ", "invalid JSON");
    refused("\n", "invalid JSON");
}

static void test_huge_input(void **state) {
    const struct shape *sh = shape_of(SP_EV_ORDER_PAID);
    char json[512], err[256];
    char *big = malloc(DECODE_MAX + 2);
    size_t n;
    sp_event ev;

    (void)state;
    assert_non_null(big);
    memset(big, ' ', DECODE_MAX + 1);
    refused_n(big, DECODE_MAX + 1, "event too large (4097 bytes > 4096)");
    free(big);

    big = malloc(5000);
    assert_non_null(big);
    memset(big, '{', 5000);
    refused_n(big, 5000, "event too large (5000 bytes > 4096)");
    free(big);

    /* exactly the bound is accepted, one byte more is not: pad a valid event with an unknown
     * field */
    big = malloc(DECODE_MAX + 2);
    assert_non_null(big);
    build(json, sizeof(json), sh, NULL, NULL);
    n = strlen(json) - 1; /* without the closing brace */
    memcpy(big, json, n);
    n += (size_t)sprintf(big + n, ",\"pad\":\"");
    while (n < DECODE_MAX - 2) big[n++] = 'p';
    big[n++] = '"';
    big[n++] = '}';
    assert_int_equal(n, DECODE_MAX);
    assert_int_equal(decode_n(big, n, &ev, err, sizeof(err)), 0);
    assert_string_equal(ev.order_id, "o-1");
    big[n] = ' ';
    refused_n(big, n + 1, "event too large");
    free(big);
}

static void test_deep_nesting(void **state) {
    const size_t deep = 100000;
    char *buf = malloc(deep + 1);
    char json[8192], *p;
    sp_event ev;

    (void)state;
    assert_non_null(buf);
    memset(buf, '[', deep);
    refused_n(buf, deep, "too large");
    /* within the size bound: jansson's depth limit (2048) ends the parse, not the stack */
    refused_n(buf, DECODE_MAX, "invalid JSON");
    free(buf);

    /* deep but legal nesting in an unknown field is ignored; in a known field it is a type
     * error */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), NULL, NULL);
    p = json + strlen(json) - 1;
    p += sprintf(p, ",\"deep\":");
    for (int i = 0; i < 1500; i++) *p++ = '[';
    for (int i = 0; i < 1500; i++) *p++ = ']';
    strcpy(p, "}");
    accepted(json, &ev);
    assert_string_equal(ev.order_id, "o-1");

    {
        char raw[3100];

        for (int i = 0; i < 1500; i++) raw[i] = '[', raw[1500 + i] = ']';
        raw[3000] = '\0';
        build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "qty", raw);
        refused(json, "field \"qty\"");
    }
}

static void test_embedded_nul(void **state) {
    char json[512];
    size_t n;
    char *q;

    (void)state;
    /* a raw NUL byte inside the order id */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "order_id", "\"o-1X2\"");
    n = strlen(json);
    q = strstr(json, "o-1X2");
    q[3] = '\0';
    refused_n(json, n, "invalid JSON");

    /* an escaped NUL: never accepted (JSON_ALLOW_NUL is off), so ids cannot be cut short */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "order_id", "\"o-1\\u0000x\"");
    refused(json, "invalid JSON");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "type", "\"order.paid\\u0000x\"");
    refused(json, "invalid JSON");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_VOIDED), "reason", "\"a\\u0000b\"");
    refused(json, "invalid JSON");
    refused("{\"v\":1,\"type\":\"order.paid\",\"ts_ms\":1,\"sku_id\":1,\"order_id\":\"a\","
            "\"extra\":\"\\u0000\"}",
            "invalid JSON");

    /* a NUL after the object, and one between tokens: jansson alone would skip a NUL that
     * directly follows a number, so these are the cases that matter */
    build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), NULL, NULL);
    n = strlen(json);
    refused_n(json, n + 1, "invalid JSON"); /* includes the terminating NUL */
    q = strchr(json, ',');                  /* right after "v":1 */
    memmove(q + 1, q, strlen(q) + 1);
    *q = '\0';
    refused_n(json, n + 1, "NUL byte at offset 6");
    refused_n("{\"v\":1\0}", 8, "NUL byte");
    refused_n("\0", 1, "NUL byte at offset 0");
}

static void test_invalid_utf8(void **state) {
    static const char *bad[] = {"\"o-\xff\"", "\"o-\xc3\x28\"", "\"\xed\xa0\x80\"", "\"\xc0\xaf\"",
                                "\"\xe2\x82\""};
    char json[512];

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "order_id", bad[i]);
        refused(json, "invalid JSON");
        /* in an unknown field too: the whole message must be valid UTF-8 */
        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), NULL, NULL);
        snprintf(json + strlen(json) - 1, sizeof(json) - strlen(json) + 1, ",\"x\":%s}", bad[i]);
        refused(json, "invalid JSON");
    }
    /* the reason quoted from jansson is made printable */
    {
        sp_event ev;
        char err[256];

        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "order_id", "\"\xff\x1b\"");
        assert_int_equal(decode_n(json, strlen(json), &ev, err, sizeof(err)), -1);
        for (const char *c = err; *c; c++) assert_true(*c >= 0x20 && *c <= 0x7e);
    }
}

static void test_invalid_order_ids(void **state) {
    static const char *bad_json[] = {
        "\"\"",    "\"a b\"",   "\"a\\\"b\"",  "\"caf\xc3\xa9\"", "\"caf\\u00e9\"",
        "\"a/b\"", "\"a\\tb\"", "\"a\\nb\"",   "\" o-1\"",        "\"o-1 \"",
        "\"a+b\"", "\"a:b\"",   "\"\\u2028\"", "\"a\\\\b\"",
    };
    static const char *bad_c[] = {"", "a b", "a\"b", "caf\xc3\xa9", "a/b", "a\tb", "o-1 ", "\xff"};
    char json[512], raw[80];
    sp_event ev;

    (void)state;
    for (size_t i = 0; i < sizeof(bad_json) / sizeof(bad_json[0]); i++) {
        build(json, sizeof(json), shape_of(SP_EV_ORDER_PAID), "order_id", bad_json[i]);
        refused(json, "field \"order_id\"");
        build(json, sizeof(json), shape_of(SP_EV_ORDER_VOIDED), "order_id", bad_json[i]);
        refused(json, "field \"order_id\"");
    }

    /* 64 bytes is fine, 65 is not */
    raw[0] = '"';
    memset(raw + 1, '7', 64);
    strcpy(raw + 65, "\"");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "order_id", raw);
    accepted(json, &ev);
    assert_int_equal(strlen(ev.order_id), 64);
    raw[65] = '7';
    strcpy(raw + 66, "\"");
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), "order_id", raw);
    refused(json, "field \"order_id\": must be 1..64 bytes");

    build(json, sizeof(json), shape_of(SP_EV_ORDER_EXPIRED), "order_id", "\"AZaz09._-\"");
    accepted(json, &ev);
    assert_string_equal(ev.order_id, "AZaz09._-");

    /* the validator itself */
    for (size_t i = 0; i < sizeof(bad_c) / sizeof(bad_c[0]); i++)
        assert_false(sp_order_id_valid(bad_c[i]));
    assert_false(sp_order_id_valid(NULL));
    assert_true(sp_order_id_valid("0"));
    assert_true(sp_order_id_valid("AZaz09._-"));
    memset(raw, 'k', 64);
    raw[64] = '\0';
    assert_true(sp_order_id_valid(raw));
    raw[64] = 'k';
    raw[65] = '\0';
    assert_false(sp_order_id_valid(raw));

    /* encode refuses them too */
    for (size_t i = 0; i < sizeof(bad_c) / sizeof(bad_c[0]); i++) {
        sp_event out = sample(SP_EV_ORDER_CREATED);

        strcpy(out.order_id, bad_c[i]);
        encode_refused(&out, "field \"order_id\"");
    }
}

static void test_unknown_fields_ignored(void **state) {
    char json[1024];
    sp_event ev, want = sample(SP_EV_ORDER_CREATED);

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_ORDER_CREATED), NULL, NULL);
    snprintf(json + strlen(json) - 1, sizeof(json) - strlen(json) + 1,
             ",\"channel\":\"app\",\"price\":19.99,\"tags\":[1,\"x\",null],"
             "\"meta\":{\"a\":{\"b\":[]}},\"flag\":false,\"none\":null,\"V\":2,\"\":0}");
    accepted(json, &ev);
    assert_event_equal(&ev, &want);

    /* fields of another type are ignored, not copied into the event */
    refused("{\"v\":1,\"type\":\"stock.add\",\"ts_ms\":1,\"sku_id\":1,\"stock\":5}",
            "field \"add\": missing");
    accepted("{\"v\":1,\"type\":\"order.paid\",\"ts_ms\":1,\"sku_id\":1,\"order_id\":\"p\","
             "\"user_id\":5,\"qty\":3,\"stock\":9,\"reason\":\"x\",\"expires_ms\":2}",
             &ev);
    assert_int_equal(ev.user_id, 0);
    assert_int_equal(ev.qty, 0);
    assert_int_equal(ev.stock, 0);
    assert_int_equal(ev.expires_ms, 0);
    assert_string_equal(ev.reason, "");
    /* ... even when they are out of range or of the wrong type for the type that has them */
    accepted("{\"v\":1,\"type\":\"stock.add\",\"ts_ms\":1,\"sku_id\":1,\"add\":1,"
             "\"qty\":\"lots\",\"order_id\":\"bad id\"}",
             &ev);
    assert_int_equal(ev.stock, 1);
}

/* stock.add's optional request_id: absent is empty; 1..64 printable bytes without blanks; encode
 * writes it only when set and checks the same rule. */
/* A stock.add of the shape above with "request_id": raw appended. */
static void with_request_id(char *out, size_t outlen, const char *raw) {
    int n = snprintf(out, outlen,
                     "{\"v\":1,\"type\":\"stock.add\",\"ts_ms\":1732240000000,\"sku_id\":1001,"
                     "\"add\":50,\"request_id\":%s}",
                     raw);
    assert_true(n > 0 && (size_t)n < outlen);
}

static void test_request_id(void **state) {
    char json[512], raw[200], buf[SP_EVENT_MAX], err[256];
    size_t len;
    sp_event ev;

    (void)state;
    build(json, sizeof(json), shape_of(SP_EV_STOCK_ADD), NULL, NULL);
    accepted(json, &ev);
    assert_string_equal(ev.request_id, "");
    with_request_id(json, sizeof(json), "\"restock:2026-12-03/a\"");
    accepted(json, &ev);
    assert_string_equal(ev.request_id, "restock:2026-12-03/a");
    encode_ok(&ev, buf, sizeof(buf));
    assert_string_equal(buf, "{\"v\":1,\"type\":\"stock.add\",\"ts_ms\":1732240000000,"
                             "\"sku_id\":1001,\"add\":50,\"request_id\":\"restock:2026-12-03/a\"}");

    raw[0] = '"';
    memset(raw + 1, 'k', 64);
    strcpy(raw + 65, "\"");
    with_request_id(json, sizeof(json), raw);
    accepted(json, &ev);
    assert_int_equal(strlen(ev.request_id), 64);
    raw[65] = 'k';
    strcpy(raw + 66, "\"");
    with_request_id(json, sizeof(json), raw);
    refused(json, "field \"request_id\": must be 1..64 bytes");
    with_request_id(json, sizeof(json), "\"\"");
    refused(json, "field \"request_id\"");
    with_request_id(json, sizeof(json), "\"has blank\"");
    refused(json, "field \"request_id\"");
    with_request_id(json, sizeof(json), "\"caf\xc3\xa9\"");
    refused(json, "field \"request_id\"");
    with_request_id(json, sizeof(json), "17");
    refused(json, "field \"request_id\": must be a string");

    ev = sample(SP_EV_STOCK_ADD);
    snprintf(ev.request_id, sizeof(ev.request_id), "tab\there");
    assert_int_equal(sp_event_encode(&ev, buf, sizeof(buf), &len, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "request_id"));
    assert_true(sp_request_id_valid("k"));
    assert_false(sp_request_id_valid(NULL));
}

static void test_reason(void **state) {
    const struct shape *sh = shape_of(SP_EV_ORDER_VOIDED);
    char json[512], raw[200];
    sp_event ev;

    (void)state;
    build(json, sizeof(json), sh, "reason", NULL);
    accepted(json, &ev);
    assert_string_equal(ev.reason, "");
    assert_int_equal(ev.qty, 3);
    build(json, sizeof(json), sh, "reason", "\"\"");
    accepted(json, &ev);
    assert_string_equal(ev.reason, "");
    build(json, sizeof(json), sh, "reason", "\"say \\\"hi\\\" \\\\ ~\"");
    accepted(json, &ev);
    assert_string_equal(ev.reason, "say \"hi\" \\ ~");

    raw[0] = '"';
    memset(raw + 1, 'r', 128);
    strcpy(raw + 129, "\"");
    build(json, sizeof(json), sh, "reason", raw);
    accepted(json, &ev);
    assert_int_equal(strlen(ev.reason), 128);
    raw[129] = 'r';
    strcpy(raw + 130, "\"");
    build(json, sizeof(json), sh, "reason", raw);
    refused(json, "field \"reason\": must be at most 128 bytes");

    build(json, sizeof(json), sh, "reason", "\"line\\nbreak\"");
    refused(json, "field \"reason\"");
    build(json, sizeof(json), sh, "reason", "\"tab\\there\"");
    refused(json, "field \"reason\"");
    build(json, sizeof(json), sh, "reason", "\"del\\u007f\"");
    refused(json, "field \"reason\"");
    build(json, sizeof(json), sh, "reason", "\"caf\xc3\xa9\"");
    refused(json, "field \"reason\"");
    build(json, sizeof(json), sh, "reason", "\"\\u00e9\"");
    refused(json, "field \"reason\"");

    /* encode checks the same rules */
    ev = sample(SP_EV_ORDER_VOIDED);
    strcpy(ev.reason, "two\nlines");
    encode_refused(&ev, "field \"reason\"");
    strcpy(ev.reason, "caf\xc3\xa9");
    encode_refused(&ev, "field \"reason\"");
    memset(ev.reason, 'r', sizeof(ev.reason)); /* no terminating NUL */
    encode_refused(&ev, "field \"reason\"");
}

static void test_encode_buffer_too_small(void **state) {
    sp_event ev = sample(SP_EV_ORDER_CREATED);
    char buf[SP_EVENT_MAX], small[SP_EVENT_MAX], err[256];
    size_t len, need = encode_ok(&ev, buf, sizeof(buf));

    (void)state;
    /* the NUL needs a byte too: need bytes of buffer are one short */
    for (size_t buflen = 0; buflen <= need; buflen++) {
        len = 777;
        memset(small, 'x', sizeof(small));
        err[0] = '\0';
        assert_int_equal(sp_event_encode(&ev, small, buflen, &len, err, sizeof(err)), -1);
        assert_int_equal(len, 777);
        assert_int_equal(small[0], 'x');
        assert_non_null(strstr(err, "buffer too small"));
    }
    len = 777;
    assert_int_equal(sp_event_encode(&ev, small, need + 1, &len, err, sizeof(err)), 0);
    assert_int_equal(len, need);
    assert_string_equal(small, buf);
}

static void test_encode_out_of_range(void **state) {
    sp_event ev;

    (void)state;
    ev = sample(SP_EV_NONE);
    encode_refused(&ev, "unknown event type");
    ev = sample(SP_EV_ORDER_PAID);
    ev.type = (sp_event_type)42;
    encode_refused(&ev, "unknown event type");

#define REFUSE(t, field, value, name)                                                              \
    do {                                                                                           \
        ev = sample(t);                                                                            \
        ev.field = (value);                                                                        \
        encode_refused(&ev, "field \"" name "\"");                                                 \
    } while (0)

    REFUSE(SP_EV_ORDER_PAID, ts_ms, -1, "ts_ms");
    REFUSE(SP_EV_ORDER_PAID, ts_ms, SP_TS_MAX + 1, "ts_ms");
    REFUSE(SP_EV_ORDER_PAID, sku_id, 0, "sku_id");
    REFUSE(SP_EV_ORDER_PAID, sku_id, SP_ID_MAX + 1, "sku_id");
    REFUSE(SP_EV_STOCK_SET, stock, -1, "stock");
    REFUSE(SP_EV_STOCK_SET, stock, SP_STOCK_MAX + 1, "stock");
    REFUSE(SP_EV_STOCK_SET, per_user_limit, -1, "per_user_limit");
    REFUSE(SP_EV_STOCK_SET, per_user_limit, SP_PER_USER_MAX + 1, "per_user_limit");
    REFUSE(SP_EV_STOCK_SET, pay_timeout_s, 0, "pay_timeout_s");
    REFUSE(SP_EV_STOCK_SET, pay_timeout_s, SP_PAY_TIMEOUT_MAX + 1, "pay_timeout_s");
    REFUSE(SP_EV_STOCK_ADD, stock, 0, "add");
    REFUSE(SP_EV_STOCK_ADD, stock, SP_STOCK_MAX + 1, "add");
    REFUSE(SP_EV_ORDER_CREATED, user_id, 0, "user_id");
    REFUSE(SP_EV_ORDER_CREATED, user_id, SP_ID_MAX + 1, "user_id");
    REFUSE(SP_EV_ORDER_CREATED, qty, 0, "qty");
    REFUSE(SP_EV_ORDER_CREATED, qty, SP_QTY_MAX + 1, "qty");
    REFUSE(SP_EV_ORDER_CREATED, expires_ms, INT64_C(1732240000000) - 1, "expires_ms");
    REFUSE(SP_EV_ORDER_CREATED, expires_ms, SP_TS_MAX + 1, "expires_ms");
    REFUSE(SP_EV_ORDER_VOIDED, user_id, -5, "user_id");
    REFUSE(SP_EV_ORDER_VOIDED, qty, -1, "qty");
#undef REFUSE

    ev = sample(SP_EV_ORDER_PAID);
    ev.order_id[0] = '\0';
    encode_refused(&ev, "field \"order_id\"");
    memset(ev.order_id, 'a', sizeof(ev.order_id)); /* 65 bytes, no terminating NUL */
    encode_refused(&ev, "field \"order_id\"");

    /* expires_ms == ts_ms is the edge that is allowed */
    {
        char buf[SP_EVENT_MAX];

        ev = sample(SP_EV_ORDER_CREATED);
        ev.expires_ms = ev.ts_ms;
        encode_ok(&ev, buf, sizeof(buf));
    }
}

static void test_small_errbuf(void **state) {
    sp_event ev;
    char err[8];
    char buf[SP_EVENT_MAX];
    size_t len;

    (void)state;
    memset(err, 'x', sizeof(err));
    assert_int_equal(sp_event_decode("{}", 2, &ev, err, sizeof(err)), -1);
    assert_int_equal(strlen(err), sizeof(err) - 1);
    assert_int_equal(sp_event_decode("{}", 2, &ev, NULL, 0), -1);
    assert_true(is_zero(&ev));
    ev = sample(SP_EV_NONE);
    assert_int_equal(sp_event_encode(&ev, buf, sizeof(buf), &len, NULL, 0), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_names),
        cmocka_unit_test(test_round_trip_every_type),
        cmocka_unit_test(test_round_trip_extremes),
        cmocka_unit_test(test_encode_exact_json),
        cmocka_unit_test(test_encode_matches_jansson),
        cmocka_unit_test(test_decode_example),
        cmocka_unit_test(test_every_shape_decodes),
        cmocka_unit_test(test_field_missing),
        cmocka_unit_test(test_field_wrong_type),
        cmocka_unit_test(test_integer_message),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_unknown_type),
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_not_an_object),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_trailing_garbage),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_empty_input),
        cmocka_unit_test(test_huge_input),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_embedded_nul),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_invalid_order_ids),
        cmocka_unit_test(test_unknown_fields_ignored),
        cmocka_unit_test(test_reason),
        cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_encode_buffer_too_small),
        cmocka_unit_test(test_stock_set_shards),
        cmocka_unit_test(test_encode_out_of_range),
        cmocka_unit_test(test_small_errbuf),
    };

    return cmocka_run_group_tests_name("event", tests, NULL, NULL);
}
