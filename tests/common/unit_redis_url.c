/* unit_redis_url.c - unit tests of REDIS_URL parsing (single server and Sentinel forms). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "redis_store.h"

static char err[256];

static void test_plain(void **state) {
    (void)state;
    sp_redis_target t;
    assert_int_equal(sp_redis_parse_url("redis://127.0.0.1:16379", &t, err, sizeof(err)), 0);
    assert_false(t.sentinel);
    assert_int_equal(t.nhosts, 1);
    assert_string_equal(t.hosts[0].host, "127.0.0.1");
    assert_int_equal(t.hosts[0].port, 16379);
    assert_int_equal(t.db, 0);
    assert_string_equal(t.password, "");
}

static void test_defaults_password_db(void **state) {
    (void)state;
    sp_redis_target t;
    assert_int_equal(sp_redis_parse_url("redis://:s3cret@cache/3", &t, err, sizeof(err)), 0);
    assert_string_equal(t.hosts[0].host, "cache");
    assert_int_equal(t.hosts[0].port, 6379);
    assert_string_equal(t.password, "s3cret");
    assert_int_equal(t.db, 3);
}

static void test_sentinel(void **state) {
    (void)state;
    sp_redis_target t;
    assert_int_equal(sp_redis_parse_url("sentinel://10.0.0.1:26379,10.0.0.2,s3:5000/mymaster", &t,
                                        err, sizeof(err)),
                     0);
    assert_true(t.sentinel);
    assert_int_equal(t.nhosts, 3);
    assert_string_equal(t.hosts[1].host, "10.0.0.2");
    assert_int_equal(t.hosts[1].port, 26379);
    assert_int_equal(t.hosts[2].port, 5000);
    assert_string_equal(t.master, "mymaster");
    assert_int_equal(sp_redis_parse_url("sentinel://a:1/m/2", &t, err, sizeof(err)), 0);
    assert_int_equal(t.db, 2);
}

static void test_cluster(void **state) {
    (void)state;
    sp_redis_target t;
    assert_int_equal(sp_redis_parse_url("redis-cluster://:pw@10.0.0.1:7000,10.0.0.2:7001,n3", &t,
                                        err, sizeof(err)),
                     0);
    assert_true(t.cluster);
    assert_false(t.sentinel);
    assert_int_equal(t.nhosts, 3);
    assert_string_equal(t.hosts[0].host, "10.0.0.1");
    assert_int_equal(t.hosts[1].port, 7001);
    assert_int_equal(t.hosts[2].port, 6379);
    assert_string_equal(t.password, "pw");
    assert_int_equal(sp_redis_parse_url("redis-cluster://h:1", &t, err, sizeof(err)), 0);
    assert_int_equal(t.nhosts, 1);
    assert_int_equal(sp_redis_parse_url("redis://h:1", &t, err, sizeof(err)), 0);
    assert_false(t.cluster);
}

static void test_refused(void **state) {
    (void)state;
    sp_redis_target t;
    const char *bad[] = {
        "",            /* no scheme */
        "http://x:1",  /* wrong scheme */
        "redis://",    /* no host */
        "redis://h:0", /* port out of range */
        "redis://h:65536",
        "redis://h:12ab",
        "redis://h:1/16", /* db out of range */
        "redis://h:1/x",
        "redis://a:1,b:2", /* several hosts without Sentinel */
        "sentinel://a:1",  /* no master name */
        "sentinel://a:1/",
        "redis://user@h:1",               /* credentials without ':' */
        "sentinel://a,b,c,d,e,f,g,h,i/m", /* more hosts than the bound */
        "redis://:1",                     /* empty host */
        "redis-cluster://a:1/1",          /* a cluster has only database 0 */
        "redis-cluster://",
        "rediscluster://a:1",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        if (sp_redis_parse_url(bad[i], &t, err, sizeof(err)) != -1)
            fail_msg("accepted \"%s\"", bad[i]);
        assert_non_null(strstr(err, "REDIS_URL"));
    }
}

static void test_long_host_bounded(void **state) {
    (void)state;
    sp_redis_target t;
    char url[600] = "redis://";
    memset(url + 8, 'h', 400);
    url[408] = '\0';
    assert_int_equal(sp_redis_parse_url(url, &t, err, sizeof(err)), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain),    cmocka_unit_test(test_defaults_password_db),
        cmocka_unit_test(test_sentinel), cmocka_unit_test(test_cluster),
        cmocka_unit_test(test_refused),  cmocka_unit_test(test_long_host_bounded),
    };
    return cmocka_run_group_tests_name("redis_url", tests, NULL, NULL);
}
