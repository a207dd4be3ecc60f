/* integration_stock_redis.c - the sale's Lua scripts against the real Redis of the local stack:
 * admission is atomic and exact under concurrency, limits and idempotency hold, a release gives
 * back exactly once. Needs var/stack.env loaded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "redis_store.h"
#include "clock_skew.h"
#include "lua_scripts.h"
#include "clock.h"
#include "stock.h"
#include "itest.h"

static char err[512];
static sp_redis_target target;
static int64_t sku_base;

static sp_redis *connect_redis(void) {
    sp_redis *c = sp_redis_open(&target, 2000, err, sizeof(err));
    if (c == NULL) fail_msg("connect: %s", err);
    return c;
}

/* A SKU of its own for each test, its keys deleted before use. */
static int64_t fresh_sku(sp_redis *c, int n) {
    int64_t sku = sku_base + n;
    const char *suffixes[] = {"sale", "users", "resv", "restocks"};
    for (size_t i = 0; i < 4; i++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_key(key, sku, suffixes[i]);
        freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key));
    }
    return sku;
}

static sp_reserve_result reserve(sp_redis *c, int64_t sku, int64_t user, int qty,
                                 const char *order_id, const char *idem) {
    sp_reserve_request req = {.sku_id = sku, .user_id = user, .qty = qty, .ts_ms = 1700000000000};
    sp_reserve_result res;
    snprintf(req.order_id, sizeof(req.order_id), "%s", order_id);
    snprintf(req.idem_key, sizeof(req.idem_key), "%s", idem ? idem : "");
    if (sp_stock_reserve(c, &req, &res, err, sizeof(err)) != 0) fail_msg("reserve: %s", err);
    return res;
}

/* Kafka acknowledged order_id, which user reserved with key idem (NULL: none). */
static int confirm(sp_redis *c, int64_t sku, int64_t user, const char *order_id, const char *idem) {
    sp_reserve_request req = {.sku_id = sku, .user_id = user};
    int was;
    snprintf(req.order_id, sizeof(req.order_id), "%s", order_id);
    snprintf(req.idem_key, sizeof(req.idem_key), "%s", idem ? idem : "");
    if (sp_stock_confirm(c, &req, 3, 17, &was, err, sizeof(err)) != 0) fail_msg("confirm: %s", err);
    return was;
}

/* entry ("r:user:qty:ts:idem" or "a:user:qty:ts") with its time written "T", once checked to be
 * Redis's clock of about now: reserve.lua stamps a reservation with TIME, never with the
 * producer's clock (the request's ts_ms is 1700000000000 here, long past). */
static const char *timeless(sp_redis *c, const char *entry) {
    static char out[256];
    int64_t now;
    if (sp_clock_redis_now_ms(c, NULL, &now, err, sizeof(err)) != 0) fail_msg("%s", err);
    const char *p = entry;
    for (int i = 0; i < 3 && p; i++) p = strchr(p + 1, ':');
    if (p == NULL) fail_msg("malformed entry %s", entry);
    char *end;
    long long ts = strtoll(p + 1, &end, 10);
    if (ts < now - 60000 || ts > now + 1000)
        fail_msg("entry %s: its time is not Redis's clock (%" PRId64 ")", entry, now);
    snprintf(out, sizeof(out), "%.*sT%s", (int)(p + 1 - entry), entry, end);
    return out;
}

static void test_open_once_and_restock(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 1), stock;
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 10, 1, 600, &opened, err, sizeof(err)), 0);
    assert_int_equal(opened, 1);
    assert_int_equal(sp_stock_open(c, sku, 999, 5, 5, &opened, err, sizeof(err)), 0);
    assert_int_equal(opened, 0); /* the second open changes nothing */
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 10);
    assert_int_equal(sale_hget_int(c, sku, "sale", "limit"), 1);
    sp_restock_status st;
    assert_int_equal(sp_stock_restock(c, sku, 5, "rs-1", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_APPLIED);
    assert_int_equal(stock, 15);
    /* The same request id again (an admin's retry; the reaper catching up): nothing more, and
     * the first apply's stock; another id adds. */
    assert_int_equal(sp_stock_restock(c, sku, 5, "rs-1", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_SEEN);
    assert_int_equal(stock, 15);
    assert_int_equal(sale_hget_int(c, sku, "sale", "supplied"), 15);
    assert_int_equal(sp_stock_restock(c, sku, 2, "rs-2", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_APPLIED);
    assert_int_equal(stock, 17);
    assert_int_equal(sp_stock_restock(c, sku, 5, "rs-1", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_SEEN);
    assert_int_equal(stock, 15);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 17);
    /* A paused sale (a reconcile rebuilds it) takes no restock. */
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HSET {sku:%" PRId64 "}:sale paused tok", sku));
    assert_int_equal(sp_stock_restock(c, sku, 5, "rs-3", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_PAUSED);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 17);
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HDEL {sku:%" PRId64 "}:sale paused", sku));
    /* Ids older than IDEM_TTL_S are forgotten on the next apply (the hash stays bounded). */
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HSET {sku:%" PRId64 "}:restocks old 1000:7", sku));
    assert_int_equal(sp_stock_restock(c, sku, 1, "rs-4", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_APPLIED);
    redisReply *n = sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HLEN {sku:%" PRId64 "}:restocks", sku);
    assert_int_equal(n->integer, 3); /* rs-1, rs-2, rs-4 */
    freeReplyObject(n);
    int64_t other = fresh_sku(c, 2);
    assert_int_equal(sp_stock_restock(c, other, 5, "rs-5", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(st, SP_RESTOCK_NO_SALE); /* not open: nothing created */
    assert_int_equal(sp_stock_available(c, other, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, -1);
    sp_redis_close(c);
}

static void test_reserve_outcomes(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 3), stock;
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 3, 2, 600, &opened, err, sizeof(err)), 0);

    sp_reserve_result r = reserve(c, sku, 7, 2, "o-1", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    assert_string_equal(r.order_id, "o-1");
    assert_int_equal(r.stock_left, 1);
    assert_int_equal(r.pay_timeout_s, 600);
    assert_int_equal(sale_hget_int(c, sku, "users", "7"), 2);
    /* The user holds 2 of a limit of 2. */
    r = reserve(c, sku, 7, 1, "o-2", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_LIMIT);
    /* Another user wants 2, only 1 is left. */
    r = reserve(c, sku, 8, 2, "o-3", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_SOLD_OUT);
    assert_int_equal(r.stock_left, 1);
    r = reserve(c, sku, 8, 1, "o-4", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    r = reserve(c, sku, 9, 1, "o-5", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_SOLD_OUT);
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 0);
    /* Refused attempts left no reservation behind. */
    assert_int_equal(sale_hget_int(c, sku, "resv", "o-3"), -1);
    assert_int_equal(sale_hget_int(c, sku, "users", "9"), -1);

    r = reserve(c, fresh_sku(c, 4), 1, 1, "o-6", NULL);
    assert_int_equal(r.outcome, SP_RESERVE_UNKNOWN_SKU);
    sp_redis_close(c);
}

static void test_idempotency_key(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 5), stock;
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 5, 0, 600, &opened, err, sizeof(err)), 0);

    sp_reserve_result r = reserve(c, sku, 42, 1, "first", "key-A");
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    /* Retried while Kafka has not answered: same order, still pending, nothing taken. */
    r = reserve(c, sku, 42, 1, "second", "key-A");
    assert_int_equal(r.outcome, SP_RESERVE_DUP);
    assert_string_equal(r.order_id, "first");
    assert_string_equal(r.dup_state, "pending");
    assert_int_equal(confirm(c, sku, 42, "first", "key-A"), 1);
    r = reserve(c, sku, 42, 1, "third", "key-A");
    assert_int_equal(r.outcome, SP_RESERVE_DUP);
    assert_string_equal(r.order_id, "first");
    assert_string_equal(r.dup_state, "accepted");
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 4);
    /* The key is per user: another user's same key is a new order. */
    r = reserve(c, sku, 43, 1, "fourth", "key-A");
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    /* A refusal is remembered too. */
    r = reserve(c, sku, 44, 9, "fifth", "key-B");
    assert_int_equal(r.outcome, SP_RESERVE_SOLD_OUT);
    r = reserve(c, sku, 44, 1, "sixth", "key-B");
    assert_int_equal(r.outcome, SP_RESERVE_DUP);
    assert_string_equal(r.dup_state, "sold_out");
    sp_redis_close(c);
}

static void test_release_exactly_once(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 6), stock;
    int opened, qty;
    assert_int_equal(sp_stock_open(c, sku, 10, 3, 600, &opened, err, sizeof(err)), 0);
    assert_int_equal(reserve(c, sku, 5, 3, "r-1", "k").outcome, SP_RESERVE_OK);
    sp_reserve_request req = {.sku_id = sku,
                              .user_id = 5,
                              .qty = 3,
                              .order_id = "r-1",
                              .idem_key = "k"};
    assert_int_equal(sp_stock_release(c, &req, &qty, err, sizeof(err)), 0);
    assert_int_equal(qty, 3);
    assert_int_equal(sp_stock_release(c, &req, &qty, err, sizeof(err)), 0);
    assert_int_equal(qty, 0); /* the second release returns nothing */
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 10);
    assert_int_equal(sale_hget_int(c, sku, "users", "5"), -1);
    /* The key was freed: the buyer's retry is a fresh attempt. */
    sp_reserve_result r = reserve(c, sku, 5, 3, "r-2", "k");
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    assert_string_equal(r.order_id, "r-2");
    /* Confirmed first, then a late release: the units stay sold. */
    assert_int_equal(confirm(c, sku, 5, "r-2", "k"), 1);
    sp_reserve_request late = {.sku_id = sku,
                               .user_id = 5,
                               .qty = 3,
                               .order_id = "r-2",
                               .idem_key = "k"};
    assert_int_equal(sp_stock_release(c, &late, &qty, err, sizeof(err)), 0);
    assert_int_equal(qty, 0);
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 7);
    assert_int_equal(confirm(c, sku, 5, "r-2", "k"), 0); /* accepted already */
    sp_redis_close(c);
}

/* Many connections race for few units: exactly the stock is admitted, never more. */
#define RACERS          8
#define TRIES_PER_RACER 250
typedef struct racer {
    int64_t sku;
    int id;
    int won;
} racer;

static void *race(void *arg) {
    racer *rc = arg;
    char e[256];
    sp_redis *c = sp_redis_open(&target, 2000, e, sizeof(e));
    if (c == NULL) return NULL;
    for (int i = 0; i < TRIES_PER_RACER; i++) {
        sp_reserve_request req = {.sku_id = rc->sku,
                                  .user_id = rc->id * 1000 + i + 1,
                                  .qty = 1,
                                  .ts_ms = 1};
        sp_reserve_result res;
        snprintf(req.order_id, sizeof(req.order_id), "race-%d-%d", rc->id, i);
        if (sp_stock_reserve(c, &req, &res, e, sizeof(e)) == 0 && res.outcome == SP_RESERVE_OK)
            rc->won++;
    }
    sp_redis_close(c);
    return NULL;
}

