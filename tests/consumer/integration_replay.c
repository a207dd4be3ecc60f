/* integration_replay.c - PostgreSQL rebuilt from the Kafka log alone: a sale runs with all three
 * workers (two SKUs, a restock, a few hundred orders from distinct users, payments, expiries, a
 * second wave buying the returned stock, a late payment on an expired order); once it is quiet,
 * `orders`, `inventory`, `stock_returns`, `restocks` and `consumer_offsets` are dumped, the
 * database is dropped and recreated empty (scripts/migrate.sh), `consumer --replay` rebuilds it
 * from the log, and the dumps are identical, byte for byte.
 *
 * What replay cannot reproduce, and is left out of the comparison on purpose (docs/consumer.md):
 * stock_returns.returned_to_redis_at and restocks.applied_to_redis_at, stamped by the reaper (wall
 * clock) when it gives a row to Redis, which a replay does not touch; restocks.stored_at and
 * consumer_offsets.updated_at, the wall clock of the commit. Every other column of those five
 * tables is compared.
 *
 * The run has its own Redis (a redis-server started here in a scratch directory), its own topics
 * and consumer group, its own PostgreSQL database (created and migrated here, dropped at the end)
 * and fresh SKU ids. It runs bin/{producer,consumer,reaper}, or bin/asan/... when built with
 * AddressSanitizer. Needs var/stack.env loaded and the repository root as the working directory
 * (tests/run-all.sh). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "event.h"
#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "redis_store.h"
#include "itest.h"

#define WAIT_S     120 /* generous: a shared, loaded machine; ASan builds */
#define PARTITIONS 4
#define NTESTS     3
#define ADMIN      "test-admin-token"
#define PAYMENT    "test-payment-token"
#define MAX_ORDERS 512

static char err[1024];
static char tag[32]; /* unique per run: pid and time */

/* Everything a run creates, removed by teardown. */
static struct {
    char tmp[128]; /* logs, Redis's directory */
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    char redis_url[64];
    int redis_port;
    int64_t sku_a, sku_b;
    proc producer, consumer, reaper;
    char ids[MAX_ORDERS][SP_ORDER_ID_MAX + 1]; /* every order answered 202 */
    int naccepted;
    int npassed;
} g;

/* What start() gives each worker. */
static const itest_stack stack = {.dir = g.tmp,
                                  .tag = tag,
                                  .dsn = g.dsn,
                                  .redis_url = g.redis_url,
                                  .topic = g.topic,
                                  .dlq = g.dlq,
                                  .group = g.group};

/* ---- PostgreSQL ---- */

static int64_t value(const char *sql) { return query_int(g.dsn, sql, 0, NULL); }

/* Creates g.db, migrated; its conninfo into g.dsn. */
static void create_db(void) {
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
}

/* ---- HTTP ---- */

static void admin_post(const char *path, const char *body, int want) {
    char resp[1024];
    int code = http(g.producer.port, "POST", path, ADMIN, NULL, body, resp, sizeof(resp));
    if (code != want) fail_msg("POST %s %s: %d %s", path, body, code, resp);
}

static void open_sale(int64_t sku, int stock, int limit, int timeout_s) {
    char body[256];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":%d,\"per_user_limit\":%d,\"pay_timeout_s\":%d}",
             sku, stock, limit, timeout_s);
    admin_post("/v1/skus", body, 201);
}

/* POST /v1/orders; the status code. A 202's order id is kept in g.ids. */
static int order(int64_t sku, int64_t user, int qty) {
    char body[256], resp[1024];
    snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":%d}",
             user, sku, qty);
    int code = http(g.producer.port, "POST", "/v1/orders", NULL, NULL, body, resp, sizeof(resp));
    if (code == 202) {
        json_error_t jerr;
        json_t *j = json_loads(resp, 0, &jerr);
        const char *id = j ? json_string_value(json_object_get(j, "order_id")) : NULL;
        if (id != NULL && g.naccepted < MAX_ORDERS)
            snprintf(g.ids[g.naccepted++], sizeof(g.ids[0]), "%s", id);
        json_decref(j);
        if (id == NULL) fail_msg("a 202 without an order id: %s", resp);
    } else if (code != 409) {
        fail_msg("order of user %" PRId64 " for sku %" PRId64 ": %d %s", user, sku, code, resp);
    }
    return code;
}

