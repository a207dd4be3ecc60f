/* integration_redis_cluster.c - the blocking connection (sp_redis) against a real Redis Cluster
 * of its own: three primaries on private ports, made with redis-cli --cluster create. Routing by
 * slot, scripts on every primary (NOSCRIPT after a node's SCRIPT FLUSH), MOVED after a slot moved,
 * ASK while it moves, a killed connection (NULL, never sent again), pipelines across slots. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "itest.h"
#include "redis_cluster.h"
#include "redis_store.h"

#define WAIT_S 30
#define NODES  3

static struct {
    char tag[64], tmp[256], url[128];
    itest_cluster cl;
    int64_t sku_base;
} g;

static char err[512];

/* A raw connection to one node, for what the test checks behind sp_redis's back. */
static redisContext *node(int i) {
    redisContext *c = redisConnect("127.0.0.1", g.cl.port[i]);
    if (c == NULL || c->err) fail_msg("node %d: %s", i, c ? c->errstr : "out of memory");
    return c;
}

static int node_ok(int i, const char *fmt, ...) {
    va_list ap;
    redisContext *c = node(i);
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    int ok = r && r->type != REDIS_REPLY_ERROR;
    if (!ok) fprintf(stderr, "node %d: %s\n", i, r ? r->str : c->errstr);
    if (r) freeReplyObject(r);
    redisFree(c);
    return ok;
}

static char *node_id(int i, char *id, size_t cap) {
    redisReply *r = cluster_node_cmd(&g.cl, i, "CLUSTER MYID");
    snprintf(id, cap, "%s", r->str);
    freeReplyObject(r);
    return id;
}

/* The index of the node that serves key's slot. */
static int owner_of(const char *key) { return cluster_owner(&g.cl, key); }

static sp_redis *open_cluster(void) {
    sp_redis_target t;
    if (sp_redis_parse_url(g.url, &t, err, sizeof(err)) != 0) fail_msg("%s", err);
    sp_redis *r = sp_redis_open(&t, 2000, err, sizeof(err));
    if (r == NULL) fail_msg("open: %s", err);
    return r;
}

static int setup(void **state) {
    (void)state;
    const char *none[] = {NULL};
    if (begin_run("redis-cluster", 9100000000LL, none, g.tag, sizeof(g.tag), &g.sku_base, g.tmp,
                  sizeof(g.tmp)) != 0)
        return -1;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    kill_tracked();
    end_run(g.tmp, 1, "cluster's");
    return 0;
}

/* Three primaries, all slots covered, cluster_state ok everywhere. */
static void test_cluster_up(void **state) {
    (void)state;
    start_redis_cluster(&g.cl, NODES, g.tmp);
    snprintf(g.url, sizeof(g.url), "redis-cluster://127.0.0.1:%d", g.cl.port[1]);
}

/* Every command goes to its key's primary: keys of 60 SKUs spread over the three nodes, each one
 * found on the node CLUSTER SLOTS names for its slot. */