static void test_concurrent_admission_is_exact(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 7), stock;
    int opened, won = 0;
    assert_int_equal(sp_stock_open(c, sku, 100, 1, 600, &opened, err, sizeof(err)), 0);
    pthread_t t[RACERS];
    racer r[RACERS];
    for (int i = 0; i < RACERS; i++) {
        r[i] = (racer){.sku = sku, .id = i};
        assert_int_equal(pthread_create(&t[i], NULL, race, &r[i]), 0);
    }
    for (int i = 0; i < RACERS; i++) {
        pthread_join(t[i], NULL);
        won += r[i].won;
    }
    assert_int_equal(won, 100);
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 0);
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, "resv");
    redisReply *rr = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HLEN %s", key);
    assert_int_equal(rr->integer, 100);
    freeReplyObject(rr);
    sp_redis_close(c);
}

/* confirm turns a reservation into an accepted entry; the consumer's forget drops it; a consumer
 * quicker than confirm leaves nothing behind and the key still answers "accepted". */
static void test_confirm_marks_accepted(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 40);
    int opened, qty;
    assert_int_equal(sp_stock_open(c, sku, 5, 0, 60, &opened, err, sizeof(err)), 0);
    assert_int_equal(reserve(c, sku, 7, 2, "acc-1", NULL).outcome, SP_RESERVE_OK);
    assert_int_equal(reserve(c, sku, 8, 1, "acc-2", NULL).outcome, SP_RESERVE_OK);
    assert_string_equal(timeless(c, sale_hget_str(c, sku, "resv", "acc-1")), "r:7:2:T:");
    assert_int_equal(confirm(c, sku, 7, "acc-1", NULL), 1);
    assert_int_equal(confirm(c, sku, 8, "acc-2", NULL), 1);
    assert_string_equal(timeless(c, sale_hget_str(c, sku, "resv", "acc-1")), "a:7:2:T:3:17");
    /* An accepted order can no longer be released. */
    sp_reserve_request acc = {.sku_id = sku, .user_id = 7, .qty = 2, .order_id = "acc-1"};
    assert_int_equal(sp_stock_release(c, &acc, &qty, err, sizeof(err)), 0);
    assert_int_equal(qty, 0);
    const char *ids[] = {"acc-1", "acc-2", "never-there"};
    assert_int_equal(sp_stock_accepted_forget(c, sku, ids, 3, err, sizeof(err)), 0);
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, "resv");
    redisReply *r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HLEN %s", key);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 2); /* forgetting returns nothing */

    /* The consumer stored the order before the producer's confirm ran. */
    assert_int_equal(reserve(c, sku, 9, 1, "acc-3", "key-3").outcome, SP_RESERVE_OK);
    const char *id3[] = {"acc-3"};
    assert_int_equal(sp_stock_accepted_forget(c, sku, id3, 1, err, sizeof(err)), 0);
    assert_int_equal(confirm(c, sku, 9, "acc-3", "key-3"), 0);
    assert_string_equal(sale_hget_str(c, sku, "resv", "acc-3"), "(nil)"); /* not re-created */
    sp_reserve_result again = reserve(c, sku, 9, 1, "acc-4", "key-3");
    assert_int_equal(again.outcome, SP_RESERVE_DUP);
    assert_string_equal(again.dup_state, "accepted");
    assert_string_equal(again.order_id, "acc-3");
    sp_redis_close(c);
}

/* cap lowers Redis to PostgreSQL's stock plus the restocks PostgreSQL has not seen; never
 * raises. */
static void test_cap_only_lowers(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 41), stock, removed;
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 10, 0, 60, &opened, err, sizeof(err)), 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "supplied"), 10);
    /* Redis holds 10, PostgreSQL only 6 (say a failover lost four decrements): down to 6. */
    assert_int_equal(sp_stock_cap(c, sku, 6, 10, &removed, err, sizeof(err)), 0);
    assert_int_equal(removed, 4);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 6);
    /* Orders in flight keep Redis below PostgreSQL: nothing changes, nothing is added. */
    assert_int_equal(sp_stock_cap(c, sku, 9, 10, &removed, err, sizeof(err)), 0);
    assert_int_equal(removed, 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 6);
    /* A restock Redis has and PostgreSQL has not applied yet is not taken away. */
    sp_restock_status st;
    assert_int_equal(sp_stock_restock(c, sku, 50, "cap-1", &st, &stock, err, sizeof(err)), 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "supplied"), 60);
    assert_int_equal(sp_stock_cap(c, sku, 6, 10, &removed, err, sizeof(err)), 0);
    assert_int_equal(removed, 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 56);
    assert_int_equal(sp_stock_cap(c, sku, 3, 10, &removed, err, sizeof(err)), 0);
    assert_int_equal(removed, 3);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 53);
    /* No sale: nothing is created. */
    int64_t none = fresh_sku(c, 42);
    assert_int_equal(sp_stock_cap(c, none, 0, 0, &removed, err, sizeof(err)), 0);
    assert_int_equal(removed, 0);
    assert_int_equal(sp_stock_available(c, none, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, -1);
    sp_redis_close(c);
}

/* Orders of one SKU in one reserve.lua call are decided one after the other, each seeing what the
 * ones before it took: the user's limit, the stock running out, a key repeated in the batch. */
static void test_reserve_batch_in_order(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 9);
    int opened;
    if (sp_stock_open(c, sku, 5, 2, 600, &opened, err, sizeof(err)) != 0) fail_msg("open: %s", err);
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "DEL {sku:%lld}:idem:2:K {sku:%lld}:idem:3:L", (long long)sku,
                                     (long long)sku));
    struct {
        int64_t user;
        int qty;
        const char *idem;
    } orders[] = {{1, 1, NULL}, {1, 1, NULL}, {1, 1, NULL}, {2, 2, "K"},
                  {3, 1, "L"},  {2, 2, "K"},  {4, 1, NULL}};
    enum { N = sizeof(orders) / sizeof(orders[0]) };
    sp_reserve_request req[N];
    sp_script_call calls[N];
    sp_reserve_result res[N];
    sp_reserve_batch b = {0};
    for (int i = 0; i < N; i++) {
        req[i] = (sp_reserve_request){.sku_id = sku,
                                      .user_id = orders[i].user,
                                      .qty = orders[i].qty,
                                      .ts_ms = 1700000000000 + i};
        snprintf(req[i].order_id, sizeof(req[i].order_id), "b-%d", i);
        snprintf(req[i].idem_key, sizeof(req[i].idem_key), "%s",
                 orders[i].idem ? orders[i].idem : "");
        sp_stock_reserve_call(&calls[i], &req[i]);
        assert_int_equal(sp_stock_reserve_batch_add(&b, &req[i], &calls[i]), 0);
    }
    /* another SKU's order does not join the batch */
    sp_reserve_request other = req[0];
    sp_script_call other_call;
    other.sku_id = sku + 1;
    sp_stock_reserve_call(&other_call, &other);
    assert_int_equal(sp_stock_reserve_batch_add(&b, &other, &other_call), -1);
    assert_int_equal(b.n, N);

    if (sp_stock_reserve_batch(c, &b, res, err, sizeof(err)) != 0) fail_msg("batch: %s", err);
    sp_reserve_outcome want[N] = {SP_RESERVE_OK, SP_RESERVE_OK,  SP_RESERVE_LIMIT,   SP_RESERVE_OK,
                                  SP_RESERVE_OK, SP_RESERVE_DUP, SP_RESERVE_SOLD_OUT};
    int64_t left[N] = {4, 3, 3, 1, 0, 0, 0};
    for (int i = 0; i < N; i++) {
        assert_int_equal(res[i].outcome, want[i]);
        if (want[i] != SP_RESERVE_DUP) assert_int_equal(res[i].stock_left, left[i]);
    }
    assert_string_equal(res[0].order_id, "b-0");
    assert_string_equal(res[4].order_id, "b-4");
    assert_string_equal(res[5].order_id, "b-3"); /* the key's first order */
    assert_string_equal(res[5].dup_state, "pending");
    assert_int_equal(res[0].pay_timeout_s, 600);

    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 0);
    assert_int_equal(sale_hget_int(c, sku, "users", "1"), 2);
    assert_int_equal(sale_hget_int(c, sku, "users", "2"), 2);
    assert_int_equal(sale_hget_int(c, sku, "users", "3"), 1);
    assert_int_equal(sale_hget_int(c, sku, "users", "4"), -1);
    char want_entry[128];
    snprintf(want_entry, sizeof(want_entry), "r:2:2:T:{sku:%lld}:idem:2:K", (long long)sku);
    assert_string_equal(timeless(c, sale_hget_str(c, sku, "resv", "b-3")), want_entry);
    assert_string_equal(timeless(c, sale_hget_str(c, sku, "resv", "b-1")), "r:1:1:T:");
    assert_string_equal(sale_hget_str(c, sku, "resv", "b-2"), "(nil)");
    assert_string_equal(sale_hget_str(c, sku, "resv", "b-6"), "(nil)");

    /* an unknown SKU: every order of the batch hears so, nothing is written */
    sp_reserve_batch u = {0};
    assert_int_equal(sp_stock_reserve_batch_add(&u, &other, &other_call), 0);
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err), "DEL {sku:%lld}:sale",
                                     (long long)other.sku_id));
    if (sp_stock_reserve_batch(c, &u, res, err, sizeof(err)) != 0) fail_msg("batch: %s", err);
    assert_int_equal(res[0].outcome, SP_RESERVE_UNKNOWN_SKU);
    assert_string_equal(sale_hget_str(c, other.sku_id, "resv", "b-0"), "(nil)");
    sp_redis_close(c);
}

/* A reconcile's apply sets the stock but keeps the pause; only its own token's open lifts it. So
 * a reaper dying between the apply and the mend leaves the sale paused (the sweep rebuilds a
 * paused sale again) instead of open with the mend skipped. */
static void test_reconcile_open_after_apply(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 10);
    int owned = -1;
    int64_t stock = -1, inflight = -1;
    sp_vanished *vanished = NULL;
    size_t nvanished = 0;
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, "sale");
    if (sp_stock_reconcile_pause(c, sku, "tok-1", 2, 600, 10, err, sizeof(err)) != 0)
        fail_msg("pause: %s", err);
    assert_string_equal(sale_hget_str(c, sku, "sale", "paused"), "tok-1");
    if (sp_stock_reconcile_apply(c, sku, "tok-1", 7, 10, 2, 600, &owned, &stock, &inflight,
                                 &vanished, &nvanished, err, sizeof(err)) != 0)
        fail_msg("apply: %s", err);
    free(vanished);
    assert_int_equal(owned, 1);
    assert_int_equal(stock, 7);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 7);
    assert_string_equal(sale_hget_str(c, sku, "sale", "paused"), "tok-1"); /* still paused */
    if (sp_stock_reconcile_open(c, sku, "tok-2", &owned, err, sizeof(err)) != 0)
        fail_msg("open: %s", err);
    assert_int_equal(owned, 0); /* another token changes nothing */
    assert_string_equal(sale_hget_str(c, sku, "sale", "paused"), "tok-1");
    if (sp_stock_reconcile_open(c, sku, "tok-1", &owned, err, sizeof(err)) != 0)
        fail_msg("open: %s", err);
    assert_int_equal(owned, 1);
    assert_string_equal(sale_hget_str(c, sku, "sale", "paused"), "(nil)");
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 7);
    sp_redis_close(c);
}

