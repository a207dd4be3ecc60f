/* integration_idempotency.c - what an Idempotency-Key answers, and for how long, against the real
 * stack (issue 15, hole 5).
 *
 * A producer killed after Kafka acknowledged an order and before its confirm leaves the buyer's
 * key saying "pending": a retry hears 409 in_progress. Once the order is in PostgreSQL the reaper's
 * sweep settles the key, and the retry is answered 202 with the first order's id. Before, the key
 * stayed pending for its whole TTL (24 h) though the order existed.
 *
 * A refusal (sold_out, limit_exceeded) is pinned for IDEM_REFUSAL_TTL_S only: a buyer retrying
 * with the same key after a restock gets a unit once that has passed. Before, every refusal was
 * pinned for 24 h.
 *
 * The run has its own topics, consumer group and PostgreSQL database and fresh SKU ids on the
 * stack's Redis; it runs bin/test/producer (the test build with fault points) beside
 * bin/{producer,consumer,reaper}, or their bin/asan/ builds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <signal.h>
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

#define WAIT_S     120
#define SETTLE_S   30 /* RESV_LOST_AFTER_MS and a few sweeps, with room for a loaded machine */
#define PARTITIONS 2
#define NTESTS     3
#define ADMIN      "test-admin-token"

static char tag[32];

static struct {
    char tmp[128];
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku_base;
    proc producer, dying, consumer, reaper;
    int npassed;
} g;

static itest_stack stack = {
    .dir = g.tmp, .tag = tag, .dsn = g.dsn, .topic = g.topic, .dlq = g.dlq, .group = g.group};