static void test_routing(void **state) {
    (void)state;
    sp_redis *r = open_cluster();
    assert_true(sp_redis_is_cluster(r));
    assert_int_equal(sp_redis_primaries(r), NODES);
    assert_int_equal(sp_redis_ping(r, err, sizeof(err)), 0);
    int per_node[NODES] = {0};
    for (int64_t i = 0; i < 60; i++) {
        char key[64];
        snprintf(key, sizeof(key), "{sku:%" PRId64 "}:route", g.sku_base + i);
        redisReply *rep = sp_redis_command(r, key, err, sizeof(err), "SET %s %lld", key,
                                           (long long)i);
        if (rep == NULL || rep->type == REDIS_REPLY_ERROR)
            fail_msg("SET %s: %s", key, rep ? rep->str : err);
        freeReplyObject(rep);
        int n = owner_of(key);
        assert_true(n >= 0);
        redisReply *got = cluster_node_cmd(&g.cl, n, "GET %s", key);
        assert_int_equal(got->type, REDIS_REPLY_STRING);
        assert_int_equal(atoll(got->str), i);
        freeReplyObject(got);
        per_node[n]++;
    }
    for (int n = 0; n < NODES; n++) assert_true(per_node[n] > 0);
    /* a command on no key runs on some primary */
    redisReply *t = sp_redis_command(r, NULL, err, sizeof(err), "TIME");
    assert_non_null(t);
    assert_int_equal(t->type, REDIS_REPLY_ARRAY);
    freeReplyObject(t);
    /* a pipeline across slots: replies in the commands' order */
    char keys[6][64];
    const char *argv[6][2];
    sp_redis_cmd cmds[6];
    redisReply *replies[6];
    for (int i = 0; i < 6; i++) {
        snprintf(keys[i], sizeof(keys[i]), "{sku:%" PRId64 "}:route", g.sku_base + i * 7);
        argv[i][0] = "GET", argv[i][1] = keys[i];
        cmds[i] = (sp_redis_cmd){.key = keys[i], .argc = 2, .argv = argv[i]};
    }
    assert_int_equal(sp_redis_pipeline(r, 6, cmds, replies, err, sizeof(err)), 0);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(replies[i]->type, REDIS_REPLY_STRING);
        assert_int_equal(atoll(replies[i]->str), i * 7);
        freeReplyObject(replies[i]);
    }
    sp_redis_close(r);
}

static sp_redis_script incr_script = {.name = "cluster_incr",
                                      .body = "return redis.call('INCRBY', KEYS[1], ARGV[1])"};

/* Scripts load on every primary; a node that lost its script cache runs the body (EVAL). */
static void test_scripts(void **state) {
    (void)state;
    sp_redis *r = open_cluster();
    assert_int_equal(sp_redis_script_load(r, &incr_script, err, sizeof(err)), 0);
    for (int n = 0; n < NODES; n++) {
        redisReply *e = cluster_node_cmd(&g.cl, n, "SCRIPT EXISTS %s", incr_script.sha);
        assert_int_equal(e->element[0]->integer, 1);
        freeReplyObject(e);
    }
    char key[64];
    snprintf(key, sizeof(key), "{sku:%" PRId64 "}:count", g.sku_base);
    const char *argv[] = {key, "5"};
    int n = owner_of(key);
    for (int round = 1; round <= 2; round++) {
        redisReply *rep = sp_redis_evalsha(r, &incr_script, 1, 2, argv, NULL, err, sizeof(err));
        if (rep == NULL || rep->type != REDIS_REPLY_INTEGER)
            fail_msg("evalsha: %s", rep && rep->type == REDIS_REPLY_ERROR ? rep->str : err);
        assert_int_equal(rep->integer, 5 * round);
        freeReplyObject(rep);
        assert_true(node_ok(n, "SCRIPT FLUSH")); /* the next call finds NOSCRIPT */
    }
    sp_redis_close(r);
}

/* Ends a move: the keys still on `from` go over, then every node gives the slot to `to`. */
static void finish_move(unsigned slot, int from, int to) {
    char to_id[64];
    for (;;) {
        redisReply *keys = cluster_node_cmd(&g.cl, from, "CLUSTER GETKEYSINSLOT %u 100", slot);
        size_t n = keys->elements;
        for (size_t i = 0; i < n; i++)
            assert_true(node_ok(from, "MIGRATE 127.0.0.1 %d %s 0 5000", g.cl.port[to],
                                keys->element[i]->str));
        freeReplyObject(keys);
        if (n == 0) break;
    }
    node_id(to, to_id, sizeof(to_id));
    for (int n = 0; n < NODES; n++)
        assert_true(node_ok(n, "CLUSTER SETSLOT %u NODE %s", slot, to_id));
}

/* Moves slot of key from node `from` to node `to`, the MIGRATING/IMPORTING way; finish = 0
 * leaves it mid-move (keys moved, slot still owned by `from`). */
static void move_slot(unsigned slot, const char *key, int from, int to, int finish) {
    char from_id[64], to_id[64];
    node_id(from, from_id, sizeof(from_id));
    node_id(to, to_id, sizeof(to_id));
    assert_true(node_ok(to, "CLUSTER SETSLOT %u IMPORTING %s", slot, from_id));
    assert_true(node_ok(from, "CLUSTER SETSLOT %u MIGRATING %s", slot, to_id));
    if (key) assert_true(node_ok(from, "MIGRATE 127.0.0.1 %d %s 0 5000", g.cl.port[to], key));
    if (finish) finish_move(slot, from, to);
}

