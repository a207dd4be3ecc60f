/* integration_stack_smoke.c - the local stack is real and the shared helpers work against it: an
 * event goes through the real Kafka broker and comes back decoded, a row goes through PostgreSQL's
 * guarded update, a key and a Lua script go through Redis. Needs var/stack.env loaded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "event.h"
#include "kafka.h"
#include "log.h"
#include "pg_store.h"
#include "redis_store.h"
#include "itest.h"

static char err[1024];

/* ---- Redis ---- */

static void test_redis_key_and_script(void **state) {
    (void)state;
    sp_redis_target target;
    char key[64], val[32];
    assert_int_equal(sp_redis_parse_url(need_env("REDIS_URL"), &target, err, sizeof(err)), 0);
    sp_redis *c = sp_redis_open(&target, 2000, err, sizeof(err));
    if (c == NULL) fail_msg("connect: %s", err);
    assert_int_equal(sp_redis_ping(c, err, sizeof(err)), 0);

    snprintf(key, sizeof(key), "{sku:smoke}:test:%d", (int)getpid());
    snprintf(val, sizeof(val), "%lld", (long long)sp_clock_wall_ms());
    redisReply *r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "SET %s %s", key, val);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "GET %s", key);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, val);
    freeReplyObject(r);

    /* EVALSHA loads the script on first use and again after the server forgot it (NOSCRIPT), as
     * after a restart or failover. */
    sp_redis_script incr = {.name = "smoke_incr",
                            .body = "return redis.call('INCRBY', KEYS[1], ARGV[1])"};
    const char *argv[] = {key, "5"};
    const size_t argvlen[] = {strlen(key), 1};
    r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "SET %s 10", key);
    freeReplyObject(r);
    r = sp_redis_evalsha(c, &incr, 1, 2, argv, argvlen, err, sizeof(err));
    if (r == NULL) fail_msg("evalsha: %s", err);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    assert_int_equal(r->integer, 15);
    freeReplyObject(r);
    assert_int_equal(strlen(incr.sha), 40);
    r = sp_redis_command(c, NULL, itest_err, sizeof(itest_err), "SCRIPT FLUSH");
    freeReplyObject(r);
    r = sp_redis_evalsha(c, &incr, 1, 2, argv, argvlen, err, sizeof(err));
    if (r == NULL) fail_msg("evalsha after SCRIPT FLUSH: %s", err);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    assert_int_equal(r->integer, 20);
    freeReplyObject(r);

    r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key);
    assert_non_null(r);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    sp_redis_close(c);
}

static void test_redis_unreachable_is_an_error(void **state) {
    (void)state;
    sp_redis_target target;
    assert_int_equal(sp_redis_parse_url("redis://127.0.0.1:1", &target, err, sizeof(err)), 0);
    assert_null(sp_redis_open(&target, 500, err, sizeof(err)));
    assert_non_null(strstr(err, "127.0.0.1:1"));
}

/* ---- Kafka ---- */

static rd_kafka_t *new_producer(void) {
    rd_kafka_conf_t *conf = sp_kafka_conf_new(need_env("KAFKA_BROKERS"), "smoke-test", NULL, err,
                                              sizeof(err));
    if (conf == NULL) fail_msg("conf: %s", err);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_t *rk = sp_kafka_producer_new(&conf, err, sizeof(err));
    assert_null(conf); /* ownership was taken */
    if (rk == NULL) fail_msg("producer: %s", err);
    return rk;
}

