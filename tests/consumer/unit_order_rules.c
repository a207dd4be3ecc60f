/* unit_order_rules.c - unit tests for the order state machine: every rule of docs/consumer.md,
 * decided in memory the way the consumer decides a batch, with no database. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "order_rules.h"

#define SKU  1001
#define SKU2 1002
#define T0   INT64_C(1767225600000)

typedef struct fixture {
    sp_batch *b;
    sp_rules *r;
    int64_t offset;
} fixture;

static int setup(void **state) {
    static fixture f;
    f.b = sp_batch_new(1000);
    f.r = sp_rules_new(1000);
    f.offset = 0;
    *state = &f;
    return f.b && f.r ? 0 : -1;
}

static int teardown(void **state) {
    fixture *f = *state;
    sp_batch_free(f->b);
    sp_rules_free(f->r);
    return 0;
}

/* ---- building a batch ---- */

static sp_batch_item *add(fixture *f, sp_event_type type, int64_t sku) {
    sp_batch_item *it = sp_batch_add(f->b, 0, f->offset++);
    assert_non_null(it);
    it->ev.type = type;
    it->ev.sku_id = sku;
    it->ev.ts_ms = T0 + f->offset;
    return it;
}

static void stock_set(fixture *f, int64_t sku, int64_t stock) {
    sp_batch_item *it = add(f, SP_EV_STOCK_SET, sku);
    it->ev.stock = stock;
    it->ev.per_user_limit = 2;
    it->ev.pay_timeout_s = 600;
}

static void stock_add(fixture *f, int64_t sku, int64_t n) {
    add(f, SP_EV_STOCK_ADD, sku)->ev.stock = n;
}

/* A restock with a request id (the admin call's Idempotency-Key). */
static void stock_add_keyed(fixture *f, int64_t sku, int64_t n, const char *request_id) {
    sp_batch_item *it = add(f, SP_EV_STOCK_ADD, sku);
    it->ev.stock = n;
    snprintf(it->ev.request_id, sizeof(it->ev.request_id), "%s", request_id);
}

static void created(fixture *f, int64_t sku, const char *id, int qty) {
    sp_batch_item *it = add(f, SP_EV_ORDER_CREATED, sku);
    snprintf(it->ev.order_id, sizeof(it->ev.order_id), "%s", id);
    it->ev.user_id = 7;
    it->ev.qty = qty;
    it->ev.expires_ms = it->ev.ts_ms + 600000;
}

static void by_id(fixture *f, sp_event_type type, int64_t sku, const char *id) {
    snprintf(add(f, type, sku)->ev.order_id, SP_ORDER_ID_MAX + 1, "%s", id);
}

static void voided(fixture *f, int64_t sku, const char *id, int qty, const char *reason) {
    sp_batch_item *it = add(f, SP_EV_ORDER_VOIDED, sku);
    snprintf(it->ev.order_id, sizeof(it->ev.order_id), "%s", id);
    snprintf(it->ev.reason, sizeof(it->ev.reason), "%s", reason);
    it->ev.user_id = 8;
    it->ev.qty = qty;
}

/* Decides the batch with nothing in the database (stored offset 0 everywhere). */
static void decide(fixture *f) {
    sp_batch_index_partitions(f->b);
    for (size_t i = 0; i < f->b->nparts; i++) f->b->parts[i].stored = 0;
    sp_rules_begin(f->r, f->b);
    sp_rules_decide(f->r, f->b);
}

static const sp_rules_order *order(fixture *f, const char *id) {
    for (size_t i = 0; i < f->r->norders; i++)
        if (strcmp(f->r->orders[i].order_id, id) == 0) return &f->r->orders[i];
    fail_msg("no order %s", id);
    return NULL;
}

static const sp_batch_item *item(fixture *f, size_t i) { return &f->b->items[i]; }

/* The restock (sku, request_id) the rules hold, or NULL. */
static const sp_rules_restock *restock(fixture *f, int64_t sku, const char *request_id) {
    for (size_t i = 0; i < f->r->nrestocks; i++)
        if (f->r->restocks[i].sku_id == sku &&
            strcmp(f->r->restocks[i].request_id, request_id) == 0)
            return &f->r->restocks[i];
    return NULL;
}

