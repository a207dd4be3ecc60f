/* stock.c - the Redis side of a sale: its keys, and the Lua scripts that open, restock, reserve,
 *           confirm and release, each one atomic and one round trip. */
#include "stock.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua_scripts.h"
#include "redis_store.h"

/* One loaded SHA per script per process; the producer and reaper are single-threaded on Redis. */
static sp_redis_script script_sale_open = {.name = "sale_open", .body = sp_lua_sale_open};
static sp_redis_script script_restock = {.name = "restock", .body = sp_lua_restock};
static sp_redis_script script_reserve = {.name = "reserve", .body = sp_lua_reserve};
static sp_redis_script script_confirm = {.name = "confirm", .body = sp_lua_confirm};
static sp_redis_script script_release = {.name = "release", .body = sp_lua_release};

int sp_idem_key_valid(const char *s) {
    size_t n = 0;
    for (; s[n]; n++)
        if (s[n] <= ' ' || s[n] > '~' || n >= SP_IDEM_KEY_MAX) return 0;
    return n > 0;
}

void sp_stock_key(char *buf, int64_t sku_id, const char *suffix) {
    snprintf(buf, SP_STOCK_KEY_MAX, "{sku:%" PRId64 "}:%s", sku_id, suffix);
}

/* Runs script with the given keys and args (all as text); returns the reply or NULL with errbuf.
 * A script error (a bug, or a key of the wrong type) is reported as a failure too. */