static void produce_and_wait(rd_kafka_t *rk, const char *topic, const sp_event *ev, delivery *d) {
    memset(d, 0, sizeof(*d));
    if (sp_kafka_produce_event(rk, topic, ev, d, err, sizeof(err)) != 0)
        fail_msg("produce: %s", err);
    assert_int_equal(rd_kafka_flush(rk, 15000), RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_true(d->done);
    assert_int_equal(d->err, RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_true(d->offset >= 0);
}

static void test_kafka_event_round_trip(void **state) {
    (void)state;
    const char *topic = need_env("KAFKA_TOPIC");
    rd_kafka_t *producer = new_producer();
    int npartitions = 0;
    assert_int_equal(
        sp_kafka_topic_partitions(producer, topic, 5000, &npartitions, err, sizeof(err)), 0);
    assert_true(npartitions >= 1);

    sp_event ev = {.type = SP_EV_ORDER_CREATED,
                   .ts_ms = sp_clock_wall_ms(),
                   .sku_id = 900000 + getpid() % 1000,
                   .user_id = 42,
                   .qty = 2};
    ev.expires_ms = ev.ts_ms + 600000;
    snprintf(ev.order_id, sizeof(ev.order_id), "smoke-%lld-%d", (long long)ev.ts_ms, (int)getpid());
    delivery first, second;
    produce_and_wait(producer, topic, &ev, &first);
    /* Same key, same partition: one SKU's events stay in order. */
    sp_event paid = {.type = SP_EV_ORDER_PAID, .ts_ms = ev.ts_ms + 1, .sku_id = ev.sku_id};
    memcpy(paid.order_id, ev.order_id, sizeof(ev.order_id));
    produce_and_wait(producer, topic, &paid, &second);
    assert_int_equal(second.partition, first.partition);
    assert_true(second.offset > first.offset);
    rd_kafka_destroy(producer);

    /* Read it back from exactly where the broker said it is. */
    rd_kafka_conf_t *conf = sp_kafka_conf_new(need_env("KAFKA_BROKERS"), "smoke-test", NULL, err,
                                              sizeof(err));
    assert_non_null(conf);
    char group[64];
    snprintf(group, sizeof(group), "smoke-%d", (int)getpid());
    rd_kafka_t *consumer = sp_kafka_consumer_new(&conf, group, err, sizeof(err));
    if (consumer == NULL) fail_msg("consumer: %s", err);
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(parts, topic, first.partition)->offset = first.offset;
    assert_int_equal(rd_kafka_assign(consumer, parts), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(parts);

    int found = 0;
    int64_t deadline = sp_clock_wall_ms() + 20000;
    while (!found && sp_clock_wall_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(consumer, 500);
        if (m == NULL) continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR && m->offset == first.offset) {
            sp_event got;
            char key[24];
            snprintf(key, sizeof(key), "%lld", (long long)ev.sku_id);
            assert_int_equal(m->key_len, strlen(key));
            assert_memory_equal(m->key, key, m->key_len);
            assert_int_equal(sp_event_decode(m->payload, m->len, &got, err, sizeof(err)), 0);
            assert_int_equal(got.type, SP_EV_ORDER_CREATED);
            assert_string_equal(got.order_id, ev.order_id);
            assert_int_equal(got.sku_id, ev.sku_id);
            assert_int_equal(got.user_id, 42);
            assert_int_equal(got.qty, 2);
            assert_int_equal(got.ts_ms, ev.ts_ms);
            assert_int_equal(got.expires_ms, ev.expires_ms);
            found = 1;
        }
        rd_kafka_message_destroy(m);
    }
    assert_true(found);
    assert_int_equal(rd_kafka_consumer_close(consumer), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(consumer);
}

/* A consumer group against the pinned broker: join (JoinGroup/SyncGroup), read, commit
 * (OffsetCommit), and a later member of the same group finds the committed position
 * (OffsetFetch). This is what keeps the README's compatibility claim for the broker honest. */
static rd_kafka_t *join_group(const char *group) {
    rd_kafka_conf_t *conf = sp_kafka_conf_new(need_env("KAFKA_BROKERS"), "smoke-group", NULL, err,
                                              sizeof(err));
    assert_non_null(conf);
    rd_kafka_t *rk = sp_kafka_consumer_new(&conf, group, err, sizeof(err));
    if (rk == NULL) fail_msg("consumer: %s", err);
    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, need_env("KAFKA_TOPIC"), RD_KAFKA_PARTITION_UA);
    assert_int_equal(rd_kafka_subscribe(rk, topics), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(topics);
    return rk;
}

static void test_kafka_consumer_group_commit_and_resume(void **state) {
    (void)state;
    const char *topic = need_env("KAFKA_TOPIC");
    char group[64];
    delivery d;
    snprintf(group, sizeof(group), "smoke-group-%d-%lld", (int)getpid(),
             (long long)sp_clock_wall_ms());

    /* Join first, so the event produced next is certainly ahead of the member. */
    rd_kafka_t *a = join_group(group);
    int64_t deadline = sp_clock_wall_ms() + 30000;
    rd_kafka_topic_partition_list_t *assigned = NULL;
    while (sp_clock_wall_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(a, 200);
        if (m) rd_kafka_message_destroy(m);
        assert_int_equal(rd_kafka_assignment(a, &assigned), RD_KAFKA_RESP_ERR_NO_ERROR);
        if (assigned->cnt > 0) break;
        rd_kafka_topic_partition_list_destroy(assigned);
        assigned = NULL;
    }
    if (assigned == NULL) fail_msg("the group never assigned a partition");
    rd_kafka_topic_partition_list_destroy(assigned);

    rd_kafka_t *producer = new_producer();
    sp_event ev = {.type = SP_EV_ORDER_PAID,
                   .ts_ms = sp_clock_wall_ms(),
                   .sku_id = 910000 + getpid() % 1000};
    snprintf(ev.order_id, sizeof(ev.order_id), "smoke-group-%d", (int)getpid());
    produce_and_wait(producer, topic, &ev, &d);
    rd_kafka_destroy(producer);

    int got = 0;
    deadline = sp_clock_wall_ms() + 30000;
    while (!got && sp_clock_wall_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(a, 500);
        if (m == NULL) continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR && m->partition == d.partition &&
            m->offset == d.offset) {
            assert_int_equal(rd_kafka_commit_message(a, m, 0), RD_KAFKA_RESP_ERR_NO_ERROR);
            got = 1;
        }
        rd_kafka_message_destroy(m);
    }
    assert_true(got);
    assert_int_equal(rd_kafka_consumer_close(a), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(a);

    /* A new member of the group sees the position the first one committed. */
    rd_kafka_t *b = join_group(group);
    rd_kafka_topic_partition_list_t *pos = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(pos, topic, d.partition);
    assert_int_equal(rd_kafka_committed(b, pos, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(pos->elems[0].err, RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(pos->elems[0].offset, d.offset + 1);
    rd_kafka_topic_partition_list_destroy(pos);
    assert_int_equal(rd_kafka_consumer_close(b), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(b);
}

/* ---- PostgreSQL ---- */

static int64_t count_rows(PGconn *pg, const char *sql, int n, const char *const *params) {
    PGresult *res = sp_pg_query(pg, sql, n, params, err, sizeof(err));
    if (res == NULL) fail_msg("%s: %s", sql, err);
    int64_t v = atoll(PQgetvalue(res, 0, 0));
    PQclear(res);
    return v;
}

static void test_pg_schema_and_guarded_update(void **state) {
    (void)state;
    PGconn *pg = sp_pg_connect(need_env("PG_DSN"), "smoke-test", err, sizeof(err));
    if (pg == NULL) fail_msg("%s", err);

    /* The migrations ran and recorded themselves. */
    const char *tables[] = {"inventory", "orders", "consumer_offsets", "stock_returns",
                            "schema_migrations"};
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        const char *p[] = {tables[i]};
        assert_int_equal(count_rows(pg,
                                    "SELECT count(*) FROM information_schema.tables "
                                    "WHERE table_schema = 'public' AND table_name = $1",
                                    1, p),
                         1);
    }
    assert_true(count_rows(pg, "SELECT count(*) FROM schema_migrations", 0, NULL) >= 1);

    /* Everything below happens in a transaction that is rolled back: the test leaves nothing. */
    assert_int_equal(sp_pg_exec(pg, "BEGIN", 0, NULL, err, sizeof(err)), 0);
    char sku[24];
    snprintf(sku, sizeof(sku), "%d", 800000000 + (int)getpid());
    const char *ins[] = {sku};
    if (sp_pg_exec(
            pg,
            "INSERT INTO inventory (sku_id, stock, version, supplied, per_user_limit, "
            "pay_timeout_s, created_at, updated_at) VALUES ($1, 3, 0, 3, 1, 600, now(), now())",
            1, ins, err, sizeof(err)) != 0)
        fail_msg("%s", err);

    static const char guarded[] = "UPDATE inventory SET stock = stock - $3, version = version + 1 "
                                  "WHERE sku_id = $1 AND version = $2 AND stock >= $3";
    const char *take2[] = {sku, "0", "2"};
    PGresult *res = sp_pg_query(pg, guarded, 3, take2, err, sizeof(err));
    assert_non_null(res);
    assert_string_equal(PQcmdTuples(res), "1");
    PQclear(res);
    /* A stale version changes nothing. */
    res = sp_pg_query(pg, guarded, 3, take2, err, sizeof(err));
    assert_non_null(res);
    assert_string_equal(PQcmdTuples(res), "0");
    PQclear(res);
    /* More than is left changes nothing. */
    const char *take2more[] = {sku, "1", "2"};
    res = sp_pg_query(pg, guarded, 3, take2more, err, sizeof(err));
    assert_non_null(res);
    assert_string_equal(PQcmdTuples(res), "0");
    PQclear(res);
    assert_int_equal(count_rows(pg, "SELECT stock FROM inventory WHERE sku_id = $1", 1, ins), 1);
    assert_int_equal(count_rows(pg, "SELECT version FROM inventory WHERE sku_id = $1", 1, ins), 1);

    /* Even an unguarded write cannot take stock below zero: the schema refuses it. */
    assert_int_equal(sp_pg_exec(pg, "SAVEPOINT s", 0, NULL, err, sizeof(err)), 0);
    assert_int_equal(sp_pg_exec(pg, "UPDATE inventory SET stock = stock - 5 WHERE sku_id = $1", 1,
                                ins, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "inventory_stock_check"));
    assert_int_equal(sp_pg_exec(pg, "ROLLBACK TO SAVEPOINT s", 0, NULL, err, sizeof(err)), 0);

    /* An order row with a status outside the state machine is refused. */
    const char *bad_order[] = {sku};
    assert_int_equal(
        sp_pg_exec(pg,
                   "INSERT INTO orders (order_id, user_id, sku_id, qty, status, "
                   "created_at, expires_at) VALUES ('smoke-x', 1, $1, 1, 'shipped', now(), now())",
                   1, bad_order, err, sizeof(err)),
        -1);
    assert_non_null(strstr(err, "orders_status_check"));

    assert_int_equal(sp_pg_exec(pg, "ROLLBACK", 0, NULL, err, sizeof(err)), 0);
    assert_int_equal(count_rows(pg, "SELECT count(*) FROM inventory WHERE sku_id = $1", 1, ins), 0);
    PQfinish(pg);
}

int main(void) {
    sp_log_init("smoke-test", NULL, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redis_key_and_script),
        cmocka_unit_test(test_redis_unreachable_is_an_error),
        cmocka_unit_test(test_kafka_event_round_trip),
        cmocka_unit_test(test_kafka_consumer_group_commit_and_resume),
        cmocka_unit_test(test_pg_schema_and_guarded_update),
    };
    return cmocka_run_group_tests_name("stack_smoke", tests, NULL, NULL);
}
