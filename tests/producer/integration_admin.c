/* integration_admin.c - the calls that need a token (admin, payment) against the real stack.
 *
 * Racing opens (issue 15, hole 3): one SKU opened at the same instant through two producers with
 * different stock. Exactly one answer is 201 and the other 409, and the loser leaves no trace: the
 * log holds one stock.set, and Redis and PostgreSQL both hold the winner's stock. Before, both
 * producers saw "no sale" (EXISTS), both published, and PostgreSQL kept whichever stock.set came
 * first in the log while Redis kept whichever script ran first.
 *
 * Payments (issue 15, hole 9): a payment names its order and units. An unknown order is 404 and
 * other units than the order's 409 qty_mismatch, neither publishing anything; an open order is
 * 202; an order closed before the payment (expired) is 409 order_closed, and the payment is still
 * recorded (refund_due). Before, every well-formed id was answered 202.
 *
 * Restocks (issue 15, hole 2): a restock publishes its stock.add, then adds the units in Redis.
 * With Redis's writes paused in between (CLIENT PAUSE WRITE, longer than the producer waits for a
 * reply), the call answers 503 though the event is logged. A retry with the same Idempotency-Key
 * answers 200 and adds nothing more, in either store; and without a retry, the reaper gives Redis
 * the restock it missed. Before, the retry restocked PostgreSQL twice (stock 20 for a sale of 10
 * restocked by 5) and Redis stayed at 15; without the retry Redis stayed at 10 for good. A sale
 * Redis lost and a reconcile rebuilt from PostgreSQL counts the restock once: a retry with its key
 * afterwards adds nothing (the rebuild marks the request ids it counted).
 *
 * The run has its own topics, consumer group and PostgreSQL database (created and migrated here,
 * dropped at the end) and fresh SKU ids on the stack's Redis. It runs bin/{producer,consumer}, or
 * bin/asan/... when built with AddressSanitizer. Needs var/stack.env loaded and the repository root
 * as the working directory (tests/run-all.sh). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <pthread.h>
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

#define WAIT_S     120 /* generous: a shared, loaded machine; ASan builds */
#define PARTITIONS 2
#define NTESTS     6
#define ADMIN      "test-admin-token"
#define PAYMENT    "test-payment-token"
#define RACES      12 /* racing pairs of opens, one SKU each */

static char tag[32]; /* unique per run: pid and time */

static struct {
    char tmp[128]; /* logs */
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku_base;
    proc producers[2], consumer, reaper;
    int npassed;
} g;

static itest_stack stack = {
    .dir = g.tmp, .tag = tag, .dsn = g.dsn, .topic = g.topic, .dlq = g.dlq, .group = g.group};

static int64_t value(const char *sql, int64_t sku) {
    char text[24];
    snprintf(text, sizeof(text), "%" PRId64, sku);
    const char *params[] = {text};
    return query_int(g.dsn, sql, 1, params);
}

