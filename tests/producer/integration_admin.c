/* integration_admin.c - the admin calls against the real stack: a sale is opened once, in both
 * stores, whatever races or fails.
 *
 * Racing opens (issue 15, hole 3): one SKU opened at the same instant through two producers with
 * different stock. Exactly one answer is 201 and the other 409, and the loser leaves no trace: the
 * log holds one stock.set, and Redis and PostgreSQL both hold the winner's stock. Before, both
 * producers saw "no sale" (EXISTS), both published, and PostgreSQL kept whichever stock.set came
 * first in the log while Redis kept whichever script ran first.
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
#define NTESTS     2
#define ADMIN      "test-admin-token"
#define RACES      12 /* racing pairs of opens, one SKU each */

static char tag[32]; /* unique per run: pid and time */

static struct {
    char tmp[128]; /* logs */
    char db[64], dsn[1200];
    char topic[160], dlq[160], group[160];
    int64_t sku_base;
    proc producers[2], consumer;
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
    const char *producer_settings[] = {"ADMIN_TOKEN=" ADMIN, "KAFKA_MESSAGE_TIMEOUT_MS=5000",
                                       "KAFKA_LINGER_MS=20", NULL};
    const char *consumer_settings[] = {"KAFKA_SESSION_TIMEOUT_MS=6000", NULL};
    g.producers[0] = start(&stack, BIN "producer", "producer-1", producer_settings, NULL);
    g.producers[1] = start(&stack, BIN "producer", "producer-2", producer_settings, NULL);
    g.consumer = start(&stack, BIN "consumer", "consumer", consumer_settings, NULL);
    for (int i = 0; i < 2; i++) wait_ready(&g.producers[i], WAIT_S);
    wait_ready(&g.consumer, WAIT_S);
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
    redisContext *rc = redis_connect_env();
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
        redisReply *rep = redisCommand(rc, "EXISTS %s", key);
        assert_non_null(rep);
        assert_int_equal(rep->integer, 0); /* no claim left behind */
        freeReplyObject(rep);
    }
    redisFree(rc);
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
    proc *all[] = {&g.producers[0], &g.producers[1], &g.consumer};
    int clean = stop_all(all, sizeof(all) / sizeof(all[0]));
    kill_tracked();
    redisContext *rc = redis_connect_env();
    if (rc) {
        char key[SP_STOCK_KEY_MAX];
        for (int r = 0; r < RACES; r++) {
            const char *suffixes[] = {"sale", "opening", "users", "resv"};
            for (int i = 0; i < 4; i++) {
                sp_stock_key(key, g.sku_base + r, suffixes[i]);
                freeReplyObject(redisCommand(rc, "DEL %s", key));
            }
        }
        redisFree(rc);
    }
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
    };
    return cmocka_run_group_tests_name("admin", tests, group_setup, group_teardown);
}
