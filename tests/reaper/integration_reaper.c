/* integration_reaper.c - the reaper with all three workers running against real Redis, Kafka and
 * PostgreSQL: unpaid orders expire and give their stock back exactly once to PostgreSQL and to
 * Redis; payments around the deadline end paid or expired, never both; three reapers, one killed
 * with kill -9 over and over, return every unit exactly once; a lost reservation is voided and its
 * stock comes back; Redis flushed, or restarted empty, mid-sale is rebuilt from PostgreSQL and
 * the sale goes on without overselling; `reaper reconcile --sku` and `reaper audit` by hand.
 *
 * Each run has its own Redis (a redis-server started here in a scratch directory, so it can be
 * flushed and restarted), its own topics and consumer group, its own PostgreSQL database (created
 * here, migrated with scripts/migrate.sh, dropped at the end) and fresh SKU ids. It runs
 * bin/{producer,consumer,reaper}, or bin/asan/... when built with AddressSanitizer. Needs
 * var/stack.env loaded and the repository root as the working directory (tests/run-all.sh). */
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
#include "order_id.h"
#include "pg_store.h"
#include "reaper_ctx.h"
#include "shard_transfers.h"
#include "redis_store.h"
#include "stock.h"
#include "stock_return.h"
#include "itest.h"

#define WAIT_S       120 /* generous: a shared, loaded machine; ASan builds */
#define MSG_TIMEOUT  "2000"
#define LOST_AFTER   "4000"
#define AUDIT_EVERY  "1000" /* the reapers' AUDIT_INTERVAL_MS */
#define NTESTS       19
#define CATALOG      400 /* finished sales added for the shared reconcile */
#define CATALOG_TEXT "400"
#define ADMIN        "test-admin-token"
#define PAYMENT      "test-payment-token"

static char err[1024];
static char tag[32]; /* unique per run: pid and time */

/* Everything a run creates, removed by teardown. */
static struct {
    char tmp[128]; /* logs, Redis's directory */
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    char redis_url[256];
    int redis_port;
    pid_t redis_pid;
    int cluster; /* ITEST_REDIS_CLUSTER=1: a private Redis Cluster of three primaries instead */
    itest_cluster cl;
    int64_t sku_base;
    proc producer, consumer, reapers[3];
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

/* query_int with one parameter: a SKU id. */
static int64_t sku_int(const char *sql, int64_t sku) {
    char s[24];
    snprintf(s, sizeof(s), "%" PRId64, sku);
    const char *params[] = {s};
    return query_int(g.dsn, sql, 1, params);
}

static void create_db(void) {
    char log[256];
    snprintf(g.db, sizeof(g.db), "sp_test_reaper_%s", tag);
    snprintf(log, sizeof(log), "%s/migrate.log", g.tmp);
    create_database(g.db, g.dsn, sizeof(g.dsn), log);
}

/* ---- Redis: a private server ---- */

static sp_redis *rctx; /* the test's own connection to the private Redis */

static sp_redis *redis(void) {
    sp_redis_target target;
    if (rctx) return rctx; /* it connects again by itself after a failure */
    if (sp_redis_parse_url(g.redis_url, &target, err, sizeof(err)) != 0) fail_msg("%s", err);
    rctx = sp_redis_open(&target, 2000, err, sizeof(err));
    if (rctx == NULL) fail_msg("redis: %s", err);
    return rctx;
}

static void redis_close(void) {
    if (rctx) sp_redis_close(rctx);
    rctx = NULL;
}

/* The sale's hash field as an integer on the test's connection; -1 when absent. */
static int64_t hget(int64_t sku, const char *suffix, const char *field) {
    return sale_hget_int(redis(), sku, suffix, field);
}

static int64_t hget_user(int64_t sku, int64_t user) {
    char u[24];
    snprintf(u, sizeof(u), "%" PRId64, user);
    return hget(sku, "users", u);
}

static int64_t redis_int(const char *fmt, const char *arg) {
    redisReply *r = sp_redis_command(redis(), arg, itest_err, sizeof(itest_err), fmt, arg);
    if (r == NULL) fail_msg("%s: %s", fmt, itest_err);
    int64_t v = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    return v;
}

/* Every primary holds the reapers' rebuilt key (a reconcile of every SKU has finished). */
static int rebuilt_everywhere(void) {
    for (int i = 0, n = sp_redis_primaries(redis()); i < n; i++) {
        char key[SP_STOCK_KEY_MAX];
        if (sp_redis_key_on(redis(), i, SP_STOCK_REBUILT_KEY, key, sizeof(key), itest_err,
                            sizeof(itest_err)) != 0)
            fail_msg("rebuilt key: %s", itest_err);
        if (redis_int("EXISTS %s", key) != 1) return 0;
    }
    return 1;
}

static int64_t hlen(int64_t sku, const char *suffix) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, suffix);
    return redis_int("HLEN %s", key);
}

/* A sale open and not paused by a reconcile. */
static int sale_open(int64_t sku) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, "sale");
    return hget(sku, "sale", "stock") >= 0 && redis_int("HEXISTS %s paused", key) == 0;
}

/* ---- HTTP ---- */

/* A string field of a JSON body into out; "" when absent. */
static void json_field(const char *body, const char *name, char *out, size_t cap) {
    json_error_t jerr;
    json_t *j = json_loads(body, 0, &jerr);
    const char *s = j ? json_string_value(json_object_get(j, name)) : NULL;
    snprintf(out, cap, "%s", s ? s : "");
    json_decref(j);
}

static void open_sale(int64_t sku, int stock, int limit, int timeout_s) {
    char body[256], resp[1024];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":%d,\"per_user_limit\":%d,\"pay_timeout_s\":%d}",
             sku, stock, limit, timeout_s);
    int code = http(g.producer.port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open sku %" PRId64 ": %d %s", sku, code, resp);
}

/* POST /v1/orders; the status code, and the order id into id (when 202). */
static int order(int64_t sku, int64_t user, int qty, const char *idem, char *id, size_t cap) {
    char body[256], resp[1024];
    snprintf(body, sizeof(body), "{\"user_id\":%" PRId64 ",\"sku_id\":%" PRId64 ",\"qty\":%d}",
             user, sku, qty);
    int code = http(g.producer.port, "POST", "/v1/orders", NULL, idem, body, resp, sizeof(resp));
    if (id) json_field(resp, "order_id", id, cap);
    return code;
}

static int pay(const char *order_id) {
    char path[160], resp[1024];
    snprintf(path, sizeof(path), "/v1/orders/%s/pay", order_id);
    return http(g.producer.port, "POST", path, PAYMENT, NULL, "{\"qty\":1}", resp, sizeof(resp));
}

/* The sum of a series over the running reapers' /metrics ("name" or "name{labels}"). */
static int64_t reaper_metric(const char *series) {
    int64_t sum = 0;
    for (int i = 0; i < 3; i++) {
        int64_t v = g.reapers[i].pid > 0 ? metric(g.reapers[i].port, series) : -1;
        if (v > 0) sum += v;
    }
    return sum;
}

/* ---- the workers ---- */

static const char *const reaper_settings[] = {"KAFKA_MESSAGE_TIMEOUT_MS=" MSG_TIMEOUT,
                                              "RESV_LOST_AFTER_MS=" LOST_AFTER,
                                              "REAPER_INTERVAL_MS=200",
                                              "RESV_SWEEP_INTERVAL_MS=500",
                                              "EXPIRY_RETRY_MS=5000",
                                              "ACCEPTED_STALE_AFTER_MS=3000",
                                              "RECONCILE_WAIT_MS=60000",
                                              "AUDIT_WAIT_MS=60000",
                                              "AUDIT_INTERVAL_MS=" AUDIT_EVERY,
                                              NULL};

static proc start_reaper(int i, const char *batch) {
    char name[32];
    static char batch_setting[32];
    const char *settings[16];
    int n = 0;
    for (; reaper_settings[n]; n++) settings[n] = reaper_settings[n];
    if (batch) {
        snprintf(batch_setting, sizeof(batch_setting), "REAPER_BATCH=%s", batch);
        settings[n++] = batch_setting;
    }
    settings[n] = NULL;
    snprintf(name, sizeof(name), "reaper%d", i + 1);
    return start(&stack, BIN "reaper", name, settings, NULL);
}

/* `reaper CMD...` with the run's settings; its exit status, stdout into out. */
static int reaper_cmd(const char *a1, const char *a2, const char *a3, char *out, size_t cap) {
    char log[256], dsn[1300], url[300], topic[200];
    snprintf(log, sizeof(log), "%s/reaper-cmd.log", g.tmp);
    snprintf(dsn, sizeof(dsn), "PG_DSN=%s", g.dsn);
    snprintf(url, sizeof(url), "REDIS_URL=%s", g.redis_url);
    snprintf(topic, sizeof(topic), "KAFKA_TOPIC=%s", g.topic);
    const char *settings[] = {dsn,
                              url,
                              topic,
                              "KAFKA_MESSAGE_TIMEOUT_MS=" MSG_TIMEOUT,
                              "RESV_LOST_AFTER_MS=" LOST_AFTER,
                              "AUDIT_WAIT_MS=60000",
                              NULL};
    char *argv[] = {(char *)BIN "reaper", (char *)a1, (char *)a2, (char *)a3, NULL};
    return run(argv, settings, log, out, cap);
}

static void assert_audit_passes(void) {
    static char out[64 * 1024];
    int rc = reaper_cmd("audit", NULL, NULL, out, sizeof(out));
    if (rc != 0 || strstr(out, "audit passed") == NULL)
        fail_msg("reaper audit exited %d:\n%s", rc, out);
}

/* ---- tests ---- */

/* pay_timeout_s 2: 300 orders, 100 of them paid. The other 200 expire; inventory and Redis each
 * get exactly 200 units back, once; their buyers can buy again; the paid orders are untouched. */
static void test_expiry_returns_stock_once(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 1;
    static char ids[300][SP_ORDER_ID_MAX + 1];
    int64_t returned_before = reaper_metric("stockpipe_reaper_returned_total");
    int64_t units_before = reaper_metric("stockpipe_reaper_returned_units_total");
    open_sale(sku, 300, 1, 2);
    /* Users 1..100 pay at once: well inside their 2 s. */
    for (int u = 1; u <= 300; u++) {
        if (order(sku, u, 1, NULL, ids[u - 1], sizeof(ids[0])) != 202)
            fail_msg("order of user %d not accepted", u);
        if (u <= 100) assert_int_equal(pay(ids[u - 1]), 202);
    }

    WAIT_FOR(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                     "   AND returned_to_redis_at IS NOT NULL",
                     sku) == 200,
             "200 returns never reached Redis (expired %" PRId64 ")",
             sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = 'expired'",
                     sku));
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'expired'",
                             sku),
                     200);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'paid' AND NOT refund_due AND closed_at IS NULL",
                             sku),
                     100);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 200);
    assert_int_equal(sku_int("SELECT sum(qty) FROM stock_returns WHERE sku_id = $1::bigint"
                             " AND reason = 'expired'",
                             sku),
                     200);
    /* The paid orders kept their stock: no ledger row names one of them. */
    assert_int_equal(sku_int("SELECT count(*) FROM stock_returns r JOIN orders o USING (order_id)"
                             " WHERE r.sku_id = $1::bigint AND o.status <> 'expired'",
                             sku),
                     0);
    assert_int_equal(hget(sku, "sale", "stock"), 200);
    assert_int_equal(hlen(sku, "users"), 100);
    for (int u = 1; u <= 300; u++) assert_int_equal(hget_user(sku, u), u <= 100 ? 1 : -1);
    /* Exactly once, as the reapers count it: 200 rows, 200 units (no give-back found a marker). */
    assert_int_equal(reaper_metric("stockpipe_reaper_returned_total") - returned_before, 200);
    assert_int_equal(reaper_metric("stockpipe_reaper_returned_units_total") - units_before, 200);
    assert_true(reaper_metric("stockpipe_reaper_expiry_lateness_seconds_count") >= 200);

    /* Their buyers can buy again (per_user_limit 1); the paid ones cannot. */
    for (int u = 101; u <= 300; u++)
        if (order(sku, u, 1, NULL, NULL, 0) != 202) fail_msg("user %d cannot buy again", u);
    assert_int_equal(order(sku, 1, 1, NULL, NULL, 0), 409);
    assert_int_equal(hget(sku, "sale", "stock"), 0);
    g.npassed++;
}