/* Two reconciles of one SKU interleaved (issue 15 hole 8): the first paused the sale and staged,
 * then lost its SKU lock; the second paused it again. From then on every write of the first
 * (staging, markers, the mend's adjust) is refused and the second's rebuild holds only its own
 * snapshot. */
static void test_reconcile_writes_need_the_token(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 11);
    int owned = -1;
    int64_t stock = -1, inflight = -1;
    sp_vanished *vanished = NULL;
    size_t nvanished = 0;
    const char *old_users[] = {"7", "8"}, *old_units[] = {"5", "1"};
    const char *users[] = {"7"}, *units[] = {"2"};
    const char *entry_ids[] = {"o-gone"}, *entries[] = {"a:9:3:1700000000000"};
    const char *marker_ids[] = {"o-ledger"}, *marker_ms[] = {"1700000000000"};
    const char *suffixes[] = {"users_rebuild", "resv_staged", "returned"};
    for (size_t i = 0; i < 3; i++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_key(key, sku, suffixes[i]);
        freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key));
    }
    /* The first reconcile pauses and stages per-user units. */
    if (sp_stock_reconcile_pause(c, sku, "tok-1", 5, 600, 10, err, sizeof(err)) != 0 ||
        sp_stock_reconcile_stage(c, sku, "tok-1", SP_STAGE_CLEAR, NULL, NULL, 0, &owned, err,
                                 sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(owned, 1);
    if (sp_stock_reconcile_stage(c, sku, "tok-1", SP_STAGE_USERS, old_users, old_units, 2, &owned,
                                 err, sizeof(err)) != 0)
        fail_msg("stage: %s", err);
    assert_int_equal(owned, 1);
    assert_int_equal(sale_hget_int(c, sku, "users_rebuild", "8"), 1);
    /* More pairs than one script call takes go in several. */
    static char many[600][12];
    static const char *many_users[600], *many_units[600];
    for (int i = 0; i < 600; i++) {
        snprintf(many[i], sizeof(many[i]), "%d", 100 + i);
        many_users[i] = many[i], many_units[i] = "1";
    }
    if (sp_stock_reconcile_stage(c, sku, "tok-1", SP_STAGE_USERS, many_users, many_units, 600,
                                 &owned, err, sizeof(err)) != 0)
        fail_msg("stage: %s", err);
    char rebuild_key[SP_STOCK_KEY_MAX];
    sp_stock_key(rebuild_key, sku, "users_rebuild");
    redisReply *hlen = sp_redis_command(c, rebuild_key, itest_err, sizeof(itest_err), "HLEN %s",
                                        rebuild_key);
    assert_int_equal(hlen->integer, 602);
    freeReplyObject(hlen);
    /* The second takes over: pause, clear, its own snapshot. */
    if (sp_stock_reconcile_pause(c, sku, "tok-2", 5, 600, 10, err, sizeof(err)) != 0 ||
        sp_stock_reconcile_stage(c, sku, "tok-2", SP_STAGE_CLEAR, NULL, NULL, 0, &owned, err,
                                 sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(owned, 1);
    if (sp_stock_reconcile_stage(c, sku, "tok-2", SP_STAGE_USERS, users, units, 1, &owned, err,
                                 sizeof(err)) != 0 ||
        sp_stock_reconcile_stage(c, sku, "tok-2", SP_STAGE_ENTRIES, entry_ids, entries, 1, &owned,
                                 err, sizeof(err)) != 0)
        fail_msg("stage: %s", err);
    assert_int_equal(owned, 1);
    /* The first one's late writes change nothing. */
    const char *stages[] = {"clear", "users", "entries", "markers"};
    for (int what = SP_STAGE_CLEAR; what <= SP_STAGE_MARKERS; what++) {
        owned = -1;
        const char *const *f = what == SP_STAGE_USERS     ? old_users
                               : what == SP_STAGE_ENTRIES ? entry_ids
                                                          : marker_ids;
        const char *const *v = what == SP_STAGE_USERS     ? old_units
                               : what == SP_STAGE_ENTRIES ? entries
                                                          : marker_ms;
        if (sp_stock_reconcile_stage(c, sku, "tok-1", (sp_stage_what)what, f, v,
                                     what == SP_STAGE_CLEAR ? 0 : 1, &owned, err, sizeof(err)) != 0)
            fail_msg("stage %s: %s", stages[what], err);
        if (owned != 0) fail_msg("the stale reconcile's %s was written", stages[what]);
    }
    assert_int_equal(sale_hget_int(c, sku, "users_rebuild", "7"), 2);
    assert_int_equal(sale_hget_int(c, sku, "users_rebuild", "8"), -1);
    assert_int_equal(sale_hget_int(c, sku, "users_rebuild", "650"), -1);
    assert_string_equal(sale_hget_str(c, sku, "returned", "o-ledger"), "(nil)");
    /* The second applies: the staged entry is gone from resv (stored meanwhile), and its mend
     * takes its 3 units; the first one's adjust of the same order is refused. */
    if (sp_stock_reconcile_apply(c, sku, "tok-2", 8, 10, 5, 600, &owned, &stock, &inflight,
                                 &vanished, &nvanished, err, sizeof(err)) != 0)
        fail_msg("apply: %s", err);
    assert_int_equal(owned, 1);
    assert_int_equal(stock, 8);
    assert_int_equal(nvanished, 1);
    assert_string_equal(vanished[0].order_id, "o-gone");
    free(vanished);
    if (sp_stock_reconcile_adjust(c, sku, "tok-1", 9, 3, &owned, &stock, err, sizeof(err)) != 0)
        fail_msg("adjust: %s", err);
    assert_int_equal(owned, 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 8);
    if (sp_stock_reconcile_adjust(c, sku, "tok-2", 9, 3, &owned, &stock, err, sizeof(err)) != 0)
        fail_msg("adjust: %s", err);
    assert_int_equal(owned, 1);
    assert_int_equal(stock, 5);
    assert_int_equal(sale_hget_int(c, sku, "users", "9"), 3);
    assert_int_equal(sale_hget_int(c, sku, "users", "7"), 2);
    assert_int_equal(sale_hget_int(c, sku, "users", "8"), -1);
    /* Once the sale is reopened no token owns it: a late adjust still changes nothing. */
    if (sp_stock_reconcile_open(c, sku, "tok-2", &owned, err, sizeof(err)) != 0)
        fail_msg("open: %s", err);
    assert_int_equal(owned, 1);
    if (sp_stock_reconcile_adjust(c, sku, "tok-2", 9, 3, &owned, &stock, err, sizeof(err)) != 0)
        fail_msg("adjust: %s", err);
    assert_int_equal(owned, 0);
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 5);
    sp_redis_close(c);
}

/* A sale without a per-user limit keeps no per-user counts (issue 17: nothing reads them, and
 * they cost a read and a write per reserve call): reserve, release, give_back, a reconcile's
 * apply and adjust all leave {sku:ID}:users absent, and the stock is right throughout. */
/* 1 when key exists, else 0. */
static int redis_exists(sp_redis *c, const char *key) {
    redisReply *r = sp_redis_command(c, NULL, itest_err, sizeof(itest_err), "EXISTS %s", key);
    assert_non_null(r);
    int n = (int)r->integer;
    freeReplyObject(r);
    return n;
}

static void test_no_limit_keeps_no_counts(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 40), stock, inflight;
    int opened, qty, owned, given;
    char users_key[SP_STOCK_KEY_MAX];
    sp_stock_key(users_key, sku, "users");
    assert_int_equal(sp_stock_open(c, sku, 10, 0, 600, &opened, err, sizeof(err)), 0);
    sp_reserve_batch b = {0};
    const int64_t buyers[] = {1, 2, 1};
    sp_reserve_request req[3];
    sp_script_call calls[3];
    for (int i = 0; i < 3; i++) {
        req[i] = (sp_reserve_request){.sku_id = sku, .user_id = buyers[i], .qty = 2};
        snprintf(req[i].order_id, sizeof(req[i].order_id), "n-%d", i + 1);
        sp_stock_reserve_call(&calls[i], &req[i]);
        assert_int_equal(sp_stock_reserve_batch_add(&b, &req[i], &calls[i]), 0);
    }
    sp_reserve_result res[3];
    if (sp_stock_reserve_batch(c, &b, res, err, sizeof(err)) != 0) fail_msg("reserve: %s", err);
    for (int i = 0; i < 3; i++) assert_int_equal(res[i].outcome, SP_RESERVE_OK);
    assert_int_equal(res[2].stock_left, 4);
    assert_int_equal(redis_exists(c, users_key), 0);
    /* A release gives the units back and creates no count. */
    sp_reserve_request rel = {.sku_id = sku, .user_id = 2, .qty = 2, .order_id = "n-2"};
    assert_int_equal(sp_stock_release(c, &rel, &qty, err, sizeof(err)), 0);
    assert_int_equal(qty, 2);
    assert_int_equal(redis_exists(c, users_key), 0);
    /* An expired order given back: the same. */
    assert_int_equal(
        sp_stock_give_back(c, sku, "n-1", 1, 2, "expired", 1700000000000, &given, err, sizeof(err)),
        0);
    assert_int_equal(given, 2);
    assert_int_equal(redis_exists(c, users_key), 0);
    assert_int_equal(sp_stock_available(c, sku, &stock, err, sizeof(err)), 0);
    assert_int_equal(stock, 8);
    /* A reconcile rebuilds the stock from PostgreSQL (8 left, n-3 in flight) and no counts. */
    if (sp_stock_reconcile_pause(c, sku, "tok-n", 0, 600, 10, err, sizeof(err)) != 0)
        fail_msg("pause: %s", err);
    sp_vanished *vanished = NULL;
    size_t nvanished = 0;
    if (sp_stock_reconcile_apply(c, sku, "tok-n", 8, 10, 0, 600, &owned, &stock, &inflight,
                                 &vanished, &nvanished, err, sizeof(err)) != 0)
        fail_msg("apply: %s", err);
    free(vanished);
    assert_int_equal(owned, 1);
    assert_int_equal(inflight, 2); /* n-3 only: n-1's and n-2's entries went with their units */
    assert_int_equal(redis_exists(c, users_key), 0);
    if (sp_stock_reconcile_adjust(c, sku, "tok-n", 3, 1, &owned, &stock, err, sizeof(err)) != 0)
        fail_msg("adjust: %s", err);
    assert_int_equal(owned, 1);
    assert_int_equal(redis_exists(c, users_key), 0);
    sp_redis_close(c);
}

/* A shard's field as an integer (-1: absent). */
static int64_t shard_field(sp_redis *c, int64_t sku, int shard, const char *suffix,
                           const char *field) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, shard, suffix);
    redisReply *r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HGET %s %s", key,
                                     field);
    assert_non_null(r);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

/* The units of a sharded sale, in stock or moving, summed over its shards. */
static int64_t shards_total(sp_redis *c, int64_t sku, int nshards) {
    int64_t total = 0;
    for (int k = 0; k < nshards; k++) {
        int64_t stock = shard_field(c, sku, k, "sale", "stock");
        int64_t moving = shard_field(c, sku, k, "sale", "moving");
        total += (stock > 0 ? stock : 0) + (moving > 0 ? moving : 0);
    }
    return total;
}

