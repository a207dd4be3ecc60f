/* integration_clock_skew.c - workers whose clocks are off (issue 15, hole 1): a real clock shift,
 * by libfaketime (Debian's faketime), on a worker started from the ordinary binary.
 *
 * A reaper whose clock runs 60 s ahead, during a stream of orders whose Kafka acknowledgements are
 * slowed by KAFKA_LINGER_MS: every order answered 202 ends in PostgreSQL as pending (none
 * cancelled), and once quiet Redis's stock equals PostgreSQL's. Before, the reaper took a
 * reservation's age as its own clock minus the producer's stamp, so reservations still waiting
 * for Kafka looked 60 s old, were voided, and order.voided could land before order.created: the
 * buyer held a 202 for an order that ended cancelled. Reservations now carry Redis's time (TIME
 * inside reserve.lua) and the reaper measures their age on Redis's clock too.
 *
 * A producer whose clock runs 60 s ahead says so: /readyz answers 503 naming the clock, and
 * stockpipe_clock_skew_ms shows the offset; so does the reaper, which keeps working.
 *
 * The run has its own topics, consumer group and PostgreSQL database, fresh SKU ids on the
 * stack's Redis. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
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

#define WAIT_S       120
#define PARTITIONS   2
#define NTESTS       3
#define ADMIN        "test-admin-token"
#define THREADS      16
#define STREAM_MS    6000
#define MAX_IDS      20000
#define FAKETIME_LIB "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"

static char tag[32];

static struct {
    char tmp[128];
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku;
    proc producer, consumer, reaper, skewed_producer;
    pthread_mutex_t mu;
    char (*ids)[SP_ORDER_ID_MAX + 1]; /* every order answered 202 */
    int naccepted, nother;
    int npassed;
} g = {.mu = PTHREAD_MUTEX_INITIALIZER};

static itest_stack stack = {
    .dir = g.tmp, .tag = tag, .dsn = g.dsn, .topic = g.topic, .dlq = g.dlq, .group = g.group};

/* A worker's clock 60 s ahead of everyone else's; monotonic time left alone (timeouts). */
static const char *const skew_env[] = {
    "LD_PRELOAD=" FAKETIME_LIB, "FAKETIME=+60s", "DONT_FAKE_MONOTONIC=1",
    /* AddressSanitizer wants its runtime first; libfaketime preloaded before it is harmless */
    "ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=1:abort_on_error=0"};

static int64_t value(const char *sql) { return query_int(g.dsn, sql, 0, NULL); }

/* Waits until /healthz answers (a worker that is not ready still serves it). */
static void wait_alive(const proc *p) {
    char body[512];
    WAIT_FOR(http(p->port, "GET", "/healthz", NULL, NULL, NULL, body, sizeof(body)) == 200,
             "%s never answered /healthz (log %s)", p->name, p->log);
}

static void test_start_the_workers(void **state) {
    (void)state;
    if (access(FAKETIME_LIB, R_OK) != 0) fail_msg("%s is missing: install faketime", FAKETIME_LIB);
    char log[256];
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
    const char *producer_settings[] = {
        "ADMIN_TOKEN=" ADMIN, "KAFKA_LINGER_MS=50", "KAFKA_MESSAGE_TIMEOUT_MS=5000",
        "USER_RATE_LIMIT=0",  "ORDER_RATE_LIMIT=0", NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    const char *reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=5000",
                                     "RESV_LOST_AFTER_MS=10000",
                                     "RESV_SWEEP_INTERVAL_MS=50",
                                     "REAPER_INTERVAL_MS=100",
                                     skew_env[0],
                                     skew_env[1],
                                     skew_env[2],
                                     skew_env[3],
                                     NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reaper = start(&stack, BIN "reaper", "reaper-ahead", reaper_settings, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_alive(&g.reaper);
    wait_reconciled(&g.reaper, WAIT_S);
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == PARTITIONS,
             "the consumer never owned the %d partitions", PARTITIONS);
    g.npassed++;
}

/* One buyer thread: orders of one unit from its own users until the stream's end. */
static void *buyer(void *arg) {
    int64_t first_user = (int64_t)(intptr_t)arg, deadline = sp_clock_mono_ms() + STREAM_MS;
    char body[200], resp[1024];
    for (int64_t user = first_user; sp_clock_mono_ms() < deadline; user++) {
        snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":1}",
                 user, g.sku);
        int code = http(g.producer.port, "POST", "/v1/orders", NULL, NULL, body, resp,
                        sizeof(resp));
        json_t *j = code == 202 ? json_loads(resp, 0, NULL) : NULL;
        const char *id = j ? json_string_value(json_object_get(j, "order_id")) : NULL;
        pthread_mutex_lock(&g.mu);
        if (id && g.naccepted < MAX_IDS)
            snprintf(g.ids[g.naccepted++], sizeof(g.ids[0]), "%s", id);
        else
            g.nother++;
        pthread_mutex_unlock(&g.mu);
        json_decref(j);
    }
    return NULL;
}