/* Payments sent around the deadline: each order ends paid or expired, never both; only the
 * expired ones gave stock back, to PostgreSQL and to Redis, once. */
static void test_payments_around_the_deadline(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 2;
    static char ids[100][SP_ORDER_ID_MAX + 1];
    open_sale(sku, 100, 0, 1);
    /* Each payment is aimed at its own order's deadline (1 s after the order), 400 or 150 ms
     * before it or after it, while the reapers sweep every 200 ms; sent in the order of their
     * aims. */
    int64_t aim[100];
    int by_aim[100];
    for (int i = 0; i < 100; i++) {
        static const int offsets[] = {-400, -150, 150, 400};
        if (order(sku, 1000 + i, 1, NULL, ids[i], sizeof(ids[0])) != 202)
            fail_msg("order %d not accepted", i);
        aim[i] = sp_clock_mono_ms() + 1000 + offsets[i % 4];
        by_aim[i] = i;
        for (int j = i; j > 0 && aim[by_aim[j - 1]] > aim[by_aim[j]]; j--) {
            int t = by_aim[j];
            by_aim[j] = by_aim[j - 1];
            by_aim[j - 1] = t;
        }
    }
    /* 202 while the order is open; 409 order_closed once PostgreSQL has it expired (the
     * payment is recorded all the same, refund due). */
    int closed[100] = {0}, nclosed = 0;
    for (int k = 0; k < 100; k++) {
        int i = by_aim[k];
        if (sp_clock_mono_ms() < aim[i]) sleep_ms((int)(aim[i] - sp_clock_mono_ms()));
        int code = pay(ids[i]);
        if (code != 202 && code != 409) fail_msg("payment of %s: %d", ids[i], code);
        closed[i] = code == 409;
        nclosed += closed[i];
    }
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = 'pending'",
                     sku) == 0 &&
                 sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                         " AND returned_to_redis_at IS NULL",
                         sku) == 0,
             "orders of sku %" PRId64 " still pending or owed to Redis", sku);
    int64_t paid = sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                           " AND status = 'paid'",
                           sku);
    int64_t expired = sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                              " AND status = 'expired'",
                              sku);
    int64_t late = sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                           " AND status = 'expired' AND refund_due",
                           sku);
    print_message("    %" PRId64 " paid in time, %" PRId64 " expired (%" PRId64
                  " of them paid too late: refund due)\n",
                  paid, expired, late);
    assert_int_equal(paid + expired, 100);
    /* Every payment answered order_closed is an expired order with its refund due. */
    for (int i = 0; i < 100; i++) {
        if (!closed[i]) continue;
        const char *params[] = {ids[i]};
        assert_int_equal(query_int(g.dsn,
                                   "SELECT count(*) FROM orders WHERE order_id = $1"
                                   " AND status = 'expired' AND refund_due",
                                   1, params),
                         1);
    }
    assert_true(late >= nclosed);
    /* Never both: a paid order has no ledger row and no refund; an expired one exactly one row. */
    assert_int_equal(sku_int("SELECT count(*) FROM orders o JOIN stock_returns r USING (order_id)"
                             " WHERE o.sku_id = $1::bigint AND o.status = 'paid'",
                             sku),
                     0);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'paid' AND (refund_due OR closed_at IS NOT NULL)",
                             sku),
                     0);
    assert_int_equal(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint", sku),
                     expired);
    /* Every payment of an expired order is recorded as a refund, never as a sale. */
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'expired' AND paid_at IS NOT NULL AND NOT refund_due",
                             sku),
                     0);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku),
                     expired);
    assert_int_equal(hget(sku, "sale", "stock"), expired);
    g.npassed++;
}

/* Publishes n events (in order), as the workers would, and waits for Kafka. */
static void publish_events(const sp_event *evs, int n) {
    rd_kafka_conf_t *conf = sp_kafka_conf_new(need_env("KAFKA_BROKERS"), "test-reaper", NULL, err,
                                              sizeof(err));
    assert_non_null(conf);
    rd_kafka_t *rk = sp_kafka_producer_new(&conf, err, sizeof(err));
    if (rk == NULL) fail_msg("%s", err);
    for (int i = 0; i < n; i++)
        if (sp_kafka_produce_event(rk, g.topic, &evs[i], NULL, err, sizeof(err)) != 0)
            fail_msg("%s", err);
    assert_int_equal(rd_kafka_flush(rk, 30000), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(rk);
}

/* Publishes order.expired for n orders of sku, as a reaper would, and waits for Kafka. */
static void publish_expired(int64_t sku, char (*ids)[SP_ORDER_ID_MAX + 1], int n) {
    sp_event *evs = calloc((size_t)n, sizeof(*evs));
    assert_non_null(evs);
    for (int i = 0; i < n; i++) {
        evs[i] = (sp_event){.type = SP_EV_ORDER_EXPIRED,
                            .ts_ms = sp_clock_wall_ms(),
                            .sku_id = sku};
        snprintf(evs[i].order_id, sizeof(evs[i].order_id), "%.*s", SP_ORDER_ID_MAX, ids[i]);
    }
    publish_events(evs, n);
    free(evs);
}

/* Three reapers, one of them killed with kill -9 over and over while 350 orders expire, after
 * reapers "died" at the two awkward moments of a return (recreated exactly: given back but not
 * stamped; stamped but its marker not removed): every return is applied exactly once; Redis
 * equals PostgreSQL; the audit passes. */
static void test_three_reapers_one_killed(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 3;
    static char ids[400][SP_ORDER_ID_MAX + 1], unpaid[15][SP_ORDER_ID_MAX + 1];
    char key[SP_STOCK_KEY_MAX];
    int given = 0;
    open_sale(sku, 400, 1, 1); /* with a per-user limit: Redis keeps the users' counts */
    /* No reaper while the orders come in and the awkward states are made. */
    stop(&g.reapers[0]);
    stop(&g.reapers[1]);
    for (int i = 0; i < 400; i++) {
        if (order(sku, 2000 + i, 1, NULL, ids[i], sizeof(ids[0])) != 202)
            fail_msg("order %d not accepted", i);
        if (i % 8 == 0) assert_int_equal(pay(ids[i]), 202); /* 50 paid, at once */
    }
    for (int i = 0; i < 15; i++) snprintf(unpaid[i], sizeof(unpaid[0]), "%s", ids[1 + i * 2]);
    publish_expired(sku, unpaid, 15);
    WAIT_FOR(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint", sku) == 15,
             "the 15 expiries never reached the ledger");
    assert_int_equal(hget(sku, "sale", "stock"), 0);
    for (int i = 0; i < 15; i++) {
        if (sp_stock_give_back(redis(), sku, unpaid[i], 2001 + i * 2, 1, "expired",
                               sp_clock_wall_ms(), &given, err, sizeof(err)) != 0)
            fail_msg("give_back: %s", err);
        assert_int_equal(given, 1);
    }
    /* Running it again gives nothing: the marker guards it. */
    if (sp_stock_give_back(redis(), sku, unpaid[0], 2001, 1, "expired", sp_clock_wall_ms(), &given,
                           err, sizeof(err)) != 0)
        fail_msg("give_back: %s", err);
    assert_int_equal(given, 0);
    /* A voided reservation whose entry is gone (its producer released it after all) gives
     * nothing: those units came back with the release. */
    if (sp_stock_give_back(redis(), sku, "no-such-reservation", 2001, 1, "voided",
                           sp_clock_wall_ms(), &given, err, sizeof(err)) != 0)
        fail_msg("give_back: %s", err);
    assert_int_equal(given, 0);
    /* Ten died before the stamp; five after it, before removing their markers. */
    for (int i = 10; i < 15; i++) {
        const char *params[] = {unpaid[i]};
        assert_int_equal(
            query_int(g.dsn,
                      "WITH s AS (UPDATE stock_returns SET returned_to_redis_at = now()"
                      " WHERE order_id = $1 RETURNING 1) SELECT count(*) FROM s",
                      1, params),
            1);
    }
    assert_int_equal(hget(sku, "sale", "stock"), 15);
    sp_stock_key(key, sku, "returned");
    assert_int_equal(redis_int("HLEN %s", key), 16);

    g.reapers[0] = start_reaper(0, NULL);
    g.reapers[1] = start_reaper(1, NULL);
    /* The third works in small batches, so a kill often lands inside a drain. */
    g.reapers[2] = start_reaper(2, "7");
    int kills = 0;
    uint32_t r = 12345;
    for (int64_t until = sp_clock_mono_ms() + 8000; sp_clock_mono_ms() < until; kills++) {
        r = r * 1103515245u + 12345u;
        sleep_ms(150 + (int)((r >> 16) % 400));
        assert_int_equal(kill(g.reapers[2].pid, SIGKILL), 0);
        assert_int_equal(wait_exit(g.reapers[2].pid, 30), 128 + SIGKILL);
        g.reapers[2] = start_reaper(2, "7");
    }
    print_message("    the third reaper was killed %d times\n", kills);
    wait_ready(&g.reapers[0], WAIT_S);
    wait_ready(&g.reapers[1], WAIT_S);
    wait_ready(&g.reapers[2], WAIT_S);
    WAIT_FOR(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                     " AND returned_to_redis_at IS NOT NULL",
                     sku) == 350,
             "350 returns never all reached Redis (%" PRId64 ")",
             sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                     " AND returned_to_redis_at IS NOT NULL",
                     sku));
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'expired'",
                             sku),
                     350);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 350);
    /* Every marker is settled: none of the fifteen, nor any a kill left, stays behind. */
    WAIT_FOR(redis_int("HLEN %s", key) == 0, "return markers of sku %" PRId64 " never settled",
             sku);
    assert_int_equal(hget(sku, "sale", "stock"), 350);
    assert_int_equal(hlen(sku, "users"), 50);
    stop(&g.reapers[2]);
    assert_audit_passes();
    g.npassed++;
}

/* A producer that dies between the Redis decrement and Kafka's answer leaves an 'r:'
 * reservation that nobody will confirm or release. Simulated faithfully: reserve.lua is run
 * directly (as the producer does) and its order.created is never published. After
 * RESV_LOST_AFTER_MS the sweep voids it, the consumer cancels it with a ledger row and the units
 * and the buyer's Idempotency-Key come back. Leftover entries of stored orders are dropped
 * without giving anything back. */
