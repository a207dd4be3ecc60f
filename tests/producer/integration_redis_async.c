/* integration_redis_async.c - the event loop's connection (producer/redis_async.c) against real
 * servers: REDIS_URL names a single server (the local stack's: `. var/stack.env`), a Sentinel, or
 * a Redis Cluster (redis-cluster://h:p,...: 3 primaries + 3 replicas in development). Commands
 * and scripts come back from every primary, a script survives SCRIPT FLUSH, a killed connection
 * answers what it had in flight with NULL and never runs it later, close answers everything once;
 * on a cluster, a slot migrated mid-way (ASK, then MOVED) loses and doubles no call. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "redis_async.h"
#include "redis_cluster.h"
#include "redis_store.h"
#include "itest.h"

#define WAIT_S 10

static char err[512];
static sp_redis_target target;
static struct event_base *base;
static int run_id;

/* Counts the call once (a field per call) and answers how many calls the hash has counted. */
static sp_redis_script count_script = {
    .name = "count_test",
    .body = "redis.call('HINCRBY', KEYS[1], ARGV[1], 1)\nreturn redis.call('HLEN', KEYS[1])\n"};

/* The same over two keys of one slot: a node mid-migration holding one of them answers TRYAGAIN. */
static sp_redis_script count2_script = {
    .name = "count2_test",
    .body =
        "redis.call('HINCRBY', KEYS[1], ARGV[1], 1)\nredis.call('HINCRBY', KEYS[2], ARGV[1], 1)\n"
        "return redis.call('HLEN', KEYS[1])\n"};

/* What one command's callback saw; `calls` must end at 1. */
typedef struct result {
    int calls, null, type;
    long long integer;
    char str[160];
} result;

static void on_result(redisReply *r, void *data) {
    result *res = data;
    res->calls++;
    if (r == NULL) {
        res->null = 1;
        return;
    }
    res->type = r->type;
    res->integer = r->integer;
    if (r->str) snprintf(res->str, sizeof(res->str), "%s", r->str);
}

/* Runs the loop (and the handle's tick every 100 ms) until the n results are in. */
static void run_until_done(sp_redis_async *ra, result *res, int n) {
    int64_t deadline = sp_clock_mono_ms() + WAIT_S * 1000, next_tick = 0;
    for (;;) {
        int done = 1;
        for (int i = 0; i < n; i++) done &= res[i].calls > 0;
        if (done) break;
        if (sp_clock_mono_ms() > deadline) fail_msg("replies missing after %d s", WAIT_S);
        struct timeval tv = {0, 10000};
        event_base_loopexit(base, &tv);
        event_base_dispatch(base);
        if (ra && sp_clock_mono_ms() >= next_tick) {
            sp_redis_async_tick(ra);
            next_tick = sp_clock_mono_ms() + 100;
        }
    }
    for (int i = 0; i < n; i++) assert_int_equal(res[i].calls, 1);
}

/* Runs the loop for ms (ticking), e.g. to write what was sent. */
static void run_for(sp_redis_async *ra, int ms) {
    int64_t until = sp_clock_mono_ms() + ms;
    while (sp_clock_mono_ms() < until) {
        struct timeval tv = {0, 10000};
        event_base_loopexit(base, &tv);
        event_base_dispatch(base);
        if (ra) sp_redis_async_tick(ra);
    }
}

static sp_redis_async *open_handle(void) {
    sp_redis_async *ra = sp_redis_async_open(&target, base, 1000, 3000, err, sizeof(err));
    if (ra == NULL) fail_msg("open: %s", err);
    WAIT_FOR((sp_redis_async_tick(ra), sp_redis_async_usable(ra)), "the handle never got usable");
    return ra;
}

