/* integration_recovering.c - what buyers hear while Redis has lost a sale (issue 20), against
 * the real stack.
 *
 * A sale a reconcile has paused (stock 0, `paused` = its token, as the reaper's pause leaves it)
 * answers POST /v1/orders 503 "recovering" with Retry-After: 1 and changes nothing in Redis (no
 * stock, no user's count, no reservation, the Idempotency-Key not pinned). Once the rebuild
 * reopens the sale, an order without a key is taken at once (the producer's local sold-out flag
 * was not set) and the key's retry gets 202. Before, the paused sale answered 409 sold_out, set
 * the flag for 200 ms, and pinned the key's sold_out for IDEM_REFUSAL_TTL_S.
 *
 * A sale whose keys Redis lost answers 503 "recovering" while the reaper's rebuilt key
 * (SP_STOCK_REBUILT_KEY, written after a complete reconcile) is missing too, and 404 unknown_sku
 * once it is there. Before, it answered 404 unknown_sku at once.
 *
 * GET /v1/skus/{id} says "recovering":true (and "available":null) in both cases, PostgreSQL
 * having the SKU; false for an open sale.
 *
 * Each primary keeps its own rebuilt key (a cluster's primaries lose data one at a time): one
 * primary that lost a sale and its key answers recovering for its own SKUs only, while a SKU never
 * opened on another primary is still unknown (404).
 *
 * The rebuilt keys are the stack's: their values are saved first and put back (or the keys
 * deleted) at the end; no reaper runs here, so nothing else writes them meanwhile. The run has its
 * own topics, consumer group and PostgreSQL database and fresh SKU ids; it runs
 * bin/{producer,consumer}, or their bin/asan/ builds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event.h"
#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "redis_store.h"
#include "stock.h"
#include "itest.h"

#define WAIT_S        120
#define PARTITIONS    2
#define NTESTS        4
#define PRIMARIES_MAX 16 /* the test keeps that many primaries' rebuilt keys */
#define SPAN_FIRST    10 /* the per-primary test's SKUs start at g.sku_base + SPAN_FIRST */
#define ADMIN         "test-admin-token"
#define PAUSE         "test-recovering-pause" /* the token of the test's own "reconcile" */
#define RECOVERING    "stockpipe_producer_requests_total{outcome=\"recovering\"}"

static char tag[32];

static struct {
    char tmp[128];
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku_base;
    proc producer, consumer;
    int npassed;
    int rebuilt_saved; /* every primary's rebuilt key is kept in rebuilt until put back */
    int nprimaries;
    int rebuilt_had[PRIMARIES_MAX]; /* 0: the key was absent */
    char rebuilt[PRIMARIES_MAX][128];
    int64_t span; /* SKUs g.sku_base + SPAN_FIRST ... looked at by the per-primary test */
} g;

static itest_stack stack = {
    .dir = g.tmp, .tag = tag, .dsn = g.dsn, .topic = g.topic, .dlq = g.dlq, .group = g.group};

static void test_start_the_workers(void **state) {
    (void)state;
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "KAFKA_MESSAGE_TIMEOUT_MS=5000", NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the %d partitions", PARTITIONS);
    g.npassed++;
}

/* One request to the producer (itest.h's http_raw), split into its parts: the
 * status (0 when there was no answer), the body in body, the Retry-After value (or "") in
 * retry_after. */
static int request(const char *method, const char *path, const char *token, const char *idem,
                   const char *payload, char *body, size_t cap, char *retry_after, size_t racap) {
    char resp[8192];
    body[0] = retry_after[0] = '\0';
    int code = http_raw(g.producer.port, method, path, token, idem, payload, resp, sizeof(resp));
    char *end = strstr(resp, "\r\n\r\n");
    if (code == 0 || end == NULL) return 0;
    snprintf(body, cap, "%s", end + 4);
    *end = '\0';
    const char *h = strcasestr(resp, "\r\nRetry-After:");
    if (h) {
        h += strlen("\r\nRetry-After:");
        h += strspn(h, " ");
        snprintf(retry_after, racap, "%.*s", (int)strcspn(h, "\r\n"), h);
    }
    return code;
}

