/* integration_stranded.c - an accepted order whose event the log lost (issue 15, hole 6).
 *
 * The consumer is stopped, an order is answered 202 (its units held by Redis's accepted entry),
 * and its event is deleted from the log (DeleteRecords, as retention or a lost broker disk would)
 * before the consumer reads it. The consumer comes back, finds the offset deleted and goes on
 * with the next event. The order never reaches PostgreSQL. After ACCEPTED_LOST_AFTER_MS the
 * reaper sees that the consumer has passed the order's offset (kept in the accepted entry by
 * confirm.lua), voids the order and gives its units back: Redis's stock equals PostgreSQL's again.
 * Before, the accepted entry was kept forever and held its units: Redis stayed 3 units short.
 *
 * The run has its own topics (one partition), consumer group and PostgreSQL database, fresh SKU
 * ids on the stack's Redis; it runs bin/{producer,consumer,reaper} or their bin/asan/ builds. */
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
#define PARTITIONS 1
#define NTESTS     2
#define ADMIN      "test-admin-token"

static char tag[32];

static struct {
    char tmp[128];
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku;
    proc producer, consumer, reaper;
    int npassed;
} g;

static itest_stack stack = {
    .dir = g.tmp, .tag = tag, .dsn = g.dsn, .topic = g.topic, .dlq = g.dlq, .group = g.group};

static const char *const consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};

static void test_start_the_workers(void **state) {
    (void)state;
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "KAFKA_MESSAGE_TIMEOUT_MS=2000", NULL};
    const char *reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=2000",
                                     "RESV_LOST_AFTER_MS=4000",
                                     "ACCEPTED_STALE_AFTER_MS=2000",
                                     "ACCEPTED_LOST_AFTER_MS=3000",
                                     "RESV_SWEEP_INTERVAL_MS=300",
                                     "REAPER_INTERVAL_MS=200",
                                     NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reaper = start(&stack, BIN "reaper", "reaper", reaper_settings, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_ready(&g.reaper, WAIT_S);
    wait_reconciled(&g.reaper, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the partition");
    g.npassed++;
}

static int order(int64_t user, int qty) {
    char body[200], resp[512];
    snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":%d}",
             user, g.sku, qty);
    return http(g.producer.port, "POST", "/v1/orders", NULL, NULL, body, resp, sizeof(resp));
}

static int64_t pg_int(const char *sql) {
    char sku[24];
    snprintf(sku, sizeof(sku), "%" PRId64, g.sku);
    const char *params[] = {sku};
    return query_int(g.dsn, sql, 1, params);
}

static void test_accepted_order_lost_from_the_log(void **state) {
    (void)state;
    char body[200], resp[512];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":10,\"per_user_limit\":0,\"pay_timeout_s\":600}",
             g.sku);
    int code = http(g.producer.port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open: %d %s", code, resp);
    WAIT_FOR(pg_int("SELECT count(*) FROM inventory WHERE sku_id = $1::bigint") == 1,
             "the sale never reached PostgreSQL");
    /* The consumer away; the order accepted; its event deleted before anyone read it. */
    stop(&g.consumer);
    if ((code = order(1, 3)) != 202) fail_msg("order: %d", code);
    int64_t end = topic_end(g.topic, PARTITIONS);
    delete_records_before(g.topic, 0, end);
    /* The consumer back; the next order's event moves it past the deleted offset. */
    g.consumer = start(&stack, BIN "consumer", "consumer-again", consumer_settings, NULL);
    wait_ready(&g.consumer, WAIT_S);
    if ((code = order(2, 1)) != 202) fail_msg("second order: %d", code);
    WAIT_FOR(pg_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = "
                    "'pending'") == 1,
             "the second order never reached PostgreSQL");
    /* The lost order is voided once ACCEPTED_LOST_AFTER_MS has passed, its 3 units back. */
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    WAIT_FOR(sale_hget_int(rc, g.sku, "sale", "stock") == 9 &&
                 pg_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint") == 9,
             "Redis's stock is %" PRId64 ", PostgreSQL's %" PRId64 " (want 9 in both)",
             sale_hget_int(rc, g.sku, "sale", "stock"),
             pg_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint"));
    assert_int_equal(sale_hget_int(rc, g.sku, "users", "1"), -1);
    assert_int_equal(pg_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = "
                            "'cancelled'"),
                     1);
    assert_true(metric(g.reaper.port, "stockpipe_reaper_accepted_gone_total") == 1);
    sp_redis_close(rc);
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", "REDIS_URL", NULL};
    int64_t sku_base;
    if (begin_run("stranded", INT64_C(830000000000), env, tag, sizeof(tag), &sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    g.sku = sku_base + 1;
    snprintf(g.db, sizeof(g.db), "sp_test_stranded_%s", tag);
    stack.redis_url = getenv("REDIS_URL");
    name_topics("stranded", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    proc *all[] = {&g.producer, &g.consumer, &g.reaper};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    forget_skus(g.sku, 1);
    if (g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-stranded", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_workers),
        cmocka_unit_test(test_accepted_order_lost_from_the_log),
    };
    return cmocka_run_group_tests_name("stranded", tests, group_setup, group_teardown);
}