static void test_lost_reservation(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 4;
    char real[3][SP_ORDER_ID_MAX + 1], key[SP_STOCK_KEY_MAX], entry[160];
    open_sale(sku, 10, 2, 600);
    for (int i = 0; i < 3; i++)
        assert_int_equal(order(sku, 3001 + i, 1, NULL, real[i], sizeof(real[0])), 202);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) == 3,
             "the three orders never reached PostgreSQL");

    sp_order_ids gen;
    sp_order_ids_init(&gen, "test-dead-producer");
    sp_reserve_request req = {.sku_id = sku,
                              .user_id = 3100,
                              .qty = 2,
                              .ts_ms = sp_clock_wall_ms()};
    sp_order_id_next(&gen, req.ts_ms, sku, req.order_id);
    snprintf(req.idem_key, sizeof(req.idem_key), "lost-key-%s", tag);
    sp_reserve_result res;
    if (sp_stock_reserve(redis(), &req, &res, err, sizeof(err)) != 0) fail_msg("reserve: %s", err);
    assert_int_equal(res.outcome, SP_RESERVE_OK);
    assert_int_equal(hget(sku, "sale", "stock"), 5);
    assert_int_equal(hget_user(sku, 3100), 2);
    /* The consumer's clean-up of two stored orders was lost: an 'r:' whose order.created made it,
     * an accepted entry; both old. */
    sp_stock_key(key, sku, "resv");
    snprintf(entry, sizeof(entry), "r:3001:1:%" PRId64 ":", sp_clock_wall_ms() - 60000);
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, real[0], entry));
    snprintf(entry, sizeof(entry), "a:3002:1:%" PRId64, sp_clock_wall_ms() - 60000);
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, real[1], entry));
    /* A retry of the buyer's key meanwhile is "in progress". */
    assert_int_equal(order(sku, 3100, 2, req.idem_key, NULL, 0), 409);

    WAIT_FOR(hlen(sku, "resv") == 0 &&
                 sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                         " AND returned_to_redis_at IS NOT NULL",
                         sku) == 1,
             "the lost reservation of sku %" PRId64 " was never given back (resv %" PRId64 ")", sku,
             hlen(sku, "resv"));
    const char *params[] = {req.order_id};
    assert_int_equal(query_int(g.dsn,
                               "SELECT count(*) FROM orders WHERE order_id = $1"
                               " AND status = 'cancelled' AND qty = 2 AND user_id = 3100",
                               1, params),
                     1);
    assert_int_equal(query_int(g.dsn,
                               "SELECT count(*) FROM stock_returns WHERE order_id = $1"
                               " AND reason = 'voided'",
                               1, params),
                     1);
    assert_int_equal(hget(sku, "sale", "stock"), 7);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 7);
    assert_int_equal(hget_user(sku, 3100), -1);
    assert_int_equal(hget_user(sku, 3001), 1); /* the stored orders keep their units */
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'pending'",
                             sku),
                     3);
    assert_true(reaper_metric("stockpipe_reaper_voided_total") >= 1);
    /* The buyer heard nothing but 503 or nothing at all: the key is free for a retry. */
    assert_int_equal(order(sku, 3100, 2, req.idem_key, NULL, 0), 202);
    assert_int_equal(hget(sku, "sale", "stock"), 5);
    assert_audit_passes();
    g.npassed++;
}

/* PostgreSQL rejected an order (Redis over-admitted) and the consumer died before it gave the
 * buyer's unit back in Redis (rejected_forget.lua): the entry is left, the buyer's count too
 * high. The sweep finds the rejected order's entry and gives the unit back with it, once. */
static void test_rejected_entry_left_behind(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 9;
    char a[SP_ORDER_ID_MAX + 1], b[SP_ORDER_ID_MAX + 1], key[SP_STOCK_KEY_MAX], entry[160];
    open_sale(sku, 1, 1, 600);
    sp_stock_key(key, sku, "sale");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s stock 2",
                                     key)); /* Redis believes 2 */
    assert_int_equal(order(sku, 4001, 1, NULL, a, sizeof(a)), 202);
    assert_int_equal(order(sku, 4002, 1, NULL, b, sizeof(b)), 202);
    WAIT_FOR(
        sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = 'rejected'",
                sku) == 1 &&
            hlen(sku, "resv") == 0,
        "one of the two orders of sku %" PRId64 " was never rejected and forgotten", sku);
    const char *rejected_id =
        sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = 'rejected'"
                " AND user_id = 4001",
                sku) == 1
            ? a
            : b;
    int64_t user = rejected_id == a ? 4001 : 4002;
    assert_int_equal(hget_user(sku, user), -1); /* the consumer gave it back */
    /* As if the consumer had been killed between its commit and that: entry and count back. */
    sp_stock_key(key, sku, "resv");
    snprintf(entry, sizeof(entry), "a:%" PRId64 ":1:%" PRId64, user, sp_clock_wall_ms() - 60000);
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, rejected_id, entry));
    sp_stock_key(key, sku, "users");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err),
                                     "HINCRBY %s %lld 1", key, (long long)user));
    assert_int_equal(hget_user(sku, user), 1);
    WAIT_FOR(hlen(sku, "resv") == 0, "the rejected order's entry of sku %" PRId64 " was left", sku);
    assert_int_equal(hget_user(sku, user), -1);
    assert_int_equal(hget_user(sku, user == 4001 ? 4002 : 4001), 1); /* the stored one keeps it */
    assert_audit_passes();
    g.npassed++;
}

/* A reconcile that died after reconcile_apply.lua and before its mend and reopen: the sale is
 * still paused (and here its stock too high, as a skipped mend leaves it). The sweep rebuilds it
 * again, reopens it, and Redis agrees with PostgreSQL. */
static void test_sale_left_paused_is_rebuilt(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 10;
    char key[SP_STOCK_KEY_MAX];
    open_sale(sku, 5, 0, 600);
    for (int i = 0; i < 2; i++) assert_int_equal(order(sku, 4101 + i, 1, NULL, NULL, 0), 202);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) == 2 &&
                 hlen(sku, "resv") == 0,
             "the two orders of sku %" PRId64 " never reached PostgreSQL", sku);
    sp_stock_key(key, sku, "sale");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err),
                                     "HSET %s stock 5 paused dead-reaper:1", key));
    assert_false(sale_open(sku));
    WAIT_FOR(sale_open(sku), "the sale of sku %" PRId64 " stayed paused", sku);
    assert_int_equal(hget(sku, "sale", "stock"), 3);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 3);
    assert_audit_passes();
    g.npassed++;
}

/* A reaper in this process, as the workers are, on the run's Redis and database (no Kafka). */
static void reaper_in_process(sp_reaper *rp, sp_config *cfg, const char *name) {
    memset(cfg, 0, sizeof(*cfg));
    snprintf(cfg->redis_url, sizeof(cfg->redis_url), "%s", g.redis_url);
    snprintf(cfg->pg_dsn, sizeof(cfg->pg_dsn), "%.*s", (int)sizeof(cfg->pg_dsn) - 1, g.dsn);
    snprintf(cfg->kafka_topic, sizeof(cfg->kafka_topic), "%s", g.topic);
    snprintf(cfg->worker_id, sizeof(cfg->worker_id), "test-%s-%s", name, tag);
    cfg->kafka_message_timeout_ms = atoi(MSG_TIMEOUT);
    cfg->resv_lost_after_ms = atoi(LOST_AFTER);
    cfg->reconcile_wait_ms = 60000;
    if (sp_reaper_init(rp, cfg, 0, err, sizeof(err)) != 0) fail_msg("reaper: %s", err);
}

/* A field of shard k of sku's sale as an integer; -1 when absent. */
static int64_t shard_hget(int64_t sku, int k, const char *field) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, "sale");
    redisReply *r = sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HGET %s %s", key,
                                     field);
    assert_non_null(r);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

/* Writes shard k's sale fields and a transfer record as a caller that stopped would leave them. */
static void shard_set(int64_t sku, int k, int64_t stock, int64_t moving) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, "sale");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err),
                                     "HSET %s stock %lld moving %lld", key, (long long)stock,
                                     (long long)moving));
}
static void shard_record(int64_t sku, int k, const char *id, const char *kind, int other, int units,
                         int64_t ts, const char *gen) {
    char key[SP_STOCK_KEY_MAX], value[128];
    sp_stock_shard_key(key, sku, k, "xfer");
    snprintf(value, sizeof(value), "%s:%d:%d:%" PRId64 "%s%s", kind, other, units, ts,
             gen ? ":" : "", gen ? gen : "");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, id, value));
}

/* Issue 17 part 3: the reaper completes the transfers between a sharded sale's shards that their
 * callers left open, each once, by its age: taken and never given (given now, or, past every
 * give's bound, given back to the donor), given and never settled (settled; the give adds
 * nothing), too young (left alone); old "in:" records dropped. The sale's units are the same
 * before and after, and a second pass changes nothing. */
static void test_shard_transfers_completed(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 13, now = 0;
    sp_config cfg;
    sp_reaper a;
    sp_shard_sweep sw;
    int opened = 0;
    sp_sharded_sale sale = {.sku_id = sku, .nshards = 3, .gen = "g1", .xfer_prefix = "t"};
    if (sp_stock_open_sharded(redis(), &sale, 9, 0, 600, &opened, err, sizeof(err)) != 0)
        fail_msg("open: %s", err);
    redisReply *t = sp_redis_command(redis(), NULL, itest_err, sizeof(itest_err), "TIME");
    assert_non_null(t);
    now = strtoll(t->element[0]->str, NULL, 10) * 1000;
    freeReplyObject(t);
    /* T1 taken on 0 for 1 (2 units), T2 on 0 for 2 (1, given): shard 0 holds 0, 3 moving. */
    shard_record(sku, 0, "T1", "out", 1, 2, now - 120000, "g1");
    shard_record(sku, 0, "T2", "out", 2, 1, now - 120000, "g1");
    shard_record(sku, 2, "T2", "in", 0, 1, now - 119000, NULL);
    /* T8 taken on 2 for 0 long ago and given, never settled, its "in:" on 0 past its keep: the
     * record proves the give (settled, never aborted: seen failing, its unit back on 2 twice). */
    shard_record(sku, 2, "T8", "out", 0, 1, now - 800000, "g1");
    shard_record(sku, 0, "T8", "in", 2, 1, now - 700000, NULL);
    shard_set(sku, 0, 1, 3); /* +1 T8 */
    /* T3 taken on 1 for 0 long ago, never given; T4 on 1 for 2 long ago, given. */
    shard_record(sku, 1, "T3", "out", 0, 1, now - 400000, "g1");
    shard_record(sku, 1, "T4", "out", 2, 1, now - 400000, "g1");
    shard_record(sku, 2, "T4", "in", 1, 1, now - 399000, NULL);
    shard_set(sku, 1, 1, 2);
    /* T5 taken on 2 for 0 a moment ago (its caller is still at it). */
    shard_record(sku, 2, "T5", "out", 0, 1, now - 30000, "g1");
    shard_set(sku, 2, 3, 2); /* 3, +1 T2, +1 T4, -1 T5, -1 T8 */
    /* Old and young "in:" records of transfers long settled on their donors. */
    shard_record(sku, 1, "T6", "in", 2, 1, now - 700000, NULL);
    shard_record(sku, 0, "T7", "in", 1, 1, now - 100000, NULL);

    reaper_in_process(&a, &cfg, "shards");
    for (int pass = 0; pass < 2; pass++) {
        if (sp_shard_transfers_complete(&a, sku, 3, &sw, err, sizeof(err)) != 0)
            fail_msg("complete: %s", err);
        print_message("    pass %d: %d completed, %d aborted, %d dropped, %d waiting\n", pass + 1,
                      sw.completed, sw.aborted, sw.dropped, sw.waiting);
        assert_int_equal(sw.completed, pass == 0 ? 4 : 0);
        assert_int_equal(sw.aborted, pass == 0 ? 1 : 0);
        assert_int_equal(sw.dropped, pass == 0 ? 2 : 0);
        assert_int_equal(sw.waiting, 1);
        assert_int_equal(shard_hget(sku, 0, "stock"), 1);
        assert_int_equal(shard_hget(sku, 0, "moving"), -1);
        assert_int_equal(shard_hget(sku, 1, "stock"), 4); /* 1, +2 T1, +1 T3 back */
        assert_int_equal(shard_hget(sku, 1, "moving"), -1);
        assert_int_equal(shard_hget(sku, 2, "stock"), 3);
        assert_int_equal(shard_hget(sku, 2, "moving"), 1); /* T5 */
    }
    sp_reaper_close(&a);
    for (int k = 0; k < 3; k++) {
        const char *suffixes[] = {"sale", "xfer", "opening"};
        for (int j = 0; j < 3; j++) {
            char key[SP_STOCK_KEY_MAX];
            sp_stock_shard_key(key, sku, k, suffixes[j]);
            freeReplyObject(
                sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "DEL %s", key));
        }
    }
    g.npassed++;
}