/* A blocking connection to one server: the single server, or the cluster node host:port. */
static redisContext *admin(const char *host, int port) {
    sp_redis_target one = target;
    if (target.cluster) {
        memset(&one, 0, sizeof(one));
        one.nhosts = 1;
        snprintf(one.hosts[0].host, sizeof(one.hosts[0].host), "%s", host);
        one.hosts[0].port = port;
        snprintf(one.password, sizeof(one.password), "%s", target.password);
    }
    redisContext *c = sp_redis_connect(&one, 2000, err, sizeof(err));
    if (c == NULL) fail_msg("admin connection: %s", err);
    return c;
}

/* The cluster's slot map as a seed sees it now; zero nodes for a single server. */
static void read_map(sp_cluster_map *m) {
    sp_cluster_map_clear(m);
    if (!target.cluster) return;
    redisContext *c = admin(target.hosts[0].host, target.hosts[0].port);
    redisReply *r = redisCommand(c, "CLUSTER SLOTS");
    if (sp_cluster_map_read_slots(m, r, target.hosts[0].host, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    freeReplyObject(r);
    redisFree(c);
}

/* The admin connection to the server holding key. */
static redisContext *admin_for(const char *key) {
    sp_cluster_map m;
    read_map(&m);
    if (!target.cluster) return admin(NULL, 0);
    int i = m.slot_node[sp_cluster_key_slot(key, strlen(key))];
    assert_true(i >= 0);
    return admin(m.nodes[i].host, m.nodes[i].port);
}

static void del_key(const char *key) {
    redisContext *c = admin_for(key);
    freeReplyObject(redisCommand(c, "DEL %s", key));
    redisFree(c);
}

static long long hget_int(const char *key, const char *field) {
    redisContext *c = admin_for(key);
    redisReply *r = redisCommand(c, "HGET %s %s", key, field);
    long long v = r && r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    redisFree(c);
    return v;
}

/* Keys of one hash tag each, so that (on a cluster) they fall on every primary. */
#define NKEYS 24
static void key_name(char *buf, size_t len, int i, const char *what) {
    snprintf(buf, len, "{spasync:%d:%d}:%s", run_id, i, what);
}

/* Sends the counting script for key with field; 0 when accepted. */
static int count(sp_redis_async *ra, const char *key, const char *field, result *res) {
    sp_script_call call;
    sp_script_call_init(&call, &count_script, 1);
    sp_script_call_arg(&call, "%s", key);
    sp_script_call_arg(&call, "%s", field);
    return sp_redis_async_eval_call(ra, &call, on_result, res);
}

static void test_commands_and_scripts_on_every_primary(void **state) {
    (void)state;
    sp_redis_async *ra = open_handle();
    char keys[NKEYS][96], counted[NKEYS][96];
    result set[NKEYS] = {0}, get[NKEYS] = {0}, run[NKEYS] = {0};
    for (int i = 0; i < NKEYS; i++) {
        key_name(keys[i], sizeof(keys[i]), i, "str");
        key_name(counted[i], sizeof(counted[i]), i, "count");
        del_key(counted[i]);
        assert_int_equal(
            sp_redis_async_send(ra, on_result, &set[i], keys[i], "SET %s v%d", keys[i], i), 0);
        const char *argv[] = {"GET", keys[i]};
        size_t argvlen[] = {3, strlen(keys[i])};
        assert_int_equal(sp_redis_async_send_argv(ra, on_result, &get[i], 2, argv, argvlen, 1), 0);
        assert_int_equal(count(ra, counted[i], "first", &run[i]), 0);
    }
    assert_int_equal(sp_redis_async_owed(ra), 3 * NKEYS);
    run_until_done(ra, run, NKEYS);
    run_until_done(ra, get, NKEYS);
    assert_int_equal(sp_redis_async_owed(ra), 0);
    for (int i = 0; i < NKEYS; i++) {
        char want[16];
        snprintf(want, sizeof(want), "v%d", i);
        assert_int_equal(set[i].type, REDIS_REPLY_STATUS);
        assert_string_equal(get[i].str, want);
        assert_int_equal(run[i].type, REDIS_REPLY_INTEGER);
        assert_int_equal(run[i].integer, 1);
        assert_int_equal(hget_int(counted[i], "first"), 1); /* where the map says the key is */
    }
    /* The SHA-1 the handle computed is the server's. */
    redisContext *c = admin_for(counted[0]);
    redisReply *r = redisCommand(c, "SCRIPT LOAD %s", count_script.body);
    assert_non_null(r);
    assert_string_equal(r->str, count_script.sha);
    freeReplyObject(r);
    redisFree(c);
    if (target.cluster) { /* the keys were spread over every primary */
        sp_cluster_map m;
        int hit[SP_CLUSTER_NODES_MAX] = {0}, nprimaries = 0, nhit = 0;
        read_map(&m);
        for (int s = 0; s < SP_CLUSTER_SLOTS; s++)
            if (m.slot_node[s] >= 0 && !hit[m.slot_node[s]]) hit[m.slot_node[s]] = 1, nprimaries++;
        memset(hit, 0, sizeof(hit));
        for (int i = 0; i < NKEYS; i++) {
            int n = m.slot_node[sp_cluster_key_slot(counted[i], strlen(counted[i]))];
            if (!hit[n]) hit[n] = 1, nhit++;
        }
        assert_true(nprimaries >= 3);
        assert_int_equal(nhit, nprimaries);
    }
    for (int i = 0; i < NKEYS; i++) del_key(keys[i]), del_key(counted[i]);
    sp_redis_async_close(ra);
}

static void test_noscript_after_script_flush(void **state) {
    (void)state;
    sp_redis_async *ra = open_handle();
    char keys[NKEYS][96];
    result a[NKEYS] = {0}, b[NKEYS] = {0}, c3[NKEYS] = {0};
    sp_redis_async_stats st;
    for (int i = 0; i < NKEYS; i++) {
        key_name(keys[i], sizeof(keys[i]), i, "flush");
        del_key(keys[i]);
        assert_int_equal(count(ra, keys[i], "a", &a[i]), 0);
    }
    run_until_done(ra, a, NKEYS);
    /* One server forgets its scripts (on a cluster: the one holding the first key). */
    redisContext *c = admin_for(keys[0]);
    freeReplyObject(redisCommand(c, "SCRIPT FLUSH"));
    redisFree(c);
    sp_redis_async_stats_get(ra, &st);
    uint64_t before = st.noscript;
    for (int i = 0; i < NKEYS; i++) assert_int_equal(count(ra, keys[i], "b", &b[i]), 0);
    run_until_done(ra, b, NKEYS);
    sp_redis_async_stats_get(ra, &st);
    assert_true(st.noscript > before); /* it was answered NOSCRIPT and sent again as EVAL */
    before = st.noscript;
    for (int i = 0; i < NKEYS; i++) assert_int_equal(count(ra, keys[i], "c", &c3[i]), 0);
    run_until_done(ra, c3, NKEYS);
    sp_redis_async_stats_get(ra, &st);
    assert_int_equal(st.noscript, before); /* EVAL cached it again under the same SHA */
    for (int i = 0; i < NKEYS; i++) {
        assert_int_equal(b[i].type, REDIS_REPLY_INTEGER);
        assert_int_equal(b[i].integer, 2);
        assert_int_equal(c3[i].integer, 3);
        assert_int_equal(hget_int(keys[i], "b"), 1); /* run once, not twice */
    }
    sp_redis_async_close(ra);
}

/* A callback that tries to send again: during close it must be refused. */
typedef struct resender {
    result res;
    sp_redis_async *ra;
    int rc;
} resender;

static void on_resend(redisReply *r, void *data) {
    resender *rs = data;
    on_result(r, &rs->res);
    rs->rc = sp_redis_async_send(rs->ra, on_result, &rs->res, "k", "PING");
}

static void test_close_answers_every_call_once(void **state) {
    (void)state;
    sp_redis_async *ra = open_handle();
    enum { N = 50 };
    resender rs[N];
    for (int i = 0; i < N; i++) {
        char key[96];
        key_name(key, sizeof(key), i % NKEYS, "close");
        rs[i] = (resender){.ra = ra, .rc = 99};
        assert_int_equal(sp_redis_async_send(ra, on_resend, &rs[i], key, "INCR %s", key), 0);
    }
    sp_redis_async_close(ra); /* nothing ran the loop: every call is still owed */
    for (int i = 0; i < N; i++) {
        assert_int_equal(rs[i].res.calls, 1);
        assert_true(rs[i].res.null);
        assert_int_equal(rs[i].rc, -1);
    }
}

/* Kills the handle's connection to the server of key (CLIENT KILL ID) while a BLPOP and a script
 * are in flight on it: both are answered NULL, the script never runs (not sent again), and the
 * next calls go through a new connection. */
static void test_killed_connection_in_flight(void **state) {
    (void)state;
    sp_redis_async *ra = open_handle();
    char key[96], list[96];
    result id = {0}, blpop = {0}, behind = {0}, later = {0};
    sp_redis_async_stats st;
    key_name(key, sizeof(key), 3, "kill");
    key_name(list, sizeof(list), 3, "list");
    del_key(key);
    del_key(list);
    assert_int_equal(sp_redis_async_send(ra, on_result, &id, key, "CLIENT ID"), 0);
    run_until_done(ra, &id, 1);
    assert_int_equal(id.type, REDIS_REPLY_INTEGER);
    assert_int_equal(sp_redis_async_send(ra, on_result, &blpop, list, "BLPOP %s 5", list), 0);
    assert_int_equal(count(ra, key, "behind", &behind), 0);
    run_for(ra, 100); /* both are written; the script waits behind the BLPOP */
    redisContext *c = admin_for(key);
    redisReply *r = redisCommand(c, "CLIENT KILL ID %lld", id.integer);
    assert_non_null(r);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    redisFree(c);
    run_until_done(ra, &blpop, 1);
    run_until_done(ra, &behind, 1);
    assert_true(blpop.null);
    assert_true(behind.null);
    sp_redis_async_stats_get(ra, &st);
    assert_true(st.lost >= 2);
    WAIT_FOR((run_for(ra, 100), sp_redis_async_usable_for(ra, key)), "no new connection");
    assert_int_equal(count(ra, key, "later", &later), 0);
    run_until_done(ra, &later, 1);
    assert_int_equal(later.type, REDIS_REPLY_INTEGER);
    assert_int_equal(later.integer, 1);            /* "behind" was never counted... */
    assert_int_equal(hget_int(key, "behind"), -1); /* ...nor sent again */
    assert_int_equal(sp_redis_async_owed(ra), 0);
    sp_redis_async_close(ra);
}

static void node_id(redisContext *c, char *id, size_t len) {
    redisReply *r = redisCommand(c, "CLUSTER MYID");
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    snprintf(id, len, "%s", r->str);
    freeReplyObject(r);
}

static void admin_ok(redisContext *c, const char *what, redisReply *r) {
    if (r == NULL) fail_msg("%s: %s", what, c->errstr);
    if (r->type == REDIS_REPLY_ERROR) fail_msg("%s: %s", what, r->str);
    freeReplyObject(r);
}

/* Sends n counting calls for key, fields "<phase><i>". */
static void count_many(sp_redis_async *ra, const char *key, char phase, result *res, int n) {
    for (int i = 0; i < n; i++) {
        char field[16];
        snprintf(field, sizeof(field), "%c%d", phase, i);
        assert_int_equal(count(ra, key, field, &res[i]), 0);
    }
}

/* A slot moves from one primary to another under a stream of calls: served by the source, then
 * (MIGRATE done, slot still migrating) ASK to the target, then (SETSLOT NODE) MOVED. Every call
 * answered once, counted once, where the key lives at the end. */
static void test_slot_migrated_mid_way(void **state) {
    (void)state;
    if (!target.cluster) skip();
    enum { N = 20 };
    sp_redis_async *ra = open_handle();
    sp_cluster_map m;
    char key[96], ida[64], idb[64];
    result r1[N] = {0}, r2[N] = {0}, r3[N] = {0}, r4[N] = {0};
    sp_redis_async_stats st0, st;
    char key2[96];
    key_name(key, sizeof(key), 1000, "migrated"); /* a tag of its own */
    key_name(key2, sizeof(key2), 1000, "second");
    del_key(key);
    del_key(key2);
    read_map(&m);
    int slot = (int)sp_cluster_key_slot(key, strlen(key)), a = m.slot_node[slot], b = -1;
    for (int s = 0; s < SP_CLUSTER_SLOTS && b < 0; s++)
        if (m.slot_node[s] >= 0 && m.slot_node[s] != a) b = m.slot_node[s];
    assert_true(a >= 0 && b >= 0);
    redisContext *ca = admin(m.nodes[a].host, m.nodes[a].port);
    redisContext *cb = admin(m.nodes[b].host, m.nodes[b].port);
    node_id(ca, ida, sizeof(ida));
    node_id(cb, idb, sizeof(idb));

    admin_ok(ca, "HSET", redisCommand(ca, "HSET %s x 1", key2));
    count_many(ra, key, 'a', r1, N); /* on the source, as usual */
    run_until_done(ra, r1, N);
    sp_redis_async_stats_get(ra, &st0);
    admin_ok(cb, "IMPORTING", redisCommand(cb, "CLUSTER SETSLOT %d IMPORTING %s", slot, ida));
    admin_ok(ca, "MIGRATING", redisCommand(ca, "CLUSTER SETSLOT %d MIGRATING %s", slot, idb));
    count_many(ra, key, 'b', r2, N);
    run_for(ra, 0);
    struct timeval tv = {0, 1000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base); /* written (some maybe answered) before the key moves */
    admin_ok(ca, "MIGRATE",
             redisCommand(ca, "MIGRATE %s %d %s 0 5000", m.nodes[b].host, m.nodes[b].port, key));
    count_many(ra, key, 'c', r3, N); /* the source has no key now: ASK */
    run_until_done(ra, r2, N);
    run_until_done(ra, r3, N);
    sp_redis_async_stats_get(ra, &st);
    assert_true(st.ask >= st0.ask + N);
    assert_int_equal(st.moved, st0.moved);
    /* A call over both keys while only one has moved: the source answers TRYAGAIN, the handle
     * waits and sends again; once the second key has moved too, ASK takes it to the target. */
    result two = {0};
    const char *argv2[] = {key, key2, "t"};
    size_t argv2len[] = {strlen(key), strlen(key2), 1};
    assert_int_equal(
        sp_redis_async_eval(ra, &count2_script, 2, 3, argv2, argv2len, on_result, &two), 0);
    run_for(ra, 150);
    assert_int_equal(two.calls, 0);
    sp_redis_async_stats_get(ra, &st);
    assert_true(st.retried > st0.retried);
    /* Whatever else the slot holds (key2, other runs' keys) moves too, or the source keeps it. */
    redisReply *left = redisCommand(ca, "CLUSTER GETKEYSINSLOT %d 1000", slot);
    assert_non_null(left);
    for (size_t i = 0; i < left->elements; i++)
        admin_ok(ca, "MIGRATE",
                 redisCommand(ca, "MIGRATE %s %d %s 0 5000", m.nodes[b].host, m.nodes[b].port,
                              left->element[i]->str));
    freeReplyObject(left);
    run_until_done(ra, &two, 1);
    assert_int_equal(two.type, REDIS_REPLY_INTEGER);
    assert_int_equal(two.integer, 3 * N + 1);
    admin_ok(cb, "NODE b", redisCommand(cb, "CLUSTER SETSLOT %d NODE %s", slot, idb));
    admin_ok(ca, "NODE a", redisCommand(ca, "CLUSTER SETSLOT %d NODE %s", slot, idb));
    count_many(ra, key, 'd', r4, N); /* the source answers MOVED */
    run_until_done(ra, r4, N);
    sp_redis_async_stats_get(ra, &st);
    assert_true(st.moved >= st0.moved + 1);

    result *all[] = {r1, r2, r3, r4};
    for (int p = 0; p < 4; p++)
        for (int i = 0; i < N; i++) {
            if (all[p][i].type != REDIS_REPLY_INTEGER)
                fail_msg("phase %d call %d: type %d %s", p, i, all[p][i].type, all[p][i].str);
        }
    assert_int_equal(r4[N - 1].integer, 4 * N + 1);
    redisReply *r = redisCommand(cb, "HGETALL %s", key); /* the key is on the target now */
    assert_non_null(r);
    assert_int_equal(r->elements, 2 * (4 * N + 1));
    for (size_t i = 1; i < r->elements; i += 2) assert_string_equal(r->element[i]->str, "1");
    freeReplyObject(r);
    redisFree(ca);
    redisFree(cb);
    sp_redis_async_close(ra);
}

/* A primary dies (SHUTDOWN NOSAVE) with calls in flight: they are answered NULL and never sent
 * again; once its replica has taken over, the handle's map follows and calls for the slot work.
 * Destructive (the dead node stays down), so only with SP_TEST_CLUSTER_KILL=1. */
static void test_primary_killed_in_flight(void **state) {
    (void)state;
    if (!target.cluster || getenv("SP_TEST_CLUSTER_KILL") == NULL) skip();
    sp_redis_async *ra = open_handle();
    char key[96], list[96];
    result blpop = {0}, behind = {0}, later = {0};
    key_name(key, sizeof(key), 11, "killed");
    key_name(list, sizeof(list), 11, "list");
    del_key(key);
    assert_int_equal(sp_redis_async_send(ra, on_result, &blpop, list, "BLPOP %s 5", list), 0);
    assert_int_equal(count(ra, key, "behind", &behind), 0);
    run_for(ra, 100);
    redisContext *c = admin_for(key);
    freeReplyObject(redisCommand(c, "SHUTDOWN NOSAVE")); /* no reply: the server is gone */
    redisFree(c);
    run_until_done(ra, &blpop, 1);
    run_until_done(ra, &behind, 1);
    assert_true(blpop.null);
    assert_true(behind.null);
    int64_t deadline = sp_clock_mono_ms() + 30000;
    while (!sp_redis_async_usable_for(ra, key) && sp_clock_mono_ms() < deadline) run_for(ra, 100);
    assert_true(sp_redis_async_usable_for(ra, key)); /* the replica took over, the map says so */
    assert_int_equal(count(ra, key, "later", &later), 0);
    run_until_done(ra, &later, 1);
    assert_int_equal(later.type, REDIS_REPLY_INTEGER);
    assert_int_equal(later.integer, 1);
    assert_int_equal(hget_int(key, "behind"), -1);
    sp_redis_async_close(ra);
}

/* Opening against nothing is no error: the handle says it is not usable and refuses sends. */
static void test_unreachable_is_not_usable(void **state) {
    (void)state;
    sp_redis_target none = target;
    int port = free_port();
    none.nhosts = 1;
    snprintf(none.hosts[0].host, sizeof(none.hosts[0].host), "127.0.0.1");
    none.hosts[0].port = port;
    none.sentinel = 0;
    sp_redis_async *ra = sp_redis_async_open(&none, base, 300, 1000, err, sizeof(err));
    assert_non_null(ra);
    assert_false(sp_redis_async_usable(ra));
    result res = {0};
    assert_int_equal(sp_redis_async_send(ra, on_result, &res, "k", "PING"), -1);
    sp_redis_async_tick(ra);
    assert_false(sp_redis_async_usable(ra));
    sp_redis_async_close(ra);
    assert_int_equal(res.calls, 0);
}

static char idle_key[64]; /* the key of test_node_lost_while_idle, on the node that is lost */

/* While the lost node's slots are unserved: the handle notices (its connection is gone) and reads
 * the map, which names nobody for them: a command on that key cannot be sent meanwhile, while the
 * handle as a whole stays usable (the other primaries serve their slots). */
static void while_unserved(void *arg) {
    sp_redis_async *ra = arg;
    run_for(ra, 1500);
    assert_false(sp_redis_async_usable_for(ra, idle_key));
    assert_true(sp_redis_async_usable(ra));
}

/* A private cluster of three primaries, one of which loses everything while the handle is idle
 * (killed, restarted empty, its slots given back to it under a new node id): the handle becomes
 * usable again by itself and its commands for that slot work. (Seen failing: the reconnect made
 * by the tick had nothing to write, so hiredis never finished it and the node stayed failed; and
 * the map read while the slots were unserved was never read again.) */
static void test_node_lost_while_idle(void **state) {
    (void)state;
    char dir[] = "/tmp/stockpipe-test-redis-async-XXXXXX", key[64];
    itest_cluster cl;
    sp_redis_target t;
    assert_non_null(mkdtemp(dir));
    start_redis_cluster(&cl, 3, dir);
    assert_int_equal(sp_redis_parse_url(cl.url, &t, err, sizeof(err)), 0);
    sp_redis_async *ra = sp_redis_async_open(&t, base, 1000, 3000, err, sizeof(err));
    if (ra == NULL) fail_msg("open: %s", err);
    WAIT_FOR((run_for(ra, 100), sp_redis_async_usable(ra)), "the handle never got usable");
    snprintf(key, sizeof(key), "{sku:%d}:idle", run_id);
    snprintf(idle_key, sizeof(idle_key), "%s", key);
    result res[2] = {{0}};
    assert_int_equal(sp_redis_async_send(ra, on_result, &res[0], key, "INCR %s", key), 0);
    run_until_done(ra, &res[0], 1);
    assert_int_equal(res[0].integer, 1);
    cluster_node_restart_empty(&cl, cluster_owner(&cl, key), while_unserved, ra);
    WAIT_FOR((run_for(ra, 100), sp_redis_async_usable_for(ra, key)),
             "the handle never got usable again after a primary came back empty");
    assert_int_equal(sp_redis_async_send(ra, on_result, &res[1], key, "INCR %s", key), 0);
    run_until_done(ra, &res[1], 1);
    assert_int_equal(res[1].type, REDIS_REPLY_INTEGER);
    assert_int_equal(res[1].integer, 1); /* the node came back empty */
    sp_redis_async_close(ra);
    kill_tracked();
    char *rm[] = {(char[]){"/bin/rm"}, (char[]){"-rf"}, dir, NULL};
    (void)run(rm, NULL, "/dev/null", NULL, 0);
}

/* Whatever a test left running (a private cluster whose test failed half-way) goes. */
static int group_teardown(void **state) {
    (void)state;
    kill_tracked();
    return 0;
}

int main(void) {
    char e[256];
    const char *url = getenv("REDIS_URL");
    sp_log_init("redis-async-test", NULL, SP_LOG_ERROR);
    if (url == NULL || sp_redis_parse_url(url, &target, e, sizeof(e)) != 0) {
        fprintf(stderr, "REDIS_URL is not set or bad: run `. var/stack.env` first\n");
        return 1;
    }
    run_id = (int)getpid();
    base = event_base_new();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_commands_and_scripts_on_every_primary),
        cmocka_unit_test(test_noscript_after_script_flush),
        cmocka_unit_test(test_close_answers_every_call_once),
        cmocka_unit_test(test_killed_connection_in_flight),
        cmocka_unit_test(test_slot_migrated_mid_way),
        cmocka_unit_test(test_unreachable_is_not_usable),
        cmocka_unit_test(test_node_lost_while_idle),
        cmocka_unit_test(test_primary_killed_in_flight), /* last: it leaves a node down */
    };
    int rc = cmocka_run_group_tests_name("redis_async", tests, NULL, group_teardown);
    event_base_free(base);
    return rc;
}
