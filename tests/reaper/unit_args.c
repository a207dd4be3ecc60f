/* unit_args.c - unit tests of the reaper's command line and of the settings it checks
 * against each other: `reaper reconcile [--sku ID]`, `reaper audit [--pg-only]`, and
 * RESV_LOST_AFTER_MS against KAFKA_MESSAGE_TIMEOUT_MS. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "config.h"
#include "reaper.h"

static char err[512];

static int parse(int n, const char *a0, const char *a1, const char *a2, sp_reaper_opts *opts) {
    char *args[3] = {(char *)a0, (char *)a1, (char *)a2};
    err[0] = '\0';
    return sp_reaper_parse_args(n, args, opts, err, sizeof(err));
}

static void test_no_arguments_run_the_worker(void **state) {
    (void)state;
    sp_reaper_opts opts;
    assert_int_equal(parse(0, NULL, NULL, NULL, &opts), 0);
    assert_int_equal(opts.cmd, SP_REAPER_CMD_RUN);
}

static void test_reconcile(void **state) {
    (void)state;
    sp_reaper_opts opts;
    assert_int_equal(parse(1, "reconcile", NULL, NULL, &opts), 0);
    assert_int_equal(opts.cmd, SP_REAPER_CMD_RECONCILE);
    assert_int_equal(opts.sku_id, 0);
    assert_int_equal(parse(2, "reconcile", "--sku=1001", NULL, &opts), 0);
    assert_int_equal(opts.sku_id, 1001);
    assert_int_equal(parse(3, "reconcile", "--sku", "9007199254740991", &opts), 0);
    assert_int_equal(opts.sku_id, INT64_C(9007199254740991));
}

static void test_reconcile_refuses_bad_skus(void **state) {
    (void)state;
    sp_reaper_opts opts;
    const char *bad[] = {"--sku=0", "--sku=-5",  "--sku=12x",
                         "--sku=",  "--sku=007", "--sku=9007199254740992",
                         "--sku"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(parse(2, "reconcile", bad[i], NULL, &opts), -1);
        assert_non_null(strstr(err, "sku"));
    }
    assert_int_equal(parse(2, "reconcile", "--all", NULL, &opts), -1);
}

static void test_audit(void **state) {
    (void)state;
    sp_reaper_opts opts;
    assert_int_equal(parse(1, "audit", NULL, NULL, &opts), 0);
    assert_int_equal(opts.cmd, SP_REAPER_CMD_AUDIT);
    assert_int_equal(opts.pg_only, 0);
    assert_int_equal(parse(2, "audit", "--pg-only", NULL, &opts), 0);
    assert_int_equal(opts.pg_only, 1);
    assert_int_equal(parse(2, "audit", "--fast", NULL, &opts), -1);
}

static void test_unknown_command(void **state) {
    (void)state;
    sp_reaper_opts opts;
    assert_int_equal(parse(1, "sweep", NULL, NULL, &opts), -1);
    assert_non_null(strstr(err, "unknown command \"sweep\""));
}

/* A reservation may be voided only once its producer can no longer publish it. */
static void test_lost_bound_must_exceed_the_message_timeout(void **state) {
    (void)state;
    sp_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.kafka_message_timeout_ms = 10000;
    cfg.resv_lost_after_ms = 40000;
    assert_int_equal(sp_reaper_check_config(&cfg, err, sizeof(err)), 0);
    cfg.resv_lost_after_ms = 11000;
    assert_int_equal(sp_reaper_check_config(&cfg, err, sizeof(err)), 0);
    cfg.resv_lost_after_ms = 10999;
    assert_int_equal(sp_reaper_check_config(&cfg, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "RESV_LOST_AFTER_MS"));
    assert_non_null(strstr(err, "KAFKA_MESSAGE_TIMEOUT_MS"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_arguments_run_the_worker),
        cmocka_unit_test(test_reconcile),
        cmocka_unit_test(test_reconcile_refuses_bad_skus),
        cmocka_unit_test(test_audit),
        cmocka_unit_test(test_unknown_command),
        cmocka_unit_test(test_lost_bound_must_exceed_the_message_timeout),
    };
    return cmocka_run_group_tests_name("reaper arguments", tests, NULL, NULL);
}