static void test_start_the_workers(void **state) {
    (void)state;
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "PAYMENT_TOKEN=" PAYMENT,
                                       "KAFKA_MESSAGE_TIMEOUT_MS=5000", "KAFKA_LINGER_MS=20", NULL};
    const char *reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=5000", "REAPER_INTERVAL_MS=200",
                                     NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    g.producers[0] = start(&stack, BIN "producer", "producer-1", producer_settings, NULL);
    g.producers[1] = start(&stack, BIN "producer", "producer-2", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reaper = start(&stack, BIN "reaper", "reaper", reaper_settings, NULL);
    for (int i = 0; i < 2; i++) wait_ready(&g.producers[i], WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_ready(&g.reaper, WAIT_S);
    wait_reconciled(&g.reaper, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the %d partitions", PARTITIONS);
    g.npassed++;
}

/* One open, sent from its own thread so that both of a race leave together. */
typedef struct open_call {
    int port;
    int64_t sku, stock;
    pthread_barrier_t *start;
    int code;
    char resp[512];
} open_call;

static void *send_open(void *arg) {
    open_call *o = arg;
    char body[160];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":%" PRId64 ",\"per_user_limit\":1,"
             "\"pay_timeout_s\":600}",
             o->sku, o->stock);
    pthread_barrier_wait(o->start);
    o->code = http(o->port, "POST", "/v1/skus", ADMIN, NULL, body, o->resp, sizeof(o->resp));
    return NULL;
}

static void test_racing_opens_leave_one_sale(void **state) {
    (void)state;
    int64_t winner[RACES];
    for (int r = 0; r < RACES; r++) {
        int64_t sku = g.sku_base + r;
        pthread_barrier_t start;
        pthread_barrier_init(&start, NULL, 2);
        open_call o[2];
        pthread_t t[2];
        for (int i = 0; i < 2; i++) {
            o[i] = (open_call){.port = g.producers[i].port,
                               .sku = sku,
                               .stock = 7 + 2 * i,
                               .start = &start};
            assert_int_equal(pthread_create(&t[i], NULL, send_open, &o[i]), 0);
        }
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        pthread_barrier_destroy(&start);
        int won = o[0].code == 201 ? 0 : 1;
        if (o[won].code != 201 || o[1 - won].code != 409 || !strstr(o[1 - won].resp, "exists"))
            fail_msg("race %d (sku %" PRId64 "): answers %d %s / %d %s; want one 201 and one 409",
                     r, sku, o[0].code, o[0].resp, o[1].code, o[1].resp);
        winner[r] = o[won].stock;
    }
    /* Quiet: the consumer has applied everything in the log, and the log holds one stock.set per
     * SKU: the losers published nothing. */
    int64_t in_log = topic_end(g.topic, PARTITIONS);
    WAIT_FOR(query_int(g.dsn, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets", 0,
                       NULL) == in_log,
             "the consumer did not apply the %" PRId64 " events of the log", in_log);
    assert_int_equal(in_log, RACES);
    sp_redis *rc = redis_connect_env();
    for (int r = 0; r < RACES; r++) {
        int64_t sku = g.sku_base + r;
        int64_t pg = value("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku);
        int64_t redis = sale_hget_int(rc, sku, "sale", "stock");
        if (pg != winner[r] || redis != winner[r])
            fail_msg("sku %" PRId64 ": the 201 opened %" PRId64 ", PostgreSQL holds %" PRId64
                     ", Redis %" PRId64,
                     sku, winner[r], pg, redis);
        char key[SP_STOCK_KEY_MAX];
        sp_stock_key(key, sku, "opening");
        redisReply *rep = sp_redis_command(rc, key, itest_err, sizeof(itest_err), "EXISTS %s", key);
        assert_non_null(rep);
        assert_int_equal(rep->integer, 0); /* no claim left behind */
        freeReplyObject(rep);
    }
    sp_redis_close(rc);
    g.npassed++;
}

/* POST /v1/orders/{id}/pay with body; the status, the answer in resp. */
static int pay(const char *order_id, const char *body, char *resp, size_t cap) {
    char path[160];
    snprintf(path, sizeof(path), "/v1/orders/%s/pay", order_id);
    return http(g.producers[0].port, "POST", path, PAYMENT, NULL, body, resp, cap);
}

static void test_payments_name_their_order(void **state) {
    (void)state;
    int64_t sku = g.sku_base + RACES; /* a SKU of its own, after the races' */
    char body[200], resp[1024], a[SP_ORDER_ID_MAX + 1], b[SP_ORDER_ID_MAX + 1];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":5,\"per_user_limit\":0,\"pay_timeout_s\":1}", sku);
    int code = http(g.producers[0].port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open: %d %s", code, resp);
    const struct {
        int64_t user;
        int qty;
        char *id;
    } orders[] = {{1, 2, a}, {2, 1, b}};
    for (int i = 0; i < 2; i++) {
        snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":%d}",
                 orders[i].user, sku, orders[i].qty);
        code = http(g.producers[0].port, "POST", "/v1/orders", NULL, NULL, body, resp,
                    sizeof(resp));
        if (code != 202) fail_msg("order: %d %s", code, resp);
        json_order_id(resp, orders[i].id, SP_ORDER_ID_MAX + 1);
    }
    /* Pay for a right away, while it may still be only Redis's accepted entry: the units must be
     * its own, and then it is 202. */
    int64_t in_log = topic_end(g.topic, PARTITIONS);
    assert_int_equal(pay(a, "{}", resp, sizeof(resp)), 400);
    code = pay(a, "{\"qty\":1}", resp, sizeof(resp));
    if (code != 409 || strstr(resp, "qty_mismatch") == NULL)
        fail_msg("wrong units: %d %s", code, resp);
    /* An id of the right form that names no order. */
    char unknown[SP_ORDER_ID_MAX + 1];
    snprintf(unknown, sizeof(unknown), "%s", a);
    size_t n = strlen(unknown);
    unknown[n - 1] = unknown[n - 1] == '0' ? '1' : '0';
    code = pay(unknown, "{\"qty\":2}", resp, sizeof(resp));
    if (code != 404 || strstr(resp, "unknown_order") == NULL)
        fail_msg("unknown order: %d %s", code, resp);
    assert_int_equal(topic_end(g.topic, PARTITIONS), in_log); /* none of them published anything */
    code = pay(a, "{\"qty\":2}", resp, sizeof(resp));
    if (code != 202 || strstr(resp, "payment_recorded") == NULL)
        fail_msg("pay a: %d %s", code, resp);
    /* b is left to expire (1 s to pay); paid afterwards it is closed, its payment recorded. */
    const char *params[] = {b};
    WAIT_FOR(query_int(g.dsn,
                       "SELECT count(*) FROM orders WHERE order_id = $1 AND status = 'expired'", 1,
                       params) == 1,
             "order %s never expired", b);
    code = pay(b, "{\"qty\":1}", resp, sizeof(resp));
    if (code != 409 || strstr(resp, "order_closed") == NULL || strstr(resp, "expired") == NULL)
        fail_msg("pay after the expiry: %d %s", code, resp);
    WAIT_FOR(query_int(g.dsn, "SELECT count(*) FROM orders WHERE order_id = $1 AND refund_due", 1,
                       params) == 1,
             "the late payment of %s was not recorded as a refund due", b);
    const char *a_param[] = {a};
    WAIT_FOR(query_int(g.dsn, "SELECT count(*) FROM orders WHERE order_id = $1 AND status = 'paid'",
                       1, a_param) == 1,
             "order %s never paid", a);
    g.npassed++;
}

/* ---- restocks ---- */

static int64_t redis_sale(int64_t sku, const char *field) {
    sp_redis *c = redis_connect_env();
    if (c == NULL) return -1;
    int64_t v = sale_hget_int(c, sku, "sale", field);
    sp_redis_close(c);
    return v;
}

/* Opens sku with 10 units and waits until PostgreSQL has the sale. */
static void open_ten(int64_t sku) {
    char body[200], resp[512];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":10,\"per_user_limit\":0,\"pay_timeout_s\":600}",
             sku);
    int code = http(g.producers[0].port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open: %d %s", code, resp);
    WAIT_FOR(value("SELECT count(*) FROM inventory WHERE sku_id = $1::bigint", sku) == 1,
             "sku %" PRId64 " never reached PostgreSQL", sku);
}

/* A restock of 5 with key, sent while Redis takes no writes for 4 s: Kafka takes the stock.add,
 * restock.lua waits, and the producer gives the connection up after 2 s (503). */
static void restock_during_write_pause(int64_t sku, const char *key) {
    char path[64], resp[512];
    char sale_key[SP_STOCK_KEY_MAX];
    sp_stock_key(sale_key, sku, "sale"); /* in a cluster: the primary of the sale's slot */
    sp_redis *c = redis_connect_env();
    assert_non_null(c);
    redisReply *r = sp_redis_command(c, sale_key, itest_err, sizeof(itest_err),
                                     "CLIENT PAUSE 4000 WRITE");
    assert_true(r != NULL && r->type == REDIS_REPLY_STATUS);
    freeReplyObject(r);
    sp_redis_close(c);
    int64_t paused_at = sp_clock_mono_ms();
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64 "/restock", sku);
    int code = http(g.producers[0].port, "POST", path, ADMIN, key, "{\"add\":5}", resp,
                    sizeof(resp));
    if (code != 503) fail_msg("restock during the pause: %d %s (want 503)", code, resp);
    int64_t left = paused_at + 4300 - sp_clock_mono_ms();
    if (left > 0) sleep_ms((int)left);
}