/* Issue 17 part 3, the transfer of units between two shards of a sharded sale: each of its four
 * steps retried, in every order a caller stopping and another completing can run them, moves the
 * units exactly once; stock + moving summed over the shards never changes; a paused sale, a
 * missing one and a sale rebuilt since the take (another generation) move nothing. */
static void test_shard_transfer_exactly_once(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 50), v = 0, ts = 0;
    enum { NSHARDS = 3 };
    const int64_t start[NSHARDS] = {5, 0, 3};
    char key[SP_STOCK_KEY_MAX];
    for (int k = 0; k < NSHARDS; k++) {
        const char *suffixes[] = {"sale", "xfer"};
        for (int j = 0; j < 2; j++) {
            sp_stock_shard_key(key, sku, k, suffixes[j]);
            freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key));
        }
        sp_stock_shard_key(key, sku, k, "sale");
        freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err),
                                         "HSET %s stock %lld gen g1", key, (long long)start[k]));
    }
    /* The shards' keys are on slots of their own (on a cluster: spread over the primaries). */
    char k0[SP_STOCK_KEY_MAX], k1[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(k0, sku, 0, "sale");
    sp_stock_shard_key(k1, sku, 1, "sale");
    assert_string_equal(strchr(k0, '}'), "}:sale"); /* "{sku:ID}:sale": today's key */
    assert_non_null(strstr(k1, "/1}:sale"));        /* its own hash tag: its own slot */
    assert_int_equal(shards_total(c, sku, NSHARDS), 8);

    /* 1. Take 4 from shard 2 (it holds 3) for shard 1; the retry answers the same. */
    sp_shard_transfer t = {.sku_id = sku, .from = 2, .to = 1, .id = "t-1", .gen = "g1"};
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_take(c, &t, 4, &v, &ts, err, sizeof(err)) != 0)
            fail_msg("take: %s", err);
        assert_int_equal(v, 3);
        assert_int_equal(shard_field(c, sku, 2, "sale", "stock"), 0);
        assert_int_equal(shard_field(c, sku, 2, "sale", "moving"), 3);
        assert_int_equal(shards_total(c, sku, NSHARDS), 8);
    }
    /* 2. Give, twice: the units arrive once. */
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_give(c, &t, 3, ts, 10000, &v, err, sizeof(err)) != 0)
            fail_msg("give: %s", err);
        assert_int_equal(v, i == 0 ? 3 : 0);
        assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);
    }
    /* Until the donor settles, the units count twice in stock + moving: the reaper's audit of a
     * sharded sale subtracts the open transfers' units (an "out:" whose "in:" is there). */
    assert_int_equal(shards_total(c, sku, NSHARDS), 11);
    /* A give that comes too late for its caller is refused, and changes nothing. */
    sp_shard_transfer late = {.sku_id = sku, .from = 2, .to = 1, .id = "t-late", .gen = "g1"};
    if (sp_stock_shard_give(c, &late, 3, ts - 60000, 10000, &v, err, sizeof(err)) != 0)
        fail_msg("give: %s", err);
    assert_int_equal(v, -4);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);
    /* The recipient's "in:" record is not dropped young. */
    if (sp_stock_shard_done(c, &t, t.to, 600000, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -1);
    /* 3. and 4. Settle the donor, then the recipient, each twice. */
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_done(c, &t, t.from, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
        assert_int_equal(v, i == 0 ? 3 : 0);
        assert_int_equal(shard_field(c, sku, 2, "sale", "moving"), -1);
    }
    assert_int_equal(shards_total(c, sku, NSHARDS), 8);
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_done(c, &t, t.to, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
        assert_int_equal(v, i == 0 ? 3 : 0);
    }
    sp_stock_shard_key(key, sku, 1, "xfer");
    assert_int_equal(redis_exists(c, key), 0);
    sp_stock_shard_key(key, sku, 2, "xfer");
    assert_int_equal(redis_exists(c, key), 0);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);

    /* A caller that stopped after its take: whoever completes it from the "out:" record gives
     * once, whether the first caller's give had run or not. */
    sp_shard_transfer u = {.sku_id = sku, .from = 0, .to = 2, .id = "t-2", .gen = "g1"};
    if (sp_stock_shard_take(c, &u, 2, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 2);
    for (int i = 0; i < 3; i++) { /* the completer, run three times */
        if (sp_stock_shard_give(c, &u, 2, ts, 10000, &v, err, sizeof(err)) != 0)
            fail_msg("%s", err);
        assert_int_equal(v, i == 0 ? 2 : 0);
    }
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_done(c, &u, u.from, 0, &v, err, sizeof(err)) != 0 ||
            sp_stock_shard_done(c, &u, u.to, 0, &v, err, sizeof(err)) != 0)
            fail_msg("%s", err);
    }
    assert_int_equal(shard_field(c, sku, 0, "sale", "stock"), 3);
    assert_int_equal(shard_field(c, sku, 2, "sale", "stock"), 2);
    assert_int_equal(shards_total(c, sku, NSHARDS), 8);

    /* A completer that read t-r's "out:" record before its caller gave and settled, and gives
     * late (with no age bound, as the completer does): the caller could not drop the "in:"
     * record young, so the late give finds it and adds nothing. */
    sp_shard_transfer r = {.sku_id = sku, .from = 0, .to = 1, .id = "t-r", .gen = "g1"};
    if (sp_stock_shard_take(c, &r, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 1);
    if (sp_stock_shard_give(c, &r, 1, ts, SP_SHARD_GIVE_WITHIN_MS, &v, err, sizeof(err)) != 0 ||
        v != 1)
        fail_msg("give: %s (%" PRId64 ")", err, v);
    if (sp_stock_shard_done(c, &r, r.from, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    if (sp_stock_shard_done(c, &r, r.to, SP_SHARD_IN_KEEP_MS, &v, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(v, -1);
    if (sp_stock_shard_give(c, &r, 1, ts, SP_SHARD_COMPLETE_WITHIN_MS, &v, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(v, 0);
    assert_int_equal(shard_field(c, sku, 0, "sale", "stock"), 2);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 4);
    assert_int_equal(shards_total(c, sku, NSHARDS), 8);
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s stock 3", key));
    sp_stock_shard_key(key, sku, 0, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s stock 3", key));

    /* A give with no age bound is refused outright: every give is bounded. */
    assert_int_equal(sp_stock_shard_give(c, &r, 1, ts, 0, &v, err, sizeof(err)), -1);
    /* A transfer taken and never given: aborted on its donor once old enough, the units back in
     * its stock. */
    sp_shard_transfer ab = {.sku_id = sku, .from = 0, .to = 2, .id = "t-ab", .gen = "g1"};
    if (sp_stock_shard_take(c, &ab, 2, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 2);
    if (sp_stock_shard_abort(c, &ab, SP_SHARD_ABORT_AFTER_MS, &v, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(v, -1); /* too young: it stays */
    assert_int_equal(shard_field(c, sku, 0, "sale", "moving"), 2);
    for (int i = 0; i < 2; i++) {
        if (sp_stock_shard_abort(c, &ab, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
        assert_int_equal(v, i == 0 ? 2 : 0);
    }
    assert_int_equal(shard_field(c, sku, 0, "sale", "stock"), 3);
    assert_int_equal(shard_field(c, sku, 0, "sale", "moving"), -1);
    assert_int_equal(shards_total(c, sku, NSHARDS), 8);

    /* A transfer taken before a rebuild (generation g1, then g2 with transfers of its own): its
     * settle and its abort leave the new generation's stock and moving alone. */
    sp_shard_transfer old_gen = {.sku_id = sku, .from = 0, .to = 1, .id = "t-old", .gen = "g1"};
    if (sp_stock_shard_take(c, &old_gen, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 1);
    sp_shard_transfer old_gen2 = old_gen;
    snprintf(old_gen2.id, sizeof(old_gen2.id), "t-old-2");
    if (sp_stock_shard_take(c, &old_gen2, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    sp_stock_shard_key(key, sku, 0, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err),
                                     "HSET %s gen g2 stock 7 moving 5", key));
    if (sp_stock_shard_done(c, &old_gen, 0, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    if (sp_stock_shard_abort(c, &old_gen2, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(shard_field(c, sku, 0, "sale", "moving"), 5);
    assert_int_equal(shard_field(c, sku, 0, "sale", "stock"), 7);
    freeReplyObject(
        sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s gen g1 stock 3", key));
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HDEL %s moving", key));

    /* Nothing here: 0, and nothing recorded. */
    sp_shard_transfer w = {.sku_id = sku, .from = 1, .to = 0, .id = "t-3", .gen = "g1"};
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s stock 0", key));
    if (sp_stock_shard_take(c, &w, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 0);
    sp_stock_shard_key(key, sku, 1, "xfer");
    redisReply *rec = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HEXISTS %s t-3", key);
    assert_non_null(rec);
    assert_int_equal(rec->integer, 0);
    freeReplyObject(rec);
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s stock 3", key));

    /* A sale rebuilt after the take (another generation): the give is refused, nothing moves;
     * a take of the old generation too. */
    sp_shard_transfer x = {.sku_id = sku, .from = 0, .to = 1, .id = "t-4", .gen = "g1"};
    if (sp_stock_shard_take(c, &x, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 1);
    sp_stock_shard_key(key, sku, 1, "sale");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s gen g2", key));
    if (sp_stock_shard_give(c, &x, 1, ts, 10000, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -3);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);
    sp_shard_transfer y = {.sku_id = sku, .from = 1, .to = 0, .id = "t-5", .gen = "g1"};
    if (sp_stock_shard_take(c, &y, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -3);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);

    /* Paused: -2 and nothing moves; no sale: -1, and a settle creates none. */
    freeReplyObject(
        sp_redis_command(c, key, itest_err, sizeof(itest_err), "HSET %s gen g1 paused tok", key));
    if (sp_stock_shard_give(c, &x, 1, ts, 10000, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -2);
    if (sp_stock_shard_take(c, &y, 1, &v, &ts, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -2);
    assert_int_equal(shard_field(c, sku, 1, "sale", "stock"), 3);
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key));
    if (sp_stock_shard_give(c, &x, 1, ts, 10000, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, -1);
    sp_shard_transfer z = {.sku_id = sku, .from = 1, .to = 0, .id = "t-6", .gen = "g1"};
    sp_stock_shard_key(key, sku, 1, "xfer");
    freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err),
                                     "HSET %s t-6 out:0:2:1700000000011", key));
    if (sp_stock_shard_done(c, &z, 1, 0, &v, err, sizeof(err)) != 0) fail_msg("%s", err);
    assert_int_equal(v, 2);
    sp_stock_shard_key(key, sku, 1, "sale");
    assert_int_equal(redis_exists(c, key), 0);
    sp_redis_close(c);
}

/* Deletes every key of the n shards of sku this file's sharded tests write. */
static void forget_shards(sp_redis *c, int64_t sku, int n) {
    const char *suffixes[] = {"sale", "users", "resv", "xfer", "opening"};
    char key[SP_STOCK_KEY_MAX];
    for (int k = 0; k < n; k++)
        for (size_t j = 0; j < sizeof(suffixes) / sizeof(suffixes[0]); j++) {
            sp_stock_shard_key(key, sku, k, suffixes[j]);
            freeReplyObject(sp_redis_command(c, key, itest_err, sizeof(itest_err), "DEL %s", key));
        }
}

/* The "out:" records of shard k of sku: transfers taken there and not settled. */
static int open_transfers(sp_redis *c, int64_t sku, int k) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku, k, "xfer");
    redisReply *r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HVALS %s", key);
    assert_non_null(r);
    int n = 0;
    for (size_t i = 0; i < r->elements; i++)
        if (strncmp(r->element[i]->str, "out:", 4) == 0) n++;
    freeReplyObject(r);
    return n;
}

/* ---- the sharded order path as a blocking oracle ----
 * What the producer does for an order on a sharded sale (producer/order_api.c "sharded sales",
 * producer/shard_refill.c), on a blocking connection, for the tests below to hammer: reserve.lua on
 * the buyer's home shard; when that shard is short, units are moved to it from the other shards
 * (a transfer each, asking for what is still missing) and the order decided again; SOLD_OUT only
 * when no shard had a unit to give and two reads of every shard found fewer than qty units, with
 * the same `ver` and generation everywhere and no shard paused; after three rounds RECOVERING,
 * never a false SOLD_OUT. (It lived in common/stock.c, where no worker used it.) */

/* One read of every shard of the sale: the units in stock or moving, summed, into *units, and
 * each shard's `ver` (with its generation) into ver[]; *paused when a shard is paused by a
 * reconcile. -1 on a Redis error. */
static int shards_collect(sp_redis *c, const sp_sharded_sale *sale, int64_t *units, int64_t *ver,
                          int *paused, char *errbuf, size_t errlen) {
    *units = 0;
    for (int k = 0; k < sale->nshards; k++) {
        char key[SP_STOCK_KEY_MAX];
        int64_t here;
        sp_stock_shard_key(key, sale->sku_id, k, "sale");
        redisReply *r = sp_redis_command(c, key, errbuf, errlen, SP_STOCK_SHARD_READ_FMT, key);
        if (r == NULL) return -1;
        int rc = sp_stock_shard_read_parse(r, &here, &ver[k], errbuf, errlen);
        freeReplyObject(r);
        if (rc < 0) return -1;
        if (rc == 1) *paused = 1;
        *units += here;
    }
    return 0;
}

/* 1 when the sale as a whole holds fewer than qty units: two reads of every shard in which no
 * shard's stock + moving rose (the same `ver` everywhere; reserves only lower it) and both below
 * qty. A unit moving between shards while one read passes them is seen by the other, or changes a
 * `ver`. 0 when units may remain (the caller decides again); -1 on a Redis error. */
static int sold_out_everywhere(sp_redis *c, const sp_sharded_sale *sale, int32_t qty, char *errbuf,
                               size_t errlen) {
    int64_t before[SP_SHARDS_MAX], after[SP_SHARDS_MAX], units_before, units_after;
    int paused = 0;
    if (sale->nshards < 1 || sale->nshards > SP_SHARDS_MAX) {
        snprintf(errbuf, errlen, "%d shards: out of range", sale->nshards);
        return -1;
    }
    if (shards_collect(c, sale, &units_before, before, &paused, errbuf, errlen) != 0 ||
        shards_collect(c, sale, &units_after, after, &paused, errbuf, errlen) != 0)
        return -1;
    if (paused || units_before >= qty || units_after >= qty) return 0; /* a rebuild: not known */
    return memcmp(before, after, sizeof(before[0]) * (size_t)sale->nshards) == 0;
}

/* Moves up to `missing` units to shard `home` from the others; *moved: how many came. *stop is
 * set when a shard answered paused, gone or rebuilt (the order is answered RECOVERING). */
static int refill(sp_redis *c, sp_sharded_sale *sale, int home, int64_t missing, int64_t *moved,
                  int *stop, char *errbuf, size_t errlen) {
    *moved = 0;
    *stop = 0;
    for (int i = 1; i < sale->nshards && *moved < missing; i++) {
        sp_shard_transfer t = {.sku_id = sale->sku_id,
                               .from = (home + i) % sale->nshards,
                               .to = home};
        snprintf(t.id, sizeof(t.id), "%.40s:%" PRIu64, sale->xfer_prefix, ++sale->xfer_seq);
        snprintf(t.gen, sizeof(t.gen), "%s", sale->gen);
        int64_t taken, take_ts, given, settled;
        if (sp_stock_shard_take(c, &t, missing - *moved, &taken, &take_ts, errbuf, errlen) != 0)
            return -1;
        if (taken < 0) {
            *stop = 1;
            return 0;
        }
        if (taken == 0) continue;
        /* A failure from here on leaves the "out:" record for the completer (the reaper). The
         * recipient's "in:" record stays: the completer drops it once it is old enough. */
        if (sp_stock_shard_give(c, &t, taken, take_ts, SP_SHARD_GIVE_WITHIN_MS, &given, errbuf,
                                errlen) != 0)
            return -1;
        if (given < 0) {
            *stop = 1;
            return 0;
        }
        if (given == 0) { /* a fresh take's id given before: ids reused; left to the completer */
            snprintf(errbuf, errlen, "transfer %s was given before its take: ids not unique", t.id);
            return -1;
        }
        if (sp_stock_shard_done(c, &t, t.from, 0, &settled, errbuf, errlen) != 0) return -1;
        *moved += taken;
    }
    return 0;
}

static int reserve_sharded(sp_redis *c, sp_sharded_sale *sale, const sp_reserve_request *req,
                           sp_reserve_result *res, char *errbuf, size_t errlen) {
    enum { ROUNDS = 3 };
    sp_reserve_request one = *req;
    one.shard = sp_stock_home_shard(req->user_id, sale->nshards);
    for (int round = 0; round < ROUNDS; round++) {
        if (sp_stock_reserve(c, &one, res, errbuf, errlen) != 0) return -1;
        if (res->outcome != SP_RESERVE_SOLD_OUT || sale->nshards == 1) return 0;
        int64_t moved = 0;
        int stop = 0;
        if (refill(c, sale, one.shard, one.qty - res->stock_left, &moved, &stop, errbuf, errlen) !=
            0)
            return -1;
        if (stop) break;
        if (moved > 0) continue; /* decide it again on the home shard */
        int out = sold_out_everywhere(c, sale, one.qty, errbuf, errlen);
        if (out < 0) return -1;
        if (out == 1) return 0; /* fewer than qty units anywhere: sold out, truly */
    }
    memset(res, 0, sizeof(*res));
    res->outcome = SP_RESERVE_RECOVERING;
    return 0;
}

/* One order of qty for user on a sharded sale; its outcome. */
static sp_reserve_outcome order_sharded(sp_redis *c, sp_sharded_sale *sale, int64_t user, int qty,
                                        int n) {
    sp_reserve_request req = {.sku_id = sale->sku_id, .user_id = user, .qty = qty, .ts_ms = 1};
    sp_reserve_result res;
    snprintf(req.order_id, sizeof(req.order_id), "sh-%" PRId64 "-%d", user, n);
    if (reserve_sharded(c, sale, &req, &res, err, sizeof(err)) != 0)
        fail_msg("reserve sharded: %s", err);
    return res.outcome;
}

/* reserve.lua on a shard of a sharded sale: an order of a buyer whose home is another shard is
 * answered "moved" with the sale's shards and generation (a producer that did not know the sale
 * was sharded learns it from its first order) and changes nothing; a shard's sold_out is not
 * final, so it is not pinned under the Idempotency-Key (a retry once units came is accepted);
 * the per-user limit, exact on the home shard, is pinned as on any sale. An unsharded sale's reply
 * says 0 shards. */
static void test_sharded_reserve_answers(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    sp_sharded_sale sale = {.sku_id = fresh_sku(c, 53), .nshards = 3, .gen = "g-answers"};
    int opened = 0;
    forget_shards(c, sale.sku_id, 3);
    assert_int_equal(sp_stock_open_sharded(c, &sale, 3, 1, 600, &opened, err, sizeof(err)), 0);
    sp_reserve_request req = {.sku_id = sale.sku_id, .user_id = 1, .qty = 1, .ts_ms = 1};
    sp_reserve_result res;
    snprintf(req.order_id, sizeof(req.order_id), "ans-1");
    assert_int_equal(sp_stock_reserve(c, &req, &res, err, sizeof(err)), 0); /* on shard 0 */
    assert_int_equal(res.outcome, SP_RESERVE_MOVED);
    assert_int_equal(res.nshards, 3);
    assert_string_equal(res.gen, "g-answers");
    assert_int_equal(shard_field(c, sale.sku_id, 0, "sale", "stock"), 1);
    req.shard = sp_stock_home_shard(1, 3);
    assert_int_equal(sp_stock_reserve(c, &req, &res, err, sizeof(err)), 0);
    assert_int_equal(res.outcome, SP_RESERVE_OK);
    assert_int_equal(res.nshards, 3); /* the reply's head says so for every answer */
    assert_int_equal(shard_field(c, sale.sku_id, 1, "sale", "stock"), 0);
    /* Shard 1 is empty: user 4's order with a key is refused there, not pinned. */
    sp_reserve_request other = {.sku_id = sale.sku_id, .user_id = 4, .qty = 1, .ts_ms = 1};
    other.shard = sp_stock_home_shard(4, 3);
    snprintf(other.order_id, sizeof(other.order_id), "ans-4a");
    snprintf(other.idem_key, sizeof(other.idem_key), "k-4");
    assert_int_equal(sp_stock_reserve(c, &other, &res, err, sizeof(err)), 0);
    assert_int_equal(res.outcome, SP_RESERVE_SOLD_OUT);
    assert_int_equal(res.nshards, 3);
    assert_int_equal(res.stock_left, 0);
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sale.sku_id, 1, "sale");
    freeReplyObject(sp_redis_command(c, key, err, sizeof(err), "HSET %s stock 1", key));
    snprintf(other.order_id, sizeof(other.order_id), "ans-4b");
    assert_int_equal(sp_stock_reserve(c, &other, &res, err, sizeof(err)), 0);
    assert_int_equal(res.outcome, SP_RESERVE_OK);
    /* The limit (1 per buyer) on user 1's home shard: refused, and pinned under its key. */
    snprintf(req.order_id, sizeof(req.order_id), "ans-1b");
    snprintf(req.idem_key, sizeof(req.idem_key), "k-1");
    assert_int_equal(sp_stock_reserve(c, &req, &res, err, sizeof(err)), 0);
    assert_int_equal(res.outcome, SP_RESERVE_LIMIT);
    assert_int_equal(sp_stock_reserve(c, &req, &res, err, sizeof(err)), 0);
    assert_int_equal(res.outcome, SP_RESERVE_DUP);
    assert_string_equal(res.dup_state, "limit_exceeded");
    forget_shards(c, sale.sku_id, 3);
    int64_t plain = fresh_sku(c, 54);
    assert_int_equal(sp_stock_open(c, plain, 5, 0, 600, &opened, err, sizeof(err)), 0);
    assert_int_equal(reserve(c, plain, 1, 1, "ans-plain", NULL).nshards, 0);
    sp_redis_close(c);
}

/* Issue 17 part 3, no false sold-out: a sale of 8 units over 3 shards (3/3/2). The buyers of
 * shard 1 empty it; the next buyer of shard 1 is still served (units move to it from the others),
 * and so is every order until the sale as a whole is out: exactly 8 accepted, the first sold_out
 * only then. Units spread one per shard still serve an order of 2. A naive split (each shard on
 * its own) refuses the fourth buyer of shard 1 while 5 units remain. */
static void test_sharded_no_false_sold_out(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    sp_sharded_sale sale = {.sku_id = fresh_sku(c, 51),
                            .nshards = 3,
                            .gen = "g-drain",
                            .xfer_prefix = "test-drain"};
    int opened = 0, accepted = 0;
    forget_shards(c, sale.sku_id, 3);
    assert_int_equal(sp_stock_open_sharded(c, &sale, 8, 0, 600, &opened, err, sizeof(err)), 0);
    assert_int_equal(opened, 3);
    assert_int_equal(shard_field(c, sale.sku_id, 0, "sale", "stock"), 3);
    assert_int_equal(shard_field(c, sale.sku_id, 1, "sale", "stock"), 3);
    assert_int_equal(shard_field(c, sale.sku_id, 2, "sale", "stock"), 2);
    assert_int_equal(sp_stock_home_shard(4, 3), 1);
    /* Shard 1's own three units, to its buyers 1, 4, 7. */
    for (int64_t u = 1; u <= 7; u += 3) {
        assert_int_equal(order_sharded(c, &sale, u, 1, 0), SP_RESERVE_OK);
        accepted++;
    }
    assert_int_equal(shard_field(c, sale.sku_id, 1, "sale", "stock"), 0);
    /* Shard 1 is empty, the others are not: its next buyers are served all the same. */
    for (int64_t u = 10; accepted < 8; u += 3) {
        if (order_sharded(c, &sale, u, 1, 0) != SP_RESERVE_OK)
            fail_msg("buyer %" PRId64 " (home shard 1) refused with %d units left", u,
                     (int)shards_total(c, sale.sku_id, 3));
        accepted++;
    }
    assert_int_equal(shards_total(c, sale.sku_id, 3), 0);
    for (int64_t u = 100; u < 103; u++) /* every home shard: sold out, truly */
        assert_int_equal(order_sharded(c, &sale, u, 1, 0), SP_RESERVE_SOLD_OUT);
    for (int k = 0; k < 3; k++) { /* every transfer settled on its donor */
        assert_int_equal(open_transfers(c, sale.sku_id, k), 0);
        assert_int_equal(shard_field(c, sale.sku_id, k, "sale", "moving"), -1);
    }
    forget_shards(c, sale.sku_id, 3);

    /* One unit per shard: an order of 2 gathers them; then 1 is left: 2 is sold out, 1 is not. */
    sp_sharded_sale thin = {.sku_id = sale.sku_id,
                            .nshards = 3,
                            .gen = "g-thin",
                            .xfer_prefix = "test-thin"};
    assert_int_equal(sp_stock_open_sharded(c, &thin, 3, 0, 600, &opened, err, sizeof(err)), 0);
    assert_int_equal(order_sharded(c, &thin, 3, 2, 0), SP_RESERVE_OK);
    assert_int_equal(order_sharded(c, &thin, 6, 2, 0), SP_RESERVE_SOLD_OUT);
    assert_int_equal(order_sharded(c, &thin, 9, 1, 0), SP_RESERVE_OK);
    assert_int_equal(order_sharded(c, &thin, 12, 1, 0), SP_RESERVE_SOLD_OUT);
    assert_int_equal(shards_total(c, sale.sku_id, 3), 0);
    forget_shards(c, sale.sku_id, 3);
    sp_redis_close(c);
}

enum { HAMMERS = 4, HAMMER_STOCK = 90, HAMMER_LIMIT = 2, HAMMER_USERS = 400 };
typedef struct hammer {
    int id;
    sp_sharded_sale sale;
    int accepted, recovering, limited, failed;
    int per_user[HAMMER_USERS]; /* units accepted per user of this hammer */
    int64_t last_ok_start_us;   /* when its last accepted order was sent */
    int64_t sold_out_end_us;    /* when its sold_out came back */
} hammer;

/* Orders until its first sold_out: each of its users three times (the third is over the limit). */
static void *hammer_run(void *arg) {
    hammer *h = arg;
    char e[256];
    sp_redis *c = sp_redis_open(&target, 2000, e, sizeof(e));
    if (c == NULL) {
        h->failed = 1;
        return NULL;
    }
    for (int i = 0; i < 3 * HAMMER_USERS; i++) {
        int u = i / 3;
        /* Three buyers in four have home shard 0, the others 1 or 2: shard 0 runs dry first. */
        int64_t home = u % 4 == 0 ? 1 + (u / 4) % 2 : 0;
        sp_reserve_request req = {.sku_id = h->sale.sku_id,
                                  .user_id = 3 * ((int64_t)h->id * 100000 + u + 1) + home,
                                  .qty = 1,
                                  .ts_ms = 1};
        sp_reserve_result res;
        snprintf(req.order_id, sizeof(req.order_id), "hm-%d-%d", h->id, i);
        int64_t start_us = sp_clock_mono_us();
        if (reserve_sharded(c, &h->sale, &req, &res, e, sizeof(e)) != 0) {
            h->failed = 1;
            break;
        }
        if (res.outcome == SP_RESERVE_OK) {
            h->accepted++;
            h->per_user[u]++;
            h->last_ok_start_us = start_us;
        } else if (res.outcome == SP_RESERVE_LIMIT) {
            h->limited++;
        } else if (res.outcome == SP_RESERVE_RECOVERING) {
            h->recovering++;
            i--; /* "try again": the same order */
        } else {
            h->sold_out_end_us = sp_clock_mono_us();
            break; /* sold out: this buyer stream stops */
        }
    }
    sp_redis_close(c);
    return NULL;
}

/* Issue 17 part 3, hammered: four buyer streams on one sale of 90 units over 3 shards (per-user
 * limit 2), most buyers' home on shard 0, each stream stopping at its first sold_out. Never more
 * than 90 sold; no false sold-out (a stream told sold_out while units remained would leave them
 * unsold: all 90 are sold); the per-user limit exact; no unit left moving. */
static void test_sharded_hammer(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    static hammer h[HAMMERS];
    int64_t sku = fresh_sku(c, 52);
    int opened = 0, accepted = 0, recovering = 0, limited = 0;
    forget_shards(c, sku, 3);
    sp_sharded_sale sale = {.sku_id = sku, .nshards = 3, .gen = "g-hammer"};
    assert_int_equal(
        sp_stock_open_sharded(c, &sale, HAMMER_STOCK, HAMMER_LIMIT, 600, &opened, err, sizeof(err)),
        0);
    pthread_t t[HAMMERS];
    static char prefixes[HAMMERS][24];
    for (int i = 0; i < HAMMERS; i++) {
        memset(&h[i], 0, sizeof(h[i]));
        snprintf(prefixes[i], sizeof(prefixes[i]), "hammer-%d", i);
        h[i].id = i + 1;
        h[i].sale = sale;
        h[i].sale.xfer_prefix = prefixes[i];
        assert_int_equal(pthread_create(&t[i], NULL, hammer_run, &h[i]), 0);
    }
    for (int i = 0; i < HAMMERS; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(h[i].failed, 0);
        accepted += h[i].accepted;
        recovering += h[i].recovering;
        limited += h[i].limited;
        for (int u = 0; u < HAMMER_USERS; u++) assert_in_range(h[i].per_user[u], 0, HAMMER_LIMIT);
    }
    print_message("    %d accepted, %d over the limit, %d told to try again\n", accepted, limited,
                  recovering);
    /* Nothing is given back in this sale, so once one buyer heard sold_out truly, no order sent
     * after that can be accepted: one that was means that sold_out was false. */
    for (int i = 0; i < HAMMERS; i++)
        for (int j = 0; j < HAMMERS; j++)
            if (h[i].sold_out_end_us > 0 && h[j].last_ok_start_us > h[i].sold_out_end_us)
                fail_msg("stream %d heard sold_out, then stream %d's order sent %" PRId64
                         " us later was accepted: a false sold_out",
                         i + 1, j + 1, h[j].last_ok_start_us - h[i].sold_out_end_us);
    assert_int_equal(accepted, HAMMER_STOCK);
    assert_int_equal(shards_total(c, sku, 3), 0);
    for (int k = 0; k < 3; k++) {
        assert_int_equal(open_transfers(c, sku, k), 0);
        assert_int_equal(shard_field(c, sku, k, "sale", "moving"), -1);
    }
    forget_shards(c, sku, 3);
    sp_redis_close(c);
}

static void test_idem_key_validation(void **state) {
    (void)state;
    char big[SP_IDEM_KEY_MAX + 2];
    memset(big, 'k', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_true(sp_idem_key_valid("abc-123_X:y"));
    assert_false(sp_idem_key_valid(""));
    assert_false(sp_idem_key_valid("has space"));
    assert_false(sp_idem_key_valid("tab\t"));
    assert_false(sp_idem_key_valid("\xc3\xa9"));
    assert_false(sp_idem_key_valid(big));
    big[SP_IDEM_KEY_MAX] = '\0';
    assert_true(sp_idem_key_valid(big));
}

/* How long a key pins its answer: an order for IDEM_TTL_S, a refusal for IDEM_REFUSAL_TTL_S, and
 * with 0 a refusal not at all (a retry after a restock is decided afresh). */
static int64_t idem_ttl(sp_redis *c, int64_t sku, int64_t user, const char *key) {
    redisReply *r = sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "TTL {sku:%lld}:idem:%lld:%s", (long long)sku, (long long)user,
                                     key);
    assert_non_null(r);
    int64_t ttl = r->integer;
    freeReplyObject(r);
    return ttl;
}

static void test_idem_ttls(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 50), stock;
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 1, 0, 600, &opened, err, sizeof(err)), 0);
    sp_stock_idem_ttls(86400, 5);
    assert_int_equal(reserve(c, sku, 50, 2, "t-1", "key-T").outcome, SP_RESERVE_SOLD_OUT);
    assert_in_range(idem_ttl(c, sku, 50, "key-T"), 1, 5);
    assert_int_equal(reserve(c, sku, 51, 1, "t-2", "key-U").outcome, SP_RESERVE_OK);
    assert_in_range(idem_ttl(c, sku, 51, "key-U"), 86000, 86400);
    sp_stock_idem_ttls(86400, 0);
    assert_int_equal(reserve(c, sku, 52, 2, "t-3", "key-V").outcome, SP_RESERVE_SOLD_OUT);
    assert_int_equal(idem_ttl(c, sku, 52, "key-V"), -2); /* no key */
    sp_restock_status st;
    assert_int_equal(sp_stock_restock(c, sku, 5, "ttl-1", &st, &stock, err, sizeof(err)), 0);
    sp_reserve_result r = reserve(c, sku, 52, 2, "t-4", "key-V");
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    assert_string_equal(r.order_id, "t-4");
    sp_stock_idem_ttls(SP_IDEM_TTL_S, SP_IDEM_REFUSAL_TTL_S);
    sp_redis_close(c);
}

/* The consumer's forget after a commit, for a whole batch whose confirms have not come yet: every
 * entry goes, and every key still pending on its order answers accepted (more entries than one
 * script call's bound on the old path: the demo left 500 entries behind). */
static void test_forget_settles_a_batch_of_keys(void **state) {
    (void)state;
    enum { N = 300 };
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 60);
    int opened;
    static char ids[N][16], keys[N][16];
    const char *id_ptrs[N];
    assert_int_equal(sp_stock_open(c, sku, N, 0, 600, &opened, err, sizeof(err)), 0);
    for (int i = 0; i < N; i++) {
        snprintf(ids[i], sizeof(ids[i]), "f-%d", i);
        snprintf(keys[i], sizeof(keys[i]), "k-%d", i);
        id_ptrs[i] = ids[i];
        assert_int_equal(reserve(c, sku, 1000 + i, 1, ids[i], i % 2 ? keys[i] : NULL).outcome,
                         SP_RESERVE_OK);
    }
    if (sp_stock_accepted_forget(c, sku, id_ptrs, N, err, sizeof(err)) != 0) fail_msg("%s", err);
    redisReply *r = sp_redis_command(c, NULL, itest_err, sizeof(itest_err), "HLEN {sku:%lld}:resv",
                                     (long long)sku);
    assert_non_null(r);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    for (int i = 1; i < N; i += 2) {
        sp_reserve_result again = reserve(c, sku, 1000 + i, 1, "f-again", keys[i]);
        assert_int_equal(again.outcome, SP_RESERVE_DUP);
        assert_string_equal(again.dup_state, "accepted");
        assert_string_equal(again.order_id, ids[i]);
    }
    sp_redis_close(c);
}

/* A sale a reconcile has paused (issue 20): reserve.lua answers "recovering" and changes nothing
 * (no stock, no user's count, no reservation, the Idempotency-Key not pinned), while a key that
 * names an order already still answers that order. Once the pause is lifted, the same key is
 * decided afresh. Before, a paused sale (stock 0) answered sold_out. */
static void test_reserve_recovering_while_paused(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t sku = fresh_sku(c, 70);
    int opened;
    assert_int_equal(sp_stock_open(c, sku, 5, 0, 600, &opened, err, sizeof(err)), 0);
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "DEL {sku:%lld}:idem:1:A {sku:%lld}:idem:2:B", (long long)sku,
                                     (long long)sku));
    assert_int_equal(reserve(c, sku, 1, 1, "p-1", "A").outcome, SP_RESERVE_OK);
    assert_int_equal(confirm(c, sku, 1, "p-1", "A"), 1);
    if (sp_stock_reconcile_pause(c, sku, "tok-r", 0, 600, 5, err, sizeof(err)) != 0)
        fail_msg("pause: %s", err);
    sp_reserve_result r = reserve(c, sku, 2, 1, "p-2", "B");
    assert_int_equal(r.outcome, SP_RESERVE_RECOVERING);
    assert_int_equal(reserve(c, sku, 3, 1, "p-3", NULL).outcome, SP_RESERVE_RECOVERING);
    r = reserve(c, sku, 1, 1, "p-4", "A");
    assert_int_equal(r.outcome, SP_RESERVE_DUP);
    assert_string_equal(r.dup_state, "accepted");
    assert_string_equal(r.order_id, "p-1");
    assert_int_equal(sale_hget_int(c, sku, "sale", "stock"), 0);
    assert_int_equal(sale_hget_int(c, sku, "users", "2"), -1);
    assert_int_equal(sale_hget_int(c, sku, "users", "3"), -1);
    assert_string_equal(sale_hget_str(c, sku, "resv", "p-2"), "(nil)");
    assert_string_equal(sale_hget_str(c, sku, "resv", "p-3"), "(nil)");
    redisReply *k = sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "EXISTS {sku:%lld}:idem:2:B", (long long)sku);
    assert_non_null(k);
    assert_int_equal(k->integer, 0);
    freeReplyObject(k);
    /* the rebuild reopens the sale: the key's retry is decided afresh */
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HSET {sku:%lld}:sale stock 4", (long long)sku));
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "HDEL {sku:%lld}:sale paused", (long long)sku));
    r = reserve(c, sku, 2, 1, "p-5", "B");
    assert_int_equal(r.outcome, SP_RESERVE_OK);
    assert_int_equal(r.stock_left, 3);
    sp_redis_close(c);
}

/* A page of sales paused in one pipelined round trip, also after the server lost its script
 * cache (SCRIPT FLUSH, as a restart does): each sale ends closed, paused by the token, with its
 * fields from PostgreSQL's row, a missing one created whole. */
static void test_pause_many(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int opened = 0;
    sp_pause_sale sales[3];
    for (int i = 0; i < 3; i++) {
        int64_t sku = fresh_sku(c, 40 + i);
        sales[i] = (sp_pause_sale){.sku_id = sku,
                                   .supplied = 10 + i,
                                   .per_user_limit = i,
                                   .pay_timeout_s = 60};
    }
    assert_int_equal(sp_stock_open(c, sales[0].sku_id, 10, 0, 60, &opened, err, sizeof(err)), 0);
    freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err), "SCRIPT FLUSH"));
    if (sp_stock_reconcile_pause_many(c, sales, 3, "tok-all", err, sizeof(err)) != 0)
        fail_msg("pause_many: %s", err);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sale_hget_int(c, sales[i].sku_id, "sale", "stock"), 0);
        assert_int_equal(sale_hget_int(c, sales[i].sku_id, "sale", "supplied"), 10 + i);
        assert_string_equal(sale_hget_str(c, sales[i].sku_id, "sale", "paused"), "tok-all");
    }
    assert_int_equal(sp_stock_reconcile_pause_many(c, sales, 0, "tok-all", err, sizeof(err)), 0);
    /* Sharded sales: every shard paused, with the sale's shards and one bounded generation (the
     * token's fingerprint), supplied on shard 0 only; 30 sales of 3 shards are 90 pauses, more
     * than one pipelined round (seen failing: "EVALSHA" written as a shard's shards). */
    enum { NSHARDED = 30 };
    sp_pause_sale sharded[NSHARDED];
    for (int i = 0; i < NSHARDED; i++)
        sharded[i] = (sp_pause_sale){.sku_id = fresh_sku(c, 300 + i),
                                     .supplied = 7,
                                     .per_user_limit = 1,
                                     .pay_timeout_s = 60,
                                     .shards = 3};
    if (sp_stock_reconcile_pause_many(c, sharded, NSHARDED, "tok-sharded", err, sizeof(err)) != 0)
        fail_msg("pause_many, sharded: %s", err);
    char gen0[64] = "";
    for (int i = 0; i < NSHARDED; i++)
        for (int k = 0; k < 3; k++) {
            char key[SP_STOCK_KEY_MAX];
            sp_stock_shard_key(key, sharded[i].sku_id, k, "sale");
            redisReply *r = sp_redis_command(c, key, err, sizeof(err),
                                             "HMGET %s shards paused supplied gen", key);
            assert_non_null(r);
            if (r->type != REDIS_REPLY_ARRAY || r->elements != 4 ||
                r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "3") != 0 ||
                r->element[1]->type != REDIS_REPLY_STRING ||
                strcmp(r->element[1]->str, "tok-sharded") != 0 ||
                r->element[2]->type != REDIS_REPLY_STRING ||
                strcmp(r->element[2]->str, k == 0 ? "7" : "0") != 0 ||
                r->element[3]->type != REDIS_REPLY_STRING || strlen(r->element[3]->str) != 16 ||
                (gen0[0] && strcmp(r->element[3]->str, gen0) != 0))
                fail_msg("sale %d shard %d after the pause: shards %s, paused %s, supplied %s, "
                         "gen %s",
                         i, k, r->elements > 0 && r->element[0]->str ? r->element[0]->str : "-",
                         r->elements > 1 && r->element[1]->str ? r->element[1]->str : "-",
                         r->elements > 2 && r->element[2]->str ? r->element[2]->str : "-",
                         r->elements > 3 && r->element[3]->str ? r->element[3]->str : "-");
            snprintf(gen0, sizeof(gen0), "%s", r->element[3]->str);
            freeReplyObject(r);
            freeReplyObject(sp_redis_command(c, key, err, sizeof(err), "DEL %s", key));
        }
    sp_redis_close(c);
}