/* Pays for an order of qty units; the answer must be want (202, or 409 for a closed order). */
static void pay(const char *order_id, int qty, int want) {
    char path[160], body[32], resp[1024];
    snprintf(path, sizeof(path), "/v1/orders/%s/pay", order_id);
    snprintf(body, sizeof(body), "{\"qty\":%d}", qty);
    int code = http(g.producer.port, "POST", path, PAYMENT, NULL, body, resp, sizeof(resp));
    if (code != want) fail_msg("pay %s: %d %s (want %d)", order_id, code, resp, want);
}

/* ---- Kafka ---- */

static int64_t log_end; /* set by read_log_end */

/* The events in the topic: the sum of its partitions' end offsets (no transactions, so every
 * offset is an event). */
static int read_log_end(rd_kafka_t *rk) {
    int64_t sum = 0;
    for (int p = 0; p < PARTITIONS; p++) {
        int64_t lo = 0, hi = 0;
        if (rd_kafka_query_watermark_offsets(rk, g.topic, p, &lo, &hi, 10000) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            return -1;
        sum += hi;
    }
    log_end = sum;
    return 0;
}

static int64_t events_in_log(void) {
    if (with_kafka(read_log_end, err, sizeof(err)) != 0)
        fail_msg("cannot read the end offsets of %s", g.topic);
    return log_end;
}

static int64_t events_applied(void) {
    return value("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets");
}

/* ---- tests ---- */

static void test_start_the_stack(void **state) {
    (void)state;
    start_redis(g.redis_port, g.tmp);
    create_db();
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "PAYMENT_TOKEN=" PAYMENT,
                                       "KAFKA_MESSAGE_TIMEOUT_MS=2000", "USER_RATE_LIMIT=0", NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    const char *reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=2000",
                                     "RESV_LOST_AFTER_MS=4000",
                                     "REAPER_INTERVAL_MS=200",
                                     "RESV_SWEEP_INTERVAL_MS=500",
                                     "EXPIRY_RETRY_MS=5000",
                                     "ACCEPTED_STALE_AFTER_MS=3000",
                                     NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reaper = start(&stack, BIN "reaper", "reaper", reaper_settings, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_ready(&g.reaper, WAIT_S);
    wait_reconciled(&g.reaper, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the %d partitions", PARTITIONS);
    g.npassed++;
}

/* Counts orders of the run in one status. */
static int64_t orders_in(const char *status) {
    char sql[160];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM orders WHERE status = '%s'", status);
    return value(sql);
}

/* The sale: A opens with 100 units (one per user, 5 s to pay: longer than the first wave takes to
 * send even in the ASan build, so no unit comes back while it still buys) and is restocked with
 * 50; B opens with 80 (two per user). 200 users want one A each, 60 want two B each: A and B sell
 * out. Every third A order and every other B order is paid at once; the rest expire and their units
 * go back. A second wave of 120 users buys what came back, every other one paying. One expired
 * order is paid late (refund_due). Then the system is left to become quiet. */
static void test_a_sale_with_payments_and_expiries(void **state) {
    (void)state;
    int64_t user = 1;
    open_sale(g.sku_a, 100, 1, 5);
    char path[96];
    snprintf(path, sizeof(path), "/v1/skus/%" PRId64 "/restock", g.sku_a);
    admin_post(path, "{\"add\":50}", 200);
    open_sale(g.sku_b, 80, 2, 5);

    int a_ok = 0, b_ok = 0, sold_out = 0, paid = 0;
    for (int i = 0; i < 200; i++, user++) {
        if (order(g.sku_a, user, 1) != 202) {
            sold_out++;
            continue;
        }
        if (a_ok++ % 3 == 0) pay(g.ids[g.naccepted - 1], 1, 202), paid++;
    }
    for (int i = 0; i < 60; i++, user++) {
        if (order(g.sku_b, user, 2) != 202) {
            sold_out++;
            continue;
        }
        if (b_ok++ % 2 == 0) pay(g.ids[g.naccepted - 1], 2, 202), paid++;
    }
    assert_int_equal(a_ok, 150);
    assert_int_equal(b_ok, 40);
    int first_wave = g.naccepted;

    /* The unpaid ones expire; once their units are back in Redis a second wave buys them. */
    int expired_a = 150 - 50, expired_b = 40 - 20;
    WAIT_FOR(value("SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NOT NULL") ==
                 expired_a + expired_b,
             "the first wave's %d expiries never all reached Redis (%" PRId64 " did)",
             expired_a + expired_b,
             value("SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NOT NULL"));
    int wave2 = 0;
    for (int i = 0; i < 120; i++, user++) {
        int64_t sku = i % 2 ? g.sku_b : g.sku_a;
        if (order(sku, user, 1) != 202) {
            sold_out++;
            continue;
        }
        if (wave2++ % 2 == 0) pay(g.ids[g.naccepted - 1], 1, 202), paid++;
    }
    assert_true(wave2 >= 100); /* 100 A units and 40 B units came back */

    /* A late payment: the first unpaid order of the first wave has expired by now. */
    const char *late = g.ids[1];
    WAIT_FOR(value("SELECT count(*) FROM orders WHERE status = 'expired'") >= expired_a,
             "the first wave never expired");
    const char *late_param[] = {late};
    WAIT_FOR(query_int(g.dsn,
                       "SELECT count(*) FROM orders WHERE order_id = $1 AND status = 'expired'", 1,
                       late_param) == 1,
             "order %s never expired", late);
    pay(late, 1, 409); /* recorded, refund due; the buyer hears the order was closed */

    /* Quiet: every 202 order is stored, nothing pending is left (the second wave's unpaid ones
     * expired), every ledger row went back to Redis, the late payment is recorded, and the
     * consumer applied the whole log. */
    WAIT_FOR(value("SELECT count(*) FROM orders") == g.naccepted && orders_in("pending") == 0 &&
                 value("SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NULL") ==
                     0 &&
                 value("SELECT count(*) FROM orders WHERE refund_due") == 1 &&
                 events_applied() == events_in_log(),
             "the sale never became quiet: %" PRId64 " of %d orders stored, %" PRId64
             " pending, %" PRId64 " of %" PRId64 " events applied",
             value("SELECT count(*) FROM orders"), g.naccepted, orders_in("pending"),
             events_applied(), events_in_log());
    assert_int_equal(orders_in("paid"), paid);
    assert_int_equal(orders_in("expired"), g.naccepted - paid);
    assert_int_equal(value("SELECT count(*) FROM stock_returns"), g.naccepted - paid);
    assert_int_equal(value("SELECT count(*) FROM orders WHERE refund_due AND status = 'expired'"
                           " AND paid_at IS NOT NULL"),
                     1);
    print_message("    %d orders accepted (%d in the first wave, %d in the second), %d refused"
                  " sold out; %d paid, %d expired, 1 paid late; %" PRId64 " events in the log\n",
                  g.naccepted, first_wave, wave2, sold_out, paid, g.naccepted - paid,
                  events_in_log());
    g.npassed++;
}

/* Every column replay must reproduce, in a fixed order (see the file's first comment for the two
 * left out). */
static const struct {
    const char *name, *sql;
} tables[] = {
    {"orders", "SELECT * FROM orders ORDER BY order_id"},
    {"inventory", "SELECT * FROM inventory ORDER BY sku_id"},
    {"stock_returns", "SELECT order_id, sku_id, user_id, qty, reason, created_at"
                      " FROM stock_returns ORDER BY order_id"},
    {"restocks", "SELECT sku_id, request_id, add_units, created_at, kafka_partition, kafka_offset"
                 " FROM restocks ORDER BY sku_id, request_id"},
    {"consumer_offsets", "SELECT topic, partition, next_offset FROM consumer_offsets"
                         " ORDER BY topic, partition"},
};
#define NTABLES (sizeof(tables) / sizeof(tables[0]))

static void test_replay_rebuilds_the_same_tables(void **state) {
    (void)state;
    char *before[NTABLES];
    int rows[NTABLES];

    /* The log is final once no worker runs: the producer and the reaper stop first, the
     * consumer once it applied everything they published. */
    stop(&g.producer);
    stop(&g.reaper);
    WAIT_FOR(events_applied() == events_in_log(), "the consumer never applied the whole log");
    stop(&g.consumer);
    for (size_t i = 0; i < NTABLES; i++) before[i] = dump(g.dsn, tables[i].sql, 0, NULL, &rows[i]);

    /* Drop the database; recreate it empty and migrated. */
    if (drop_database(g.db) != 0) fail_msg("cannot drop %s", g.db);
    create_db();
    assert_int_equal(value("SELECT count(*) FROM orders"), 0);

    /* Rebuild it from the log alone. */
    int64_t t0 = sp_clock_mono_ms();
    proc r = start(&stack, BIN "consumer", "consumer-replay", NULL, "--replay");
    int rc = wait_exit(r.pid, WAIT_S);
    if (rc != 0) fail_msg("consumer --replay exited %d (log %s)", rc, r.log);
    assert_true(log_has(r.log, "replay done"));
    int64_t replay_ms = sp_clock_mono_ms() - t0;

    int same = 1;
    for (size_t i = 0; i < NTABLES; i++) {
        int n = 0;
        char *after = dump(g.dsn, tables[i].sql, 0, NULL, &n);
        int eq = strcmp(before[i], after) == 0;
        print_message("    %-16s %5d rows, %6zu bytes: %s\n", tables[i].name, rows[i],
                      strlen(before[i]), eq ? "identical after replay" : "DIFFERENT");
        if (!eq) {
            fprintf(stderr, "%s before:\n%.3000s\n%s after replay (%d rows):\n%.3000s\n",
                    tables[i].name, before[i], tables[i].name, n, after);
            same = 0;
        }
        free(after);
        free(before[i]);
    }
    print_message("    consumer --replay rebuilt the database in %" PRId64 " ms\n", replay_ms);
    assert_true(same);
    assert_int_equal(rows[0], g.naccepted);
    assert_int_equal(rows[1], 2);
    assert_int_equal(rows[2], value("SELECT count(*) FROM orders WHERE status = 'expired'"));
    assert_int_equal(rows[3], 1); /* the one restock, under the request id the producer gave it */
    assert_true(rows[4] >= 1 && rows[4] <= PARTITIONS); /* the partitions the two SKUs hash to */
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", NULL};
    if (begin_run("replay", INT64_C(700000000000), env, tag, sizeof(tag), &g.sku_a, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    g.sku_b = g.sku_a + 1;
    snprintf(g.db, sizeof(g.db), "sp_test_replay_%s", tag);
    name_topics("replay", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    g.redis_port = free_port();
    snprintf(g.redis_url, sizeof(g.redis_url), "redis://127.0.0.1:%d", g.redis_port);
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    proc *all[] = {&g.reaper, &g.producer, &g.consumer};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked(); /* Redis, and anything left */
    if (getenv("PG_DSN") && g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-replay", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_stack),
        cmocka_unit_test(test_a_sale_with_payments_and_expiries),
        cmocka_unit_test(test_replay_rebuilds_the_same_tables),
    };
    return cmocka_run_group_tests_name("replay", tests, group_setup, group_teardown);
}