/* The sale ends at 15 in both stores, the request recorded once and stamped given to Redis. */
static void expect_restocked_once(int64_t sku, const char *key) {
    char text[24];
    snprintf(text, sizeof(text), "%" PRId64, sku);
    const char *params[] = {text, key};
    /* Everything in the log is applied (a second stock.add included, if one was published). */
    int64_t end = topic_end(g.topic, PARTITIONS);
    const char *topic[] = {g.topic};
    WAIT_FOR(query_int(g.dsn, "SELECT sum(next_offset) FROM consumer_offsets WHERE topic = $1", 1,
                       topic) == end,
             "the consumer never stored the log up to its end (%" PRId64 ")", end);
    WAIT_FOR(redis_sale(sku, "stock") == 15 &&
                 value("SELECT supplied FROM inventory WHERE sku_id = $1::bigint", sku) >= 15,
             "Redis stock %" PRId64 ", PostgreSQL supplied %" PRId64 "; want 15 and 15",
             redis_sale(sku, "stock"),
             value("SELECT supplied FROM inventory WHERE sku_id = $1::bigint", sku));
    assert_int_equal(value("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 15);
    assert_int_equal(value("SELECT supplied FROM inventory WHERE sku_id = $1::bigint", sku), 15);
    assert_int_equal(redis_sale(sku, "supplied"), 15);
    WAIT_FOR(query_int(g.dsn,
                       "SELECT count(*) FROM restocks WHERE sku_id = $1::bigint AND request_id = $2"
                       "   AND applied_to_redis_at IS NOT NULL",
                       2, params) == 1,
             "the restock %s of sku %" PRId64 " was never stamped given to Redis", key, sku);
    assert_int_equal(value("SELECT count(*) FROM restocks WHERE sku_id = $1::bigint", sku), 1);
}

static void test_restock_retry_applies_once(void **state) {
    (void)state;
    int64_t sku = g.sku_base + RACES + 1;
    char path[64], resp[512];
    open_ten(sku);
    restock_during_write_pause(sku, "restock-retry-1");
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64 "/restock", sku);
    int code = http(g.producers[1].port, "POST", path, ADMIN, "restock-retry-1", "{\"add\":5}",
                    resp, sizeof(resp));
    if (code != 200 || strstr(resp, "\"available\":15") == NULL)
        fail_msg("the retry: %d %s (want 200, available 15)", code, resp);
    /* Once more, when everything has settled: the first outcome again, nothing added. */
    expect_restocked_once(sku, "restock-retry-1");
    code = http(g.producers[0].port, "POST", path, ADMIN, "restock-retry-1", "{\"add\":5}", resp,
                sizeof(resp));
    if (code != 200 || strstr(resp, "\"available\":15") == NULL)
        fail_msg("a late retry: %d %s (want 200, available 15)", code, resp);
    sleep_ms(1000);
    expect_restocked_once(sku, "restock-retry-1");
    /* Redis forgets the id after IDEM_TTL_S (restock.lua prunes it): a retry then is answered from
     * PostgreSQL's restocks (stamped given to Redis), adding nothing. */
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    freeReplyObject(sp_redis_command(rc, NULL, itest_err, sizeof(itest_err),
                                     "HDEL {sku:%" PRId64 "}:restocks restock-retry-1", sku));
    sp_redis_close(rc);
    code = http(g.producers[1].port, "POST", path, ADMIN, "restock-retry-1", "{\"add\":5}", resp,
                sizeof(resp));
    if (code != 200 || strstr(resp, "\"available\":15") == NULL)
        fail_msg("a retry after Redis forgot the key: %d %s (want 200, available 15)", code, resp);
    sleep_ms(1000);
    expect_restocked_once(sku, "restock-retry-1");
    /* A bad key is refused before anything happens. */
    code = http(g.producers[0].port, "POST", path, ADMIN, "has blank", "{\"add\":5}", resp,
                sizeof(resp));
    assert_int_equal(code, 400);
    g.npassed++;
}

static void test_reaper_gives_redis_a_missed_restock(void **state) {
    (void)state;
    int64_t sku = g.sku_base + RACES + 2;
    open_ten(sku);
    restock_during_write_pause(sku, "restock-missed-1");
    /* No retry: the event is in the log, PostgreSQL applies it, the reaper catches Redis up. */
    expect_restocked_once(sku, "restock-missed-1");
    if (metric(g.reaper.port, "stockpipe_reaper_restocks_caught_up_total") < 1)
        fail_msg("the reaper's catch-up counted nothing");
    g.npassed++;
}

/* Redis loses the sale after a restock; `reaper reconcile --sku` rebuilds it from PostgreSQL (which
 * counts the restock); the admin's retry of the restock then adds nothing. */
static void test_rebuilt_sale_counts_a_restock_once(void **state) {
    (void)state;
    int64_t sku = g.sku_base + RACES + 3;
    char path[64], resp[512], log[256], dsn[1300], url[300], topic[200], flag[48];
    open_ten(sku);
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64 "/restock", sku);
    int code = http(g.producers[0].port, "POST", path, ADMIN, "restock-rebuilt-1", "{\"add\":5}",
                    resp, sizeof(resp));
    if (code != 200) fail_msg("restock: %d %s", code, resp);
    expect_restocked_once(sku, "restock-rebuilt-1");
    forget_skus(sku, 1); /* the sale, its restock ids and all: as a failover to an empty replica */
    snprintf(log, sizeof(log), "%s/reaper-reconcile.log", g.tmp);
    snprintf(dsn, sizeof(dsn), "PG_DSN=%s", g.dsn);
    snprintf(url, sizeof(url), "REDIS_URL=%s", stack.redis_url);
    snprintf(topic, sizeof(topic), "KAFKA_TOPIC=%s", g.topic);
    snprintf(flag, sizeof(flag), "--sku=%" PRId64, sku);
    const char *settings[] = {dsn, url, topic, "KAFKA_MESSAGE_TIMEOUT_MS=5000", NULL};
    char *argv[] = {(char *)BIN "reaper", (char *)"reconcile", flag, NULL};
    char out[512];
    int rc = run(argv, settings, log, out, sizeof(out));
    if (rc != 0) fail_msg("reaper reconcile exited %d: %s (log %s)", rc, out, log);
    assert_int_equal(redis_sale(sku, "stock"), 15);
    code = http(g.producers[1].port, "POST", path, ADMIN, "restock-rebuilt-1", "{\"add\":5}", resp,
                sizeof(resp));
    if (code != 200 || strstr(resp, "\"available\":15") == NULL)
        fail_msg("the retry after the rebuild: %d %s (want 200, available 15)", code, resp);
    expect_restocked_once(sku, "restock-rebuilt-1");
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", "REDIS_URL", NULL};
    if (begin_run("admin", INT64_C(800000000000), env, tag, sizeof(tag), &g.sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    snprintf(g.db, sizeof(g.db), "sp_test_admin_%s", tag);
    stack.redis_url = getenv("REDIS_URL");
    name_topics("admin", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    proc *all[] = {&g.producers[0], &g.producers[1], &g.consumer, &g.reaper};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    forget_skus(g.sku_base, RACES + 4);
    if (g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-admin", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_workers),
        cmocka_unit_test(test_racing_opens_leave_one_sale),
        cmocka_unit_test(test_payments_name_their_order),
        cmocka_unit_test(test_restock_retry_applies_once),
        cmocka_unit_test(test_reaper_gives_redis_a_missed_restock),
        cmocka_unit_test(test_rebuilt_sale_counts_a_restock_once),
    };
    return cmocka_run_group_tests_name("admin", tests, group_setup, group_teardown);
}