static size_t new_restocks(fixture *f) {
    size_t n = 0;
    for (size_t i = 0; i < f->r->nrestocks; i++) n += f->r->restocks[i].is_new != 0;
    return n;
}

/* Begins deciding the batch against SKU rows already in PostgreSQL: sku with stock = supplied =
 * `stock` at `version` (and SKU2 likewise when sku2_stock >= 0). */
static void begin_with_rows(fixture *f, int64_t stock, int64_t version, int64_t sku2_stock) {
    sp_batch_index_partitions(f->b);
    for (size_t i = 0; i < f->b->nparts; i++) f->b->parts[i].stored = 0;
    sp_rules_begin(f->r, f->b);
    for (int k = 0; k < 2; k++) {
        sp_rules_sku *sk = sp_rules_find_sku(f->r, k ? SKU2 : SKU);
        int64_t st = k ? sku2_stock : stock;
        if (sk == NULL || st < 0) continue;
        sk->in_db = 1;
        sk->stock = sk->supplied = st;
        sk->version = version;
    }
}

/* ---- tests ---- */

static void test_created_takes_stock_until_it_runs_out(void **state) {
    fixture *f = *state;
    stock_set(f, SKU, 3);
    created(f, SKU, "o1", 2);
    created(f, SKU, "o2", 2); /* 1 left: refused */
    created(f, SKU, "o3", 1);
    created(f, SKU, "o1", 2);  /* the log repeats itself */
    created(f, SKU2, "o4", 1); /* never opened */
    decide(f);
    assert_int_equal(item(f, 0)->effect, SP_EFFECT_OPENED);
    assert_int_equal(item(f, 1)->effect, SP_EFFECT_PENDING);
    assert_int_equal(item(f, 2)->effect, SP_EFFECT_REJECTED_STOCK);
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_PENDING);
    assert_int_equal(item(f, 4)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 5)->effect, SP_EFFECT_REJECTED_NO_SKU);
    assert_int_equal(order(f, "o2")->status, SP_ORDER_REJECTED);
    assert_string_equal(order(f, "o2")->reject_reason, "out_of_stock");
    assert_string_equal(order(f, "o4")->reject_reason, "unknown_sku");
    assert_int_equal(order(f, "o1")->partition, 0);
    assert_int_equal(order(f, "o1")->offset, 1);

    const sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU);
    assert_true(sk->opened);
    assert_int_equal(sk->open_stock, 3);
    assert_int_equal(sk->stock, 0);
    assert_int_equal(sk->taken, 3);
    assert_int_equal(sk->changes, 2); /* two orders took stock; the refusal changed nothing */
    assert_int_equal(f->b->nskus, 2);
    assert_int_equal(f->b->skus[0].nrejected, 1);
    assert_int_equal(f->b->skus[0].stock, 0);
    assert_false(f->b->skus[1].exists);
}

/* The over-admission case: 100 units, 150 orders Redis let through. */
static void test_150_orders_for_100_units(void **state) {
    fixture *f = *state;
    char id[32];
    stock_set(f, SKU, 100);
    for (int i = 0; i < 150; i++) {
        snprintf(id, sizeof(id), "o%03d", i);
        created(f, SKU, id, 1);
    }
    decide(f);
    int pending = 0, rejected = 0;
    for (size_t i = 0; i < f->r->norders; i++) {
        pending += f->r->orders[i].status == SP_ORDER_PENDING;
        rejected += f->r->orders[i].status == SP_ORDER_REJECTED;
    }
    assert_int_equal(pending, 100);
    assert_int_equal(rejected, 50);
    /* In log order: the first 100 got the units. */
    assert_int_equal(order(f, "o099")->status, SP_ORDER_PENDING);
    assert_int_equal(order(f, "o100")->status, SP_ORDER_REJECTED);
    assert_int_equal(sp_rules_find_sku(f->r, SKU)->stock, 0);
    assert_int_equal(f->b->skus[0].nrejected, 50);
}