/* POST /v1/orders of one unit by user, with Idempotency-Key idem (NULL: none). */
static int order(int64_t sku, int64_t user, const char *idem, char *body, size_t cap,
                 char *retry_after, size_t racap) {
    char payload[200];
    snprintf(payload, sizeof(payload), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":1}",
             user, sku);
    return request("POST", "/v1/orders", NULL, idem, payload, body, cap, retry_after, racap);
}

/* The order is refused with 503 recovering and Retry-After: 1. */
static void expect_recovering(int64_t sku, int64_t user, const char *idem, const char *when) {
    char body[1024], ra[32];
    int code = order(sku, user, idem, body, sizeof(body), ra, sizeof(ra));
    if (code != 503 || strstr(body, "\"error\":\"recovering\"") == NULL || strcmp(ra, "1") != 0)
        fail_msg("%s: order of user %" PRId64 " answered %d %s (Retry-After \"%s\"); want 503 "
                 "recovering with Retry-After: 1",
                 when, user, code, body, ra);
}

static void expect_order(int64_t sku, int64_t user, const char *idem, int want, const char *word,
                         const char *when) {
    char body[1024], ra[32];
    int code = order(sku, user, idem, body, sizeof(body), ra, sizeof(ra));
    if (code != want || strstr(body, word) == NULL)
        fail_msg("%s: order of user %" PRId64 " answered %d %s; want %d %s", when, user, code, body,
                 want, word);
}

/* GET /v1/skus/{sku} answers 200 with every one of the fragments (NULL-terminated). */
static void expect_sku(int64_t sku, const char *const *fragments, const char *when) {
    char path[64], body[1024], ra[32];
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64, sku);
    int code = request("GET", path, NULL, NULL, NULL, body, sizeof(body), ra, sizeof(ra));
    for (int i = 0; code == 200 && fragments[i]; i++)
        if (strstr(body, fragments[i]) == NULL) code = -1;
    if (code != 200)
        fail_msg("%s: GET %s answered %s; want 200 with the fragments", when, path, body);
}

/* Opens a sale of stock units (per_user_limit 1) and waits until PostgreSQL has it. */
static void open_sale(int64_t sku, int stock) {
    char payload[200], body[512], ra[32], text[24];
    snprintf(payload, sizeof(payload),
             "{\"sku_id\":%" PRId64 ",\"stock\":%d,\"per_user_limit\":1,\"pay_timeout_s\":600}",
             sku, stock);
    int code = request("POST", "/v1/skus", ADMIN, NULL, payload, body, sizeof(body), ra,
                       sizeof(ra));
    if (code != 201) fail_msg("open of sku %" PRId64 ": %d %s", sku, code, body);
    snprintf(text, sizeof(text), "%" PRId64, sku);
    const char *params[] = {text};
    WAIT_FOR(query_int(g.dsn, "SELECT count(*) FROM inventory WHERE sku_id = $1::bigint", 1,
                       params) == 1,
             "sku %" PRId64 " never reached PostgreSQL", sku);
}