/* Issue 15 hole 8, "reconcile adjust without its token". Reaper A reconciles a SKU: it paused the
 * sale, took its snapshot before an order of 2 units was stored, rebuilt the sale (stock 10) and
 * found the order's entry gone, so its mend must take the 2 units off. Before it does, its
 * PostgreSQL session dies (and with it the SKU's lock); a running reaper finds the sale paused,
 * takes the lock and reconciles it whole (stock 8, the order counted). Then A's mend goes on: its
 * adjust must be refused (the sale is no longer paused by A's token), and A, having lost the
 * session that held the lock, must not write to PostgreSQL on a new one. Redis ends equal to
 * PostgreSQL. */
static void test_reconcile_that_lost_its_lock_writes_nothing(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 11, user = 4301;
    char order_id[SP_ORDER_ID_MAX + 1], key[SP_STOCK_KEY_MAX], entry[96], token[128], pid[24];
    sp_config cfg;
    sp_reaper a;
    int got = 0, owned = 0;
    int64_t stock = 0, inflight = 0;
    sp_vanished *vanished = NULL;
    size_t nvanished = 0, nsettled = 0;
    open_sale(sku, 10, 5, 600); /* with a per-user limit: Redis keeps the users' counts */
    assert_int_equal(order(sku, user, 2, NULL, order_id, sizeof(order_id)), 202);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) == 1 &&
                 hlen(sku, "resv") == 0,
             "the order of sku %" PRId64 " never reached PostgreSQL", sku);

    /* A: the SKU's lock, the pause, and the rebuild from its (older) snapshot. */
    reaper_in_process(&a, &cfg, "reaper-a");
    if (sp_reaper_lock(&a, SP_LOCK_SKU, sku, &got, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(got, 1);
    uint64_t session = a.pg_session;
    snprintf(token, sizeof(token), "%s:%" PRId64, cfg.worker_id, sp_clock_wall_ms());
    sp_redis *ra = sp_reaper_redis(&a, err, sizeof(err));
    if (ra == NULL || sp_stock_reconcile_pause(ra, sku, token, 5, 600, 10, err, sizeof(err)) != 0)
        fail_msg("pause: %s", err);
    sp_stock_key(key, sku, "resv_staged");
    snprintf(entry, sizeof(entry), "a:%" PRId64 ":2:%" PRId64, user, sp_clock_wall_ms());
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, order_id, entry));
    if (sp_stock_reconcile_apply(ra, sku, token, 10, 10, 5, 600, &owned, &stock, &inflight,
                                 &vanished, &nvanished, err, sizeof(err)) != 0)
        fail_msg("apply: %s", err);
    assert_int_equal(owned, 1);
    assert_int_equal(stock, 10);
    assert_int_equal(nvanished, 1);
    assert_string_equal(vanished[0].order_id, order_id);

    /* A's session dies: its lock is free, and a running reaper's sweep rebuilds the sale. */
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(a.pg));
    const char *params[] = {pid};
    assert_int_equal(query_int(g.dsn, "SELECT pg_terminate_backend($1::int)::int", 1, params), 1);
    WAIT_FOR(sale_open(sku), "the sale of sku %" PRId64 " was never rebuilt by another reaper",
             sku);
    assert_int_equal(hget(sku, "sale", "stock"), 8);

    /* A's mend, late: the adjust of the vanished order, then its markers. A statement of its
     * mend finds the session gone first. */
    int64_t after = -1;
    int adjusted = -1;
    int adjust_rc = sp_stock_reconcile_adjust(ra, sku, token, vanished[0].user_id, vanished[0].qty,
                                              &adjusted, &after, err, sizeof(err));
    PGresult *res = sp_reaper_query(&a, "SELECT 1", 0, NULL, err, sizeof(err));
    PQclear(res);
    sp_stock_key(key, sku, "returned");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err),
                                     "HSET %s stale-marker 1", key));
    int settle_rc = sp_stock_return_settle_markers(&a, sku, &nsettled, err, sizeof(err));
    uint64_t sessions = a.pg_session - session;
    sp_reaper_unlock(&a, SP_LOCK_SKU, sku);
    free(vanished);
    sp_reaper_close(&a);
    int64_t pg_stock = sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku);
    if (hget(sku, "sale", "stock") != pg_stock || hget_user(sku, user) != 2 || adjust_rc != 0 ||
        adjusted != 0 || settle_rc == 0 || sessions != 0)
        fail_msg("the reconcile that lost its lock still wrote: its adjust answered %d, applied "
                 "%d (stock after %" PRId64 "); Redis stock %" PRId64 ", PostgreSQL %" PRId64
                 ", user %" PRId64 " counts %" PRId64 " units (2 in PostgreSQL); its marker "
                 "settle answered %d on %" PRIu64 " new sessions",
                 adjust_rc, adjusted, after, hget(sku, "sale", "stock"), pg_stock, user,
                 hget_user(sku, user), settle_rc, sessions);
    WAIT_FOR(redis_int("HLEN %s", key) == 0, "the marker of sku %" PRId64 " was never settled",
             sku);
    assert_audit_passes();
    g.npassed++;
}

/* The same crash for real: the test build of the producer (bin/test/producer) is told to SIGKILL
 * itself right after its second successful reserve.lua, before the order.created reaches
 * librdkafka. The buyer gets no answer; Redis holds a reservation nobody will confirm or release.
 * After RESV_LOST_AFTER_MS the sweep voids it and the units come back, once. */
static void test_producer_killed_after_reserve(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 8;
    open_sale(sku, 6, 3, 600);
    const char *settings[] = {"ADMIN_TOKEN=" ADMIN,
                              "PAYMENT_TOKEN=" PAYMENT,
                              "KAFKA_MESSAGE_TIMEOUT_MS=" MSG_TIMEOUT,
                              "USER_RATE_LIMIT=0",
                              "SP_FAULT_DIE_AFTER_RESERVE=2",
                              NULL};
    proc doomed = start(&stack, BIN "test/producer", "producer-doomed", settings, NULL);
    wait_ready(&doomed, WAIT_S);
    proc saved = g.producer;
    g.producer = doomed; /* order() talks to g.producer */
    int code1 = order(sku, 4001, 1, NULL, NULL, 0);
    int code2 = order(sku, 4002, 2, "doomed-key", NULL, 0);
    g.producer = saved;
    assert_int_equal(code1, 202);
    assert_int_equal(code2, 0); /* no answer: the process died mid-request */
    assert_int_equal(wait_exit(doomed.pid, 30), 128 + SIGKILL);
    /* The decrement happened and its reservation is left behind, unconfirmed. */
    assert_int_equal(hget(sku, "sale", "stock"), 3);
    assert_int_equal(hget_user(sku, 4002), 2);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) == 1,
             "the first order never reached PostgreSQL");

    WAIT_FOR(hlen(sku, "resv") == 0 && hget(sku, "sale", "stock") == 5 &&
                 sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                         " AND reason = 'voided' AND returned_to_redis_at IS NOT NULL",
                         sku) == 1,
             "the dead producer's reservation of sku %" PRId64
             " was never given back (stock %" PRId64 ", resv %" PRId64 ")",
             sku, hget(sku, "sale", "stock"), hlen(sku, "resv"));
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'cancelled' AND user_id = 4002 AND qty = 2",
                             sku),
                     1);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 5);
    assert_int_equal(hget_user(sku, 4002), -1);
    assert_int_equal(hget_user(sku, 4001), 1);
    /* Given back once: later sweeps change nothing. */
    sleep_ms(1500);
    assert_int_equal(hget(sku, "sale", "stock"), 5);
    assert_int_equal(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint", sku),
                     1);
    /* The buyer's key is free again, and the units sell. */
    assert_int_equal(order(sku, 4002, 2, "doomed-key", NULL, 0), 202);
    assert_int_equal(hget(sku, "sale", "stock"), 3);
    assert_audit_passes();
    g.npassed++;
}

/* Orders until the SKU answers sold_out for a while after its sale is open: *accepted counts the
 * 202s. Other answers (404 while Redis has no sale, 409 while a reconcile pauses it) are fine. */
static void sell_out(int64_t sku, int64_t first_user, int *accepted) {
    int64_t user = first_user, deadline = sp_clock_mono_ms() + WAIT_S * 1000;
    int sold_out_in_a_row = 0;
    while (sold_out_in_a_row < 5 && sp_clock_mono_ms() < deadline) {
        int code = order(sku, user++, 1, NULL, NULL, 0);
        if (code == 202) {
            (*accepted)++;
            sold_out_in_a_row = 0;
        } else if (code == 409 && sale_open(sku) && hget(sku, "sale", "stock") == 0) {
            sold_out_in_a_row++;
        } else {
            sleep_ms(50);
        }
    }
    if (sold_out_in_a_row < 5) fail_msg("sku %" PRId64 " never sold out", sku);
}

/* Waits until the consumer stored every order of sku and no reservation is in flight. */
static void wait_quiet(int64_t sku, int accepted) {
    WAIT_FOR(hlen(sku, "resv") == 0 &&
                 sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) >= accepted,
             "sku %" PRId64 " never became quiet", sku);
}

/* Opens a sale of sku (stock units, limit per user, 600 s to pay), takes `before` orders of one
 * unit from user first_user on, has lose_redis() make Redis lose its data, then sells out from
 * user later_user on: the reapers must have counted a data loss, and the consumer stores every
 * order (wait_quiet). The orders accepted. */
static int sell_across_redis_loss(int64_t sku, int stock, int limit, int64_t first_user, int before,
                                  void (*lose_redis)(void), int64_t later_user) {
    int accepted = 0;
    int64_t losses = reaper_metric("stockpipe_reaper_redis_data_loss_total");
    open_sale(sku, stock, limit, 600);
    for (int64_t u = first_user; accepted < before; u++)
        if (order(sku, u, 1, NULL, NULL, 0) == 202) accepted++;
    lose_redis();
    sell_out(sku, later_user, &accepted);
    assert_true(reaper_metric("stockpipe_reaper_redis_data_loss_total") > losses);
    wait_quiet(sku, accepted);
    return accepted;
}