static void test_pay_and_expire_races(void **state) {
    fixture *f = *state;
    stock_set(f, SKU, 10);
    created(f, SKU, "paid-first", 2);
    created(f, SKU, "expired-first", 3);
    by_id(f, SP_EV_ORDER_PAID, SKU, "paid-first");
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "paid-first");    /* too late: nothing */
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "expired-first"); /* stock back, once */
    by_id(f, SP_EV_ORDER_PAID, SKU, "expired-first");    /* late payment */
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "expired-first"); /* again: nothing */
    by_id(f, SP_EV_ORDER_PAID, SKU, "expired-first");    /* again: nothing */
    by_id(f, SP_EV_ORDER_PAID, SKU, "paid-first");       /* again: nothing */
    decide(f);
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_PAID);
    assert_int_equal(item(f, 4)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 5)->effect, SP_EFFECT_EXPIRED);
    assert_int_equal(item(f, 6)->effect, SP_EFFECT_LATE_PAYMENT);
    for (size_t i = 7; i < 10; i++) assert_int_equal(item(f, i)->outcome, SP_ITEM_UNCHANGED);

    const sp_rules_order *p = order(f, "paid-first"), *e = order(f, "expired-first");
    assert_int_equal(p->status, SP_ORDER_PAID);
    assert_int_equal(p->paid_ms, item(f, 3)->ev.ts_ms);
    assert_int_equal(p->closed_ms, -1);
    assert_int_equal(e->status, SP_ORDER_EXPIRED);
    assert_true(e->refund_due);
    assert_int_equal(e->closed_ms, item(f, 5)->ev.ts_ms);
    assert_int_equal(e->paid_ms, item(f, 6)->ev.ts_ms);

    const sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU);
    assert_int_equal(sk->stock, 8); /* 10 - 2 - 3 + 3 */
    assert_int_equal(sk->changes, 3);
    assert_int_equal(f->r->nreturns, 1);
    assert_string_equal(f->r->returns[0].reason, "expired");
    assert_ptr_equal(&f->r->orders[f->r->returns[0].order], e);
}

static void test_voids(void **state) {
    fixture *f = *state;
    stock_set(f, SKU, 5);
    created(f, SKU, "logged", 1);
    voided(f, SKU, "logged", 1, "order.created not delivered"); /* the order stands */
    voided(f, SKU, "lost", 2, "order.created not delivered");
    created(f, SKU, "lost", 2); /* arrived after its void: nothing */
    voided(f, SKU, "lost", 2, "");
    voided(f, SKU2, "no-reason", 1, "");     /* a SKU PostgreSQL never saw */
    by_id(f, SP_EV_ORDER_PAID, SKU, "lost"); /* paid for a cancelled order: refund */
    decide(f);
    assert_int_equal(item(f, 2)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_CANCELLED);
    assert_int_equal(item(f, 4)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 5)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 6)->effect, SP_EFFECT_CANCELLED);
    assert_int_equal(item(f, 7)->effect, SP_EFFECT_LATE_PAYMENT);

    const sp_rules_order *lost = order(f, "lost");
    assert_int_equal(lost->status, SP_ORDER_CANCELLED);
    assert_int_equal(lost->qty, 2);
    assert_int_equal(lost->user_id, 8);
    assert_string_equal(lost->reject_reason, "order.created not delivered");
    assert_int_equal(lost->partition, -1);
    assert_int_equal(lost->closed_ms, item(f, 3)->ev.ts_ms);
    assert_string_equal(order(f, "no-reason")->reject_reason, "voided");
    /* PostgreSQL never took the voided units: only the one real order moved the stock. */
    assert_int_equal(sp_rules_find_sku(f->r, SKU)->stock, 4);
    assert_int_equal(sp_rules_find_sku(f->r, SKU)->changes, 1);
    assert_int_equal(f->r->nreturns, 2);
    assert_string_equal(f->r->returns[0].reason, "voided");
    assert_string_equal(f->r->returns[1].reason, "voided");
}