static long long redis_int(sp_redis *rc, const char *fmt, int64_t sku) {
    redisReply *r = sp_redis_command(rc, NULL, itest_err, sizeof(itest_err), fmt, (long long)sku);
    if (r == NULL || r->type != REDIS_REPLY_INTEGER) fail_msg("%s: no integer reply", fmt);
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

static void test_paused_sale_answers_recovering(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 1;
    char err[256];
    open_sale(sku, 5);
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    int64_t before = metric(g.producer.port, RECOVERING);
    if (sp_stock_reconcile_pause(rc, sku, PAUSE, 1, 600, 5, err, sizeof(err)) != 0)
        fail_msg("pause: %s", err);
    expect_recovering(sku, 1, "buy-once", "a paused sale, with a key");
    /* Nothing changed in Redis, and the key is not pinned. */
    assert_int_equal(sale_hget_int(rc, sku, "sale", "stock"), 0);
    assert_string_equal(sale_hget_str(rc, sku, "sale", "paused"), PAUSE);
    assert_int_equal(redis_int(rc, "HLEN {sku:%lld}:users", sku), 0);
    assert_int_equal(redis_int(rc, "HLEN {sku:%lld}:resv", sku), 0);
    assert_int_equal(redis_int(rc, "EXISTS {sku:%lld}:idem:1:buy-once", sku), 0);
    expect_sku(sku, (const char *[]){"\"available\":null", "\"recovering\":true", NULL},
               "a paused sale");
    /* The last answer before the reopen has no key: a producer that set its local sold-out flag
     * from it would answer the next order 409 for 200 ms. */
    expect_recovering(sku, 2, NULL, "a paused sale, without a key");
    assert_true(metric(g.producer.port, RECOVERING) >= (before < 0 ? 0 : before) + 2);
    /* The rebuild reopens the sale (what reconcile_apply/reconcile_open leave: the stock, no
     * pause), in one round trip. */
    char sale_key[SP_STOCK_KEY_MAX];
    sp_stock_key(sale_key, sku, "sale");
    const char *reopen[][4] = {{"HSET", sale_key, "stock", "5"}, {"HDEL", sale_key, "paused"}};
    sp_redis_cmd cmds[] = {{.key = sale_key, .argc = 4, .argv = reopen[0]},
                           {.key = sale_key, .argc = 3, .argv = reopen[1]}};
    redisReply *replies[2];
    if (sp_redis_pipeline(rc, 2, cmds, replies, itest_err, sizeof(itest_err)) != 0)
        fail_msg("reopen: %s", itest_err);
    for (int i = 0; i < 2; i++) freeReplyObject(replies[i]);
    expect_order(sku, 3, NULL, 202, "accepted", "right after the reopen, without a key");
    expect_order(sku, 1, "buy-once", 202, "accepted", "the key's retry after the reopen");
    expect_sku(sku, (const char *[]){"\"available\":3", "\"recovering\":false", NULL},
               "the reopened sale");
    assert_int_equal(sale_hget_int(rc, sku, "users", "1"), 1);
    sp_redis_close(rc);
    g.npassed++;
}

/* The rebuilt key primary i keeps (the reaper writes one on each, sp_redis_key_on). */
static int rebuilt_key(sp_redis *rc, int i, char *key, size_t cap) {
    return sp_redis_key_on(rc, i, SP_STOCK_REBUILT_KEY, key, cap, itest_err, sizeof(itest_err));
}

/* Sets (value not NULL) or deletes the rebuilt key of primary only (-1: of every primary). */
static void rebuilt_set(sp_redis *rc, int only, const char *value) {
    for (int i = 0, n = sp_redis_primaries(rc); i < n; i++) {
        char key[SP_STOCK_KEY_MAX];
        if (only >= 0 && i != only) continue;
        if (rebuilt_key(rc, i, key, sizeof(key)) != 0) fail_msg("rebuilt key: %s", itest_err);
        redisReply *r = value ? sp_redis_command(rc, key, itest_err, sizeof(itest_err), "SET %s %s",
                                                 key, value)
                              : sp_redis_command(rc, key, itest_err, sizeof(itest_err), "DEL %s",
                                                 key);
        if (r == NULL || r->type == REDIS_REPLY_ERROR)
            fail_msg("rebuilt key %s: %s", key, r ? r->str : itest_err);
        freeReplyObject(r);
    }
}

/* Keeps every primary's rebuilt key as it is before a test changes them (once per run). */
static void rebuilt_save(sp_redis *rc) {
    if (g.rebuilt_saved) return;
    g.nprimaries = sp_redis_primaries(rc);
    if (g.nprimaries < 1 || g.nprimaries > PRIMARIES_MAX)
        fail_msg("%d primaries; the test keeps the rebuilt keys of 1 to %d", g.nprimaries,
                 PRIMARIES_MAX);
    for (int i = 0; i < g.nprimaries; i++) {
        char key[SP_STOCK_KEY_MAX];
        if (rebuilt_key(rc, i, key, sizeof(key)) != 0) fail_msg("rebuilt key: %s", itest_err);
        redisReply *r = sp_redis_command(rc, key, itest_err, sizeof(itest_err), "GET %s", key);
        if (r == NULL) fail_msg("GET %s: %s", key, itest_err);
        g.rebuilt_had[i] = r->type == REDIS_REPLY_STRING;
        if (g.rebuilt_had[i]) snprintf(g.rebuilt[i], sizeof(g.rebuilt[i]), "%s", r->str);
        freeReplyObject(r);
    }
    g.rebuilt_saved = 1;
}

/* Puts the rebuilt keys back as they were before the tests (for teardown too: reports, never
 * fails). */
static void rebuilt_restore(void) {
    if (!g.rebuilt_saved) return;
    sp_redis *rc = redis_connect_env();
    if (rc == NULL) return;
    int ok = sp_redis_primaries(rc) == g.nprimaries;
    for (int i = 0; ok && i < g.nprimaries; i++) {
        char key[SP_STOCK_KEY_MAX];
        redisReply *r = NULL;
        if (rebuilt_key(rc, i, key, sizeof(key)) == 0)
            r = g.rebuilt_had[i]
                    ? sp_redis_command(rc, key, itest_err, sizeof(itest_err), "SET %s %s", key,
                                       g.rebuilt[i])
                    : sp_redis_command(rc, key, itest_err, sizeof(itest_err), "DEL %s", key);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "the rebuilt key of primary %d was not put back: %s\n", i,
                    r ? r->str : itest_err);
            ok = 0;
        }
        freeReplyObject(r);
    }
    if (ok) g.rebuilt_saved = 0;
    sp_redis_close(rc);
}