/* A gauge of the audit as the first reaper exports it; -1 when absent. */
static int64_t audit_gauge(const char *series) { return metric(g.reapers[0].port, series); }

/* The audit gauges of the first reaper in one line, for a failure's message. */
static const char *audit_gauges(void) {
    static char line[512];
    snprintf(
        line, sizeof(line),
        "oversold %" PRId64 ", leaked %" PRId64 ", Redis above %" PRId64 ", below %" PRId64
        ", SKUs differing %" PRId64 ", unchecked %" PRId64 ", last clean %" PRId64,
        audit_gauge("stockpipe_reaper_audit_oversold_units"),
        audit_gauge("stockpipe_reaper_audit_leaked_units"),
        audit_gauge("stockpipe_reaper_audit_stock_difference_units{direction=\"redis_above\"}"),
        audit_gauge("stockpipe_reaper_audit_stock_difference_units{direction=\"redis_below\"}"),
        audit_gauge("stockpipe_reaper_audit_skus_differing"),
        audit_gauge("stockpipe_reaper_audit_skus_unchecked"),
        audit_gauge("stockpipe_reaper_audit_last_clean_timestamp_seconds"));
    return line;
}

/* Waits up to 10 AUDIT_INTERVAL_MS for the gauges to read oversold, leaked, Redis above and
 * below PostgreSQL and SKUs differing as given; the seconds it took. */
static double wait_gauges(int64_t oversold, int64_t leaked, int64_t above, int64_t below,
                          int64_t differing, const char *what) {
    int64_t started = sp_clock_mono_ms(), deadline = started + 10 * atoi(AUDIT_EVERY);
    for (;;) {
        if (audit_gauge("stockpipe_reaper_audit_oversold_units") == oversold &&
            audit_gauge("stockpipe_reaper_audit_leaked_units") == leaked &&
            audit_gauge("stockpipe_reaper_audit_stock_difference_units{direction="
                        "\"redis_above\"}") == above &&
            audit_gauge("stockpipe_reaper_audit_stock_difference_units{direction="
                        "\"redis_below\"}") == below &&
            audit_gauge("stockpipe_reaper_audit_skus_differing") == differing)
            return (double)(sp_clock_mono_ms() - started) / 1000;
        if (sp_clock_mono_ms() > deadline)
            fail_msg("%s: the reaper's audit gauges never said so within %d ms: %s", what,
                     10 * atoi(AUDIT_EVERY), audit_gauges());
        sleep_ms(100);
    }
}

/* Issue 15 hole 11, "the oversell/leak state is only in reaper audit's output": the running
 * reaper audits every AUDIT_INTERVAL_MS and exports what it found. After a sale the gauges read 0
 * oversold, 0 leaked, no difference, and a clean audit moments ago; Redis's stock raised by 3
 * shows as 3 units above PostgreSQL on one SKU within the interval, and no clean audit while it
 * lasts; PostgreSQL's stock lowered by one (units gone from its books) shows as 1 leaked; each
 * put back, the gauges are clean again. */
static void test_audit_gauges(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 12;
    char key[SP_STOCK_KEY_MAX];
    open_sale(sku, 20, 0, 600);
    for (int u = 0; u < 5; u++) assert_int_equal(order(sku, 4401 + u, 1, NULL, NULL, 0), 202);
    wait_quiet(sku, 5);
    int64_t before = sp_clock_wall_ms() / 1000;
    double s = wait_gauges(0, 0, 0, 0, 0, "after the sale: nothing wrong");
    WAIT_FOR(audit_gauge("stockpipe_reaper_audit_last_clean_timestamp_seconds") >= before,
             "no clean audit after the sale: %s", audit_gauges());
    print_message("    after the sale: %s (%.1f s)\n", audit_gauges(), s);

    sp_stock_key(key, sku, "sale");
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock 3", key));
    int64_t corrupted = sp_clock_wall_ms() / 1000;
    s = wait_gauges(0, 0, 3, 0, 1, "Redis's stock raised by 3");
    print_message("    Redis's stock raised by 3: %s (after %.1f s)\n", audit_gauges(), s);
    sleep_ms(2 * atoi(AUDIT_EVERY)); /* no clean audit while it lasts */
    assert_true(audit_gauge("stockpipe_reaper_audit_last_clean_timestamp_seconds") <=
                corrupted + 1);
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock -3", key));
    wait_gauges(0, 0, 0, 0, 0, "Redis put back");

    assert_int_equal(sku_int("WITH u AS (UPDATE inventory SET stock = stock - 1"
                             " WHERE sku_id = $1::bigint RETURNING 1) SELECT count(*) FROM u",
                             sku),
                     1);
    s = wait_gauges(0, 1, 1, 0, 1, "PostgreSQL's stock lowered by 1");
    print_message("    PostgreSQL's stock lowered by 1: %s (after %.1f s)\n", audit_gauges(), s);
    assert_int_equal(sku_int("WITH u AS (UPDATE inventory SET stock = stock + 1"
                             " WHERE sku_id = $1::bigint RETURNING 1) SELECT count(*) FROM u",
                             sku),
                     1);
    int64_t repaired = sp_clock_wall_ms() / 1000;
    wait_gauges(0, 0, 0, 0, 0, "PostgreSQL put back");
    WAIT_FOR(audit_gauge("stockpipe_reaper_audit_last_clean_timestamp_seconds") >= repaired,
             "no clean audit once repaired: %s", audit_gauges());
    assert_audit_passes();
    g.npassed++;
}

/* FLUSHALL and SCRIPT FLUSH of every primary (the one server, or the cluster's three). */
static void flush_redis(void) {
    const char *flush[] = {"FLUSHALL"}, *scripts[] = {"SCRIPT", "FLUSH"};
    for (int i = 0, n = sp_redis_primaries(redis()); i < n; i++) {
        freeReplyObject(sp_redis_argv_on(redis(), i, 1, flush, itest_err, sizeof(itest_err)));
        freeReplyObject(sp_redis_argv_on(redis(), i, 2, scripts, itest_err, sizeof(itest_err)));
    }
}

/* Redis flushed in the middle of a sale: the reapers notice, rebuild every SKU from PostgreSQL,
 * and the sale goes on and sells exactly what exists. */
static void test_redis_flushed_mid_sale(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 5;
    int accepted = sell_across_redis_loss(sku, 200, 2, 4001, 60, flush_redis, 5001);
    print_message("    %d orders accepted around the flush\n", accepted);
    assert_int_equal(accepted, 200);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'pending'",
                             sku),
                     200);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'rejected'",
                             sku),
                     0);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 0);
    assert_int_equal(hget(sku, "sale", "stock"), 0);
    /* Every other SKU was rebuilt too: Redis equals PostgreSQL everywhere. */
    assert_audit_passes();
    g.npassed++;
}

static int64_t lost_sku; /* the SKU whose primary restart_redis_empty restarts (a cluster) */

/* kill -9 of the private Redis and a restart, empty (it keeps nothing on disk). A cluster: the
 * primary of lost_sku's slot only; the other primaries keep what they hold. */
static void restart_redis_empty(void) {
    redis_close();
    if (g.cluster) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_key(key, lost_sku, "sale");
        cluster_node_restart_empty(&g.cl, cluster_owner(&g.cl, key), NULL, NULL);
        return;
    }
    assert_int_equal(kill(g.redis_pid, SIGKILL), 0);
    assert_int_equal(wait_exit(g.redis_pid, 30), 128 + SIGKILL);
    g.redis_pid = start_redis(g.redis_port, g.tmp);
}

/* Redis restarted empty (no persistence) mid-sale: a new run_id and no epoch; the same. */
static void test_redis_restarted_empty(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 6;
    lost_sku = sku;
    int accepted = sell_across_redis_loss(sku, 50, 1, 6001, 20, restart_redis_empty, 7001);
    print_message("    %d orders accepted around the restart\n", accepted);
    assert_int_equal(accepted, 50);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'pending'",
                             sku),
                     50);
    assert_int_equal(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                             " AND status = 'rejected'",
                             sku),
                     0);
    assert_int_equal(hlen(sku, "users"), 50);
    assert_audit_passes();
    g.npassed++;
}

/* A catalog of CATALOG finished sales more, then Redis flushed: the two running reapers share the
 * reconcile of every SKU (one pauses them all and rebuilds; the other, finding the reconcile lock
 * taken and the reconcile under way, rebuilds the paused sales whose locks are free), and no sale
 * is rebuilt twice: the SKUs rebuilt, summed over both, are exactly the catalog. */
static void test_replicas_share_a_reconcile(void **state) {
    (void)state;
    char first[24];
    snprintf(first, sizeof(first), "%" PRId64, g.sku_base + 1000);
    const char *params[] = {first, CATALOG_TEXT};
    assert_int_equal(query_int(g.dsn,
                               "WITH ins AS (INSERT INTO inventory (sku_id, stock, version,"
                               " supplied, per_user_limit, pay_timeout_s, created_at, updated_at)"
                               " SELECT $1::bigint + i, 0, 0, 0, 0, 600, now(), now()"
                               " FROM generate_series(1, $2::int) AS i RETURNING 1)"
                               " SELECT count(*) FROM ins",
                               2, params),
                     CATALOG);
    int64_t nskus = query_int(g.dsn, "SELECT count(*) FROM inventory", 0, NULL);
    int64_t before[2], after[2];
    for (int i = 0; i < 2; i++)
        before[i] = metric(g.reapers[i].port, "stockpipe_reaper_reconciled_total");
    int64_t losses = reaper_metric("stockpipe_reaper_redis_data_loss_total");
    flush_redis();
    WAIT_FOR(reaper_metric("stockpipe_reaper_redis_data_loss_total") > losses,
             "no reaper noticed the flush");
    WAIT_FOR(metric(g.reapers[0].port, "stockpipe_reaper_reconciled_total") +
                     metric(g.reapers[1].port, "stockpipe_reaper_reconciled_total") - before[0] -
                     before[1] >=
                 nskus,
             "the %" PRId64 " SKUs were never all rebuilt", nskus);
    sleep_ms(1000); /* a sale rebuilt twice would show by now */
    for (int i = 0; i < 2; i++)
        after[i] = metric(g.reapers[i].port, "stockpipe_reaper_reconciled_total") - before[i];
    print_message("    %" PRId64 " SKUs rebuilt: %" PRId64 " by one reaper, %" PRId64
                  " by the other\n",
                  nskus, after[0], after[1]);
    assert_int_equal(after[0] + after[1], nskus);
    if (after[0] == 0 || after[1] == 0) fail_msg("one reaper did all the work");
    assert_audit_passes();
    g.npassed++;
}

/* `reaper audit` names a SKU whose Redis stock is off; `reaper reconcile --sku` repairs it and
 * its per-user counts. */