/* ---- issue 17: a batch decides and writes exactly as its orders one at a time ---- */

/* text with every "{sku:<sku>}" written "{sku:S}", so two SKUs' values compare; in out. */
static const char *sku_neutral(const char *text, int64_t sku, char *out, size_t cap) {
    char tag[40];
    int ntag = snprintf(tag, sizeof(tag), "{sku:%lld}", (long long)sku);
    size_t o = 0;
    for (const char *p = text; *p && o + 8 < cap;) {
        if (strncmp(p, tag, (size_t)ntag) == 0) {
            o += (size_t)snprintf(out + o, cap - o, "{sku:S}");
            p += ntag;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
    return out;
}

/* An Idempotency-Key's value ("(nil)" when absent) and what pins it: 2 an order's TTL, 1 a
 * refusal's, 0 none. */
static int idem_state(sp_redis *c, int64_t sku, int64_t user, const char *key, char *val,
                      size_t cap) {
    redisReply *r = sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                     "GET {sku:%lld}:idem:%lld:%s", (long long)sku, (long long)user,
                                     key);
    assert_non_null(r);
    snprintf(val, cap, "%s", r->type == REDIS_REPLY_STRING ? r->str : "(nil)");
    freeReplyObject(r);
    int64_t ttl = idem_ttl(c, sku, user, key);
    return ttl > SP_IDEM_REFUSAL_TTL_S ? 2 : ttl > 0 ? 1 : 0;
}

enum { MIX_N = 150, MIX_USERS = 6, MIX_KEYS = 4 };

/* The mixed orders both runs send: users 1..6 with a limit of 4, qty 1..3, most with one of a
 * few Idempotency-Keys per user (so keys repeat, in one batch and across batches). */
static void mix_orders(sp_reserve_request *req, int64_t sku) {
    uint32_t x = 17;
    for (int i = 0; i < MIX_N; i++) {
        x = x * 1103515245u + 12345u;
        uint32_t r = x >> 8;
        req[i] = (sp_reserve_request){.sku_id = sku,
                                      .user_id = 1 + (int64_t)(r % MIX_USERS),
                                      .qty = 1 + (int32_t)((r / 8) % 3),
                                      .ts_ms = 1700000000000 + i};
        snprintf(req[i].order_id, sizeof(req[i].order_id), "mix-%d", i);
        if ((r / 32) % 5 >= 2)
            snprintf(req[i].idem_key, sizeof(req[i].idem_key), "K%u", (r / 256) % MIX_KEYS);
    }
}

/* Between the batches both SKUs see the same: a restock and some confirms. */
static void mix_between(sp_redis *c, int64_t sku, int step, const sp_reserve_request *req,
                        const sp_reserve_result *res, int upto) {
    if (step == 1) {
        sp_restock_status st;
        int64_t stock;
        char id[32];
        snprintf(id, sizeof(id), "mix-rs-%lld", (long long)sku);
        assert_int_equal(sp_stock_restock(c, sku, 12, id, &st, &stock, err, sizeof(err)), 0);
    }
    for (int i = 0; i < upto; i += 3) /* every third admitted order is acknowledged */
        if (res[i].outcome == SP_RESERVE_OK)
            (void)confirm(c, sku, req[i].user_id, req[i].order_id,
                          req[i].idem_key[0] ? req[i].idem_key : NULL);
}

/* 150 orders of six users in batches of 7, 64, 1, 40 and 38, with per-user limits, repeated keys
 * (within a batch and across batches), a sale running out, a restock and confirms between the
 * batches: every answer, the stock, the users' counts, every reservation entry and every key are
 * what the same orders sent one at a time to a fresh sale give. */
static void test_reserve_batch_as_one_by_one(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t one = fresh_sku(c, 80), batched = fresh_sku(c, 81);
    int64_t skus[2] = {one, batched};
    int opened;
    for (int s = 0; s < 2; s++) {
        if (sp_stock_open(c, skus[s], 20, 4, 600, &opened, err, sizeof(err)) != 0)
            fail_msg("open: %s", err);
        for (int u = 1; u <= MIX_USERS; u++)
            for (int k = 0; k < MIX_KEYS; k++)
                freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                                 "DEL {sku:%lld}:idem:%d:K%d", (long long)skus[s],
                                                 u, k));
    }
    static sp_reserve_request req1[MIX_N], reqb[MIX_N];
    static sp_reserve_result res1[MIX_N], resb[MIX_N];
    static sp_script_call calls[MIX_N];
    mix_orders(req1, one);
    mix_orders(reqb, batched);
    const int sizes[] = {7, 64, 1, 40, 38};
    int at = 0;
    for (int step = 0; step < 5; step++) {
        for (int i = at; i < at + sizes[step]; i++)
            if (sp_stock_reserve(c, &req1[i], &res1[i], err, sizeof(err)) != 0)
                fail_msg("reserve: %s", err);
        sp_reserve_batch b = {0};
        for (int i = at; i < at + sizes[step]; i++) {
            sp_stock_reserve_call(&calls[i], &reqb[i]);
            assert_int_equal(sp_stock_reserve_batch_add(&b, &reqb[i], &calls[i]), 0);
        }
        if (sp_stock_reserve_batch(c, &b, &resb[at], err, sizeof(err)) != 0)
            fail_msg("batch: %s", err);
        at += sizes[step];
        mix_between(c, one, step, req1, res1, at);
        mix_between(c, batched, step, reqb, resb, at);
    }
    assert_int_equal(at, MIX_N);

    int seen[SP_RESERVE_RECOVERING + 1] = {0};
    for (int i = 0; i < MIX_N; i++) {
        assert_int_equal(resb[i].outcome, res1[i].outcome);
        assert_string_equal(resb[i].order_id, res1[i].order_id);
        assert_string_equal(resb[i].dup_state, res1[i].dup_state);
        assert_int_equal(resb[i].stock_left, res1[i].stock_left);
        assert_int_equal(resb[i].pay_timeout_s, res1[i].pay_timeout_s);
        seen[res1[i].outcome]++;
    }
    /* the mix exercised every decision */
    assert_true(seen[SP_RESERVE_OK] > 0 && seen[SP_RESERVE_DUP] > 0 && seen[SP_RESERVE_LIMIT] > 0 &&
                seen[SP_RESERVE_SOLD_OUT] > 0);

    assert_int_equal(sale_hget_int(c, batched, "sale", "stock"),
                     sale_hget_int(c, one, "sale", "stock"));
    for (int u = 1; u <= MIX_USERS; u++) {
        char user[16];
        snprintf(user, sizeof(user), "%d", u);
        assert_int_equal(sale_hget_int(c, batched, "users", user),
                         sale_hget_int(c, one, "users", user));
    }
    for (int i = 0; i < MIX_N; i++) {
        char a[256], b[256], t[256];
        const char *e = sale_hget_str(c, one, "resv", req1[i].order_id);
        sku_neutral(strcmp(e, "(nil)") ? timeless(c, e) : e, one, a, sizeof(a));
        e = sale_hget_str(c, batched, "resv", reqb[i].order_id);
        snprintf(t, sizeof(t), "%s", strcmp(e, "(nil)") ? timeless(c, e) : e);
        assert_string_equal(sku_neutral(t, batched, b, sizeof(b)), a);
    }
    for (int u = 1; u <= MIX_USERS; u++)
        for (int k = 0; k < MIX_KEYS; k++) {
            char key[16], a[128], b[128];
            snprintf(key, sizeof(key), "K%d", k);
            int pa = idem_state(c, one, u, key, a, sizeof(a));
            int pb = idem_state(c, batched, u, key, b, sizeof(b));
            assert_string_equal(b, a);
            assert_int_equal(pb, pa);
        }
    sp_redis_close(c);
}

