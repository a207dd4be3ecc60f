/* unit_config.c - unit tests of the settings loader: defaults, environment, flags, bounds, the
 * Kafka security settings and PG_DSN checks, and that no secret is shown. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    static const char *const vars[] = {"REDIS_URL",
                                       "KAFKA_BROKERS",
                                       "KAFKA_TOPIC",
                                       "KAFKA_DLQ_TOPIC",
                                       "KAFKA_GROUP",
                                       "PG_DSN",
                                       "HTTP_ADDR",
                                       "HTTP_PORT",
                                       "WORKER_ID",
                                       "ADMIN_TOKEN",
                                       "PAYMENT_TOKEN",
                                       "LOG_LEVEL",
                                       "KAFKA_SECURITY_PROTOCOL",
                                       "KAFKA_SASL_MECHANISM",
                                       "KAFKA_SASL_USERNAME",
                                       "KAFKA_SASL_PASSWORD",
                                       "KAFKA_SSL_CA_LOCATION",
                                       "KAFKA_SSL_CERTIFICATE_LOCATION",
                                       "KAFKA_SSL_KEY_LOCATION",
                                       "KAFKA_SSL_KEY_PASSWORD"};
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
    /* KAFKA_GROUP belongs to the consumer: the producer neither reads it nor accepts its flag as
     * one of its own (it is left as an argument for the worker to refuse). */
    setenv("KAFKA_GROUP", "from-env", 1);
    char **argv = args("producer", "--kafka-group=x", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 2, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.kafka_group, "stockpipe-consumer"); /* the default, not the env */
    assert_int_equal(cfg.nargs, 1);
    assert_string_equal(cfg.args[0], "--kafka-group=x");
    /* ADMIN_TOKEN belongs to the producer: the consumer ignores the variable. */
    setenv("ADMIN_TOKEN", "s3cret", 1);
    argv = args("consumer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.admin_token, "");
}

/* Another worker's secret flag, or a misspelt one, is refused by the loader without its value:
 * left as an argument, the worker's "unexpected argument" would print it. */
static void test_foreign_secret_flag_refused_unshown(void **state) {
    (void)state;
    sp_config cfg;
    const char *const flags[] = {"--admin-token=s3cr3t-XYZ", "--kafka-sasl-pasword=s3cr3t-XYZ",
                                 "--Payment-Token=s3cr3t-XYZ"};
    for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++) {
        char **argv = args("consumer", flags[i], NULL);
        assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 2, argv), -1);
        assert_non_null(strstr(err, "is not a setting of consumer"));
        assert_null(strstr(err, "s3cr3t"));
    }
    char **argv = args("consumer", "-kafka-sasl-password=s3cr3t-XYZ", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 2, argv), -1);
    assert_non_null(strstr(err, "unknown option \"-kafka-sasl-password\""));
    assert_null(strstr(err, "s3cr3t"));
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

/* ---- Kafka security and PG_DSN (issue 16) ---- */