static void test_audit_and_reconcile_by_hand(void **state) {
    (void)state;
    static char out[64 * 1024];
    int64_t sku = g.sku_base + 4; /* the lost-reservation SKU: orders, a cancelled one, users */
    char key[SP_STOCK_KEY_MAX], skutext[40], flag[48];
    int64_t stock = hget(sku, "sale", "stock");
    sp_stock_key(key, sku, "sale");
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock 3", key));
    sp_stock_key(key, sku, "users");
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s 999999 4", key));
    int rc = reaper_cmd("audit", NULL, NULL, out, sizeof(out));
    snprintf(skutext, sizeof(skutext), "sku %" PRId64 ":", sku);
    if (rc != 1 || strstr(out, "audit FAILED") == NULL || strstr(out, skutext) == NULL)
        fail_msg("the audit did not report sku %" PRId64 " (exit %d):\n%s", sku, rc, out);
    print_message("    the audit, on purpose after corrupting Redis, said:\n");
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
        print_message("      | %s\n", line);
    snprintf(flag, sizeof(flag), "--sku=%" PRId64, sku);
    rc = reaper_cmd("reconcile", flag, NULL, out, sizeof(out));
    if (rc != 0) fail_msg("reaper reconcile %s exited %d: %s", flag, rc, out);
    assert_int_equal(hget(sku, "sale", "stock"), stock);
    assert_int_equal(hget_user(sku, 999999), -1);
    assert_int_equal(hget_user(sku, 3100), 2);
    /* Bad arguments are a startup error. */
    assert_int_equal(reaper_cmd("reconcile", "--sku=zero", NULL, NULL, 0), 2);
    assert_int_equal(reaper_cmd("sweep", NULL, NULL, NULL, 0), 2);
    assert_audit_passes();
    g.npassed++;
}

/* ---- the audit over a sharded sale (issue 17 part 3) ---- */

/* The sharded sale of the two tests below. */
static const int64_t sharded_audit_sku_offset = 61;

/* The entries of every shard's `resv` of a sale over n shards. */
static int64_t sharded_audit_inflight(int64_t sku, int n) {
    int64_t sum = 0;
    for (int k = 0; k < n; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, sku, k, "resv");
        sum += redis_int("HLEN %s", key);
    }
    return sum;
}

/* `reaper audit` over a sale opened over 3 Redis shards (12 units, 4 a shard, limit 2): Redis's
 * stock is the sum over the shards of stock + moving, a transfer given and not yet settled counted
 * once, and each buyer's count is on the buyer's home shard. Three buyers, one per home shard
 * (users 6003, 6001 and 6002: homes 0, 1, 2), take 1, 2 and 1 units there, and the consumer
 * stores their orders (PostgreSQL: stock 8); then shard 2 passes 2 units to shard 0 by a transfer
 * given and not settled (shard 0: 3 + 2; shard 1: 2; shard 2: 1, 2 moving; "out:" on 2, "in:" on
 * 0), so the shards hold 5 + 2 + 1 + 2 - 2 = 8 units. The audit passes and the running reapers'
 * gauges read nothing differing. Seen failing with the audit that read shard 0 only: "VIOLATION
 * sku ...: Redis stock 5 (supplied 4) != PostgreSQL stock 8 (supplied 12)". */
static void test_audit_sharded_sale_in_transfer(void **state) {
    (void)state;
    enum { NSHARDS = 3 };
    int64_t sku = g.sku_base + sharded_audit_sku_offset, now = sp_clock_wall_ms();
    const int64_t users[] = {6003, 6001, 6002};
    const int32_t qty[] = {1, 2, 1};
    sp_event evs[4] = {{.type = SP_EV_STOCK_SET,
                        .ts_ms = now,
                        .sku_id = sku,
                        .stock = 12,
                        .per_user_limit = 2,
                        .pay_timeout_s = 600,
                        .shards = NSHARDS}};
    sp_sharded_sale sale = {.sku_id = sku, .nshards = NSHARDS, .gen = "ga", .xfer_prefix = "ta"};
    sp_order_ids ids;
    int opened = 0;
    if (sp_stock_open_sharded(redis(), &sale, 12, 2, 600, &opened, err, sizeof(err)) != 0)
        fail_msg("open: %s", err);
    assert_int_equal(opened, NSHARDS);
    sp_order_ids_init(&ids, "test-sharded-audit");
    for (int i = 0; i < 3; i++) {
        sp_reserve_request req = {.sku_id = sku, .user_id = users[i], .qty = qty[i], .ts_ms = now};
        sp_reserve_result res;
        req.shard = sp_stock_home_shard(users[i], NSHARDS);
        assert_int_equal(req.shard, i);
        sp_order_id_next(&ids, now, sku, req.order_id);
        if (sp_stock_reserve(redis(), &req, &res, err, sizeof(err)) != 0)
            fail_msg("reserve: %s", err);
        assert_int_equal(res.outcome, SP_RESERVE_OK);
        evs[1 + i] = (sp_event){.type = SP_EV_ORDER_CREATED,
                                .ts_ms = now,
                                .sku_id = sku,
                                .user_id = users[i],
                                .qty = qty[i],
                                .expires_ms = now + 600000};
        snprintf(evs[1 + i].order_id, sizeof(evs[1 + i].order_id), "%s", req.order_id);
    }
    publish_events(evs, 4);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint"
                     " AND status = 'pending'",
                     sku) == 3 &&
                 sharded_audit_inflight(sku, NSHARDS) == 0,
             "the orders of sku %" PRId64 " were never all stored (%" PRId64 " entries left)", sku,
             sharded_audit_inflight(sku, NSHARDS));
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 8);
    assert_int_equal(sku_int("SELECT shards FROM inventory WHERE sku_id = $1::bigint", sku),
                     NSHARDS);

    sp_shard_transfer t = {.sku_id = sku, .from = 2, .to = 0, .id = "ta:1", .gen = "ga"};
    int64_t taken = 0, take_ts = 0, given = 0;
    if (sp_stock_shard_take(redis(), &t, 2, &taken, &take_ts, err, sizeof(err)) != 0 ||
        sp_stock_shard_give(redis(), &t, taken, take_ts, SP_SHARD_GIVE_WITHIN_MS, &given, err,
                            sizeof(err)) != 0)
        fail_msg("transfer: %s", err);
    assert_int_equal(given, 2);
    assert_int_equal(shard_hget(sku, 0, "stock"), 5);
    assert_int_equal(shard_hget(sku, 1, "stock"), 2);
    assert_int_equal(shard_hget(sku, 2, "stock"), 1);
    assert_int_equal(shard_hget(sku, 2, "moving"), 2);

    assert_audit_passes();
    double s = wait_gauges(0, 0, 0, 0, 0, "a sharded sale in transfer: nothing wrong");
    WAIT_FOR(audit_gauge("stockpipe_reaper_audit_skus_unchecked") == 0 &&
                 audit_gauge("stockpipe_reaper_audit_skus_differing") == 0,
             "the periodic audit never compared every sale and found them equal: %s",
             audit_gauges());
    print_message("    3 shards, a transfer given and not settled: audit passed; %s (%.1f s)\n",
                  audit_gauges(), s);
    g.npassed++;
}

/* The same sale, with one unit too many on shard 1 (Redis would sell 9 of PostgreSQL's 8):
 * `reaper audit` fails naming the SKU and the sum, and the running reapers' gauges read 1 unit
 * above PostgreSQL on 1 SKU; once the unit is taken off again, both are clean. Seen failing with
 * the audit that read shard 0 only: the gauges read "Redis above 0, below 3" (shard 0's 5 against
 * PostgreSQL's 8). */
static void test_audit_sharded_sale_one_unit_too_many(void **state) {
    (void)state;
    static char out[64 * 1024];
    int64_t sku = g.sku_base + sharded_audit_sku_offset;
    char key[SP_STOCK_KEY_MAX], want[160];
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock 1", key));
    double s = wait_gauges(0, 0, 1, 0, 1, "a shard holds one unit too many");
    print_message("    one unit too many on shard 1: %s (after %.1f s)\n", audit_gauges(), s);
    int rc = reaper_cmd("audit", NULL, NULL, out, sizeof(out));
    snprintf(want, sizeof(want),
             "sku %" PRId64 ": Redis stock 9 (supplied 12) summed over 3 shards != PostgreSQL "
             "stock 8 (supplied 12)",
             sku);
    if (rc != 1 || strstr(out, "audit FAILED") == NULL || strstr(out, want) == NULL)
        fail_msg("the audit did not report \"%s\" (exit %d):\n%s", want, rc, out);
    print_message("    the audit said: %s\n", want);
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock -1", key));
    wait_gauges(0, 0, 0, 0, 0, "the unit taken off again");
    assert_audit_passes();
    g.npassed++;
}

/* ---- the ledger and the reservation sweep over a sharded sale (issue 17 part 3) ---- */

enum { HOME_SHARDS = 3 }; /* the shards of the two sales below */

/* User's count on shard k of sku; -1 when absent. */
static int64_t shard_user(int64_t sku, int k, int64_t user) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, "users");
    redisReply *r = sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HGET %s %lld",
                                     key, (long long)user);
    if (r == NULL) fail_msg("HGET %s: %s", key, itest_err);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

static int64_t shard_hlen(int64_t sku, int k, const char *suffix) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, suffix);
    return redis_int("HLEN %s", key);
}

/* Shard k's count of the rises of its stock (0 before the first). */
static int64_t shard_ver(int64_t sku, int k) {
    int64_t v = shard_hget(sku, k, "ver");
    return v < 0 ? 0 : v;
}

/* The two running reapers, started again if a test that stopped them failed before it could. */
static void reapers_running(void) {
    for (int i = 0; i < 2; i++)
        if (g.reapers[i].pid <= 0) {
            g.reapers[i] = start_reaper(i, NULL);
            wait_ready(&g.reapers[i], WAIT_S);
        }
}

/* Every shard's stock, "s0/s1/s2", for comparisons and messages (a static buffer). */
static const char *shard_stocks(int64_t sku) {
    static char line[96];
    snprintf(line, sizeof(line), "%" PRId64 "/%" PRId64 "/%" PRId64, shard_hget(sku, 0, "stock"),
             shard_hget(sku, 1, "stock"), shard_hget(sku, 2, "stock"));
    return line;
}

/* Opens sku over HOME_SHARDS Redis shards (stock spread evenly, generation "g"), as the producer
 * does, and publishes its stock.set with those shards, which gives it its inventory row. */
static void open_sharded_sale(int64_t sku, int stock, int limit) {
    sp_sharded_sale sale = {.sku_id = sku, .nshards = HOME_SHARDS, .gen = "g", .xfer_prefix = "t"};
    int opened = 0;
    if (sp_stock_open_sharded(redis(), &sale, stock, limit, 600, &opened, err, sizeof(err)) != 0)
        fail_msg("open sharded: %s", err);
    assert_int_equal(opened, HOME_SHARDS);
    sp_event set = {.type = SP_EV_STOCK_SET,
                    .ts_ms = sp_clock_wall_ms(),
                    .sku_id = sku,
                    .stock = stock,
                    .per_user_limit = limit,
                    .pay_timeout_s = 600,
                    .shards = HOME_SHARDS};
    publish_events(&set, 1);
    WAIT_FOR(sku_int("SELECT count(*) FROM inventory WHERE sku_id = $1::bigint AND shards = 3",
                     sku) == 1,
             "the inventory row of sku %" PRId64 " (3 shards) never came", sku);
}