static void test_lost_sale_recovering_until_rebuilt(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 2, never = g.sku_base + 3;
    open_sale(sku, 5);
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    rebuilt_save(rc);
    /* Redis lost the sale, and with it the reaper's rebuilt key. */
    redisReply *r = sp_redis_command(rc, NULL, itest_err, sizeof(itest_err),
                                     "DEL {sku:%lld}:sale {sku:%lld}:users {sku:%lld}:resv",
                                     (long long)sku, (long long)sku, (long long)sku);
    assert_true(r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer >= 1);
    freeReplyObject(r);
    rebuilt_set(rc, -1, NULL);
    expect_recovering(sku, 1, "lost-key", "a lost sale, no rebuilt key");
    expect_recovering(never, 1, NULL, "a SKU never opened, no rebuilt key (cannot be told apart)");
    assert_int_equal(redis_int(rc, "EXISTS {sku:%lld}:idem:1:lost-key", sku), 0);
    assert_int_equal(redis_int(rc, "EXISTS {sku:%lld}:sale", sku), 0);
    expect_sku(sku, (const char *[]){"\"available\":null", "\"recovering\":true", NULL},
               "a lost sale, no rebuilt key");
    /* Every sale rebuilt: the rebuilt key is back, and a SKU still missing is unknown. */
    rebuilt_set(rc, -1, "test-recovering-rebuilt");
    expect_order(sku, 1, "lost-key", 404, "unknown_sku", "a missing sale with the rebuilt key");
    expect_order(never, 1, NULL, 404, "unknown_sku", "a SKU never opened with the rebuilt key");
    expect_sku(sku, (const char *[]){"\"available\":null", "\"recovering\":true", NULL},
               "a sale PostgreSQL has and Redis not");
    char path[64], body[512], ra[32];
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64, never);
    int code = request("GET", path, NULL, NULL, NULL, body, sizeof(body), ra, sizeof(ra));
    if (code != 404 || strstr(body, "unknown_sku") == NULL)
        fail_msg("GET %s: %d %s; want 404 unknown_sku", path, code, body);
    sp_redis_close(rc);
    rebuilt_restore();
    assert_int_equal(g.rebuilt_saved, 0);
    g.npassed++;
}

/* The SKU after from whose sale lives on primary i (one server: every SKU). */
static int64_t sku_on_primary(sp_redis *rc, int i, int64_t from) {
    char key[SP_STOCK_KEY_MAX];
    for (int64_t sku = from + 1; sku < from + 100000; sku++) {
        sp_stock_key(key, sku, "sale");
        if (sp_redis_primary_of(rc, key) == i) {
            if (sku - g.sku_base + 1 > g.span) g.span = sku - g.sku_base + 1;
            return sku;
        }
    }
    fail_msg("no SKU after %" PRId64 " lives on primary %d", from, i);
    return -1;
}