static void test_dead_letters(void **state) {
    fixture *f = *state;
    stock_set(f, SKU, 5);
    stock_set(f, SKU, 99);  /* opened already: nothing */
    stock_add(f, SKU2, 10); /* never opened */
    by_id(f, SP_EV_ORDER_PAID, SKU, "ghost");
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "ghost");
    created(f, SKU, "mine", 1);
    by_id(f, SP_EV_ORDER_PAID, SKU2, "mine"); /* another SKU's order */
    sp_batch_item *bad = add(f, SP_EV_NONE, 0);
    bad->bad = 1;
    snprintf(bad->reason, sizeof(bad->reason), "undecodable: test");
    stock_add(f, SKU, 10);
    decide(f);
    assert_int_equal(item(f, 1)->outcome, SP_ITEM_UNCHANGED);
    for (size_t i = 2; i <= 4; i++) assert_int_equal(item(f, i)->outcome, SP_ITEM_DEAD);
    assert_non_null(strstr(item(f, 2)->reason, "stock.add for sku 1002"));
    assert_non_null(strstr(item(f, 3)->reason, "order.paid for order ghost"));
    assert_int_equal(item(f, 6)->outcome, SP_ITEM_DEAD);
    assert_non_null(strstr(item(f, 6)->reason, "of sku 1001 names sku 1002"));
    assert_int_equal(item(f, 7)->outcome, SP_ITEM_DEAD);
    assert_string_equal(item(f, 7)->reason, "undecodable: test"); /* the caller's reason stays */
    /* A bad event does not stop the rest. */
    assert_int_equal(item(f, 8)->effect, SP_EFFECT_RESTOCKED);
    const sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU);
    assert_int_equal(sk->stock, 14);
    assert_int_equal(sk->supplied, 15);
    assert_int_equal(sk->added, 10);
}

/* Rows already in PostgreSQL, and a batch read again after a rebalance. */
static void test_existing_rows_and_stale_items(void **state) {
    fixture *f = *state;
    f->offset = 100;
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "old"); /* offset 100: applied before */
    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "old"); /* 101 */
    created(f, SKU, "new", 4);                 /* 102 */
    created(f, SKU, "dup", 1);                 /* 103: its row exists */
    sp_batch_index_partitions(f->b);
    assert_int_equal(f->b->nparts, 1);
    assert_int_equal(f->b->parts[0].first_offset, 100);
    assert_int_equal(f->b->parts[0].last_offset, 103);
    f->b->parts[0].stored = 101;
    sp_rules_begin(f->r, f->b);
    sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU);
    assert_non_null(sk);
    sk->in_db = 1;
    sk->stock = sk->supplied = 3;
    sk->version = 41;
    assert_int_equal(sp_rules_add_order(f->r, "old", SKU, 5, 2, SP_ORDER_PENDING, 0), 0);
    assert_int_equal(sp_rules_add_order(f->r, "dup", SKU, 5, 1, SP_ORDER_PAID, 0), 0);
    sp_rules_decide(f->r, f->b);
    assert_int_equal(item(f, 0)->outcome, SP_ITEM_STALE);
    assert_int_equal(item(f, 1)->effect, SP_EFFECT_EXPIRED);
    assert_int_equal(item(f, 2)->effect, SP_EFFECT_PENDING); /* 3 + 2 returned covers 4 */
    assert_int_equal(item(f, 3)->outcome, SP_ITEM_UNCHANGED);
    const sp_rules_order *old = order(f, "old");
    assert_int_equal(old->status_db, SP_ORDER_PENDING);
    assert_int_equal(old->status, SP_ORDER_EXPIRED);
    assert_true(old->changed);
    assert_int_equal(sk->stock, 1);
    assert_int_equal(sk->version, 41);
    assert_int_equal(sk->changes, 2);
    assert_int_equal(sk->taken - sk->returned - sk->added, 2); /* the guarded update's n */
}

/* The same events cut into batches differently end in the same row: same stock, and the version
 * moves by the same total (it counts the events that changed the row, not the batches). */
