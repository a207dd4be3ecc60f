/* unit_args.c - unit tests for the consumer's arguments: --replay, --replay-force and
 * the times --replay-from takes. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "consumer.h"

static char err[256];

static int parse(sp_consumer_opts *o, int n, const char *a, const char *b) {
    char *args[] = {(char *)a, (char *)b};
    memset(err, 0, sizeof(err));
    return sp_consumer_parse_args(n, args, o, err, sizeof(err));
}

static void test_no_arguments_is_live(void **state) {
    (void)state;
    sp_consumer_opts o;
    assert_int_equal(parse(&o, 0, NULL, NULL), 0);
    assert_false(o.replay);
    assert_false(o.replay_force);
    assert_int_equal(o.replay_from_ms, -1);
}

static void test_replay(void **state) {
    (void)state;
    sp_consumer_opts o;
    assert_int_equal(parse(&o, 1, "--replay", NULL), 0);
    assert_true(o.replay);
    assert_int_equal(o.replay_from_ms, -1);
    assert_int_equal(parse(&o, 2, "--replay", "--replay-force"), 0);
    assert_true(o.replay_force);
    /* Forcing nothing is a mistake worth a sentence. */
    assert_int_equal(parse(&o, 1, "--replay-force", NULL), -1);
    assert_non_null(strstr(err, "--replay-force only goes with --replay"));
}

static void test_replay_from_times(void **state) {
    (void)state;
    sp_consumer_opts o;
    assert_int_equal(parse(&o, 1, "--replay-from=1732240000123", NULL), 0);
    assert_true(o.replay);
    assert_int_equal(o.replay_from_ms, INT64_C(1732240000123));
    assert_int_equal(parse(&o, 2, "--replay-from", "0"), 0);
    assert_int_equal(o.replay_from_ms, 0);
    assert_int_equal(parse(&o, 1, "--replay-from=2024-11-22T01:46:40Z", NULL), 0);
    assert_int_equal(o.replay_from_ms, INT64_C(1732240000000));
    assert_int_equal(parse(&o, 1, "--replay-from=2024-11-22 01:46:40.123+00:00", NULL), 0);
    assert_int_equal(o.replay_from_ms, INT64_C(1732240000123));
    assert_int_equal(parse(&o, 1, "--replay-from=2024-11-22T01:46:40.5", NULL), 0);
    assert_int_equal(o.replay_from_ms, INT64_C(1732240000500));
}

static void test_bad_arguments(void **state) {
    (void)state;
    sp_consumer_opts o = {.replay = 7};
    const char *bad[] = {"--replay-from=yesterday",
                         "--replay-from=2024-13-01T00:00:00Z",
                         "--replay-from=2024-11-22T01:46:40+02:00",
                         "--replay-from=-5",
                         "--replay-from=99999999999999999999",
                         "--replay-from="};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(parse(&o, 1, bad[i], NULL), -1);
        assert_non_null(strstr(err, "is not a time"));
    }
    assert_int_equal(parse(&o, 1, "--replay-now", NULL), -1);
    assert_non_null(strstr(err, "unexpected argument \"--replay-now\""));
    assert_int_equal(parse(&o, 1, "--replay-from", NULL), -1);
    assert_non_null(strstr(err, "needs a TIME"));
    assert_int_equal(o.replay, 7); /* untouched on failure */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_arguments_is_live),
        cmocka_unit_test(test_replay),
        cmocka_unit_test(test_replay_from_times),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests_name("consumer_args", tests, NULL, NULL);
}