static void test_reaper_ahead_voids_no_accepted_order(void **state) {
    (void)state;
    char body[256], resp[512];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":1000000,\"per_user_limit\":0,"
             "\"pay_timeout_s\":600}",
             g.sku);
    int code = http(g.producer.port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open: %d %s", code, resp);
    int64_t sweeps = metric(g.reaper.port, "stockpipe_reaper_sweep_seconds_count");
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(
            pthread_create(&t[i], NULL, buyer, (void *)(intptr_t)(1 + (int64_t)i * 1000000)), 0);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    /* The reaper swept all along (every RESV_SWEEP_INTERVAL_MS), with its clock ahead. */
    int64_t swept = metric(g.reaper.port, "stockpipe_reaper_sweep_seconds_count") - sweeps;
    if (sweeps < 0 || swept < STREAM_MS / 1000)
        fail_msg("the reaper swept %" PRId64 " times during the stream", swept);
    if (g.naccepted < 200)
        fail_msg("only %d orders answered 202 (%d other answers)", g.naccepted, g.nother);

    /* Quiet: the log has stopped growing (the reaper's voids come after the orders) and the
     * consumer has applied all of it. */
    int64_t in_log = -1, prev = -2;
    for (int64_t deadline = sp_clock_mono_ms() + WAIT_S * 1000;
         sp_clock_mono_ms() < deadline && (in_log != prev || value("SELECT coalesce(sum("
                                                                   "next_offset), 0) FROM "
                                                                   "consumer_offsets") != in_log);
         sleep_ms(1000)) {
        prev = in_log;
        in_log = topic_end(g.topic, PARTITIONS);
    }
    json_t *ids = json_array();
    for (int i = 0; i < g.naccepted; i++) json_array_append_new(ids, json_string(g.ids[i]));
    char *ids_text = json_dumps(ids, JSON_COMPACT);
    json_decref(ids);
    const char *params[] = {ids_text};
    int64_t stored = query_int(g.dsn,
                               "SELECT count(*) FROM orders WHERE order_id IN "
                               "(SELECT json_array_elements_text($1::json))",
                               1, params);
    int64_t cancelled = query_int(g.dsn,
                                  "SELECT count(*) FROM orders WHERE status = 'cancelled' AND "
                                  "order_id IN (SELECT json_array_elements_text($1::json))",
                                  1, params);
    free(ids_text);
    print_message("%d orders answered 202 while the reaper's clock ran 60 s ahead; %" PRId64
                  " in PostgreSQL, %" PRId64 " of them cancelled\n",
                  g.naccepted, stored, cancelled);
    assert_int_equal(cancelled, 0);
    assert_int_equal(stored, g.naccepted);
    assert_int_equal(value("SELECT count(*) FROM orders WHERE status = 'pending'"), g.naccepted);
    sp_redis *rc = redis_connect_env();
    assert_non_null(rc);
    char sku_text[24];
    snprintf(sku_text, sizeof(sku_text), "%" PRId64, g.sku);
    const char *sku_param[] = {sku_text};
    int64_t pg_stock = query_int(g.dsn, "SELECT stock FROM inventory WHERE sku_id = $1::bigint", 1,
                                 sku_param);
    WAIT_FOR(sale_hget_int(rc, g.sku, "sale", "stock") == pg_stock,
             "Redis's stock %" PRId64 " never came to PostgreSQL's %" PRId64,
             sale_hget_int(rc, g.sku, "sale", "stock"), pg_stock);
    assert_int_equal(pg_stock, 1000000 - g.naccepted);
    sp_redis_close(rc);
    g.npassed++;
}