/* The primaries' ids in sp_redis_primaries' order, joined (what the reaper's identity lists). */
static void primaries_ids(sp_redis *r, char *out, size_t cap) {
    const char *myid[] = {"CLUSTER", "MYID"};
    out[0] = '\0';
    for (int i = 0, n = sp_redis_primaries(r); i < n; i++) {
        redisReply *rep = sp_redis_argv_on(r, i, 2, myid, err, sizeof(err));
        if (rep == NULL || rep->type != REDIS_REPLY_STRING) fail_msg("CLUSTER MYID: %s", err);
        size_t len = strlen(out);
        snprintf(out + len, cap - len, "%s%s", i ? "," : "", rep->str);
        freeReplyObject(rep);
    }
}

/* A reshard changes no primary, so it must not change their numbering either: slot 0 (the first
 * slot of the primary that serves it) moved to another primary leaves sp_redis_primaries' order as
 * it was. (The order was by first slot served: this move changed it, and the reaper took the
 * reshard for a data loss.) */
static void test_primaries_order_kept_by_reshard(void **state) {
    (void)state;
    char before[256], after[256], fresh[256];
    sp_redis *r = open_cluster();
    primaries_ids(r, before, sizeof(before));
    int from = owner_of(""), to = (from + 1) % NODES; /* the empty key is in slot 0 */
    move_slot(0, NULL, from, to, 1);
    WAIT_FOR(owner_of("") == to, "slot 0 did not move");
    redisReply *rep = sp_redis_command(r, "", err, sizeof(err), "GET %s", ""); /* MOVED: map read */
    assert_non_null(rep);
    freeReplyObject(rep);
    primaries_ids(r, after, sizeof(after));
    sp_redis_close(r);
    r = open_cluster();
    primaries_ids(r, fresh, sizeof(fresh));
    sp_redis_close(r);
    assert_string_equal(after, before);
    assert_string_equal(fresh, before);
}

/* A slot that moved answers MOVED: the command follows it, and so does the map. */
static void test_moved(void **state) {
    (void)state;
    sp_redis *r = open_cluster();
    char key[64];
    snprintf(key, sizeof(key), "{sku:%" PRId64 "}:moved", g.sku_base + 1);
    redisReply *rep = sp_redis_command(r, key, err, sizeof(err), "SET %s before", key);
    assert_non_null(rep);
    freeReplyObject(rep);
    unsigned slot = sp_cluster_key_slot(key, strlen(key));
    int from = owner_of(key), to = (from + 1) % NODES;
    move_slot(slot, key, from, to, 1);
    WAIT_FOR(owner_of(key) == to, "slot %u did not move", slot);
    for (int i = 0; i < 3; i++) { /* the first gets MOVED, the others go straight there */
        rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s:n", key);
        if (rep == NULL || rep->type != REDIS_REPLY_INTEGER)
            fail_msg("INCR after the move: %s", rep ? rep->str : err);
        assert_int_equal(rep->integer, i + 1); /* once each: never run twice */
        freeReplyObject(rep);
    }
    rep = cluster_node_cmd(&g.cl, to, "GET %s", key);
    assert_string_equal(rep->str, "before");
    freeReplyObject(rep);
    sp_redis_close(r);
}

/* Mid-move: the source answers ASK for a key it no longer has; the command goes to the importing
 * node with ASKING, once, and the map still names the source. */