/* A readable file of our own (a stand-in CA or key); the caller unlinks it. */
static void temp_file(char *path, size_t len) {
    snprintf(path, len, "/tmp/unit_config_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "x\n", 2), 2);
    close(fd);
}

static void test_kafka_security_defaults(void **state) {
    (void)state;
    sp_config cfg;
    char **argv = args("consumer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.kafka_security_protocol, "plaintext");
    assert_string_equal(cfg.kafka_sasl_mechanism, "");
    assert_string_equal(cfg.kafka_sasl_password, "");
    assert_string_equal(cfg.kafka_ssl_ca_location, "");
    /* Empty is not set (an empty key of a Kubernetes Secret): the default. */
    setenv("KAFKA_SECURITY_PROTOCOL", "", 1);
    setenv("KAFKA_SASL_PASSWORD", "", 1);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.kafka_security_protocol, "plaintext");
}

static void test_kafka_sasl_ssl_loads_normalized(void **state) {
    (void)state;
    sp_config cfg;
    char ca[64];
    temp_file(ca, sizeof(ca));
    setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL", 1);
    setenv("KAFKA_SASL_MECHANISM", "scram-sha-512", 1);
    setenv("KAFKA_SASL_USERNAME", "stockpipe", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    setenv("KAFKA_SSL_CA_LOCATION", ca, 1);
    unsigned workers[] = {SP_WORKER_PRODUCER, SP_WORKER_CONSUMER, SP_WORKER_REAPER, SP_WORKER_TOOL};
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++) {
        char **argv = args("w", NULL);
        assert_int_equal(load(&cfg, workers[i], 1, argv), SP_CONFIG_OK);
        assert_string_equal(cfg.kafka_security_protocol, "sasl_ssl");
        assert_string_equal(cfg.kafka_sasl_mechanism, "SCRAM-SHA-512");
        assert_string_equal(cfg.kafka_sasl_password, "s3cr3t-kafka-XYZ");
        assert_string_equal(cfg.kafka_ssl_ca_location, ca);
        assert_string_equal(cfg.kafka_sasl_username, "stockpipe");
    }
    /* A flag wins over the environment, as for every setting. */
    char **argv = args("reaper", "--kafka-sasl-mechanism=PLAIN", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_REAPER, 2, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.kafka_sasl_mechanism, "PLAIN");
    unlink(ca);
}

/* Loads with the environment as it is; -1 expected, with `want` in the message and no secret. */
static void expect_refused(const char *want) {
    sp_config cfg;
    char **argv = args("producer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 1, argv), -1);
    if (strstr(err, want) == NULL) fail_msg("error \"%s\" does not say \"%s\"", err, want);
    if (strstr(err, "s3cr3t")) fail_msg("error \"%s\" shows a secret", err);
}

static void test_kafka_security_refusals(void **state) {
    (void)state;
    setenv("KAFKA_SECURITY_PROTOCOL", "tls", 1);
    expect_refused("KAFKA_SECURITY_PROTOCOL is \"tls\"; use plaintext, ssl, sasl_plaintext or "
                   "sasl_ssl");

    setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl", 1);
    expect_refused("KAFKA_SASL_MECHANISM is not set");
    setenv("KAFKA_SASL_MECHANISM", "GSSAPI", 1);
    setenv("KAFKA_SASL_USERNAME", "u", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    expect_refused("KAFKA_SASL_MECHANISM is \"GSSAPI\"; use SCRAM-SHA-512");
    setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256", 1);
    unsetenv("KAFKA_SASL_USERNAME");
    expect_refused("KAFKA_SASL_USERNAME is not set");
    setenv("KAFKA_SASL_USERNAME", "u", 1);
    unsetenv("KAFKA_SASL_PASSWORD");
    expect_refused("KAFKA_SASL_PASSWORD is not set");
    setenv("KAFKA_SASL_PASSWORD", "", 1); /* empty is not set */
    expect_refused("KAFKA_SASL_PASSWORD is not set");

    /* Credentials a non-SASL protocol would silently not send. */
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    setenv("KAFKA_SECURITY_PROTOCOL", "ssl", 1);
    expect_refused("KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL is ssl");
    unsetenv("KAFKA_SASL_MECHANISM");
    unsetenv("KAFKA_SASL_USERNAME");
    expect_refused("KAFKA_SASL_PASSWORD is set but KAFKA_SECURITY_PROTOCOL is ssl");
    unsetenv("KAFKA_SASL_PASSWORD");

    /* TLS files a protocol without TLS would not use. */
    setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext", 1);
    setenv("KAFKA_SASL_MECHANISM", "PLAIN", 1);
    setenv("KAFKA_SASL_USERNAME", "u", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    setenv("KAFKA_SSL_CA_LOCATION", "/etc/hostname", 1);
    expect_refused("KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL is sasl_plaintext, "
                   "which does not use TLS");
    unsetenv("KAFKA_SSL_CA_LOCATION");
    setenv("KAFKA_SSL_KEY_PASSWORD", "s3cr3t-key-XYZ", 1);
    expect_refused("KAFKA_SSL_KEY_PASSWORD is set but KAFKA_SECURITY_PROTOCOL is sasl_plaintext");

    /* Mutual TLS: both files or neither, a passphrase only with a key, files readable. */
    setenv("KAFKA_SECURITY_PROTOCOL", "ssl", 1);
    unsetenv("KAFKA_SASL_MECHANISM");
    unsetenv("KAFKA_SASL_USERNAME");
    unsetenv("KAFKA_SASL_PASSWORD");
    expect_refused("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_KEY_LOCATION");
    unsetenv("KAFKA_SSL_KEY_PASSWORD");
    char key[64];
    temp_file(key, sizeof(key));
    setenv("KAFKA_SSL_KEY_LOCATION", key, 1);
    expect_refused("KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together");
    setenv("KAFKA_SSL_CERTIFICATE_LOCATION", "/nonexistent/client.pem", 1);
    expect_refused("KAFKA_SSL_CERTIFICATE_LOCATION is \"/nonexistent/client.pem\", which this "
                   "worker cannot read (No such file or directory)");
    setenv("KAFKA_SSL_CERTIFICATE_LOCATION", key, 1);
    setenv("KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem", 1);
    expect_refused("KAFKA_SSL_CA_LOCATION is \"/nonexistent/ca.pem\"");
    setenv("KAFKA_SSL_CA_LOCATION", "probe", 1); /* librdkafka finds the system's store */
    setenv("KAFKA_SSL_KEY_PASSWORD", "s3cr3t-key-XYZ", 1);
    sp_config cfg;
    char **argv = args("producer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 1, argv), SP_CONFIG_OK);
    assert_string_equal(cfg.kafka_ssl_key_password, "s3cr3t-key-XYZ");
    unlink(key);
}

static void test_pg_dsn_checked_without_showing_password(void **state) {
    (void)state;
    /* libpq's parse error would quote a piece of the password ('missing "=" after "b"'). */
    setenv("PG_DSN", "host=db password=s3cr3t-pg a-b", 1);
    expect_refused("PG_DSN is not a libpq conninfo (libpq's reason is not shown");
    setenv("PG_DSN", "postgresql://u:s3cr3t%zz@db/x", 1);
    expect_refused("PG_DSN is not a libpq conninfo (libpq's reason is not shown");
    /* Without a password, libpq's reason helps. */
    setenv("PG_DSN", "host=db dbname", 1);
    expect_refused("PG_DSN is not a libpq conninfo (missing \"=\" after \"dbname\"");
    setenv("PG_DSN", "host=db hots=x", 1);
    expect_refused("invalid connection option \"hots\"");
    setenv("PG_DSN", "host=db sslmode=verify_full password=s3cr3t-pg", 1);
    expect_refused("PG_DSN's sslmode is \"verify_full\"; use disable, allow, prefer, require, "
                   "verify-ca or verify-full");
    setenv("PG_DSN", "host=db sslmode=verify-full sslrootcert=/nonexistent/root.crt", 1);
    expect_refused("PG_DSN's sslrootcert is \"/nonexistent/root.crt\", which this worker cannot "
                   "read");
    setenv("PG_DSN", "postgresql://u:s3cr3t-pg@db/x?sslmode=verify-full&sslkey=/nonexistent/k", 1);
    expect_refused("PG_DSN's sslkey is \"/nonexistent/k\"");

    sp_config cfg;
    char ca[64];
    temp_file(ca, sizeof(ca));
    char dsn[200];
    snprintf(dsn, sizeof(dsn),
             "host=localhost sslmode=verify-full sslrootcert=%s password='s3 cr3t' sslpassword=x",
             ca);
    setenv("PG_DSN", dsn, 1);
    char **argv = args("consumer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), SP_CONFIG_OK);
    setenv("PG_DSN", "postgresql://u:s3cr3t-pg@localhost:5432/x?sslmode=require", 1);
    assert_int_equal(load(&cfg, SP_WORKER_CONSUMER, 1, argv), SP_CONFIG_OK);
    unlink(ca);
}

static void expect_redacted(const char *in, const char *want) {
    char out[512];
    sp_config_redact(in, out, sizeof(out));
    if (strcmp(out, want) != 0) fail_msg("redact(%s) = %s, want %s", in, out, want);
}

static void test_redact(void **state) {
    (void)state;
    /* conninfo */
    expect_redacted("host=db password=s3cr3t dbname=x", "host=db password=*** dbname=x");
    expect_redacted("host=db password = s3cr3t dbname=x", "host=db password = *** dbname=x");
    expect_redacted("password='s3 cr\\'3t' host=db", "password=*** host=db");
    expect_redacted("host=db password=s3\\ cr3t user=u", "host=db password=*** user=u");
    expect_redacted("host=db sslmode=verify-full sslrootcert=/ca.pem sslpassword=k3y",
                    "host=db sslmode=verify-full sslrootcert=/ca.pem sslpassword=***");
    expect_redacted("host=db  dbname='a b'\tpassword=s3cr3t",
                    "host=db  dbname='a b'\tpassword=***");
    expect_redacted("host=db password='unterminated s3cr3t", "host=db password=***");
    /* URLs */
    expect_redacted("postgresql://user:s3cr3t@db:5432/x", "postgresql://user:***@db:5432/x");
    expect_redacted("postgres://user@db/x", "postgres://user@db/x");
    expect_redacted("postgresql://u:s3/cr@3t@db/x", "postgresql://u:***@db/x");
    expect_redacted("postgresql://db/x?user=u&password=s3cr3t&sslmode=require",
                    "postgresql://db/x?user=u&password=***&sslmode=require");
    expect_redacted("postgresql://db/x?sslpassword=s3cr3t", "postgresql://db/x?sslpassword=***");
    expect_redacted("postgresql://db/x?pass%77ord=s3cr3t", "postgresql://db/x?pass%77ord=***");
    expect_redacted("postgresql://u:s3cr3t@h1:5432,h2:5432/x?password=s3cr3t",
                    "postgresql://u:***@h1:5432,h2:5432/x?password=***");
    expect_redacted("redis://:s3cr3t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0");
    expect_redacted("sentinel://h1:26379,h2:26379/mymaster",
                    "sentinel://h1:26379,h2:26379/mymaster");
    /* Neither: as it is. */
    expect_redacted("127.0.0.1:9092,kafka-1:9093", "127.0.0.1:9092,kafka-1:9093");
    expect_redacted("SASL_SSL://b-1.kafka:9096", "SASL_SSL://b-1.kafka:9096");
    expect_redacted("", "");
    /* A bound cuts, never overruns. */
    char small[12];
    sp_config_redact("password=s3cr3t", small, sizeof(small));
    assert_string_equal(small, "password=**");
}

/* The startup log: every setting but the secrets, and no secret anywhere. */
static void test_log_hides_secrets(void **state) {
    (void)state;
    sp_config cfg;
    setenv("PG_DSN", "postgresql://u:s3cr3t-pg@db/x?sslpassword=s3cr3t-key", 1);
    setenv("REDIS_URL", "redis://:s3cr3t-redis@127.0.0.1:6379/0", 1);
    setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext", 1);
    setenv("KAFKA_SASL_MECHANISM", "PLAIN", 1);
    setenv("KAFKA_SASL_USERNAME", "stockpipe-user", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka", 1);
    setenv("ADMIN_TOKEN", "s3cr3t-admin", 1);
    setenv("PAYMENT_TOKEN", "s3cr3t-pay", 1);
    char **argv = args("producer", NULL);
    assert_int_equal(load(&cfg, SP_WORKER_PRODUCER, 1, argv), SP_CONFIG_OK);

    char path[] = "/tmp/unit_config_log_XXXXXX";
    int fd = mkstemp(path), saved = dup(STDERR_FILENO);
    assert_true(fd >= 0 && saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    sp_config_log(&cfg, SP_WORKER_PRODUCER);
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    char text[16384];
    ssize_t n = pread(fd, text, sizeof(text) - 1, 0);
    close(fd);
    unlink(path);
    assert_true(n > 0);
    text[n] = '\0';
    assert_null(strstr(text, "s3cr3t"));
    assert_non_null(strstr(text, "KAFKA_SASL_PASSWORD=(set)"));
    assert_non_null(strstr(text, "KAFKA_SASL_USERNAME=stockpipe-user"));
    assert_non_null(strstr(text, "PG_DSN=postgresql://u:***@db/x?sslpassword=***"));
    assert_non_null(strstr(text, "PLAIN over KAFKA_SECURITY_PROTOCOL=sasl_plaintext"));
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
        cmocka_unit_test_setup(test_foreign_secret_flag_refused_unshown, setup),
        cmocka_unit_test_setup(test_kafka_security_defaults, setup),
        cmocka_unit_test_setup(test_kafka_sasl_ssl_loads_normalized, setup),
        cmocka_unit_test_setup(test_kafka_security_refusals, setup),
        cmocka_unit_test_setup(test_pg_dsn_checked_without_showing_password, setup),
        cmocka_unit_test_setup(test_redact, setup),
        cmocka_unit_test_setup(test_log_hides_secrets, setup),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