/* confirm.lua's batch: orders reserved, one named twice, one the consumer already removed, one
 * never there, with and without keys; the count, the entries and the keys are what one confirm
 * per order gives. */
static void test_confirm_batch_as_one_by_one(void **state) {
    (void)state;
    sp_redis *c = connect_redis();
    int64_t one = fresh_sku(c, 82), batched = fresh_sku(c, 83);
    int64_t skus[2] = {one, batched};
    const char *idem[] = {"C0", NULL, "C2", NULL, "C4"};
    int opened;
    for (int s = 0; s < 2; s++) {
        if (sp_stock_open(c, skus[s], 10, 0, 600, &opened, err, sizeof(err)) != 0)
            fail_msg("open: %s", err);
        for (int i = 0; i < 5; i++) {
            char id[16];
            snprintf(id, sizeof(id), "cb-%d", i);
            freeReplyObject(sp_redis_command(c, NULL, itest_err, sizeof(itest_err),
                                             "DEL {sku:%lld}:idem:%d:C%d", (long long)skus[s],
                                             10 + i, i));
            assert_int_equal(reserve(c, skus[s], 10 + i, 1, id, idem[i]).outcome, SP_RESERVE_OK);
        }
        const char *gone[] = {"cb-3"}; /* the consumer stored it first */
        assert_int_equal(sp_stock_accepted_forget(c, skus[s], gone, 1, err, sizeof(err)), 0);
    }
    const int which[] = {0, 1, 1, 3, 5, 4, 2}; /* 5: an order never reserved */
    enum { NC = sizeof(which) / sizeof(which[0]) };
    int n_one = 0;
    static sp_reserve_request reqs[NC];
    static sp_script_call calls[NC];
    sp_confirm_batch b = {0};
    for (int j = 0; j < NC; j++) {
        int i = which[j];
        const char *key = i < 5 ? idem[i] : NULL;
        char id[16];
        snprintf(id, sizeof(id), "cb-%d", i);
        n_one += confirm(c, one, 10 + i, id, key);
        reqs[j] = (sp_reserve_request){.sku_id = batched, .user_id = 10 + i};
        snprintf(reqs[j].order_id, sizeof(reqs[j].order_id), "%s", id);
        snprintf(reqs[j].idem_key, sizeof(reqs[j].idem_key), "%s", key ? key : "");
        sp_stock_confirm_call(&calls[j], &reqs[j], 3, 17);
        assert_int_equal(sp_stock_confirm_batch_add(&b, batched, &calls[j]), 0);
    }
    /* the batch as the producer sends it: EVAL of confirm.lua with the batch's keys and args */
    const char *argv[3 + 4 * NC];
    size_t argvlen[3 + 4 * NC];
    char nkeys[12];
    int argc = 0;
    snprintf(nkeys, sizeof(nkeys), "%d", b.nkeys);
    argv[argc] = "EVAL", argvlen[argc++] = 4;
    argv[argc] = sp_lua_confirm, argvlen[argc++] = strlen(sp_lua_confirm);
    argv[argc] = nkeys, argvlen[argc++] = strlen(nkeys);
    for (int i = 0; i < b.nkeys; i++) argv[argc] = b.keys[i], argvlen[argc++] = b.keyslen[i];
    for (int i = 0; i < b.nargs; i++) argv[argc] = b.args[i], argvlen[argc++] = b.argslen[i];
    redisReply *r = sp_redis_argv(c, b.keys[0], argc, argv, argvlen, itest_err, sizeof(itest_err));
    assert_non_null(r);
    if (r->type != REDIS_REPLY_INTEGER) fail_msg("confirm batch: %s", r->str ? r->str : "?");
    assert_int_equal(n_one, 4); /* cb-0, cb-1 once, cb-4, cb-2 */
    assert_int_equal(r->integer, n_one);
    freeReplyObject(r);
    for (int i = 0; i < 6; i++) {
        char id[16], a[256], t[256], bb[256];
        snprintf(id, sizeof(id), "cb-%d", i);
        const char *e = sale_hget_str(c, one, "resv", id);
        sku_neutral(strcmp(e, "(nil)") ? timeless(c, e) : e, one, a, sizeof(a));
        e = sale_hget_str(c, batched, "resv", id);
        snprintf(t, sizeof(t), "%s", strcmp(e, "(nil)") ? timeless(c, e) : e);
        assert_string_equal(sku_neutral(t, batched, bb, sizeof(bb)), a);
        if (i < 5 && idem[i]) {
            char va[64], vb[64];
            int pa = idem_state(c, one, 10 + i, idem[i], va, sizeof(va));
            int pb = idem_state(c, batched, 10 + i, idem[i], vb, sizeof(vb));
            assert_string_equal(vb, va);
            assert_int_equal(pb, pa);
            snprintf(t, sizeof(t), "accepted:%s", id);
            assert_string_equal(va, t);
        }
    }
    sp_redis_close(c);
}