static void test_ask(void **state) {
    (void)state;
    sp_redis *r = open_cluster();
    char key[64], fresh[64];
    snprintf(key, sizeof(key), "{sku:%" PRId64 "}:ask", g.sku_base + 2);
    snprintf(fresh, sizeof(fresh), "{sku:%" PRId64 "}:ask-new", g.sku_base + 2);
    redisReply *rep = sp_redis_command(r, key, err, sizeof(err), "SET %s moving", key);
    assert_non_null(rep);
    freeReplyObject(rep);
    unsigned slot = sp_cluster_key_slot(key, strlen(key));
    int from = owner_of(key), to = (from + 1) % NODES;
    move_slot(slot, key, from, to, 0);
    rep = sp_redis_command(r, key, err, sizeof(err), "GET %s", key);
    if (rep == NULL || rep->type != REDIS_REPLY_STRING)
        fail_msg("GET mid-move: %s", rep ? rep->str : err);
    assert_string_equal(rep->str, "moving");
    freeReplyObject(rep);
    /* a key the source does not have is written on the importing node */
    rep = sp_redis_command(r, fresh, err, sizeof(err), "INCR %s", fresh);
    if (rep == NULL || rep->type != REDIS_REPLY_INTEGER)
        fail_msg("INCR mid-move: %s", rep ? rep->str : err);
    assert_int_equal(rep->integer, 1);
    freeReplyObject(rep);
    redisContext *c = node(to);
    freeReplyObject(redisCommand(c, "ASKING"));
    rep = redisCommand(c, "GET %s", fresh);
    assert_string_equal(rep->str, "1");
    freeReplyObject(rep);
    redisFree(c);
    assert_int_equal(owner_of(key), from); /* still mid-move */
    finish_move(slot, from, to);
    rep = sp_redis_command(r, fresh, err, sizeof(err), "INCR %s", fresh);
    assert_non_null(rep);
    assert_int_equal(rep->integer, 2);
    freeReplyObject(rep);
    sp_redis_close(r);
}

/* A connection killed under a command: NULL, the command not sent again; the next call connects
 * afresh. */
static void test_connection_killed(void **state) {
    (void)state;
    sp_redis *r = open_cluster();
    char key[64];
    snprintf(key, sizeof(key), "{sku:%" PRId64 "}:killed", g.sku_base + 3);
    redisReply *rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s", key);
    assert_non_null(rep);
    assert_int_equal(rep->integer, 1);
    freeReplyObject(rep);
    int n = owner_of(key);
    /* every client of that node but the test's own raw one goes */
    assert_true(node_ok(n, "CLIENT KILL TYPE normal SKIPME yes"));
    rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s", key);
    assert_null(rep);
    assert_non_null(strstr(err, "INCR"));
    rep = cluster_node_cmd(&g.cl, n, "GET %s", key);
    assert_string_equal(rep->str, "1"); /* not run, and not resent */
    freeReplyObject(rep);
    rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s", key);
    if (rep == NULL) fail_msg("after the reconnect: %s", err);
    assert_int_equal(rep->integer, 2);
    freeReplyObject(rep);
    sp_redis_close(r);
}

/* A seed that is down: the next one gives the map; none: a clear error. */
static void test_seeds(void **state) {
    (void)state;
    sp_redis_target t;
    char url[160];
    int dead = cluster_free_port(g.cl.port, NODES);
    snprintf(url, sizeof(url), "redis-cluster://127.0.0.1:%d,127.0.0.1:%d", dead, g.cl.port[2]);
    assert_int_equal(sp_redis_parse_url(url, &t, err, sizeof(err)), 0);
    sp_redis *r = sp_redis_open(&t, 1000, err, sizeof(err));
    if (r == NULL) fail_msg("open with one dead seed: %s", err);
    assert_int_equal(sp_redis_primaries(r), NODES);
    sp_redis_close(r);
    snprintf(url, sizeof(url), "redis-cluster://127.0.0.1:%d", dead);
    assert_int_equal(sp_redis_parse_url(url, &t, err, sizeof(err)), 0);
    assert_null(sp_redis_open(&t, 500, err, sizeof(err)));
    assert_non_null(strstr(err, "127.0.0.1"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cluster_up),
        cmocka_unit_test(test_routing),
        cmocka_unit_test(test_scripts),
        cmocka_unit_test(test_moved),
        cmocka_unit_test(test_ask),
        cmocka_unit_test(test_primaries_order_kept_by_reshard),
        cmocka_unit_test(test_connection_killed),
        cmocka_unit_test(test_seeds),
    };
    return cmocka_run_group_tests_name("redis_cluster", tests, setup, teardown);
}