/* reserve.lua on the buyer's home shard, as the producer does; the new order's id into id. */
static void reserve_home(int64_t sku, int64_t user, int qty, const char *idem,
                         char id[SP_ORDER_ID_MAX + 1]) {
    static sp_order_ids gen;
    static int ready;
    if (!ready) sp_order_ids_init(&gen, "test-sharded"), ready = 1;
    sp_reserve_request req = {.sku_id = sku,
                              .user_id = user,
                              .qty = qty,
                              .ts_ms = sp_clock_wall_ms(),
                              .shard = sp_stock_home_shard(user, HOME_SHARDS)};
    sp_order_id_next(&gen, req.ts_ms, sku, req.order_id);
    if (idem) snprintf(req.idem_key, sizeof(req.idem_key), "%s", idem);
    sp_reserve_result res;
    if (sp_stock_reserve(redis(), &req, &res, err, sizeof(err)) != 0) fail_msg("reserve: %s", err);
    if (res.outcome != SP_RESERVE_OK)
        fail_msg("reserve of user %" PRId64 " on shard %d: outcome %d", user, (int)req.shard,
                 (int)res.outcome);
    snprintf(id, SP_ORDER_ID_MAX + 1, "%s", req.order_id);
}

/* The order.created of an order reserve_home made, as its producer publishes it. */
static sp_event created(int64_t sku, int64_t user, int qty, const char *id) {
    sp_event ev = {.type = SP_EV_ORDER_CREATED,
                   .ts_ms = sp_clock_wall_ms(),
                   .sku_id = sku,
                   .user_id = user,
                   .qty = qty};
    ev.expires_ms = ev.ts_ms + 600000;
    snprintf(ev.order_id, sizeof(ev.order_id), "%s", id);
    return ev;
}

/* Takes a sharded test sale out of the run (PostgreSQL first, so no sweep finds its sale missing,
 * then every shard's keys): the audits of the tests after it see only what they expect. */
static void drop_sharded_sale(int64_t sku) {
    static const char *const tables[] = {"stock_returns", "reaper_requests", "orders", "inventory"};
    static const char *const suffixes[] = {"sale", "users", "resv", "returned", "xfer", "opening"};
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        char sql[160];
        snprintf(sql, sizeof(sql),
                 "WITH d AS (DELETE FROM %s WHERE sku_id = $1::bigint RETURNING 1)"
                 " SELECT count(*) FROM d",
                 tables[i]);
        (void)sku_int(sql, sku);
    }
    for (int k = 0; k < HOME_SHARDS; k++)
        for (size_t j = 0; j < sizeof(suffixes) / sizeof(suffixes[0]); j++) {
            char key[SP_STOCK_KEY_MAX];
            sp_stock_shard_key(key, sku, k, suffixes[j]);
            freeReplyObject(
                sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "DEL %s", key));
        }
}

/* Issue 17 part 3, "the reaper gives back to shard 0 only": a sale over 3 shards, orders on their
 * buyers' home shards (user mod 3) stored pending, three of them expired. The ledger drain must
 * give each row back on its home shard, once: its stock, its buyer's count, a rise of its `ver`,
 * its marker there; the other shards untouched. A row given back before a crash (its marker on its
 * home shard, the row not stamped) gives nothing again; a second drain gives nothing; markers left
 * on shards 1 and 2 after the stamp are settled (by the reconcile's call, and by a restarted
 * reaper's sweep) and nothing comes back twice. Seen failing with the shard-0-only drain. */
static void test_sharded_returns_on_home_shards(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 14;
    /* homes: 8100 -> shard 0, 8101 -> 1, 8104 -> 1, 8102 -> 2 */
    static const int64_t users[] = {8100, 8101, 8104, 8102};
    static const int qtys[] = {1, 1, 2, 2};
    char ids[4][SP_ORDER_ID_MAX + 1], key[SP_STOCK_KEY_MAX], ms[24];
    int64_t ver[HOME_SHARDS];
    sp_event evs[4];
    sp_config cfg;
    sp_reaper a;
    size_t nreturned = 0, nsettled = 0;
    int given = -1, got = 0;
    /* No running reaper while the awkward states are made: the drains here are the test's. */
    stop(&g.reapers[0]);
    stop(&g.reapers[1]);
    open_sharded_sale(sku, 9, 3); /* 3 units a shard; a per-user limit: Redis keeps counts */
    for (int i = 0; i < 4; i++) {
        reserve_home(sku, users[i], qtys[i], i == 3 ? "sharded-expiry-key" : NULL, ids[i]);
        evs[i] = created(sku, users[i], qtys[i], ids[i]);
    }
    publish_events(evs, 4);
    WAIT_FOR(
        sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint AND status = 'pending'",
                sku) == 4 &&
            shard_hlen(sku, 0, "resv") + shard_hlen(sku, 1, "resv") + shard_hlen(sku, 2, "resv") ==
                0,
        "the 4 orders of sku %" PRId64 " were never stored and forgotten on their shards", sku);
    assert_string_equal(shard_stocks(sku), "2/0/1");
    for (int k = 0; k < HOME_SHARDS; k++) ver[k] = shard_ver(sku, k);

    publish_expired(sku, &ids[1], 3);
    WAIT_FOR(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                     " AND reason = 'expired'",
                     sku) == 3,
             "the 3 expiries of sku %" PRId64 " never reached the ledger", sku);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 8);
    /* A drain that died after the give-back of user 8104's row, before its stamp. */
    if (sp_stock_give_back_on_shard(redis(), sku, 1, ids[2], 8104, 2, "expired", sp_clock_wall_ms(),
                                    &given, err, sizeof(err)) != 0)
        fail_msg("give_back: %s", err);
    assert_int_equal(given, 2);

    reaper_in_process(&a, &cfg, "sharded-drain");
    cfg.reaper_batch = 100;
    for (int pass = 0; pass < 2; pass++) {
        if (sp_stock_return_drain(&a, 10000, &nreturned, err, sizeof(err)) != 0)
            fail_msg("drain: %s", err);
        int64_t owed = sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                               " AND returned_to_redis_at IS NULL",
                               sku);
        /* 2/3/3: shard 0 keeps its pending order's unit, shards 1 and 2 have every unit back. */
        if (strcmp(shard_stocks(sku), "2/3/3") != 0 || owed != 0 ||
            nreturned != (pass == 0 ? 3u : 0u) || shard_ver(sku, 0) != ver[0] ||
            shard_ver(sku, 1) != ver[1] + 2 || shard_ver(sku, 2) != ver[2] + 1)
            fail_msg("drain %d of the sale over 3 shards (sku %" PRId64 "): shard stocks %s (want "
                     "2/3/3); %zu rows stamped (want %d), %" PRId64 " still owed; the shards' ver "
                     "%" PRId64 "/%" PRId64 "/%" PRId64 " (were %" PRId64 "/%" PRId64 "/%" PRId64
                     "); users 8101 and 8104 count %" PRId64 " and %" PRId64 " on shard 1, %" PRId64
                     " and %" PRId64 " on shard 0",
                     pass + 1, sku, shard_stocks(sku), nreturned, pass == 0 ? 3 : 0, owed,
                     shard_ver(sku, 0), shard_ver(sku, 1), shard_ver(sku, 2), ver[0], ver[1],
                     ver[2], shard_user(sku, 1, 8101), shard_user(sku, 1, 8104),
                     shard_user(sku, 0, 8101), shard_user(sku, 0, 8104));
        assert_int_equal(shard_user(sku, 0, 8100), 1); /* the pending order keeps its unit */
        for (int i = 1; i < 4; i++)
            for (int k = 0; k < HOME_SHARDS; k++)
                assert_int_equal(shard_user(sku, k, users[i]), -1);
        for (int k = 0; k < HOME_SHARDS; k++) assert_int_equal(shard_hlen(sku, k, "returned"), 0);
    }

    /* Drains that died after their commit, before removing the markers: on shard 2 (settled by
     * the reconcile's call, which reads the shards from PostgreSQL) and on shard 1 (by a sweep). */
    snprintf(ms, sizeof(ms), "%" PRId64, sp_clock_wall_ms());
    sp_stock_shard_key(key, sku, 2, "returned");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, ids[3], ms));
    if (sp_reaper_lock(&a, SP_LOCK_SKU, sku, &got, err, sizeof(err)) != 0 || !got)
        fail_msg("lock: %s", err);
    int settle_rc = sp_stock_return_settle_markers(&a, sku, &nsettled, err, sizeof(err));
    sp_reaper_unlock(&a, SP_LOCK_SKU, sku);
    sp_reaper_close(&a);
    if (settle_rc != 0 || nsettled != 1 || shard_hlen(sku, 2, "returned") != 0)
        fail_msg("the marker on shard 2 of sku %" PRId64 " was not settled: rc %d, %zu settled, "
                 "%" PRId64 " left",
                 sku, settle_rc, nsettled, shard_hlen(sku, 2, "returned"));
    sp_stock_shard_key(key, sku, 1, "returned");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, ids[1], ms));
    reapers_running();
    WAIT_FOR(shard_hlen(sku, 1, "returned") == 0,
             "the marker on shard 1 of sku %" PRId64 " was never settled by a sweep", sku);
    sleep_ms(1500); /* more sweeps and drains: nothing comes back twice */
    assert_string_equal(shard_stocks(sku), "2/3/3");
    assert_int_equal(shard_ver(sku, 1), ver[1] + 2);
    assert_int_equal(shard_ver(sku, 2), ver[2] + 1);
    assert_int_equal(shard_user(sku, 0, 8100), 1);
    drop_sharded_sale(sku);
    g.npassed++;
}

/* Issue 17 part 3, "the reservation sweep scans shard 0 only": a sale over 3 shards; a producer
 * died after reserve.lua on shard 2 (user 8201's home), so its 'r:' entry is there and nobody
 * confirms or releases it; an old 'r:' leftover of a stored order sits on shard 1. The running
 * reapers' sweep must walk every shard: the lost reservation is voided, the consumer cancels it,
 * and its units, its buyer's count and Idempotency-Key come back on shard 2, once; the leftover
 * on shard 1 is dropped without giving anything; shard 0 is untouched. Seen failing with the
 * shard-0-only sweep. */