static redisReply *run(redisContext *c, sp_redis_script *s, int nkeys, int argc, const char **argv,
                       char *errbuf, size_t errlen) {
    size_t lens[16];
    for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
    redisReply *r = sp_redis_evalsha(c, s, nkeys, argc, argv, lens, errbuf, errlen);
    if (r && r->type == REDIS_REPLY_ERROR) {
        snprintf(errbuf, errlen, "script %s: %s", s->name, r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

static int integer_reply(redisReply *r, const char *name, long long *v, char *errbuf,
                         size_t errlen) {
    if (r->type != REDIS_REPLY_INTEGER) {
        snprintf(errbuf, errlen, "script %s: unexpected reply type %d", name, r->type);
        freeReplyObject(r);
        return -1;
    }
    *v = r->integer;
    freeReplyObject(r);
    return 0;
}

int sp_stock_open(redisContext *c, int64_t sku_id, int64_t stock, int32_t per_user_limit,
                  int32_t pay_timeout_s, int *opened, char *errbuf, size_t errlen) {
    char sale[SP_STOCK_KEY_MAX], a1[24], a2[16], a3[16];
    long long v;
    sp_stock_key(sale, sku_id, "sale");
    snprintf(a1, sizeof(a1), "%" PRId64, stock);
    snprintf(a2, sizeof(a2), "%" PRId32, per_user_limit);
    snprintf(a3, sizeof(a3), "%" PRId32, pay_timeout_s);
    const char *argv[] = {sale, a1, a2, a3};
    redisReply *r = run(c, &script_sale_open, 1, 4, argv, errbuf, errlen);
    if (r == NULL || integer_reply(r, "sale_open", &v, errbuf, errlen) != 0) return -1;
    *opened = (int)v;
    return 0;
}

int sp_stock_restock(redisContext *c, int64_t sku_id, int64_t add, int64_t *stock, char *errbuf,
                     size_t errlen) {
    char sale[SP_STOCK_KEY_MAX], a1[24];
    long long v;
    sp_stock_key(sale, sku_id, "sale");
    snprintf(a1, sizeof(a1), "%" PRId64, add);
    const char *argv[] = {sale, a1};
    redisReply *r = run(c, &script_restock, 1, 2, argv, errbuf, errlen);
    if (r == NULL || integer_reply(r, "restock", &v, errbuf, errlen) != 0) return -1;
    *stock = v;
    return 0;
}

int sp_stock_reserve(redisContext *c, const sp_reserve_request *req, sp_reserve_result *res,
                     char *errbuf, size_t errlen) {
    char sale[SP_STOCK_KEY_MAX], users[SP_STOCK_KEY_MAX], resv[SP_STOCK_KEY_MAX],
        resv_ts[SP_STOCK_KEY_MAX], idem[SP_STOCK_KEY_MAX + SP_IDEM_KEY_MAX + 32];
    char user[24], qty[16], ts[24], ttl[16];
    sp_stock_key(sale, req->sku_id, "sale");
    sp_stock_key(users, req->sku_id, "users");
    sp_stock_key(resv, req->sku_id, "resv");
    sp_stock_key(resv_ts, req->sku_id, "resv_by_ts");
    idem[0] = '\0';
    if (req->idem_key[0])
        snprintf(idem, sizeof(idem), "{sku:%" PRId64 "}:idem:%" PRId64 ":%s", req->sku_id,
                 req->user_id, req->idem_key);
    snprintf(user, sizeof(user), "%" PRId64, req->user_id);
    snprintf(qty, sizeof(qty), "%" PRId32, req->qty);
    snprintf(ts, sizeof(ts), "%" PRId64, req->ts_ms);
    snprintf(ttl, sizeof(ttl), "%d", SP_IDEM_TTL_S);
    const char *argv[] = {sale, users, resv, resv_ts, idem, user, qty, req->order_id, ts, ttl};
    redisReply *r = run(c, &script_reserve, 5, 10, argv, errbuf, errlen);
    if (r == NULL) return -1;
    int rc = -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 || r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[1]->type != REDIS_REPLY_STRING) {
        snprintf(errbuf, errlen, "script reserve: unexpected reply");
        goto out;
    }
    memset(res, 0, sizeof(*res));
    const char *outcome = r->element[0]->str;
    redisReply *third = r->element[2];
    if (strcmp(outcome, "ok") == 0) res->outcome = SP_RESERVE_OK;
    else if (strcmp(outcome, "dup") == 0) res->outcome = SP_RESERVE_DUP;
    else if (strcmp(outcome, "unknown_sku") == 0) res->outcome = SP_RESERVE_UNKNOWN_SKU;
    else if (strcmp(outcome, "sold_out") == 0) res->outcome = SP_RESERVE_SOLD_OUT;
    else if (strcmp(outcome, "limit_exceeded") == 0) res->outcome = SP_RESERVE_LIMIT;
    else {
        snprintf(errbuf, errlen, "script reserve: unknown outcome \"%.32s\"", outcome);
        goto out;
    }
    snprintf(res->order_id, sizeof(res->order_id), "%s", r->element[1]->str);
    if (res->outcome == SP_RESERVE_DUP && third->type == REDIS_REPLY_STRING)
        snprintf(res->dup_state, sizeof(res->dup_state), "%s", third->str);
    else if (third->type == REDIS_REPLY_INTEGER)
        res->stock_left = third->integer;
    rc = 0;
out:
    freeReplyObject(r);
    return rc;
}

int sp_stock_confirm(redisContext *c, int64_t sku_id, const char *order_id, int *was_reserved,
                     char *errbuf, size_t errlen) {
    char resv[SP_STOCK_KEY_MAX], resv_ts[SP_STOCK_KEY_MAX];
    long long v;
    sp_stock_key(resv, sku_id, "resv");
    sp_stock_key(resv_ts, sku_id, "resv_by_ts");
    const char *argv[] = {resv, resv_ts, order_id};
    redisReply *r = run(c, &script_confirm, 2, 3, argv, errbuf, errlen);
    if (r == NULL || integer_reply(r, "confirm", &v, errbuf, errlen) != 0) return -1;
    *was_reserved = (int)v;
    return 0;
}

int sp_stock_release(redisContext *c, int64_t sku_id, const char *order_id, int *qty_returned,
                     char *errbuf, size_t errlen) {
    char sale[SP_STOCK_KEY_MAX], users[SP_STOCK_KEY_MAX], resv[SP_STOCK_KEY_MAX],
        resv_ts[SP_STOCK_KEY_MAX];
    long long v;
    sp_stock_key(sale, sku_id, "sale");
    sp_stock_key(users, sku_id, "users");
    sp_stock_key(resv, sku_id, "resv");
    sp_stock_key(resv_ts, sku_id, "resv_by_ts");
    const char *argv[] = {sale, users, resv, resv_ts, order_id};
    redisReply *r = run(c, &script_release, 4, 5, argv, errbuf, errlen);
    if (r == NULL || integer_reply(r, "release", &v, errbuf, errlen) != 0) return -1;
    *qty_returned = (int)v;
    return 0;
}

int sp_stock_available(redisContext *c, int64_t sku_id, int64_t *stock, char *errbuf,
                       size_t errlen) {
    char sale[SP_STOCK_KEY_MAX];
    sp_stock_key(sale, sku_id, "sale");
    redisReply *r = redisCommand(c, "HGET %s stock", sale);
    if (r == NULL) {
        snprintf(errbuf, errlen, "HGET %s: %s", sale, c->errstr);
        return -1;
    }
    int rc = 0;
    if (r->type == REDIS_REPLY_NIL) *stock = -1;
    else if (r->type == REDIS_REPLY_STRING) *stock = strtoll(r->str, NULL, 10);
    else {
        snprintf(errbuf, errlen, "HGET %s: unexpected reply", sale);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}