static void test_batch_boundaries_do_not_matter(void **state) {
    fixture *f = *state;
    char id[16];
    int64_t changes_split = 0, stock_split = 0;
    for (int cut = 0; cut <= 20; cut += 20) { /* cut 0: one batch; cut 20: two */
        int64_t stock = 10, changes = 0;
        for (int part = 0; part < (cut ? 2 : 1); part++) {
            sp_batch_clear(f->b);
            f->offset = 0;
            int from = cut ? part * 10 : 0, to = cut ? from + 10 : 20;
            for (int i = from; i < to; i++) {
                snprintf(id, sizeof(id), "o%d", i);
                if (i % 5 == 4)
                    by_id(f, SP_EV_ORDER_EXPIRED, SKU, "o0");
                else
                    created(f, SKU, id, 1);
            }
            sp_batch_index_partitions(f->b);
            f->b->parts[0].stored = 0;
            sp_rules_begin(f->r, f->b);
            sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU);
            sk->in_db = 1;
            sk->stock = sk->supplied = stock;
            if (part == 1) /* o0 was stored by the first batch, pending or expired */
                assert_int_equal(sp_rules_add_order(f->r, "o0", SKU, 7, 1, SP_ORDER_EXPIRED, 0), 0);
            sp_rules_decide(f->r, f->b);
            stock = sk->stock;
            changes += sk->changes;
        }
        if (cut == 0) {
            stock_split = stock;
            changes_split = changes;
        } else {
            assert_int_equal(stock, stock_split);
            assert_int_equal(changes, changes_split);
        }
    }
    assert_int_equal(stock_split, 0);    /* 16 orders for 10 units + 1 returned: 11 taken */
    assert_int_equal(changes_split, 12); /* 11 taken + 1 returned */
}

/* A producer published the same restock twice (an admin's retry with the same Idempotency-Key
 * after a failure between the publish and Redis), both in one batch: applied once. Another id, an
 * add without id, and the same id on another SKU are each applied. */
static void test_restock_twice_in_one_batch(void **state) {
    fixture *f = *state;
    stock_set(f, SKU, 10);
    stock_add_keyed(f, SKU, 5, "K");  /* 1 */
    stock_add_keyed(f, SKU, 5, "K");  /* 2: the same restock again */
    stock_add_keyed(f, SKU, 3, "L");  /* 3 */
    stock_add(f, SKU, 2);             /* 4: without id: always applied */
    stock_add(f, SKU, 2);             /* 5 */
    stock_set(f, SKU2, 1);            /* 6 */
    stock_add_keyed(f, SKU2, 4, "K"); /* 7: the same id on another SKU */
    stock_add_keyed(f, SKU, 5, "K");  /* 8: and again, after all that */
    decide(f);
    assert_int_equal(item(f, 1)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 2)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 2)->effect, SP_EFFECT_NONE);
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 4)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 5)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 7)->outcome, SP_ITEM_APPLIED);
    assert_int_equal(item(f, 7)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 8)->outcome, SP_ITEM_UNCHANGED);

    const sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU), *sk2 = sp_rules_find_sku(f->r, SKU2);
    assert_int_equal(sk->stock, 10 + 5 + 3 + 2 + 2);
    assert_int_equal(sk->supplied, 22);
    assert_int_equal(sk->added, 12);
    assert_int_equal(sk->changes,
                     4); /* K, L and the two without id: the duplicates change nothing */
    assert_int_equal(sk->updated_ms, item(f, 5)->ev.ts_ms);
    assert_int_equal(sk2->stock, 5);
    assert_int_equal(sk2->supplied, 5);
    assert_int_equal(sk2->changes, 1);
    assert_int_equal(f->b->skus[0].stock, 22);
    assert_int_equal(f->b->skus[0].supplied, 22);

    /* The rows to insert: one per applied pair, with where and when it was applied. */
    assert_int_equal(f->r->nrestocks, 3);
    assert_int_equal(new_restocks(f), 3);
    const sp_rules_restock *k = restock(f, SKU, "K"), *l = restock(f, SKU, "L");
    const sp_rules_restock *k2 = restock(f, SKU2, "K");
    assert_non_null(k);
    assert_non_null(l);
    assert_non_null(k2);
    assert_int_equal(k->add, 5);
    assert_int_equal(k->ts_ms, item(f, 1)->ev.ts_ms);
    assert_int_equal(k->partition, 0);
    assert_int_equal(k->offset, 1);
    assert_int_equal(l->add, 3);
    assert_int_equal(l->offset, 3);
    assert_int_equal(k2->add, 4);
    assert_int_equal(k2->offset, 7);
}

