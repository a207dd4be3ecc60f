/* unit_config.c - unit tests of the settings loader: defaults, environment, flags, bounds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

static char err[512];

/* Writable copies of string literals, as a real argv is (-Wwrite-strings makes literals const).
 * Each call frees the previous copies. */
static char **args(const char *first, ...) {
    static char *copy[16];
    va_list ap;
    int n = 0;
    for (int i = 0; copy[i]; i++) free(copy[i]), copy[i] = NULL;
    va_start(ap, first);
    for (const char *a = first; a && n < 15; a = va_arg(ap, const char *)) copy[n++] = strdup(a);
    va_end(ap);
    copy[n] = NULL;
    return copy;
}

static void clear_env(void) {
    static const char *const vars[] = {"REDIS_URL",       "KAFKA_BROKERS", "KAFKA_TOPIC",
                                       "KAFKA_DLQ_TOPIC", "KAFKA_GROUP",   "PG_DSN",
                                       "HTTP_ADDR",       "HTTP_PORT",     "WORKER_ID",
                                       "ADMIN_TOKEN",     "PAYMENT_TOKEN", "LOG_LEVEL"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) unsetenv(vars[i]);
}

static int setup(void **state) {
    (void)state;
    clear_env();
    setenv("PG_DSN", "host=127.0.0.1 dbname=x", 1);
    err[0] = '\0';
    return 0;
}

static int load(sp_config *cfg, unsigned worker, int argc, char **argv) {
    return sp_config_load(cfg, worker, argc, argv, "", err, sizeof(err));
}

static void test_defaults(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("producer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 1, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.redis_url, "redis://127.0.0.1:6379");
    assert_string_equal(cfg.kafka_topic, "stockpipe.events");
    assert_int_equal(cfg.http_port, 8080);
    assert_string_equal(cfg.log_level, "info");
    assert_true(strlen(cfg.worker_id) > 0); /* the host name */
    assert_int_equal(cfg.nargs, 0);
}

static void test_env_then_flag_wins(void **state) {
    (void)state;
    sp_config cfg;
    setenv("HTTP_PORT", "9001", 1);
    setenv("KAFKA_TOPIC", "from-env", 1);
    setenv("WORKER_ID", "prod-7", 1);
    char **argv = args("producer", "--http-port=9002", "--kafka-topic", "from-flag", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 4, argv), SP_CONFIG_OK);
    assert_int_equal(cfg.http_port, 9002);
    assert_string_equal(cfg.kafka_topic, "from-flag");
    assert_string_equal(cfg.worker_id, "prod-7");
}

static void test_required_missing(void **state) {
    (void)state;
    sp_config cfg;
    unsetenv("PG_DSN");
    char **argv = args("consumer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), -1);
    assert_non_null(strstr(err, "PG_DSN"));
    assert_non_null(strstr(err, "--pg-dsn"));
}

static void test_int_bounds(void **state) {
    (void)state;
    sp_config cfg;
    const char *bad[] = {"0", "65536", "-1", "80x", "", "99999999999999999999", " 80"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        setenv("HTTP_PORT", bad[i], 1);
        char **argv = args("reaper", NULL);
        assert_int_equal(load(&cfg, SP_WORKER_REAPER, 1, argv), -1);
        assert_non_null(strstr(err, "HTTP_PORT"));
        assert_non_null(strstr(err, "1 to 65535"));
    }
    setenv("HTTP_PORT", "65535", 1);
    char **argv = args("reaper", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_REAPER, 1, argv), SP_CONFIG_OK);
    assert_int_equal(cfg.http_port, 65535);
}

static void test_string_too_long(void **state) {
    (void)state;
    sp_config cfg;
    char big[2000];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    setenv("REDIS_URL", big, 1);
    char **argv = args("producer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 1, argv), -1);
    assert_non_null(strstr(err, "REDIS_URL"));
    assert_non_null(strstr(err, "at most 511"));
}

static void test_flag_needs_value(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("producer", "--http-port", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 2, argv), -1);
    assert_non_null(strstr(err, "--http-port needs a value"));
}

static void test_bad_log_level(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("producer", "--log-level=loud", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 2, argv), -1);
    assert_non_null(strstr(err, "LOG_LEVEL"));
}

static void test_setting_of_other_worker_ignored(void **state) {
    (void)state;
    sp_config cfg;
    /* ADMIN_TOKEN belongs to the producer: the consumer neither reads it nor accepts its flag as
     * one of its own (it is left as an argument for the worker to refuse). */
    setenv("ADMIN_TOKEN", "s3cret", 1);
    char **argv = args("consumer", "--admin-token=x", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 2, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.admin_token, "");
    assert_int_equal(cfg.nargs, 1);
    assert_string_equal(cfg.args[0], "--admin-token=x");
}

static void test_positional_args(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("reaper", "reconcile", "--sku", "--http-port=9100", "--", "--not-a-flag",
                       NULL);
    assert_int_equal(load(&cfg, SP_WORKER_REAPER, 6, argv), SP_CONFIG_OK);
    assert_int_equal(cfg.http_port, 9100);
    assert_int_equal(cfg.nargs, 3);
    assert_string_equal(cfg.args[0], "reconcile");
    assert_string_equal(cfg.args[1], "--sku");
    assert_string_equal(cfg.args[2], "--not-a-flag");
}

static void test_unknown_short_option(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("producer", "-x", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 2, argv), -1);
    assert_non_null(strstr(err, "unknown option"));
}

static void test_help_exits(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("producer", "--help", NULL);
    FILE *saved = stdout;
    stdout = fopen("/dev/null", "w");
    int rc = load(&cfg, SP_WORKER_PRODUCER, 2, argv);
    fclose(stdout);
    stdout = saved;
    assert_int_equal(rc, SP_CONFIG_EXIT);
}

static void test_usage_lists_only_own_settings(void **state) {
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    sp_config_usage(f, SP_WORKER_CONSUMER, "consumer", "");
    fclose(f);
    assert_non_null(strstr(text, "--kafka-group"));
    assert_non_null(strstr(text, "KAFKA_DLQ_TOPIC"));
    assert_null(strstr(text, "ADMIN_TOKEN"));
    free(text);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, setup),
        cmocka_unit_test_setup(test_env_then_flag_wins, setup),
        cmocka_unit_test_setup(test_required_missing, setup),
        cmocka_unit_test_setup(test_int_bounds, setup),
        cmocka_unit_test_setup(test_string_too_long, setup),
        cmocka_unit_test_setup(test_flag_needs_value, setup),
        cmocka_unit_test_setup(test_bad_log_level, setup),
        cmocka_unit_test_setup(test_setting_of_other_worker_ignored, setup),
        cmocka_unit_test_setup(test_positional_args, setup),
        cmocka_unit_test_setup(test_unknown_short_option, setup),
        cmocka_unit_test_setup(test_help_exits, setup),
        cmocka_unit_test_setup(test_usage_lists_only_own_settings, setup),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
