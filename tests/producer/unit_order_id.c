/* unit_order_id.c - unit tests of order ids: valid, unique, sortable by time, carrying the SKU. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "order_id.h"

static void test_form_and_sku(void **state) {
    (void)state;
    sp_order_ids g;
    char id[SP_ORDER_ID_MAX + 1];
    int64_t sku = 0;
    sp_order_ids_init(&g, "producer-7d9f8b6c5-abcde");
    sp_order_id_next(&g, 1732240000123, 1001, id);
    assert_true(sp_order_id_valid(id));
    assert_int_equal(strncmp(id, "0193518cc47b-1001-", 18), 0);
    assert_non_null(strstr(id, "7d9f8b6c5.abcde-")); /* the unique tail of the pod name */
    assert_int_equal(sp_order_id_sku(id, &sku), 0);
    assert_int_equal(sku, 1001);
    sp_order_id_next(&g, 253402300799999, SP_ID_MAX, id); /* the largest of everything */
    assert_true(sp_order_id_valid(id));
    assert_int_equal(sp_order_id_sku(id, &sku), 0);
    assert_int_equal(sku, SP_ID_MAX);
}

static void test_unique_and_sorted(void **state) {
    (void)state;
    sp_order_ids a, b;
    char prev[SP_ORDER_ID_MAX + 1] = "", id[SP_ORDER_ID_MAX + 1], other[SP_ORDER_ID_MAX + 1];
    sp_order_ids_init(&a, "worker-a");
    sp_order_ids_init(&b, "worker-b");
    for (int i = 0; i < 1000; i++) {
        sp_order_id_next(&a, 1732240000000 + i, 5, id);
        assert_true(strcmp(prev, id) < 0); /* later time sorts later */
        memcpy(prev, id, sizeof(id));
    }
    /* Same millisecond, same SKU: another worker or the next call gives another id. */
    sp_order_id_next(&a, 1, 5, id);
    sp_order_id_next(&b, 1, 5, other);
    assert_string_not_equal(id, other);
    sp_order_id_next(&a, 1, 5, other);
    assert_string_not_equal(id, other);
}

static void test_odd_worker_ids(void **state) {
    (void)state;
    sp_order_ids g;
    char id[SP_ORDER_ID_MAX + 1];
    const char *workers[] = {"", "a b\"c\n", "\xc3\xa9\xc3\xa9", "x-y_z"};
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++) {
        sp_order_ids_init(&g, workers[i]);
        sp_order_id_next(&g, 1732240000000, 9, id);
        assert_true(sp_order_id_valid(id));
    }
}

static void test_not_an_order_id(void **state) {
    (void)state;
    int64_t sku;
    const char *bad[] = {"",
                         "abc",
                         "0193505e87b0",
                         "0193505e87b0-",
                         "0193505e87b0-0-w-1",
                         "0193505e87b0-x-w-1",
                         "0193505e87b0-12",
                         "193505e87b0-1-w-1",
                         "0193505e87b0-9007199254740992-w-1",
                         "0193505e87b0-1 -w-1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (sp_order_id_sku(bad[i], &sku) != -1) fail_msg("accepted \"%s\"", bad[i]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_form_and_sku),
        cmocka_unit_test(test_unique_and_sorted),
        cmocka_unit_test(test_odd_worker_ids),
        cmocka_unit_test(test_not_an_order_id),
    };
    return cmocka_run_group_tests_name("order_id", tests, NULL, NULL);
}
