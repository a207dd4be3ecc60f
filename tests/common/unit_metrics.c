/* unit_metrics.c - unit tests of the Prometheus text rendering and of the JSON log line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"

static sp_metric accepted = SP_METRIC_COUNTER("sp_test_requests_total", "Requests by outcome.",
                                              "outcome=\"accepted\"");
static sp_metric sold_out = SP_METRIC_COUNTER("sp_test_requests_total", "Requests by outcome.",
                                              "outcome=\"sold_out\"");
static sp_metric inflight = SP_METRIC_GAUGE("sp_test_inflight", "Publishes in flight.", NULL);
static sp_metric took = SP_METRIC_GAUGE_SCALED("sp_test_took_seconds", "Last run, set in ms.", NULL,
                                               1e-3);
static const int64_t bounds[] = {1000, 10000};
static sp_metric latency = SP_METRIC_HISTOGRAM("sp_test_latency_seconds", "Latency.", NULL, bounds,
                                               2, 1e-6);

static char *render(void) {
    /* static: open_memstream keeps the addresses until fclose, which gcc's dangling-pointer
     * analysis cannot see through */
    static char *text;
    static size_t len;
    text = NULL;
    FILE *f = open_memstream(&text, &len);
    assert_int_equal(sp_metrics_render(f), 0);
    fclose(f);
    return text;
}

static void test_render(void **state) {
    (void)state;
    sp_metrics_register(&accepted);
    sp_metrics_register(&inflight);
    sp_metrics_register(&latency);
    sp_metrics_register(&took);
    sp_metrics_register(&sold_out); /* same family as accepted, registered later */
    sp_metrics_register(&accepted); /* twice: no-op */
    sp_metric_add(&accepted, 3);
    sp_metric_inc(&sold_out);
    sp_metric_set(&inflight, 7);
    sp_metric_set(&took, 1250);
    sp_metric_observe(&latency, 500);   /* <= 1ms */
    sp_metric_observe(&latency, 5000);  /* <= 10ms */
    sp_metric_observe(&latency, 50000); /* +Inf only */
    char *t = render();
    /* One HELP/TYPE per family, its series together. */
    const char *fam = "# HELP sp_test_requests_total Requests by outcome.\n"
                      "# TYPE sp_test_requests_total counter\n"
                      "sp_test_requests_total{outcome=\"accepted\"} 3\n"
                      "sp_test_requests_total{outcome=\"sold_out\"} 1\n";
    assert_non_null(strstr(t, fam));
    assert_non_null(strstr(t, "# TYPE sp_test_inflight gauge\nsp_test_inflight 7\n"));
    assert_non_null(strstr(t, "# TYPE sp_test_took_seconds gauge\nsp_test_took_seconds 1.25\n"));
    assert_non_null(strstr(t, "sp_test_latency_seconds_bucket{le=\"0.001\"} 1\n"));
    assert_non_null(strstr(t, "sp_test_latency_seconds_bucket{le=\"0.01\"} 2\n"));
    assert_non_null(strstr(t, "sp_test_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
    assert_non_null(strstr(t, "sp_test_latency_seconds_sum 0.0555\n"));
    assert_non_null(strstr(t, "sp_test_latency_seconds_count 3\n"));
    assert_non_null(strstr(t, "process_resident_memory_bytes "));
    /* HELP of the requests family appears once. */
    const char *first = strstr(t, "# HELP sp_test_requests_total");
    assert_null(strstr(first + 1, "# HELP sp_test_requests_total"));
    free(t);
}

static void test_json_escape(void **state) {
    (void)state;
    char buf[64];
    size_t pos = 0;
    sp_json_escape_append(buf, sizeof(buf), &pos, "a\"b\\c\n\x01\xff");
    assert_string_equal(buf, "a\\\"b\\\\c\\n\\u0001\\u00ff");
    /* Bounded: never writes past cap, always NUL-terminated. */
    char small[8];
    pos = 0;
    sp_json_escape_append(small, sizeof(small), &pos, "\"\"\"\"\"\"");
    assert_true(pos < sizeof(small));
    assert_int_equal(strlen(small), pos);
}

static void test_log_level_parse(void **state) {
    (void)state;
    sp_log_level l;
    assert_int_equal(sp_log_level_parse("WARNING", &l), 0);
    assert_int_equal(l, SP_LOG_WARN);
    assert_int_equal(sp_log_level_parse("debug", &l), 0);
    assert_int_equal(l, SP_LOG_DEBUG);
    assert_int_equal(sp_log_level_parse("verbose", &l), -1);
    assert_int_equal(sp_log_level_parse(NULL, &l), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render),
        cmocka_unit_test(test_json_escape),
        cmocka_unit_test(test_log_level_parse),
    };
    return cmocka_run_group_tests_name("metrics_and_log", tests, NULL, NULL);
}