/* Ends a worker whose clock is shifted. Its drain is tested elsewhere: under libfaketime a timed
 * wait inside librdkafka's shutdown lasts the shift longer (seen: exit 60 s after SIGTERM). */
static void kill_shifted(proc *p) {
    kill(p->pid, SIGKILL);
    wait_exit(p->pid, 10);
    untrack(p->pid);
    p->pid = 0;
}

/* A worker 60 s off says so in /readyz and in its metrics. */
static void test_skewed_workers_say_so(void **state) {
    (void)state;
    const char *settings[] = {"ADMIN_TOKEN=" ADMIN, skew_env[0], skew_env[1],
                              skew_env[2],          skew_env[3], NULL};
    g.skewed_producer = start(&stack, BIN "producer", "producer-ahead", settings, NULL);
    wait_alive(&g.skewed_producer);
    char body[1024];
    const proc *skewed[] = {&g.skewed_producer, &g.reaper};
    for (int i = 0; i < 2; i++) {
        const proc *p = skewed[i];
        WAIT_FOR(metric(p->port, "stockpipe_clock_skew_ms") > 55000,
                 "%s: stockpipe_clock_skew_ms is %" PRId64 ", not about 60000", p->name,
                 metric(p->port, "stockpipe_clock_skew_ms"));
        WAIT_FOR(http(p->port, "GET", "/readyz", NULL, NULL, NULL, body, sizeof(body)) == 503 &&
                     strstr(body, "clock") != NULL,
                 "%s: /readyz does not name the clock: %s", p->name, body);
        assert_true(log_has(p->log, "clock"));
    }
    /* The producer with the right clock stays ready, its skew small. */
    assert_int_equal(http(g.producer.port, "GET", "/readyz", NULL, NULL, NULL, body, sizeof(body)),
                     200);
    int64_t skew = metric(g.producer.port, "stockpipe_clock_skew_ms");
    assert_true(skew > -1000 && skew < 1000);
    kill_shifted(&g.skewed_producer);
    kill_shifted(&g.reaper);
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", "REDIS_URL", NULL};
    int64_t sku_base;
    if (begin_run("clockskew", INT64_C(810000000000), env, tag, sizeof(tag), &sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    g.sku = sku_base + 1;
    g.ids = calloc(MAX_IDS, sizeof(*g.ids));
    if (g.ids == NULL) return -1;
    snprintf(g.db, sizeof(g.db), "sp_test_clockskew_%s", tag);
    stack.redis_url = getenv("REDIS_URL");
    name_topics("clockskew", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    return create_run_topics(&stack, PARTITIONS);
}

static int group_teardown(void **state) {
    (void)state;
    proc *all[] = {&g.producer, &g.skewed_producer, &g.consumer, &g.reaper};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    forget_skus(g.sku, 1);
    if (g.dsn[0]) drop_database(g.db);
    delete_run_topics(&stack);
    free(g.ids);
    end_run(g.tmp, g.npassed == NTESTS && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-clock-skew", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_workers),
        cmocka_unit_test(test_reaper_ahead_voids_no_accepted_order),
        cmocka_unit_test(test_skewed_workers_say_so),
    };
    return cmocka_run_group_tests_name("clock skew", tests, group_setup, group_teardown);
}
