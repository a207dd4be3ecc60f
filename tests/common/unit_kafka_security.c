/* unit_kafka_security.c - unit tests of the Kafka security settings reaching every client's
 * configuration (sp_kafka_conf_new), and of errors that name the setting without its secret. No
 * broker: librdkafka only builds configurations and clients here. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "kafka.h"

static char err[512];
static char ca_path[64]; /* a file that is no certificate at all */

/* conf's value of property name, into a static buffer. */
static const char *conf_get(rd_kafka_conf_t *conf, const char *name) {
    static char value[512];
    size_t len = sizeof(value);
    if (rd_kafka_conf_get(conf, name, value, &len) != RD_KAFKA_CONF_OK) return "(unknown)";
    return value;
}

static sp_config cfg; /* what load_env loaded */

static void load_env(unsigned worker) {
    char prog[] = "test", *argv[] = {prog, NULL};
    if (sp_config_load(&cfg, worker, 1, argv, "", err, sizeof(err)) != SP_CONFIG_OK)
        fail_msg("load: %s", err);
}

static int setup_group(void **state) {
    (void)state;
    snprintf(ca_path, sizeof(ca_path), "/tmp/unit_kafka_ca_XXXXXX");
    int fd = mkstemp(ca_path);
    if (fd < 0) return -1;
    if (write(fd, "not a certificate\n", 18) != 18) return -1;
    close(fd);
    setenv("PG_DSN", "host=127.0.0.1 dbname=x", 1);
    return 0;
}

static int teardown_group(void **state) {
    (void)state;
    unlink(ca_path);
    return 0;
}

/* No settings (tests talking to the local stack): librdkafka's defaults, plaintext. */
static void test_no_settings_loaded_is_plaintext(void **state) {
    (void)state;
    rd_kafka_conf_t *conf = sp_kafka_conf_new("127.0.0.1:1", "t", NULL, err, sizeof(err));
    assert_non_null(conf);
    assert_string_equal(conf_get(conf, "security.protocol"), "plaintext");
    rd_kafka_conf_destroy(conf);
}

static void test_settings_reach_every_client_conf(void **state) {
    (void)state;
    setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl", 1);
    setenv("KAFKA_SASL_MECHANISM", "scram-sha-256", 1);
    setenv("KAFKA_SASL_USERNAME", "stockpipe", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    setenv("KAFKA_SSL_CA_LOCATION", ca_path, 1);
    load_env(SP_WORKER_CONSUMER);
    rd_kafka_conf_t *conf = sp_kafka_conf_new("127.0.0.1:1", "t", &cfg, err, sizeof(err));
    assert_non_null(conf);
    assert_string_equal(conf_get(conf, "security.protocol"), "sasl_ssl");
    assert_string_equal(conf_get(conf, "sasl.mechanisms"), "SCRAM-SHA-256");
    assert_string_equal(conf_get(conf, "sasl.username"), "stockpipe");
    assert_string_equal(conf_get(conf, "ssl.ca.location"), ca_path);
    /* librdkafka 2.x checks the broker's host name by default; nothing here turns it off. */
    assert_string_equal(conf_get(conf, "ssl.endpoint.identification.algorithm"), "https");
    assert_string_equal(conf_get(conf, "enable.ssl.certificate.verification"), "true");
    rd_kafka_conf_destroy(conf);
}

/* A CA file that is no certificate: the client cannot be made, and the error names the setting. */
static void test_bad_ca_file_names_the_setting(void **state) {
    (void)state;
    setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl", 1);
    setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512", 1);
    setenv("KAFKA_SASL_USERNAME", "stockpipe", 1);
    setenv("KAFKA_SASL_PASSWORD", "s3cr3t-kafka-XYZ", 1);
    setenv("KAFKA_SSL_CA_LOCATION", ca_path, 1);
    load_env(SP_WORKER_PRODUCER);
    rd_kafka_conf_t *conf = sp_kafka_conf_new("127.0.0.1:1", "t", &cfg, err, sizeof(err));
    assert_non_null(conf);
    rd_kafka_t *rk = sp_kafka_producer_new(&conf, err, sizeof(err));
    assert_null(rk);
    assert_null(conf);
    if (strstr(err, "check KAFKA_SSL_CA_LOCATION") == NULL) fail_msg("error: %s", err);
    assert_null(strstr(err, "s3cr3t"));
}

static void test_refused_secret_property_not_shown(void **state) {
    (void)state;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    assert_int_equal(sp_kafka_conf_set(conf, "sasl.pasword", "s3cr3t-XYZ", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "sasl.pasword"));
    assert_null(strstr(err, "s3cr3t"));
    assert_int_equal(sp_kafka_conf_set(conf, "security.protocol", "tls", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "security.protocol=tls")); /* not a secret: shown */
    rd_kafka_conf_destroy(conf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_settings_loaded_is_plaintext),
        cmocka_unit_test(test_settings_reach_every_client_conf),
        cmocka_unit_test(test_bad_ca_file_names_the_setting),
        cmocka_unit_test(test_refused_secret_property_not_shown),
    };
    return cmocka_run_group_tests_name("kafka security", tests, setup_group, teardown_group);
}