/* The restock was applied by an earlier batch (its row read from restocks): a repeat in a later
 * batch changes neither stock nor version; other ids and adds without id still apply. */
static void test_restock_twice_across_batches(void **state) {
    fixture *f = *state;
    stock_add_keyed(f, SKU, 5, "K");  /* 0: applied before */
    stock_add_keyed(f, SKU, 3, "L");  /* 1 */
    stock_add_keyed(f, SKU2, 4, "K"); /* 2: the same id on another SKU */
    stock_add(f, SKU, 2);             /* 3 */
    stock_add_keyed(f, SKU, 3, "L");  /* 4: L again, within this batch */
    begin_with_rows(f, 15, 7, 1);
    assert_int_equal(sp_rules_add_restock(f->r, SKU, "K"), 0);
    assert_int_equal(sp_rules_add_restock(f->r, SKU, "K"), 0); /* once is enough */
    sp_rules_decide(f->r, f->b);
    assert_int_equal(item(f, 0)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(item(f, 1)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 2)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_RESTOCKED);
    assert_int_equal(item(f, 4)->outcome, SP_ITEM_UNCHANGED);

    const sp_rules_sku *sk = sp_rules_find_sku(f->r, SKU), *sk2 = sp_rules_find_sku(f->r, SKU2);
    assert_int_equal(sk->stock, 15 + 3 + 2);
    assert_int_equal(sk->supplied, 20);
    assert_int_equal(sk->added, 5);
    assert_int_equal(sk->version, 7); /* as read: the guarded update moves it by changes */
    assert_int_equal(sk->changes, 2);
    assert_int_equal(sk2->stock, 5);
    assert_int_equal(sk2->changes, 1);
    assert_int_equal(f->r->nrestocks, 3);
    assert_false(restock(f, SKU, "K")->is_new); /* read: nothing to insert */
    assert_true(restock(f, SKU, "L")->is_new);
    assert_true(restock(f, SKU2, "K")->is_new);
    assert_int_equal(new_restocks(f), 2);

    /* Only a repeat: the row is not touched at all. */
    sp_batch_clear(f->b);
    f->offset = 0;
    stock_add_keyed(f, SKU, 5, "K");
    begin_with_rows(f, 20, 9, -1);
    assert_int_equal(f->r->nrestocks, 0); /* begin forgot the last batch's */
    assert_int_equal(sp_rules_add_restock(f->r, SKU, "K"), 0);
    sp_rules_decide(f->r, f->b);
    assert_int_equal(item(f, 0)->outcome, SP_ITEM_UNCHANGED);
    assert_int_equal(sp_rules_find_sku(f->r, SKU)->stock, 20);
    assert_int_equal(sp_rules_find_sku(f->r, SKU)->changes, 0);
    assert_int_equal(new_restocks(f), 0);
}

/* A batch decided again after a rollback applies its restocks again (begin forgets the new ones);
 * a keyed add for a SKU without a row stays a dead letter and does not count as applied. */
static void test_restock_decided_again_and_dead(void **state) {
    fixture *f = *state;
    stock_add_keyed(f, SKU2, 4, "K"); /* 0: never opened yet: dead */
    stock_set(f, SKU2, 1);            /* 1 */
    stock_add_keyed(f, SKU2, 4, "K"); /* 2: now it applies */
    for (int round = 0; round < 2; round++) {
        decide(f);
        assert_int_equal(item(f, 0)->outcome, SP_ITEM_DEAD);
        assert_non_null(strstr(item(f, 0)->reason, "stock.add for sku 1002"));
        assert_int_equal(item(f, 2)->effect, SP_EFFECT_RESTOCKED);
        assert_int_equal(sp_rules_find_sku(f->r, SKU2)->stock, 5);
        assert_int_equal(f->r->nrestocks, 1);
        assert_int_equal(restock(f, SKU2, "K")->offset, 2);
    }
}

