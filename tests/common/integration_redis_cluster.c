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
    int port[NODES];
    int64_t sku_base;
} g;

static char err[512];

/* A port p below 32768 with p and its cluster bus port p+10000 both free. */
static int cluster_port(int avoid) {
    for (int tries = 0; tries < 200; tries++) {
        int p = 20000 + (int)((getpid() * 7919u + (unsigned)tries * 104729u) % 9000u);
        int ok = p != avoid;
        for (int k = 0; k < 2 && ok; k++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = {.sin_family = AF_INET,
                                    .sin_port = htons((uint16_t)(p + k * 10000)),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
            if (fd >= 0) close(fd);
        }
        if (ok) return p;
    }
    fail_msg("no free pair of ports for a cluster node");
    return -1;
}

/* A raw connection to one node, for what the test checks behind sp_redis's back. */
static redisContext *node(int i) {
    redisContext *c = redisConnect("127.0.0.1", g.port[i]);
    if (c == NULL || c->err) fail_msg("node %d: %s", i, c ? c->errstr : "out of memory");
    return c;
}

static redisReply *node_cmd(int i, const char *fmt, ...) {
    va_list ap;
    redisContext *c = node(i);
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL) fail_msg("node %d: %s", i, c->errstr);
    redisFree(c);
    return r;
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
    redisReply *r = node_cmd(i, "CLUSTER MYID");
    snprintf(id, cap, "%s", r->str);
    freeReplyObject(r);
    return id;
}

/* The index of the node that serves slot, asked of node 0. */
static int owner(unsigned slot) {
    redisReply *r = node_cmd(0, "CLUSTER SLOTS");
    int who = -1;
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *range = r->element[i];
        if ((long long)slot < range->element[0]->integer ||
            (long long)slot > range->element[1]->integer)
            continue;
        for (int n = 0; n < NODES; n++)
            if (range->element[2]->element[1]->integer == g.port[n]) who = n;
    }
    freeReplyObject(r);
    return who;
}

static int cluster_ok(int i) {
    redisReply *r = node_cmd(i, "CLUSTER INFO");
    int ok = strstr(r->str, "cluster_state:ok") != NULL;
    freeReplyObject(r);
    return ok;
}

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
    char addr[NODES][32];
    for (int i = 0; i < NODES; i++) {
        char dir[300], portstr[16], conf[64], log[320];
        g.port[i] = cluster_port(i ? g.port[i - 1] : 0);
        snprintf(dir, sizeof(dir), "%s/node-%d", g.tmp, i);
        mkdir(dir, 0755);
        snprintf(portstr, sizeof(portstr), "%d", g.port[i]);
        snprintf(conf, sizeof(conf), "nodes-%d.conf", g.port[i]);
        snprintf(log, sizeof(log), "%s/redis.log", dir);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
            execlp("redis-server", "redis-server", "--port", portstr, "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", dir, "--cluster-enabled", "yes",
                   "--cluster-config-file", conf, "--cluster-node-timeout", "3000", (char *)NULL);
            _exit(127);
        }
        track(pid);
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", g.port[i]);
        int64_t deadline = sp_clock_mono_ms() + 10000;
        for (;;) {
            redisContext *c = redisConnect("127.0.0.1", g.port[i]);
            int up = c && !c->err;
            if (c) redisFree(c);
            if (up) break;
            if (sp_clock_mono_ms() > deadline) fail_msg("node %d did not start (%s)", i, log);
            sleep_ms(50);
        }
    }
    char log[320];
    snprintf(log, sizeof(log), "%s/create.log", g.tmp);
    char *argv[] = {(char[]){"/usr/bin/redis-cli"},
                    (char[]){"--cluster"},
                    (char[]){"create"},
                    addr[0],
                    addr[1],
                    addr[2],
                    (char[]){"--cluster-yes"},
                    NULL};
    assert_int_equal(run(argv, NULL, log, NULL, 0), 0);
    WAIT_FOR(cluster_ok(0) && cluster_ok(1) && cluster_ok(2), "cluster_state not ok (%s)", log);
    snprintf(g.url, sizeof(g.url), "redis-cluster://127.0.0.1:%d", g.port[1]);
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
        int n = owner(sp_cluster_key_slot(key, strlen(key)));
        assert_true(n >= 0);
        redisReply *got = node_cmd(n, "GET %s", key);
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
        redisReply *e = node_cmd(n, "SCRIPT EXISTS %s", incr_script.sha);
        assert_int_equal(e->element[0]->integer, 1);
        freeReplyObject(e);
    }
    char key[64];
    snprintf(key, sizeof(key), "{sku:%" PRId64 "}:count", g.sku_base);
    const char *argv[] = {key, "5"};
    int n = owner(sp_cluster_key_slot(key, strlen(key)));
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
        redisReply *keys = node_cmd(from, "CLUSTER GETKEYSINSLOT %u 100", slot);
        size_t n = keys->elements;
        for (size_t i = 0; i < n; i++)
            assert_true(
                node_ok(from, "MIGRATE 127.0.0.1 %d %s 0 5000", g.port[to], keys->element[i]->str));
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
    if (key) assert_true(node_ok(from, "MIGRATE 127.0.0.1 %d %s 0 5000", g.port[to], key));
    if (finish) finish_move(slot, from, to);
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
    int from = owner(slot), to = (from + 1) % NODES;
    move_slot(slot, key, from, to, 1);
    WAIT_FOR(owner(slot) == to, "slot %u did not move", slot);
    for (int i = 0; i < 3; i++) { /* the first gets MOVED, the others go straight there */
        rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s:n", key);
        if (rep == NULL || rep->type != REDIS_REPLY_INTEGER)
            fail_msg("INCR after the move: %s", rep ? rep->str : err);
        assert_int_equal(rep->integer, i + 1); /* once each: never run twice */
        freeReplyObject(rep);
    }
    rep = node_cmd(to, "GET %s", key);
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
    int from = owner(slot), to = (from + 1) % NODES;
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
    assert_int_equal(owner(slot), from); /* still mid-move */
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
    int n = owner(sp_cluster_key_slot(key, strlen(key)));
    /* every client of that node but the test's own raw one goes */
    assert_true(node_ok(n, "CLIENT KILL TYPE normal SKIPME yes"));
    rep = sp_redis_command(r, key, err, sizeof(err), "INCR %s", key);
    assert_null(rep);
    assert_non_null(strstr(err, "INCR"));
    rep = node_cmd(n, "GET %s", key);
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
    int dead = cluster_port(0);
    snprintf(url, sizeof(url), "redis-cluster://127.0.0.1:%d,127.0.0.1:%d", dead, g.port[2]);
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
        cmocka_unit_test(test_cluster_up), cmocka_unit_test(test_routing),
        cmocka_unit_test(test_scripts),    cmocka_unit_test(test_moved),
        cmocka_unit_test(test_ask),        cmocka_unit_test(test_connection_killed),
        cmocka_unit_test(test_seeds),
    };
    return cmocka_run_group_tests_name("redis_cluster", tests, setup, teardown);
}