int main(void) {
    char e[256];
    const char *url = getenv("REDIS_URL");
    sp_log_init("stock-test", NULL, SP_LOG_WARN);
    if (url == NULL || sp_redis_parse_url(url, &target, e, sizeof(e)) != 0) {
        fprintf(stderr, "REDIS_URL is not set or bad: run `. var/stack.env` first\n");
        return 1;
    }
    sku_base = 700000000 + (int64_t)getpid() * 10;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_once_and_restock),
        cmocka_unit_test(test_reserve_outcomes),
        cmocka_unit_test(test_idempotency_key),
        cmocka_unit_test(test_release_exactly_once),
        cmocka_unit_test(test_concurrent_admission_is_exact),
        cmocka_unit_test(test_idem_key_validation),
        cmocka_unit_test(test_no_limit_keeps_no_counts),
        cmocka_unit_test(test_shard_transfer_exactly_once),
        cmocka_unit_test(test_sharded_reserve_answers),
        cmocka_unit_test(test_sharded_no_false_sold_out),
        cmocka_unit_test(test_sharded_hammer),
        cmocka_unit_test(test_reserve_batch_in_order),
        cmocka_unit_test(test_reserve_batch_as_one_by_one),
        cmocka_unit_test(test_confirm_batch_as_one_by_one),
        cmocka_unit_test(test_reconcile_open_after_apply),
        cmocka_unit_test(test_reconcile_writes_need_the_token),
        cmocka_unit_test(test_confirm_marks_accepted),
        cmocka_unit_test(test_cap_only_lowers),
        cmocka_unit_test(test_idem_ttls),
        cmocka_unit_test(test_forget_settles_a_batch_of_keys),
        cmocka_unit_test(test_reserve_recovering_while_paused),
        cmocka_unit_test(test_pause_many),
    };
    return cmocka_run_group_tests_name("stock_redis", tests, NULL, NULL);
}
