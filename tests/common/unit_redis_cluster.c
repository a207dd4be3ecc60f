/* unit_redis_cluster.c - unit tests of Redis Cluster routing: key slots, CLUSTER SLOTS replies,
 * redirects (hand-built replies: no server can be made to answer a malformed one). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis_cluster.h"

static char err[256];

static unsigned slot_of(const char *key) { return sp_cluster_key_slot(key, strlen(key)); }

static void test_key_slot(void **state) {
    (void)state;
    /* CRC16/XMODEM's check value: "123456789" -> 0x31C3 */
    assert_int_equal(slot_of("123456789"), 0x31C3 & 0x3FFF);
    /* values CLUSTER KEYSLOT gives (Redis 7.0) */
    assert_int_equal(slot_of("foo"), 12182);
    assert_int_equal(slot_of("bar"), 5061);
    assert_int_equal(slot_of(""), 0);
    /* hash tags: the first {...} with something inside */
    assert_int_equal(slot_of("{user1000}.following"), slot_of("user1000"));
    assert_int_equal(slot_of("{user1000}.followers"), slot_of("{user1000}.following"));
    assert_int_equal(slot_of("foo{}{bar}"), sp_cluster_key_slot("foo{}{bar}", 10));
    assert_int_not_equal(slot_of("foo{}{bar}"), slot_of("bar"));
    assert_int_equal(slot_of("foo{{bar}}zap"), slot_of("{bar"));
    assert_int_equal(slot_of("foo{bar}{zap}"), slot_of("bar"));
    assert_int_equal(slot_of("{sku:42}:sale"), slot_of("{sku:42}:idem:7:k"));
    assert_int_equal(slot_of("no{close"), sp_cluster_key_slot("no{close", 8));
    /* a key with a NUL inside counts all its bytes */
    assert_int_not_equal(sp_cluster_key_slot("a\0b", 3), sp_cluster_key_slot("a", 1));
}

/* ---- hand-built replies ---- */

static redisReply *mk(int type) {
    redisReply *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    r->type = type;
    return r;
}
static redisReply *mk_int(long long v) {
    redisReply *r = mk(REDIS_REPLY_INTEGER);
    r->integer = v;
    return r;
}
static redisReply *mk_str(int type, const char *s) {
    redisReply *r = mk(type);
    r->str = strdup(s);
    r->len = strlen(s);
    return r;
}
static redisReply *mk_arr(size_t n, ...) {
    va_list ap;
    redisReply *r = mk(REDIS_REPLY_ARRAY);
    r->elements = n;
    r->element = calloc(n ? n : 1, sizeof(*r->element));
    va_start(ap, n);
    for (size_t i = 0; i < n; i++) r->element[i] = va_arg(ap, redisReply *);
    va_end(ap);
    return r;
}
static redisReply *range(long long from, long long to, const char *host, long long port) {
    return mk_arr(3, mk_int(from), mk_int(to),
                  mk_arr(3, mk_str(REDIS_REPLY_STRING, host), mk_int(port),
                         mk_str(REDIS_REPLY_STRING, "id")));
}

static void test_map(void **state) {
    (void)state;
    sp_cluster_map *m = malloc(sizeof(*m));
    assert_non_null(m);
    sp_cluster_map_clear(m);
    redisReply *r = mk_arr(3, range(0, 5460, "10.0.0.1", 7000), range(5461, 10922, "", 7001),
                           range(10923, 16383, "10.0.0.3", 7002));
    assert_int_equal(sp_cluster_map_read_slots(m, r, "10.0.0.9", err, sizeof(err)), 0);
    assert_int_equal(m->nnodes, 3);
    assert_string_equal(m->nodes[m->slot_node[0]].host, "10.0.0.1");
    assert_int_equal(m->nodes[m->slot_node[5460]].port, 7000);
    /* an empty address is the node that answered */
    assert_string_equal(m->nodes[m->slot_node[5461]].host, "10.0.0.9");
    assert_int_equal(m->nodes[m->slot_node[16383]].port, 7002);
    freeReplyObject(r);

    /* a later reply: slots move, a node is added, known nodes keep their index */
    r = mk_arr(2, range(0, 100, "10.0.0.4", 7003), range(101, 16383, "10.0.0.1", 7000));
    assert_int_equal(sp_cluster_map_read_slots(m, r, "x", err, sizeof(err)), 0);
    assert_int_equal(m->nnodes, 4);
    assert_int_equal(m->slot_node[0], 3);
    assert_int_equal(m->slot_node[101], 0);
    assert_int_equal(m->slot_node[16383], 0);
    freeReplyObject(r);

    /* a partial cover leaves the other slots unserved */
    r = mk_arr(1, range(0, 10, "10.0.0.1", 7000));
    assert_int_equal(sp_cluster_map_read_slots(m, r, "x", err, sizeof(err)), 0);
    assert_int_equal(m->slot_node[10], 0);
    assert_int_equal(m->slot_node[11], -1);
    freeReplyObject(r);

    /* malformed replies change nothing */
    redisReply *bad[] = {
        mk_str(REDIS_REPLY_ERROR, "ERR This instance has cluster support disabled"),
        mk_arr(1, range(5, 4, "h", 1)),
        mk_arr(1, range(0, 16384, "h", 1)),
        mk_arr(1, range(0, 1, "h", 0)),
        mk_arr(1, mk_arr(2, mk_int(0), mk_int(1))),
        mk_arr(2, range(0, 1, "new-node", 9), mk_int(3)),
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(sp_cluster_map_read_slots(m, bad[i], "x", err, sizeof(err)), -1);
        assert_int_equal(m->nnodes, 4);
        assert_int_equal(m->slot_node[0], 0);
        assert_int_equal(m->slot_node[11], -1);
        freeReplyObject(bad[i]);
    }
    assert_int_equal(sp_cluster_map_read_slots(m, NULL, "x", err, sizeof(err)), -1);
    free(m);
}