static void test_start_the_workers(void **state) {
    (void)state;
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "KAFKA_MESSAGE_TIMEOUT_MS=2000",
                                       "IDEM_REFUSAL_TTL_S=1", NULL};
    const char *dying_settings[] = {"ADMIN_TOKEN=" ADMIN, "KAFKA_MESSAGE_TIMEOUT_MS=2000",
                                    "SP_FAULT_DIE_AFTER_ACK=1", NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    const char *reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=2000", "RESV_LOST_AFTER_MS=4000",
                                     "RESV_SWEEP_INTERVAL_MS=300", "REAPER_INTERVAL_MS=200", NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.dying = start(&stack, BIN "test/producer", "producer-dies-after-ack", dying_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reaper = start(&stack, BIN "reaper", "reaper", reaper_settings, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.dying, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_ready(&g.reaper, WAIT_S);
    wait_reconciled(&g.reaper, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the %d partitions", PARTITIONS);
    g.npassed++;
}

static void admin(const char *path, const char *body, int want) {
    char resp[512];
    int code = http(g.producer.port, "POST", path, ADMIN, NULL, body, resp, sizeof(resp));
    if (code != want) fail_msg("POST %s %s: %d %s (want %d)", path, body, code, resp, want);
}

static void open_sale(int64_t sku, int stock) {
    char body[200];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":%d,\"per_user_limit\":1,\"pay_timeout_s\":600}",
             sku, stock);
    admin("/v1/skus", body, 201);
}

/* POST /v1/orders of one unit to port, with Idempotency-Key idem; the status, the body in resp. */
static int order(int port, int64_t sku, int64_t user, const char *idem, char *resp, size_t cap) {
    char body[200];
    snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":1}", user,
             sku);
    return http(port, "POST", "/v1/orders", NULL, idem, body, resp, cap);
}

static void test_pending_key_settled_once_stored(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 1, user = 4242;
    char resp[1024], first[SP_ORDER_ID_MAX + 1], again[SP_ORDER_ID_MAX + 1];
    open_sale(sku, 10);
    /* Kafka takes the order; the producer dies before answering. */
    int code = order(g.dying.port, sku, user, "retry-me", resp, sizeof(resp));
    if (code != 0) fail_msg("the dying producer answered %d %s", code, resp);
    assert_int_equal(wait_exit(g.dying.pid, 30), 128 + SIGKILL);
    g.dying.pid = 0;
    /* The retry on a live producer: the key names the order, in progress until the consumer
     * has stored it (a quick consumer may have done so already: then it is accepted at once). */
    code = order(g.producer.port, sku, user, "retry-me", resp, sizeof(resp));
    if (!(code == 409 && strstr(resp, "in_progress")) && code != 202)
        fail_msg("retry right after the crash: %d %s (want 409 in_progress or 202)", code, resp);
    json_order_id(resp, first, sizeof(first));
    const char *params[] = {first};
    WAIT_FOR(query_int(g.dsn, "SELECT count(*) FROM orders WHERE order_id = $1", 1, params) == 1,
             "order %s never reached PostgreSQL", first);
    /* Then the key settles: the retry is the first order, accepted. */
    int64_t deadline = sp_clock_mono_ms() + SETTLE_S * 1000;
    do {
        code = order(g.producer.port, sku, user, "retry-me", resp, sizeof(resp));
        if (code == 202) break;
        sleep_ms(500);
    } while (sp_clock_mono_ms() < deadline);
    if (code != 202)
        fail_msg("%d s after order %s was stored its key still answers %d %s", SETTLE_S, first,
                 code, resp);
    json_order_id(resp, again, sizeof(again));
    assert_string_equal(again, first);
    /* One order, one unit, in both stores. */
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    char sku_text[24];
    snprintf(sku_text, sizeof(sku_text), "%" PRId64, sku);
    const char *sku_param[] = {sku_text};
    assert_int_equal(
        query_int(g.dsn, "SELECT count(*) FROM orders WHERE sku_id = $1::bigint", 1, sku_param), 1);
    WAIT_FOR(query_int(g.dsn, "SELECT stock FROM inventory WHERE sku_id = $1::bigint", 1,
                       sku_param) == 9,
             "PostgreSQL's stock is not 9");
    assert_int_equal(sale_hget_int(rc, sku, "sale", "stock"), 9);
    assert_string_equal(sale_hget_str(rc, sku, "resv", first), "(nil)");
    sp_redis_close(rc);
    g.npassed++;
}

static void test_refusal_pinned_for_its_ttl(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 2;
    char resp[1024], path[96];
    open_sale(sku, 1);
    int code = order(g.producer.port, sku, 1, NULL, resp, sizeof(resp));
    if (code != 202) fail_msg("first order: %d %s", code, resp);
    code = order(g.producer.port, sku, 2, "after-restock", resp, sizeof(resp));
    if (code != 409 || strstr(resp, "sold_out") == NULL) fail_msg("sold out: %d %s", code, resp);
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64 "/restock", sku);
    admin(path, "{\"add\":1}", 200);
    /* Within IDEM_REFUSAL_TTL_S (1 s) the key still answers its refusal... */
    code = order(g.producer.port, sku, 2, "after-restock", resp, sizeof(resp));
    if (code != 409 || strstr(resp, "sold_out") == NULL)
        fail_msg("retry within the refusal's TTL: %d %s", code, resp);
    /* ...and after it the retry is decided afresh: the restocked unit. */
    sleep_ms(1500);
    code = order(g.producer.port, sku, 2, "after-restock", resp, sizeof(resp));
    if (code != 202) fail_msg("retry after the refusal's TTL: %d %s (want 202)", code, resp);
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", "REDIS_URL", NULL};
    if (begin_run("idem", INT64_C(820000000000), env, tag, sizeof(tag), &g.sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    snprintf(g.db, sizeof(g.db), "sp_test_idem_%s", tag);
    stack.redis_url = getenv("REDIS_URL");
    name_topics("idem", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    proc *all[] = {&g.producer, &g.dying, &g.consumer, &g.reaper};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    forget_skus(g.sku_base + 1, 2);
    if (g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-idempotency", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_workers),
        cmocka_unit_test(test_pending_key_settled_once_stored),
        cmocka_unit_test(test_refusal_pinned_for_its_ttl),
    };
    return cmocka_run_group_tests_name("idempotency", tests, group_setup, group_teardown);
}