static void test_sharded_lost_reservation(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 15, ver[HOME_SHARDS];
    char lost[SP_ORDER_ID_MAX + 1], stored[SP_ORDER_ID_MAX + 1], key[SP_STOCK_KEY_MAX],
        idem[SP_STOCK_KEY_MAX], entry[160];
    reapers_running(); /* their sweep is what this test is about */
    open_sharded_sale(sku, 9, 3);
    /* 8200 (home 1): stored pending; then the consumer's clean-up of its entry is lost. */
    reserve_home(sku, 8200, 1, NULL, stored);
    sp_event ev = created(sku, 8200, 1, stored);
    publish_events(&ev, 1);
    WAIT_FOR(sku_int("SELECT count(*) FROM orders WHERE sku_id = $1::bigint", sku) == 1 &&
                 shard_hlen(sku, 1, "resv") == 0,
             "the order of sku %" PRId64 " never reached PostgreSQL", sku);
    for (int k = 0; k < HOME_SHARDS; k++) ver[k] = shard_ver(sku, k);
    /* 8201 (home 2): reserved, never published. */
    reserve_home(sku, 8201, 2, "sharded-lost-key", lost);
    assert_string_equal(shard_stocks(sku), "3/2/1");
    assert_int_equal(shard_user(sku, 2, 8201), 2);
    snprintf(idem, sizeof(idem), "{sku:%" PRId64 "/2}:idem:8201:sharded-lost-key", sku);
    assert_int_equal(redis_int("EXISTS %s", idem), 1);
    sp_stock_shard_key(key, sku, 1, "resv");
    snprintf(entry, sizeof(entry), "r:8200:1:%" PRId64 ":", sp_clock_wall_ms() - 60000);
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HSET %s %s %s",
                                     key, stored, entry));

    WAIT_FOR(shard_hlen(sku, 2, "resv") == 0 && shard_hlen(sku, 1, "resv") == 0 &&
                 sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint"
                         " AND reason = 'voided' AND returned_to_redis_at IS NOT NULL",
                         sku) == 1,
             "the lost reservation on shard 2 of sku %" PRId64 " was never voided and given back "
             "(shard stocks %s, want 3/2/3; entries left on shard 1: %" PRId64 ", on shard 2: "
             "%" PRId64 "; ledger rows %" PRId64 ")",
             sku, shard_stocks(sku), shard_hlen(sku, 1, "resv"), shard_hlen(sku, 2, "resv"),
             sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint", sku));
    const char *params[] = {lost};
    assert_int_equal(query_int(g.dsn,
                               "SELECT count(*) FROM orders WHERE order_id = $1"
                               " AND status = 'cancelled' AND qty = 2 AND user_id = 8201",
                               1, params),
                     1);
    WAIT_FOR(shard_hlen(sku, 2, "returned") == 0,
             "the marker on shard 2 of sku %" PRId64 " was never removed", sku);
    assert_string_equal(shard_stocks(sku), "3/2/3");
    for (int k = 0; k < HOME_SHARDS; k++) assert_int_equal(shard_user(sku, k, 8201), -1);
    assert_int_equal(redis_int("EXISTS %s", idem), 0); /* the buyer's key is free again */
    assert_int_equal(shard_user(sku, 1, 8200), 1);     /* the stored order keeps its unit */
    assert_int_equal(shard_ver(sku, 0), ver[0]);
    assert_int_equal(shard_ver(sku, 1), ver[1]);
    assert_int_equal(shard_ver(sku, 2), ver[2] + 1);
    /* Given back once: later sweeps change nothing. */
    sleep_ms(1500);
    assert_string_equal(shard_stocks(sku), "3/2/3");
    assert_int_equal(sku_int("SELECT count(*) FROM stock_returns WHERE sku_id = $1::bigint", sku),
                     1);
    assert_int_equal(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku), 8);
    drop_sharded_sale(sku);
    g.npassed++;
}

/* A string field of shard k of sku's sale; "" when absent. */
static void shard_hget_str(int64_t sku, int k, const char *field, char *out, size_t cap) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, "sale");
    redisReply *r = sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HGET %s %s", key,
                                     field);
    assert_non_null(r);
    snprintf(out, cap, "%s", r->type == REDIS_REPLY_STRING ? r->str : "");
    freeReplyObject(r);
}

/* Issue 17 part 3: the reconcile of a sharded sale. 30 units over 3 shards (limit 2); six buyers,
 * two per home shard, order one unit each and PostgreSQL stores them (24 left). Then Redis goes
 * wrong: shard 1 holds 5 units too many, shard 2's sale is gone, shard 0 has a transfer left open
 * (an "out:" record, 2 units moving). `reaper reconcile --sku` rebuilds every shard: none paused,
 * one new generation on all, nothing moving, no transfer record, 8 units each (PostgreSQL's 24),
 * each buyer counted on its home shard only; the sale then sells exactly its 24 units. Seen
 * failing with the reconcile of shard 0 alone: shard 2 stayed missing. */
static void test_sharded_sale_reconciled(void **state) {
    (void)state;
    int64_t sku = g.sku_base + 30;
    const int64_t users[6] = {3, 6, 4, 7, 5, 8}; /* home shards 0, 0, 1, 1, 2, 2 */
    char body[256], resp[1024], key[SP_STOCK_KEY_MAX], flag[48], gen[3][64];
    static char out[64 * 1024];
    snprintf(body, sizeof(body),
             "{\"sku_id\":%" PRId64 ",\"stock\":30,\"per_user_limit\":2,\"pay_timeout_s\":600,"
             "\"shards\":3}",
             sku);
    int code = http(g.producer.port, "POST", "/v1/skus", ADMIN, NULL, body, resp, sizeof(resp));
    if (code != 201) fail_msg("open sharded sku %" PRId64 ": %d %s", sku, code, resp);
    for (int i = 0; i < 6; i++) assert_int_equal(order(sku, users[i], 1, NULL, NULL, 0), 202);
    WAIT_FOR(sku_int("SELECT stock FROM inventory WHERE sku_id = $1::bigint", sku) == 24,
             "PostgreSQL never stored the six orders");
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(
        sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "HINCRBY %s stock 5", key));
    sp_stock_shard_key(key, sku, 2, "sale");
    freeReplyObject(sp_redis_command(redis(), key, itest_err, sizeof(itest_err), "DEL %s", key));
    shard_hget_str(sku, 0, "gen", gen[0], sizeof(gen[0]));
    shard_record(sku, 0, "TX", "out", 1, 2, 1, gen[0]);
    shard_set(sku, 0, shard_hget(sku, 0, "stock"), 2);

    snprintf(flag, sizeof(flag), "--sku=%" PRId64, sku);
    int rc = reaper_cmd("reconcile", flag, NULL, out, sizeof(out));
    if (rc != 0) fail_msg("reaper reconcile %s exited %d: %s", flag, rc, out);
    for (int k = 0; k < 3; k++) {
        shard_hget_str(sku, k, "gen", gen[k], sizeof(gen[k]));
        if (shard_hget(sku, k, "stock") != 8 || shard_hget(sku, k, "shards") != 3 ||
            shard_hget(sku, k, "moving") != -1 || strcmp(gen[k], gen[0]) != 0 || !gen[k][0])
            fail_msg("shard %d after the reconcile: stock %" PRId64 ", shards %" PRId64
                     ", moving %" PRId64 ", gen \"%s\" (shard 0's \"%s\")",
                     k, shard_hget(sku, k, "stock"), shard_hget(sku, k, "shards"),
                     shard_hget(sku, k, "moving"), gen[k], gen[0]);
        char paused[64];
        shard_hget_str(sku, k, "paused", paused, sizeof(paused));
        if (paused[0]) fail_msg("shard %d is still paused (%s)", k, paused);
        sp_stock_shard_key(key, sku, k, "xfer");
        assert_int_equal(redis_int("EXISTS %s", key), 0);
        for (int i = 0; i < 6; i++) {
            char u[24];
            snprintf(u, sizeof(u), "%" PRId64, users[i]);
            sp_stock_shard_key(key, sku, k, "users");
            redisReply *r = sp_redis_command(redis(), key, itest_err, sizeof(itest_err),
                                             "HGET %s %s", key, u);
            assert_non_null(r);
            int64_t held = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : 0;
            freeReplyObject(r);
            if (held != (sp_stock_home_shard(users[i], 3) == k ? 1 : 0))
                fail_msg("buyer %" PRId64 " counts %" PRId64 " on shard %d", users[i], held, k);
        }
    }
    int accepted = 0;
    for (int64_t u = 100; u < 160; u++) {
        code = order(sku, u, 1, NULL, NULL, 0);
        if (code == 202)
            accepted++;
        else if (code != 409)
            fail_msg("buyer %" PRId64 ": %d", u, code);
    }
    assert_int_equal(accepted, 24);
    g.npassed++;
}

/* ---- set-up ---- */

static int group_setup(void **state) {
    (void)state;
    const char *env[] = {"KAFKA_BROKERS", "PG_DSN", NULL};
    if (begin_run("reaper", INT64_C(800000000000), env, tag, sizeof(tag), &g.sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    name_topics("reaper", tag, g.topic, g.dlq, g.group, sizeof(g.topic));
    const char *cluster = getenv("ITEST_REDIS_CLUSTER");
    g.cluster = cluster != NULL && strcmp(cluster, "1") == 0;
    if (g.cluster) print_message("    Redis: a private cluster of three primaries\n");
    g.redis_port = free_port();
    snprintf(g.redis_url, sizeof(g.redis_url), "redis://127.0.0.1:%d", g.redis_port);
    return create_run_topics(&stack, 4);
}

/* Starts Redis, the database and the workers (inside a test, so a failure is reported). */
static void test_start_the_stack(void **state) {
    (void)state;
    if (g.cluster) {
        start_redis_cluster(&g.cl, 3, g.tmp);
        snprintf(g.redis_url, sizeof(g.redis_url), "%s", g.cl.url);
    } else {
        g.redis_pid = start_redis(g.redis_port, g.tmp);
    }
    create_db();
    const char *producer_settings[] = {
        "ADMIN_TOKEN=" ADMIN, "PAYMENT_TOKEN=" PAYMENT, "KAFKA_MESSAGE_TIMEOUT_MS=" MSG_TIMEOUT,
        "USER_RATE_LIMIT=0",  "SALE_SHARDS_MAX=3",      NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    g.producer = start(&stack, BIN "producer", "producer", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    g.reapers[0] = start_reaper(0, NULL);
    g.reapers[1] = start_reaper(1, NULL);
    wait_ready(&g.producer, WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
    wait_ready(&g.reapers[0], WAIT_S);
    wait_ready(&g.reapers[1], WAIT_S);
    /* The consumer must own its partitions before the first order is worth waiting for. */
    WAIT_FOR(metric(g.consumer.port, "stockpipe_consumer_assigned_partitions") == 4,
             "the consumer never owned the topic's 4 partitions");
    /* A reaper's first start on a database reconciles every SKU (nothing is recorded about this
     * Redis yet): the sales the tests open wait for it to have finished, else one opened during
     * its settle wait is paused and rebuilt on its own while a test looks at it. */
    WAIT_FOR(rebuilt_everywhere(), "the reapers' first reconcile never finished");
    g.npassed++;
}

static int group_teardown(void **state) {
    (void)state;
    /* SIGTERM drains: each worker must exit 0. */
    proc *all[] = {&g.reapers[0], &g.reapers[1], &g.reapers[2], &g.producer, &g.consumer};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    redis_close();
    if (g.db[0]) drop_database(g.db);
    delete_run_topics(&stack);
    end_run(g.tmp, g.npassed == NTESTS + 1 && clean, "workers'");
    return clean ? 0 : -1;
}

int main(void) {
    sp_log_init("test-reaper", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_the_stack),
        cmocka_unit_test(test_expiry_returns_stock_once),
        cmocka_unit_test(test_payments_around_the_deadline),
        cmocka_unit_test(test_three_reapers_one_killed),
        cmocka_unit_test(test_lost_reservation),
        cmocka_unit_test(test_rejected_entry_left_behind),
        cmocka_unit_test(test_sale_left_paused_is_rebuilt),
        cmocka_unit_test(test_reconcile_that_lost_its_lock_writes_nothing),
        cmocka_unit_test(test_shard_transfers_completed),
        cmocka_unit_test(test_audit_gauges),
        cmocka_unit_test(test_producer_killed_after_reserve),
        cmocka_unit_test(test_redis_flushed_mid_sale),
        cmocka_unit_test(test_redis_restarted_empty),
        cmocka_unit_test(test_replicas_share_a_reconcile),
        cmocka_unit_test(test_audit_and_reconcile_by_hand),
        cmocka_unit_test(test_audit_sharded_sale_in_transfer),
        cmocka_unit_test(test_audit_sharded_sale_one_unit_too_many),
        cmocka_unit_test(test_sharded_returns_on_home_shards),
        cmocka_unit_test(test_sharded_lost_reservation),
        cmocka_unit_test(test_sharded_sale_reconciled),
    };
    return cmocka_run_group_tests_name("reaper", tests, group_setup, group_teardown);
}