/* A cluster's primaries lose data one at a time (a failover with lost writes, a restart without
 * its disk): the one that lost a sale lost its own rebuilt key with it, and the others keep
 * theirs. An order for the lost sale answers 503 recovering, and so does a SKU never opened on
 * that primary (they cannot be told apart), while a SKU never opened on any other primary still
 * answers 404 unknown_sku; once that primary's key is back, the missing sale is unknown. Before,
 * one rebuilt key lived on one primary: a sale another primary had lost answered 404 until a
 * reaper noticed the loss. Each primary loses its data in turn; one server is the case of one. */
static void test_primary_lost_recovering_on_its_own(void **state) {
    (void)state;
    int64_t lost[PRIMARIES_MAX], never[PRIMARIES_MAX];
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    rebuilt_save(rc);
    int n = g.nprimaries;
    rebuilt_set(rc, -1, "test-recovering-rebuilt");
    for (int i = 0; i < n; i++) {
        lost[i] = sku_on_primary(rc, i, g.sku_base + SPAN_FIRST - 1);
        never[i] = sku_on_primary(rc, i, lost[i]);
        open_sale(lost[i], 5);
    }
    for (int i = 0; i < n; i++) {
        /* Primary i lost its data: the sale and its rebuilt key. */
        redisReply *r = sp_redis_command(rc, NULL, itest_err, sizeof(itest_err),
                                         "DEL {sku:%lld}:sale {sku:%lld}:users", (long long)lost[i],
                                         (long long)lost[i]);
        assert_true(r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer >= 1);
        freeReplyObject(r);
        rebuilt_set(rc, i, NULL);
        expect_recovering(lost[i], 1, NULL, "a sale lost with its primary's data");
        expect_recovering(never[i], 1, NULL, "a SKU never opened on the primary that lost data");
        for (int j = 0; j < n; j++)
            if (j != i)
                expect_order(never[j], 1, NULL, 404, "unknown_sku",
                             "a SKU never opened on a primary that kept its data");
        rebuilt_set(rc, i, "test-recovering-rebuilt");
        expect_order(lost[i], 1, NULL, 404, "unknown_sku",
                     "the lost sale once its primary's rebuilt key is back");
    }
    print_message("    %d primar%s, each lost its data in turn: only its own sales answered "
                  "recovering\n",
                  n, n == 1 ? "y" : "ies");
    sp_redis_close(rc);
    rebuilt_restore();
    assert_int_equal(g.rebuilt_saved, 0);
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", "REDIS_URL", NULL};
    if (begin_run("recovering", INT64_C(840000000000), env, tag, sizeof(tag), &g.sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    snprintf(g.db, sizeof(g.db), "sp_test_recovering_%s", tag);
    stack.redis_url = getenv("REDIS_URL");
    name_topics("recovering", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    rebuilt_restore();
    proc *all[] = {&g.producer, &g.consumer};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    forget_skus(g.sku_base + 1, 3);
    if (g.span > 0) forget_skus(g.sku_base + SPAN_FIRST, (int)(g.span - SPAN_FIRST));
    sp_redis *rc = redis_connect_env();
    if (rc) { /* the keys the tests used, not forget_skus()'s */
        freeReplyObject(
            sp_redis_command(rc, NULL, itest_err, sizeof(itest_err),
                             "DEL {sku:%lld}:idem:1:buy-once {sku:%lld}:idem:1:lost-key",
                             (long long)(g.sku_base + 1), (long long)(g.sku_base + 2)));
        sp_redis_close(rc);
    }
    if (g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean && !g.rebuilt_saved ? 0 : -1;
}

int main(void) {
    sp_log_init("test-recovering", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_workers),
        cmocka_unit_test(test_paused_sale_answers_recovering),
        cmocka_unit_test(test_lost_sale_recovering_until_rebuilt),
        cmocka_unit_test(test_primary_lost_recovering_on_its_own),
    };
    return cmocka_run_group_tests_name("recovering", tests, group_setup, group_teardown);
}