/* The table holds cap pairs, as many as a batch can name. */
static void test_restock_table_is_bounded(void **state) {
    (void)state;
    sp_rules *r = sp_rules_new(2);
    sp_batch *b = sp_batch_new(2);
    assert_non_null(r);
    assert_non_null(b);
    sp_rules_begin(r, b);
    assert_int_equal(sp_rules_add_restock(r, SKU, "a"), 0);
    assert_int_equal(sp_rules_add_restock(r, SKU2, "a"), 0);
    assert_int_equal(sp_rules_add_restock(r, SKU, "a"), 0); /* known: takes no room */
    assert_int_equal(sp_rules_add_restock(r, SKU, "b"), -1);
    assert_int_equal(r->nrestocks, 2);
    sp_batch_free(b);
    sp_rules_free(r);
}

static void test_status_names(void **state) {
    (void)state;
    for (int st = SP_ORDER_PENDING; st <= SP_ORDER_CANCELLED; st++)
        assert_int_equal(sp_order_status_parse(sp_order_status_name((sp_order_status)st)), st);
    assert_int_equal(sp_order_status_parse("shipped"), SP_ORDER_NONE);
    assert_null(sp_order_status_name(SP_ORDER_NONE));
}

static void test_batch_is_bounded(void **state) {
    (void)state;
    sp_batch *b = sp_batch_new(2);
    assert_non_null(b);
    assert_non_null(sp_batch_add(b, 0, 0));
    assert_non_null(sp_batch_add(b, 1, 0));
    assert_null(sp_batch_add(b, 0, 1));
    sp_batch_index_partitions(b);
    assert_int_equal(b->nparts, 2);
    sp_batch_clear(b);
    assert_int_equal(b->n, 0);
    sp_batch_free(b);
}

/* A decided batch tells the consumer's Redis corrections over how many shards each SKU's sale
 * is (an order's entry is on its buyer's home shard): as read from its row, as the stock.set
 * that opened it in the batch says, 1 for a SKU without a row. */
static void test_batch_sku_shards(void **state) {
    fixture *f = *state;
    created(f, SKU, "o1", 1);
    sp_batch_item *open = add(f, SP_EV_STOCK_SET, SKU2);
    open->ev.stock = 5;
    open->ev.shards = 4;
    created(f, SKU2, "o2", 1);
    created(f, SKU + 100, "o3", 1); /* never opened */
    begin_with_rows(f, 10, 1, -1);
    sp_rules_find_sku(f->r, SKU)->shards = 3; /* as the store reads it */
    sp_rules_decide(f->r, f->b);
    assert_int_equal(f->b->nskus, 3);
    for (size_t k = 0; k < f->b->nskus; k++) {
        const sp_batch_sku *sk = &f->b->skus[k];
        assert_int_equal(sk->shards, sk->sku_id == SKU ? 3 : sk->sku_id == SKU2 ? 4 : 1);
    }
    assert_int_equal(item(f, 3)->effect, SP_EFFECT_REJECTED_NO_SKU);
}

int main(void) {
#define WITH_FIXTURE(t) cmocka_unit_test_setup_teardown(t, setup, teardown)
    const struct CMUnitTest tests[] = {
        WITH_FIXTURE(test_created_takes_stock_until_it_runs_out),
        WITH_FIXTURE(test_150_orders_for_100_units),
        WITH_FIXTURE(test_pay_and_expire_races),
        WITH_FIXTURE(test_voids),
        WITH_FIXTURE(test_dead_letters),
        WITH_FIXTURE(test_existing_rows_and_stale_items),
        WITH_FIXTURE(test_batch_boundaries_do_not_matter),
        WITH_FIXTURE(test_restock_twice_in_one_batch),
        WITH_FIXTURE(test_restock_twice_across_batches),
        WITH_FIXTURE(test_restock_decided_again_and_dead),
        WITH_FIXTURE(test_batch_sku_shards),
        cmocka_unit_test(test_restock_table_is_bounded),
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_batch_is_bounded),
    };
    return cmocka_run_group_tests_name("order_rules", tests, NULL, NULL);
}