static void test_map_full(void **state) {
    (void)state;
    sp_cluster_map *m = malloc(sizeof(*m));
    assert_non_null(m);
    sp_cluster_map_clear(m);
    char host[16];
    for (int i = 0; i < SP_CLUSTER_NODES_MAX; i++) {
        snprintf(host, sizeof(host), "h%d", i);
        assert_int_equal(sp_cluster_map_node(m, host, 1), i);
    }
    assert_int_equal(sp_cluster_map_node(m, "h0", 1), 0);
    assert_int_equal(sp_cluster_map_node(m, "one-too-many", 1), -1);
    free(m);
}

/* A key of stockpipe's own on a given primary: base:{N}, the smallest N whose slot it serves. */
static void test_key_on_node(void **state) {
    (void)state;
    sp_cluster_map *m = malloc(sizeof(*m));
    assert_non_null(m);
    sp_cluster_map_clear(m);
    for (int i = 0; i < 3; i++) {
        char host[32];
        snprintf(host, sizeof(host), "10.0.0.%d", i + 1);
        assert_int_equal(sp_cluster_map_node(m, host, 7000), i);
    }
    for (int s = 0; s < SP_CLUSTER_SLOTS; s++)
        m->slot_node[s] = (int16_t)(s * 3 / SP_CLUSTER_SLOTS);
    char key[64];
    for (int node = 0; node < 3; node++) {
        assert_int_equal(
            sp_cluster_key_on_node(m, node, "stockpipe:reaper:rebuilt", key, sizeof(key)), 0);
        assert_int_equal(m->slot_node[slot_of(key)], node);
        assert_int_equal(strncmp(key, "stockpipe:reaper:rebuilt:{", 26), 0);
        int n = atoi(key + 26);
        for (int k = 0; k < n; k++) { /* no smaller N lands there */
            char smaller[64];
            snprintf(smaller, sizeof(smaller), "stockpipe:reaper:rebuilt:{%d}", k);
            assert_int_not_equal(m->slot_node[slot_of(smaller)], node);
        }
    }
    /* {0}'s slot is CRC16("0") = 13907: the third primary's; "{1}" (9842) the second's */
    assert_int_equal(sp_cluster_key_on_node(m, 2, "e", key, sizeof(key)), 0);
    assert_string_equal(key, "e:{0}");
    assert_int_equal(sp_cluster_key_on_node(m, 1, "e", key, sizeof(key)), 0);
    assert_string_equal(key, "e:{1}");
    /* no primary, an unserved node, a buffer too small */
    assert_int_equal(sp_cluster_key_on_node(m, -1, "e", key, sizeof(key)), -1);
    assert_int_equal(sp_cluster_key_on_node(m, 7, "e", key, sizeof(key)), -1);
    assert_int_equal(sp_cluster_key_on_node(m, 0, "stockpipe:reaper:rebuilt", key, 8), -1);
    free(m);
}

static void test_answers(void **state) {
    (void)state;
    sp_cluster_redirect to;
    struct {
        int type;
        const char *text;
        sp_cluster_answer want;
        int slot;
        const char *host;
        int port;
    } cases[] = {
        {REDIS_REPLY_ERROR, "MOVED 3999 127.0.0.1:6381", SP_CLUSTER_MOVED, 3999, "127.0.0.1", 6381},
        {REDIS_REPLY_ERROR, "ASK 3999 10.1.1.1:7000", SP_CLUSTER_ASK, 3999, "10.1.1.1", 7000},
        {REDIS_REPLY_ERROR, "MOVED 5 :7001", SP_CLUSTER_MOVED, 5, "replier", 7001},
        {REDIS_REPLY_ERROR, "MOVED 16383 ::1:7002", SP_CLUSTER_MOVED, 16383, "::1", 7002},
        {REDIS_REPLY_ERROR, "TRYAGAIN Multiple keys request during rehashing of slot",
         SP_CLUSTER_TRYAGAIN, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "CLUSTERDOWN The cluster is down", SP_CLUSTER_DOWN, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "CLUSTERDOWN Hash slot not served", SP_CLUSTER_DOWN, 0, NULL, 0},
        /* not redirects: final */
        {REDIS_REPLY_ERROR, "ERR unknown command", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "NOSCRIPT No matching script", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_STRING, "MOVED 1 h:1", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_STATUS, "OK", SP_CLUSTER_FINAL, 0, NULL, 0},
        /* malformed redirects are kept as the errors they are */
        {REDIS_REPLY_ERROR, "MOVED 16384 h:1", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "MOVED x h:1", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "MOVED 1 h", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "MOVED 1 h:0", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "MOVED 1 h:12x", SP_CLUSTER_FINAL, 0, NULL, 0},
        {REDIS_REPLY_ERROR, "ASK 1", SP_CLUSTER_FINAL, 0, NULL, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        redisReply *r = mk_str(cases[i].type, cases[i].text);
        memset(&to, 0, sizeof(to));
        assert_int_equal(sp_cluster_answer_of(r, "replier", &to), cases[i].want);
        if (cases[i].host) {
            assert_int_equal(to.slot, cases[i].slot);
            assert_string_equal(to.host, cases[i].host);
            assert_int_equal(to.port, cases[i].port);
        }
        freeReplyObject(r);
    }
    assert_int_equal(sp_cluster_answer_of(NULL, "x", &to), SP_CLUSTER_FINAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_slot), cmocka_unit_test(test_map),
        cmocka_unit_test(test_map_full), cmocka_unit_test(test_key_on_node),
        cmocka_unit_test(test_answers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
