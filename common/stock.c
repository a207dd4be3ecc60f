/* stock.c - the Redis side of a sale: its keys, and the Lua scripts that open, restock, reserve,
 *           confirm, release and cap, each one atomic and one round trip.
 *
 * Each call is built once (sp_stock_*_call) and parsed once (sp_stock_*_parse); the blocking
 * functions below and the producer's async path both use those, so there is one definition of
 * every script's arguments and replies. */
#include "stock.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua_scripts.h"

/* One loaded SHA per script per process. Only the thread that owns the Redis connection uses
 * them (the producer's event loop, the reaper's main loop). */
static sp_redis_script script_sale_claim = {.name = "sale_claim", .body = sp_lua_sale_claim};
static sp_redis_script script_sale_open = {.name = "sale_open", .body = sp_lua_sale_open};
static sp_redis_script script_sale_unclaim = {.name = "sale_unclaim", .body = sp_lua_sale_unclaim};
static sp_redis_script script_restock = {.name = "restock", .body = sp_lua_restock};
static sp_redis_script script_reserve = {.name = "reserve", .body = sp_lua_reserve};
static sp_redis_script script_confirm = {.name = "confirm", .body = sp_lua_confirm};
static sp_redis_script script_release = {.name = "release", .body = sp_lua_release};
static sp_redis_script script_cap = {.name = "cap", .body = sp_lua_cap};
static sp_redis_script script_rejected_forget = {.name = "rejected_forget",
                                                 .body = sp_lua_rejected_forget};
static sp_redis_script script_give_back = {.name = "give_back", .body = sp_lua_give_back};
static sp_redis_script script_resv_drop = {.name = "resv_drop", .body = sp_lua_resv_drop};
static sp_redis_script script_reconcile_pause = {.name = "reconcile_pause",
                                                 .body = sp_lua_reconcile_pause};
static sp_redis_script script_reconcile_apply = {.name = "reconcile_apply",
                                                 .body = sp_lua_reconcile_apply};
static sp_redis_script script_reconcile_adjust = {.name = "reconcile_adjust",
                                                  .body = sp_lua_reconcile_adjust};
static sp_redis_script script_reconcile_open = {.name = "reconcile_open",
                                                .body = sp_lua_reconcile_open};
static sp_redis_script script_reconcile_stage = {.name = "reconcile_stage",
                                                 .body = sp_lua_reconcile_stage};
static sp_redis_script script_shard_take = {.name = "shard_take", .body = sp_lua_shard_take};
static sp_redis_script script_shard_give = {.name = "shard_give", .body = sp_lua_shard_give};
static sp_redis_script script_shard_done = {.name = "shard_done", .body = sp_lua_shard_done};

int sp_idem_key_valid(const char *s) { return sp_request_id_valid(s); }

void sp_stock_key(char *buf, int64_t sku_id, const char *suffix) {
    snprintf(buf, SP_STOCK_KEY_MAX, "{sku:%" PRId64 "}:%s", sku_id, suffix);
}

void sp_stock_shard_key(char *buf, int64_t sku_id, int shard, const char *suffix) {
    if (shard == 0)
        sp_stock_key(buf, sku_id, suffix);
    else
        snprintf(buf, SP_STOCK_KEY_MAX, "{sku:%" PRId64 "/%d}:%s", sku_id, shard, suffix);
}

/* A SKU's key as the next script argument: {sku:ID}:suffix. */
static void key_arg(sp_script_call *call, int64_t sku_id, const char *suffix) {
    sp_script_call_arg(call, "{sku:%" PRId64 "}:%s", sku_id, suffix);
}

/* A shard's key as the next script argument (sp_stock_shard_key); shard 0, every unsharded sale's
 * order on the order path, formatted in place. */
static void shard_key_arg(sp_script_call *call, int64_t sku_id, int shard, const char *suffix) {
    if (shard == 0) {
        key_arg(call, sku_id, suffix);
        return;
    }
    char key[SP_STOCK_KEY_MAX];
    sp_stock_shard_key(key, sku_id, shard, suffix);
    sp_script_call_arg(call, "%s", key);
}

int sp_stock_scripts_load(sp_redis *c, char *errbuf, size_t errlen) {
    sp_redis_script *all[] = {&script_sale_claim,       &script_sale_open,
                              &script_sale_unclaim,     &script_restock,
                              &script_reserve,          &script_confirm,
                              &script_release,          &script_cap,
                              &script_give_back,        &script_resv_drop,
                              &script_reconcile_pause,  &script_reconcile_apply,
                              &script_reconcile_adjust, &script_reconcile_open,
                              &script_reconcile_stage,  &script_rejected_forget,
                              &script_shard_take,       &script_shard_give,
                              &script_shard_done};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (sp_redis_script_load(c, all[i], errbuf, errlen) != 0) return -1;
    return 0;
}

/* ---- building calls ---- */

void sp_stock_claim_call(sp_script_call *call, int64_t sku_id, const char *token,
                         int64_t claim_ms) {
    sp_script_call_init(call, &script_sale_claim, 2);
    key_arg(call, sku_id, "sale");
    key_arg(call, sku_id, "opening");
    sp_script_call_arg(call, "%s", token);
    sp_script_call_arg(call, "%" PRId64, claim_ms);
}

void sp_stock_open_call(sp_script_call *call, int64_t sku_id, int64_t stock, int32_t per_user_limit,
                        int32_t pay_timeout_s, const char *token) {
    sp_script_call_init(call, &script_sale_open, 2);
    key_arg(call, sku_id, "sale");
    key_arg(call, sku_id, "opening");
    sp_script_call_arg(call, "%" PRId64, stock);
    sp_script_call_arg(call, "%" PRId32, per_user_limit);
    sp_script_call_arg(call, "%" PRId32, pay_timeout_s);
    sp_script_call_arg(call, "%s", token);
}

void sp_stock_open_shard_call(sp_script_call *call, int64_t sku_id, int shard, int nshards,
                              int64_t stock, int32_t per_user_limit, int32_t pay_timeout_s,
                              const char *gen, const char *token) {
    sp_script_call_init(call, &script_sale_open, 2);
    shard_key_arg(call, sku_id, shard, "sale");
    shard_key_arg(call, sku_id, shard, "opening");
    sp_script_call_arg(call, "%" PRId64, stock / nshards + (shard < stock % nshards ? 1 : 0));
    sp_script_call_arg(call, "%" PRId32, per_user_limit);
    sp_script_call_arg(call, "%" PRId32, pay_timeout_s);
    sp_script_call_arg(call, "%s", token);
    sp_script_call_arg(call, "%s", gen);
    sp_script_call_arg(call, "%d", nshards);
}

void sp_stock_unclaim_call(sp_script_call *call, int64_t sku_id, const char *token) {
    sp_script_call_init(call, &script_sale_unclaim, 1);
    key_arg(call, sku_id, "opening");
    sp_script_call_arg(call, "%s", token);
}

static int32_t idem_ttl_s = SP_IDEM_TTL_S, idem_refusal_ttl_s = SP_IDEM_REFUSAL_TTL_S;

void sp_stock_restock_call(sp_script_call *call, int64_t sku_id, int64_t add,
                           const char *request_id) {
    sp_script_call_init(call, &script_restock, 2);
    key_arg(call, sku_id, "sale");
    key_arg(call, sku_id, "restocks");
    sp_script_call_arg(call, "%" PRId64, add);
    sp_script_call_arg(call, "%s", request_id);
    sp_script_call_arg(call, "%" PRId64, (int64_t)idem_ttl_s * 1000);
}

int sp_stock_restock_parse(const redisReply *r, sp_restock_status *status, int64_t *stock,
                           char *errbuf, size_t errlen) {
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_INTEGER) {
        snprintf(errbuf, errlen, "restock: %s",
                 r && r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        return -1;
    }
    long long st = r->element[0]->integer;
    if (st < SP_RESTOCK_PAUSED || st > SP_RESTOCK_APPLIED ||
        (st >= 0 && (r->elements < 2 || r->element[1]->type != REDIS_REPLY_INTEGER))) {
        snprintf(errbuf, errlen, "restock: unexpected reply");
        return -1;
    }
    *status = (sp_restock_status)st;
    *stock = st >= 0 ? r->element[1]->integer : -1;
    return 0;
}

/* The request's idempotency key name, or "" without one. */
static void idem_arg(sp_script_call *call, const sp_reserve_request *req) {
    if (req->idem_key[0] && req->shard == 0)
        sp_script_call_arg(call, "{sku:%" PRId64 "}:idem:%" PRId64 ":%s", req->sku_id, req->user_id,
                           req->idem_key);
    else if (req->idem_key[0]) /* on the buyer's home shard, with its count */
        sp_script_call_arg(call, "{sku:%" PRId64 "/%" PRId32 "}:idem:%" PRId64 ":%s", req->sku_id,
                           req->shard, req->user_id, req->idem_key);
    else
        sp_script_call_arg(call, "%s", "");
}

void sp_stock_idem_ttls(int32_t ttl_s, int32_t refusal_ttl_s) {
    idem_ttl_s = ttl_s;
    idem_refusal_ttl_s = refusal_ttl_s;
}

/* One order in reserve.lua's batch layout (a batch of one): KEYS sale, users, resv and the
 * idempotency key if there is one; ARGV the key's two TTLs (order, refusal), then user, qty, order
 * id and the key's index in KEYS (4, or 0 without a key). sp_stock_reserve_batch_add relies on this
 * layout. The reservation's time is Redis's (reserve.lua), not req->ts_ms. */
void sp_stock_reserve_call(sp_script_call *call, const sp_reserve_request *req) {
    int64_t sku = req->sku_id;
    int has_idem = req->idem_key[0] != '\0';
    sp_script_call_init(call, &script_reserve, has_idem ? 4 : 3);
    shard_key_arg(call, sku, req->shard, "sale");
    shard_key_arg(call, sku, req->shard, "users");
    shard_key_arg(call, sku, req->shard, "resv");
    if (has_idem) idem_arg(call, req);
    sp_script_call_arg(call, "%" PRId32, idem_ttl_s);
    sp_script_call_arg(call, "%" PRId32, idem_refusal_ttl_s);
    sp_script_call_arg(call, "%" PRId64, req->user_id);
    sp_script_call_arg(call, "%" PRId32, req->qty);
    sp_script_call_arg(call, "%s", req->order_id);
    sp_script_call_arg(call, "%s", has_idem ? "4" : "0");
}

/* confirm.lua's layout for one order: KEYS resv and the idempotency key if there is one; ARGV the
 * order id, the key's index in KEYS (2, or 0) and "partition:offset". sp_stock_confirm_batch_add
 * relies on it. */
void sp_stock_confirm_call(sp_script_call *call, const sp_reserve_request *req, int32_t partition,
                           int64_t offset) {
    int has_idem = req->idem_key[0] != '\0';
    sp_script_call_init(call, &script_confirm, has_idem ? 2 : 1);
    shard_key_arg(call, req->sku_id, req->shard, "resv");
    if (has_idem) idem_arg(call, req);
    sp_script_call_arg(call, "%s", req->order_id);
    sp_script_call_arg(call, "%s", has_idem ? "2" : "0");
    if (partition >= 0 && offset >= 0)
        sp_script_call_arg(call, "%" PRId32 ":%" PRId64, partition, offset);
    else
        sp_script_call_arg(call, "%s", ""); /* position unknown: the entry keeps none */
}

void sp_stock_release_call(sp_script_call *call, const sp_reserve_request *req) {
    int has_idem = req->idem_key[0] != '\0';
    sp_script_call_init(call, &script_release, has_idem ? 4 : 3);
    shard_key_arg(call, req->sku_id, req->shard, "sale");
    shard_key_arg(call, req->sku_id, req->shard, "users");
    shard_key_arg(call, req->sku_id, req->shard, "resv");
    if (has_idem) idem_arg(call, req);
    sp_script_call_arg(call, "%s", req->order_id);
}

void sp_stock_cap_call(sp_script_call *call, int64_t sku_id, int64_t pg_stock,
                       int64_t pg_supplied) {
    sp_script_call_init(call, &script_cap, 1);
    key_arg(call, sku_id, "sale");
    sp_script_call_arg(call, "%" PRId64, pg_stock);
    sp_script_call_arg(call, "%" PRId64, pg_supplied);
}

_Static_assert(1 + 4 * SP_CONFIRM_BATCH_MAX <= SP_REDIS_SCRIPT_ARGV_MAX,
               "a full batch must be sendable");
_Static_assert(3 + SP_RESERVE_BATCH_MAX + 2 + 4 * SP_RESERVE_BATCH_MAX <= SP_REDIS_SCRIPT_ARGV_MAX,
               "a full reserve batch must be sendable");

int sp_stock_reserve_batch_add(sp_reserve_batch *b, const sp_reserve_request *req,
                               const sp_script_call *one) {
    int nk = one->nkeys;
    if (one->overflow || one->script != &script_reserve || (nk != 3 && nk != 4) ||
        one->argc != nk + 6 || b->n >= SP_RESERVE_BATCH_MAX ||
        (b->n > 0 && (b->sku_id != req->sku_id || b->shard != req->shard)))
        return -1;
    if (b->n == 0) {
        b->sku_id = req->sku_id;
        b->shard = req->shard;
        b->nkeys = 3;
        for (int i = 0; i < 3; i++) b->keys[i] = one->argv[i], b->keyslen[i] = one->argvlen[i];
        for (int i = 0; i < 2; i++) /* the TTLs */
            b->args[i] = one->argv[nk + i], b->argslen[i] = one->argvlen[nk + i];
        b->nargs = 2;
    }
    char *idx = b->index[b->n];
    if (nk == 4) {
        b->keys[b->nkeys] = one->argv[3], b->keyslen[b->nkeys] = one->argvlen[3];
        snprintf(idx, sizeof(b->index[0]), "%d", ++b->nkeys);
    } else {
        idx[0] = '0', idx[1] = '\0';
    }
    for (int i = nk + 2; i < nk + 5; i++) { /* user, qty, order id */
        b->args[b->nargs] = one->argv[i], b->argslen[b->nargs] = one->argvlen[i];
        b->nargs++;
    }
    b->args[b->nargs] = idx, b->argslen[b->nargs] = strlen(idx);
    b->nargs++;
    b->n++;
    return 0;
}

/* b's command line: its keys, then its arguments; returns how many. */
static int reserve_batch_argv(const sp_reserve_batch *b, const char **argv, size_t *argvlen) {
    int argc = 0;
    for (int i = 0; i < b->nkeys; i++, argc++)
        argv[argc] = b->keys[i], argvlen[argc] = b->keyslen[i];
    for (int i = 0; i < b->nargs; i++, argc++)
        argv[argc] = b->args[i], argvlen[argc] = b->argslen[i];
    return argc;
}

int sp_stock_reserve_batch_argv(const sp_reserve_batch *b, sp_redis_script **script,
                                const char **argv, size_t *argvlen) {
    *script = &script_reserve;
    return reserve_batch_argv(b, argv, argvlen);
}

int sp_stock_reserve_batch(sp_redis *c, const sp_reserve_batch *b, sp_reserve_result *res,
                           char *errbuf, size_t errlen) {
    const char *argv[SP_REDIS_SCRIPT_ARGV_MAX];
    size_t argvlen[SP_REDIS_SCRIPT_ARGV_MAX];
    int argc = reserve_batch_argv(b, argv, argvlen);
    redisReply *r = sp_redis_evalsha(c, &script_reserve, b->nkeys, argc, argv, argvlen, errbuf,
                                     errlen);
    if (r == NULL) return -1;
    int rc = 0;
    for (int i = 0; i < b->n && rc == 0; i++) {
        rc = sp_stock_reserve_parse(r, (size_t)i, &res[i], errbuf, errlen);
        if (rc == 0 && res[i].outcome == SP_RESERVE_OK) /* the order's own id, args[2+4i+2] */
            snprintf(res[i].order_id, sizeof(res[i].order_id), "%.*s", (int)b->argslen[4 + 4 * i],
                     b->args[4 + 4 * i]);
    }
    freeReplyObject(r);
    return rc;
}

int sp_stock_confirm_batch_add(sp_confirm_batch *b, int64_t sku_id, const sp_script_call *one) {
    int nk = one->nkeys;
    if (one->overflow || one->script != &script_confirm || (nk != 1 && nk != 2) ||
        one->argc != nk + 3 || b->n >= SP_CONFIRM_BATCH_MAX ||
        (b->n > 0 && (b->sku_id != sku_id || b->keyslen[0] != one->argvlen[0] ||
                      memcmp(b->keys[0], one->argv[0], one->argvlen[0]) != 0))) /* one resv */
        return -1;
    if (b->n == 0) {
        b->sku_id = sku_id;
        b->keys[0] = one->argv[0], b->keyslen[0] = one->argvlen[0];
        b->nkeys = 1, b->nargs = 0;
    }
    char *idx = b->index[b->n];
    if (nk == 2) {
        b->keys[b->nkeys] = one->argv[1], b->keyslen[b->nkeys] = one->argvlen[1];
        snprintf(idx, sizeof(b->index[0]), "%d", ++b->nkeys);
    } else {
        idx[0] = '0', idx[1] = '\0';
    }
    b->args[b->nargs] = one->argv[nk], b->argslen[b->nargs++] = one->argvlen[nk];
    b->args[b->nargs] = idx, b->argslen[b->nargs++] = strlen(idx);
    b->args[b->nargs] = one->argv[nk + 2], b->argslen[b->nargs++] = one->argvlen[nk + 2];
    b->n++;
    return 0;
}

int sp_stock_confirm_batch_argv(const sp_confirm_batch *b, sp_redis_script **script,
                                const char **argv, size_t *argvlen) {
    int argc = 0;
    for (int i = 0; i < b->nkeys; i++, argc++)
        argv[argc] = b->keys[i], argvlen[argc] = b->keyslen[i];
    for (int i = 0; i < b->nargs; i++, argc++)
        argv[argc] = b->args[i], argvlen[argc] = b->argslen[i];
    *script = &script_confirm;
    return argc;
}

/* ---- parsing replies ---- */

int sp_stock_integer_parse(const redisReply *r, const char *what, long long *v, char *errbuf,
                           size_t errlen) {
    if (r == NULL || r->type != REDIS_REPLY_INTEGER) {
        snprintf(errbuf, errlen, "script %s: %s", what,
                 r == NULL                      ? "no reply"
                 : r->type == REDIS_REPLY_ERROR ? r->str
                                                : "unexpected reply");
        return -1;
    }
    *v = r->integer;
    return 0;
}

int sp_stock_reserve_parse(const redisReply *all, size_t i, sp_reserve_result *res, char *errbuf,
                           size_t errlen) {
    static const struct {
        const char *name;
        sp_reserve_outcome outcome;
    } outcomes[] = {{"ok", SP_RESERVE_OK},
                    {"dup", SP_RESERVE_DUP},
                    {"unknown_sku", SP_RESERVE_UNKNOWN_SKU},
                    {"sold_out", SP_RESERVE_SOLD_OUT},
                    {"limit_exceeded", SP_RESERVE_LIMIT},
                    {"recovering", SP_RESERVE_RECOVERING},
                    {"moved", SP_RESERVE_MOVED}};
    /* {pay_timeout_s, shards, gen, answer...}: an integer answer is an order reserved (the stock
     * left). */
    if (all == NULL || all->type != REDIS_REPLY_ARRAY || i + 3 >= all->elements ||
        all->element[0]->type != REDIS_REPLY_INTEGER ||
        all->element[1]->type != REDIS_REPLY_INTEGER || all->element[1]->integer < 0 ||
        all->element[1]->integer > SP_SHARDS_MAX || all->element[2]->type != REDIS_REPLY_STRING) {
        snprintf(errbuf, errlen, "script reserve: %s",
                 all && all->type == REDIS_REPLY_ERROR ? all->str : "unexpected reply");
        return -1;
    }
    const redisReply *r = all->element[i + 3];
    memset(res, 0, sizeof(*res));
    res->pay_timeout_s = (int32_t)all->element[0]->integer;
    if (all->element[1]->integer > 1) { /* a shard of a sharded sale */
        res->nshards = (int32_t)all->element[1]->integer;
        snprintf(res->gen, sizeof(res->gen), "%s", all->element[2]->str);
    }
    if (r->type == REDIS_REPLY_INTEGER) {
        res->outcome = SP_RESERVE_OK;
        res->stock_left = r->integer;
        return 0;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        snprintf(errbuf, errlen, "script reserve: unexpected answer for order %zu", i + 1);
        return -1;
    }
    size_t k, n = sizeof(outcomes) / sizeof(outcomes[0]);
    for (k = 0; k < n; k++)
        if (strcmp(r->element[0]->str, outcomes[k].name) == 0) break;
    if (k == n) {
        snprintf(errbuf, errlen, "script reserve: unknown outcome \"%.32s\"", r->element[0]->str);
        return -1;
    }
    res->outcome = outcomes[k].outcome;
    snprintf(res->order_id, sizeof(res->order_id), "%s", r->element[1]->str);
    const redisReply *third = r->element[2];
    if (res->outcome == SP_RESERVE_DUP && third->type == REDIS_REPLY_STRING)
        snprintf(res->dup_state, sizeof(res->dup_state), "%s", third->str);
    else if (third->type == REDIS_REPLY_INTEGER)
        res->stock_left = third->integer;
    if (r->element[3]->type == REDIS_REPLY_INTEGER)
        res->pay_timeout_s = (int32_t)r->element[3]->integer;
    return 0;
}

/* ---- blocking calls ---- */

/* Runs a call whose reply is one integer. */
static int run_integer(sp_redis *c, sp_script_call *call, long long *v, char *errbuf,
                       size_t errlen) {
    redisReply *r = sp_redis_call(c, call, errbuf, errlen);
    if (r == NULL) return -1;
    int rc = sp_stock_integer_parse(r, call->script->name, v, errbuf, errlen);
    freeReplyObject(r);
    return rc;
}

int sp_stock_open(sp_redis *c, int64_t sku_id, int64_t stock, int32_t per_user_limit,
                  int32_t pay_timeout_s, int *opened, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_stock_open_call(&call, sku_id, stock, per_user_limit, pay_timeout_s, "");
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *opened = (int)v;
    return 0;
}

int sp_stock_restock(sp_redis *c, int64_t sku_id, int64_t add, const char *request_id,
                     sp_restock_status *status, int64_t *stock, char *errbuf, size_t errlen) {
    sp_script_call call;
    sp_stock_restock_call(&call, sku_id, add, request_id);
    redisReply *r = sp_redis_call(c, &call, errbuf, errlen);
    if (r == NULL) return -1;
    int rc = sp_stock_restock_parse(r, status, stock, errbuf, errlen);
    freeReplyObject(r);
    return rc;
}

int sp_stock_reserve(sp_redis *c, const sp_reserve_request *req, sp_reserve_result *res,
                     char *errbuf, size_t errlen) {
    sp_script_call call;
    sp_stock_reserve_call(&call, req);
    redisReply *r = sp_redis_call(c, &call, errbuf, errlen);
    if (r == NULL) return -1;
    int rc = sp_stock_reserve_parse(r, 0, res, errbuf, errlen);
    if (rc == 0 && res->outcome == SP_RESERVE_OK)
        snprintf(res->order_id, sizeof(res->order_id), "%s", req->order_id);
    freeReplyObject(r);
    return rc;
}

int sp_stock_confirm(sp_redis *c, const sp_reserve_request *req, int32_t partition, int64_t offset,
                     int *was_reserved, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_stock_confirm_call(&call, req, partition, offset);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *was_reserved = (int)v;
    return 0;
}

int sp_stock_release(sp_redis *c, const sp_reserve_request *req, int *qty_returned, char *errbuf,
                     size_t errlen) {
    sp_script_call call;
    long long v;
    sp_stock_release_call(&call, req);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *qty_returned = (int)v;
    return 0;
}

int sp_stock_cap(sp_redis *c, int64_t sku_id, int64_t pg_stock, int64_t pg_supplied,
                 int64_t *removed, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_stock_cap_call(&call, sku_id, pg_stock, pg_supplied);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *removed = v;
    return 0;
}

int sp_stock_rejected_forget(sp_redis *c, int64_t sku_id, const char *order_id, int64_t user_id,
                             int32_t qty, int *units, char *errbuf, size_t errlen) {
    return sp_stock_rejected_forget_on_shard(c, sku_id, 0, order_id, user_id, qty, units, errbuf,
                                             errlen);
}

/* The Idempotency-Key an 'r:' entry names ("r:user:qty:ts:KEY", KEY itself holding colons), or
 * NULL: an 'a:' entry, or an 'r:' one without a key. */
static const char *entry_idem_key(const char *entry) {
    if (strncmp(entry, "r:", 2) != 0) return NULL;
    const char *p = entry;
    for (int i = 0; i < 4 && p; i++) p = strchr(p + 1, ':');
    return p && p[1] ? p + 1 : NULL;
}

int sp_stock_accepted_forget(sp_redis *c, int64_t sku_id, const char *const *order_ids, size_t n,
                             char *errbuf, size_t errlen) {
    return sp_stock_accepted_forget_on_shard(c, sku_id, 0, order_ids, n, errbuf, errlen);
}

int sp_stock_available(sp_redis *c, int64_t sku_id, int64_t *stock, char *errbuf, size_t errlen) {
    char sale[SP_STOCK_KEY_MAX];
    sp_stock_key(sale, sku_id, "sale");
    redisReply *r = sp_redis_command(c, sale, errbuf, errlen, "HGET %s stock", sale);
    if (r == NULL) return -1;
    int rc = 0;
    if (r->type == REDIS_REPLY_NIL)
        *stock = -1;
    else if (r->type == REDIS_REPLY_STRING)
        *stock = strtoll(r->str, NULL, 10);
    else {
        snprintf(errbuf, errlen, "HGET %s: unexpected reply", sale);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

/* ---- the reaper's scripts (docs/reaper.md) ---- */

int sp_stock_give_back(sp_redis *c, int64_t sku_id, const char *order_id, int64_t user_id,
                       int32_t qty, const char *reason, int64_t now_ms, int *given, char *errbuf,
                       size_t errlen) {
    return sp_stock_give_back_on_shard(c, sku_id, 0, order_id, user_id, qty, reason, now_ms, given,
                                       errbuf, errlen);
}

int sp_stock_resv_drop(sp_redis *c, int64_t sku_id, const char *const *order_ids,
                       const char *const *values, size_t n, int *dropped, char *errbuf,
                       size_t errlen) {
    return sp_stock_resv_drop_on_shard(c, sku_id, 0, order_ids, values, n, dropped, errbuf, errlen);
}

/* FNV-1a, 64 bits: a short fingerprint of a text. */
static uint64_t fnv1a64(const char *s) {
    uint64_t h = UINT64_C(14695981039346656037);
    for (; *s; s++) h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    return h;
}

/* reconcile_pause.lua on shard `shard` of a sale over nshards (1: unsharded, no gen). The
 * rebuild's generation is the token's fingerprint (16 hex digits: bounded and blank-free, whatever
 * WORKER_ID is), the same on every shard of the sale. */
static void reconcile_pause_call(sp_script_call *call, int64_t sku_id, int shard, int nshards,
                                 const char *token, int32_t per_user_limit, int32_t pay_timeout_s,
                                 int64_t supplied) {
    sp_script_call_init(call, &script_reconcile_pause, 1);
    shard_key_arg(call, sku_id, shard, "sale");
    sp_script_call_arg(call, "%s", token);
    sp_script_call_arg(call, "%" PRId32, per_user_limit);
    sp_script_call_arg(call, "%" PRId32, pay_timeout_s);
    sp_script_call_arg(call, "%" PRId64, supplied);
    if (nshards > 1) {
        sp_script_call_arg(call, "%016" PRIx64, fnv1a64(token));
        sp_script_call_arg(call, "%d", nshards);
    }
}

int sp_stock_reconcile_pause_on_shard(sp_redis *c, int64_t sku_id, int shard, int nshards,
                                      const char *token, int32_t per_user_limit,
                                      int32_t pay_timeout_s, int64_t supplied, char *errbuf,
                                      size_t errlen) {
    sp_script_call call;
    long long v;
    reconcile_pause_call(&call, sku_id, shard, nshards, token, per_user_limit, pay_timeout_s,
                         supplied);
    return run_integer(c, &call, &v, errbuf, errlen);
}

int sp_stock_reconcile_pause(sp_redis *c, int64_t sku_id, const char *token, int32_t per_user_limit,
                             int32_t pay_timeout_s, int64_t supplied, char *errbuf, size_t errlen) {
    return sp_stock_reconcile_pause_on_shard(c, sku_id, 0, 1, token, per_user_limit, pay_timeout_s,
                                             supplied, errbuf, errlen);
}

/* One pipelined round of sp_stock_reconcile_pause_many; *noscript set when the server had lost
 * the script (the caller loads it and sends the round again). */
static int pause_round(sp_redis *c, const sp_pause_sale *sales, size_t n, const char *token,
                       int *noscript, char *errbuf, size_t errlen) {
    enum { ROUND = 64 }; /* shards per pipelined round trip */
    *noscript = 0;
    int rc = 0;
    size_t sale = 0;
    int shard = 0;
    while (sale < n) {
        sp_script_call call[ROUND];
        const char *argv[ROUND][3 + SP_SCRIPT_ARGS_MAX];
        sp_redis_cmd cmds[ROUND];
        redisReply *replies[ROUND];
        size_t k = 0;
        for (; sale < n && k < ROUND; k++) {
            const sp_pause_sale *ps = &sales[sale];
            int nshards = ps->shards > 1 ? ps->shards : 1;
            /* the sale's supplied on shard 0; the shards of a sharded sale hold none of it */
            reconcile_pause_call(&call[k], ps->sku_id, shard, nshards, token, ps->per_user_limit,
                                 ps->pay_timeout_s, shard == 0 ? ps->supplied : 0);
            argv[k][0] = "EVALSHA", argv[k][1] = script_reconcile_pause.sha, argv[k][2] = "1";
            for (int a = 0; a < call[k].argc; a++) argv[k][3 + a] = call[k].argv[a];
            cmds[k] = (sp_redis_cmd){.key = call[k].argv[0],
                                     .argc = 3 + call[k].argc,
                                     .argv = argv[k]};
            if (++shard >= nshards) shard = 0, sale++;
        }
        if (sp_redis_pipeline(c, k, cmds, replies, errbuf, errlen) != 0) return -1;
        for (size_t i = 0; i < k; i++) {
            redisReply *r = replies[i];
            if (sp_redis_is_noscript(r)) {
                *noscript = 1;
                rc = -1;
            } else if (rc == 0 && r->type != REDIS_REPLY_INTEGER) {
                snprintf(errbuf, errlen, "reconcile_pause: %s",
                         r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
                rc = -1;
            }
            freeReplyObject(r);
        }
    }
    return rc;
}

int sp_stock_reconcile_pause_many(sp_redis *c, const sp_pause_sale *sales, size_t n,
                                  const char *token, char *errbuf, size_t errlen) {
    int noscript = 1;
    if (n == 0) return 0;
    /* A server that lost its data may have lost its script cache too (a restart, SCRIPT FLUSH):
     * the script is loaded again and the round sent once more (a pause is idempotent). */
    for (int attempt = 0; attempt < 2 && noscript; attempt++) {
        if ((attempt > 0 || script_reconcile_pause.sha[0] == '\0') &&
            sp_redis_script_load(c, &script_reconcile_pause, errbuf, errlen) != 0)
            return -1;
        if (pause_round(c, sales, n, token, &noscript, errbuf, errlen) == 0) return 0;
    }
    if (noscript) snprintf(errbuf, errlen, "reconcile_pause: NOSCRIPT after loading the script");
    return -1;
}

/* An integer element of a reply array (Lua numbers come back as integers, strings as strings). */
static int reply_int(const redisReply *e, int64_t *v) {
    char *end;
    if (e->type == REDIS_REPLY_INTEGER) {
        *v = e->integer;
        return 0;
    }
    if (e->type != REDIS_REPLY_STRING) return -1;
    long long x = strtoll(e->str, &end, 10);
    if (end == e->str || *end != '\0') return -1;
    *v = x;
    return 0;
}

int sp_stock_reconcile_apply(sp_redis *c, int64_t sku_id, const char *token, int64_t pg_stock,
                             int64_t pg_supplied, int32_t per_user_limit, int32_t pay_timeout_s,
                             int *owned, int64_t *stock, int64_t *inflight, sp_vanished **vanished,
                             size_t *nvanished, char *errbuf, size_t errlen) {
    return sp_stock_reconcile_apply_on_shard(c, sku_id, 0, token, pg_stock, pg_supplied,
                                             per_user_limit, pay_timeout_s, owned, stock, inflight,
                                             vanished, nvanished, errbuf, errlen);
}

int sp_stock_reconcile_apply_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                      int64_t pg_stock, int64_t pg_supplied, int32_t per_user_limit,
                                      int32_t pay_timeout_s, int *owned, int64_t *stock,
                                      int64_t *inflight, sp_vanished **vanished, size_t *nvanished,
                                      char *errbuf, size_t errlen) {
    sp_script_call call;
    sp_vanished *list = NULL;
    int64_t first = 0, second = 0;
    int rc = -1;
    sp_script_call_init(&call, &script_reconcile_apply, 5);
    shard_key_arg(&call, sku_id, shard, "sale");
    shard_key_arg(&call, sku_id, shard, "users");
    shard_key_arg(&call, sku_id, shard, "resv");
    shard_key_arg(&call, sku_id, shard, "users_rebuild");
    shard_key_arg(&call, sku_id, shard, "resv_staged");
    sp_script_call_arg(&call, "%s", token);
    sp_script_call_arg(&call, "%" PRId64, pg_stock);
    sp_script_call_arg(&call, "%" PRId64, pg_supplied);
    sp_script_call_arg(&call, "%" PRId32, per_user_limit);
    sp_script_call_arg(&call, "%" PRId32, pay_timeout_s);
    redisReply *r = sp_redis_call(c, &call, errbuf, errlen);
    if (r == NULL) return -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 || reply_int(r->element[0], &first) != 0) {
        snprintf(errbuf, errlen, "script reconcile_apply: %s",
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        goto out;
    }
    if (first < 0) { /* the pause is not ours any more */
        *owned = 0;
        rc = 0;
        goto out;
    }
    if (r->elements < 2 || (r->elements - 2) % 3 != 0 || reply_int(r->element[1], &second) != 0) {
        snprintf(errbuf, errlen, "script reconcile_apply: unexpected reply");
        goto out;
    }
    size_t n = (r->elements - 2) / 3;
    if (n > 0 && (list = calloc(n, sizeof(*list))) == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const redisReply *id = r->element[2 + 3 * i];
        int64_t user = 0, qty = 0;
        if (id->type != REDIS_REPLY_STRING || reply_int(r->element[3 + 3 * i], &user) != 0 ||
            reply_int(r->element[4 + 3 * i], &qty) != 0) {
            snprintf(errbuf, errlen, "script reconcile_apply: unexpected vanished entry");
            goto out;
        }
        snprintf(list[i].order_id, sizeof(list[i].order_id), "%s", id->str);
        list[i].user_id = user;
        list[i].qty = (int32_t)qty;
    }
    *owned = 1;
    *stock = first;
    *inflight = second;
    *vanished = list;
    *nvanished = n;
    list = NULL;
    rc = 0;
out:
    free(list);
    freeReplyObject(r);
    return rc;
}

int sp_stock_reconcile_open(sp_redis *c, int64_t sku_id, const char *token, int *owned,
                            char *errbuf, size_t errlen) {
    return sp_stock_reconcile_open_on_shard(c, sku_id, 0, token, owned, errbuf, errlen);
}

int sp_stock_reconcile_open_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                     int *owned, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_script_call_init(&call, &script_reconcile_open, 1);
    shard_key_arg(&call, sku_id, shard, "sale");
    sp_script_call_arg(&call, "%s", token);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *owned = (int)v;
    return 0;
}

int sp_stock_reconcile_adjust(sp_redis *c, int64_t sku_id, const char *token, int64_t user_id,
                              int32_t qty, int *owned, int64_t *stock, char *errbuf,
                              size_t errlen) {
    return sp_stock_reconcile_adjust_on_shard(c, sku_id, 0, token, user_id, qty, owned, stock,
                                              errbuf, errlen);
}

int sp_stock_reconcile_adjust_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                       int64_t user_id, int32_t qty, int *owned, int64_t *stock,
                                       char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_script_call_init(&call, &script_reconcile_adjust, 2);
    shard_key_arg(&call, sku_id, shard, "sale");
    shard_key_arg(&call, sku_id, shard, "users");
    sp_script_call_arg(&call, "%s", token);
    sp_script_call_arg(&call, "%" PRId64, user_id);
    sp_script_call_arg(&call, "%" PRId32, qty);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *owned = v >= 0;
    if (v >= 0) *stock = v;
    return 0;
}

int sp_stock_reconcile_stage(sp_redis *c, int64_t sku_id, const char *token, sp_stage_what what,
                             const char *const *fields, const char *const *values, size_t n,
                             int *owned, char *errbuf, size_t errlen) {
    return sp_stock_reconcile_stage_on_shard(c, sku_id, 0, token, what, fields, values, n, owned,
                                             errbuf, errlen);
}

int sp_stock_reconcile_stage_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                      sp_stage_what what, const char *const *fields,
                                      const char *const *values, size_t n, int *owned, char *errbuf,
                                      size_t errlen) {
    enum { PAIRS = 250 }; /* 3 keys + 2 + 2 * 250 arguments: within SP_REDIS_SCRIPT_ARGV_MAX */
    _Static_assert(3 + 2 + 2 * PAIRS <= SP_REDIS_SCRIPT_ARGV_MAX, "a stage call must be sendable");
    static const char *const target[] = {"users_rebuild", "users_rebuild", "resv_staged",
                                         "returned", "restocks"};
    static const char *const op[] = {"clear", "hset", "hset", "hsetnx", "hsetnx"};
    char key1[SP_STOCK_KEY_MAX], key2[SP_STOCK_KEY_MAX], key3[SP_STOCK_KEY_MAX];
    const char *argv[3 + 2 + 2 * PAIRS];
    size_t argvlen[3 + 2 + 2 * PAIRS];
    int nkeys = what == SP_STAGE_CLEAR ? 3 : 2;
    sp_stock_shard_key(key1, sku_id, shard, "sale");
    sp_stock_shard_key(key2, sku_id, shard, target[what]);
    sp_stock_shard_key(key3, sku_id, shard, "resv_staged");
    argv[0] = key1, argv[1] = key2, argv[2] = key3;
    argv[nkeys] = token, argv[nkeys + 1] = op[what];
    *owned = 1;
    size_t i = 0;
    do { /* at least once: a clear has no pairs */
        size_t k = n - i < PAIRS ? n - i : PAIRS;
        int argc = nkeys + 2;
        for (size_t j = 0; j < k; j++) {
            argv[argc++] = fields[i + j];
            argv[argc++] = values[i + j];
        }
        for (int a = 0; a < argc; a++) argvlen[a] = strlen(argv[a]);
        redisReply *r = sp_redis_evalsha(c, &script_reconcile_stage, nkeys, argc, argv, argvlen,
                                         errbuf, errlen);
        if (r == NULL) return -1;
        long long v;
        int rc = sp_stock_integer_parse(r, "reconcile_stage", &v, errbuf, errlen);
        freeReplyObject(r);
        if (rc != 0) return -1;
        if (v < 0) {
            *owned = 0;
            return 0;
        }
        i += k;
    } while (i < n);
    return 0;
}

/* ---- stock transfers between the shards of a sharded sale (issue 17 part 3) ---- */

void sp_stock_shard_take_call(sp_script_call *call, const sp_shard_transfer *t, int64_t want) {
    sp_script_call_init(call, &script_shard_take, 2);
    shard_key_arg(call, t->sku_id, t->from, "sale");
    shard_key_arg(call, t->sku_id, t->from, "xfer");
    sp_script_call_arg(call, "%s", t->id);
    sp_script_call_arg(call, "%d", t->to);
    sp_script_call_arg(call, "%" PRId64, want);
    sp_script_call_arg(call, "%s", t->gen);
}

int sp_stock_shard_take_parse(const redisReply *r, int64_t *taken, int64_t *take_ts_ms,
                              char *errbuf, size_t errlen) {
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER) {
        snprintf(errbuf, errlen, "script shard_take: %s",
                 r == NULL                      ? "no reply"
                 : r->type == REDIS_REPLY_ERROR ? r->str
                                                : "unexpected reply");
        return -1;
    }
    *taken = r->element[0]->integer;
    *take_ts_ms = r->element[1]->integer;
    return 0;
}

int sp_stock_shard_take(sp_redis *c, const sp_shard_transfer *t, int64_t want, int64_t *taken,
                        int64_t *take_ts_ms, char *errbuf, size_t errlen) {
    sp_script_call call;
    sp_stock_shard_take_call(&call, t, want);
    redisReply *r = sp_redis_call(c, &call, errbuf, errlen);
    if (r == NULL) return -1;
    int rc = sp_stock_shard_take_parse(r, taken, take_ts_ms, errbuf, errlen);
    freeReplyObject(r);
    return rc;
}

void sp_stock_shard_give_call(sp_script_call *call, const sp_shard_transfer *t, int64_t units,
                              int64_t take_ts_ms, int64_t max_age_ms) {
    sp_script_call_init(call, &script_shard_give, 2);
    shard_key_arg(call, t->sku_id, t->to, "sale");
    shard_key_arg(call, t->sku_id, t->to, "xfer");
    sp_script_call_arg(call, "%s", t->id);
    sp_script_call_arg(call, "%d", t->from);
    sp_script_call_arg(call, "%" PRId64, units);
    sp_script_call_arg(call, "%" PRId64, take_ts_ms);
    sp_script_call_arg(call, "%s", t->gen);
    sp_script_call_arg(call, "%" PRId64, max_age_ms);
}

int sp_stock_shard_give(sp_redis *c, const sp_shard_transfer *t, int64_t units, int64_t take_ts_ms,
                        int64_t max_age_ms, int64_t *given, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    sp_stock_shard_give_call(&call, t, units, take_ts_ms, max_age_ms);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *given = v;
    return 0;
}

/* shard_done.lua on `shard` for t: a settle (back 0) or an abort (back 1). */
static void shard_done_call(sp_script_call *call, const sp_shard_transfer *t, int shard,
                            int64_t min_age_ms, int back) {
    sp_script_call_init(call, &script_shard_done, 2);
    shard_key_arg(call, t->sku_id, shard, "sale");
    shard_key_arg(call, t->sku_id, shard, "xfer");
    sp_script_call_arg(call, "%s", t->id);
    sp_script_call_arg(call, "%" PRId64, min_age_ms);
    sp_script_call_arg(call, "%d", back);
}

void sp_stock_shard_settle_call(sp_script_call *call, const sp_shard_transfer *t) {
    shard_done_call(call, t, t->from, 0, 0);
}

static int shard_done(sp_redis *c, const sp_shard_transfer *t, int shard, int64_t min_age_ms,
                      int back, int64_t *units, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    shard_done_call(&call, t, shard, min_age_ms, back);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *units = v;
    return 0;
}

int sp_stock_shard_done(sp_redis *c, const sp_shard_transfer *t, int shard, int64_t min_age_ms,
                        int64_t *units, char *errbuf, size_t errlen) {
    return shard_done(c, t, shard, min_age_ms, 0, units, errbuf, errlen);
}

int sp_stock_shard_abort(sp_redis *c, const sp_shard_transfer *t, int64_t min_age_ms,
                         int64_t *units, char *errbuf, size_t errlen) {
    return shard_done(c, t, t->from, min_age_ms, 1, units, errbuf, errlen);
}

int sp_stock_home_shard(int64_t user_id, int nshards) {
    return nshards > 1 ? (int)((uint64_t)user_id % (uint64_t)nshards) : 0;
}

int sp_stock_open_sharded(sp_redis *c, const sp_sharded_sale *sale, int64_t stock,
                          int32_t per_user_limit, int32_t pay_timeout_s, int *opened, char *errbuf,
                          size_t errlen) {
    int n = sale->nshards;
    if (n < 1 || n > SP_SHARDS_MAX || stock < 0) {
        snprintf(errbuf, errlen, "open: %d shards, stock %" PRId64 ": out of range", n, stock);
        return -1;
    }
    *opened = 0;
    for (int k = 0; k < n; k++) {
        sp_script_call call;
        long long v;
        sp_stock_open_shard_call(&call, sale->sku_id, k, n, stock, per_user_limit, pay_timeout_s,
                                 sale->gen, "");
        if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
        *opened += (int)v;
    }
    return 0;
}

int sp_stock_shard_read_parse(const redisReply *r, int64_t *units, int64_t *ver, char *errbuf,
                              size_t errlen) {
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 5) {
        snprintf(errbuf, errlen, "shard read: %s",
                 r == NULL                      ? "no reply"
                 : r->type == REDIS_REPLY_ERROR ? r->str
                                                : "unexpected reply");
        return -1;
    }
    int64_t v[3] = {0, 0, 0};
    for (int f = 0; f < 3; f++)
        if (r->element[f]->type == REDIS_REPLY_STRING) v[f] = strtoll(r->element[f]->str, NULL, 10);
    *units = (v[0] > 0 ? v[0] : 0) + (v[1] > 0 ? v[1] : 0);
    /* a rebuild since the other read (another generation) changes it too */
    *ver = (int64_t)((uint64_t)v[2] ^
                     fnv1a64(r->element[4]->type == REDIS_REPLY_STRING ? r->element[4]->str : ""));
    return r->element[3]->type == REDIS_REPLY_STRING ? 1 : 0; /* paused by a reconcile */
}

/* The consumer's corrections on an order's home shard, under a sale's shards as above. */

static int shard_in_range(int shard, char *errbuf, size_t errlen) {
    if (shard >= 0 && shard < SP_SHARDS_MAX) return 1;
    snprintf(errbuf, errlen, "shard %d: out of range 0..%d", shard, SP_SHARDS_MAX - 1);
    return 0;
}

/* sp_stock_resv_drop on shard `shard`: its `resv`, and the keys its 'r:' entries name (the
 * shard's own: the same hash tag, so the same slot). */
int sp_stock_resv_drop_on_shard(sp_redis *c, int64_t sku_id, int shard,
                                const char *const *order_ids, const char *const *values, size_t n,
                                int *dropped, char *errbuf, size_t errlen) {
    enum { CHUNK = 100 }; /* 1 + 100 keys + 3 * 100 arguments: within SP_REDIS_SCRIPT_ARGV_MAX */
    const char *keys[1 + CHUNK], *args[3 * CHUNK];
    size_t keyslen[1 + CHUNK], argslen[3 * CHUNK];
    char key[SP_STOCK_KEY_MAX], index[CHUNK][12];
    const char *argv[1 + 4 * CHUNK];
    size_t argvlen[1 + 4 * CHUNK];
    int total = 0;
    sp_stock_shard_key(key, sku_id, shard, "resv");
    for (size_t i = 0; i < n; i += CHUNK) {
        size_t k = n - i < CHUNK ? n - i : CHUNK;
        int nkeys = 1, nargs = 0;
        keys[0] = key, keyslen[0] = strlen(key);
        for (size_t j = 0; j < k; j++) {
            const char *idem = entry_idem_key(values[i + j]);
            if (idem) keys[nkeys] = idem, keyslen[nkeys] = strlen(idem), nkeys++;
            snprintf(index[j], sizeof(index[j]), "%d", idem ? nkeys : 0);
            args[nargs] = order_ids[i + j], argslen[nargs++] = strlen(order_ids[i + j]);
            args[nargs] = values[i + j], argslen[nargs++] = strlen(values[i + j]);
            args[nargs] = index[j], argslen[nargs++] = strlen(index[j]);
        }
        int argc = 0;
        for (int x = 0; x < nkeys; x++, argc++) argv[argc] = keys[x], argvlen[argc] = keyslen[x];
        for (int x = 0; x < nargs; x++, argc++) argv[argc] = args[x], argvlen[argc] = argslen[x];
        redisReply *r = sp_redis_evalsha(c, &script_resv_drop, nkeys, argc, argv, argvlen, errbuf,
                                         errlen);
        if (r == NULL) return -1;
        long long v;
        int rc = sp_stock_integer_parse(r, "resv_drop", &v, errbuf, errlen);
        freeReplyObject(r);
        if (rc != 0) return -1;
        total += (int)v;
    }
    *dropped = total;
    return 0;
}

int sp_stock_rejected_forget_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *order_id,
                                      int64_t user_id, int32_t qty, int *units, char *errbuf,
                                      size_t errlen) {
    sp_script_call call;
    long long v;
    if (!shard_in_range(shard, errbuf, errlen)) return -1;
    sp_script_call_init(&call, &script_rejected_forget, 2);
    shard_key_arg(&call, sku_id, shard, "resv");
    shard_key_arg(&call, sku_id, shard, "users");
    sp_script_call_arg(&call, "%s", order_id);
    sp_script_call_arg(&call, "%" PRId64, user_id);
    sp_script_call_arg(&call, "%" PRId32, qty);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *units = (int)v;
    return 0;
}

int sp_stock_accepted_forget_on_shard(sp_redis *c, int64_t sku_id, int shard,
                                      const char *const *order_ids, size_t n, char *errbuf,
                                      size_t errlen) {
    enum { CHUNK = 512 }; /* ids per HMGET / HDEL: bounded argv, few round trips */
    const char *argv[CHUNK + 2], *pending_ids[CHUNK], *pending_vals[CHUNK];
    char key[SP_STOCK_KEY_MAX];
    if (!shard_in_range(shard, errbuf, errlen)) return -1;
    sp_stock_shard_key(key, sku_id, shard, "resv");
    argv[1] = key;
    for (size_t i = 0; i < n; i += CHUNK) {
        size_t k = n - i < CHUNK ? n - i : CHUNK, npending = 0, ndel = 0;
        /* Which entries are still 'r:' with a key: their producers died between Kafka's ack and
         * the confirm, and the keys still say pending. resv_drop.lua settles those. */
        argv[0] = "HMGET";
        memcpy(&argv[2], &order_ids[i], k * sizeof(*argv));
        redisReply *got = sp_redis_argv(c, key, (int)k + 2, argv, NULL, errbuf, errlen);
        if (got == NULL) return -1;
        if (got->type != REDIS_REPLY_ARRAY || got->elements != k) {
            snprintf(errbuf, errlen, "HMGET %s: %s", key,
                     got->type == REDIS_REPLY_ERROR ? got->str : "unexpected reply");
            freeReplyObject(got);
            return -1;
        }
        argv[0] = "HDEL";
        for (size_t j = 0; j < k; j++) {
            const redisReply *e = got->element[j];
            if (e->type == REDIS_REPLY_STRING && entry_idem_key(e->str) != NULL)
                pending_ids[npending] = order_ids[i + j], pending_vals[npending++] = e->str;
            else
                argv[2 + ndel++] = order_ids[i + j];
        }
        int dropped, rc = 0;
        if (npending > 0)
            rc = sp_stock_resv_drop_on_shard(c, sku_id, shard, pending_ids, pending_vals, npending,
                                             &dropped, errbuf, errlen);
        freeReplyObject(got);
        if (rc != 0) return -1;
        if (ndel == 0) continue;
        redisReply *r = sp_redis_argv(c, key, (int)ndel + 2, argv, NULL, errbuf, errlen);
        if (r == NULL) return -1;
        if (r->type == REDIS_REPLY_ERROR) {
            snprintf(errbuf, errlen, "HDEL %s: %s", key, r->str);
            freeReplyObject(r);
            return -1;
        }
        freeReplyObject(r);
    }
    return 0;
}

/* ---- the units a sharded sale holds, and its cap (the consumer's, the audit's) ---- */

/* One shard's transfers in a sp_stock_sharded_read: its open "out:" records of generation gen
 * whose recipient holds the "in:" record, their units added to *given. */
static int shard_given(sp_redis *c, int64_t sku_id, int shard, int nshards, const char *gen,
                       int64_t *given, char *errbuf, size_t errlen) {
    char key[SP_STOCK_KEY_MAX], cursor[32] = "0";
    sp_stock_shard_key(key, sku_id, shard, "xfer");
    do {
        redisReply *r = sp_redis_command(c, key, errbuf, errlen, "HSCAN %s %s COUNT 200", key,
                                         cursor);
        if (r == NULL) return -1;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
            r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY) {
            snprintf(errbuf, errlen, "HSCAN %s: %s", key,
                     r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
            freeReplyObject(r);
            return -1;
        }
        snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
        const redisReply *kv = r->element[1];
        for (size_t i = 0; i + 1 < kv->elements; i += 2) {
            const redisReply *id = kv->element[i], *value = kv->element[i + 1];
            int to = -1, n = 0;
            long long units = 0, ts = 0;
            char its_gen[64] = "";
            if (id->type != REDIS_REPLY_STRING || value->type != REDIS_REPLY_STRING ||
                strncmp(value->str, "out:", 4) != 0)
                continue;
            n = sscanf(value->str, "out:%d:%lld:%lld:%63s", &to, &units, &ts, its_gen);
            if (n < 3 || to < 0 || to >= nshards || to == shard || units <= 0 ||
                strcmp(its_gen, gen) != 0)
                continue; /* its units are not this generation's `moving` */
            char in_key[SP_STOCK_KEY_MAX];
            sp_stock_shard_key(in_key, sku_id, to, "xfer");
            redisReply *in = sp_redis_command(c, in_key, errbuf, errlen, "HGET %s %s", in_key,
                                              id->str);
            if (in == NULL) {
                freeReplyObject(r);
                return -1;
            }
            if (in->type == REDIS_REPLY_STRING && strncmp(in->str, "in:", 3) == 0) *given += units;
            freeReplyObject(in);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

int sp_stock_sharded_read(sp_redis *c, int64_t sku_id, int nshards, sp_sharded_units *out,
                          char *errbuf, size_t errlen) {
    sp_sharded_units u = {.missing = -1};
    char gens[SP_SHARDS_MAX][64];
    if (nshards < 2 || nshards > SP_SHARDS_MAX) {
        snprintf(errbuf, errlen, "sharded read: %d shards: out of range 2..%d", nshards,
                 SP_SHARDS_MAX);
        return -1;
    }
    for (int k = 0; k < nshards; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, sku_id, k, "sale");
        redisReply *r = sp_redis_command(c, key, errbuf, errlen,
                                         "HMGET %s stock moving supplied paused gen ver", key);
        if (r == NULL) return -1;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 6) {
            snprintf(errbuf, errlen, "HMGET %s: %s", key,
                     r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
            freeReplyObject(r);
            return -1;
        }
        redisReply *const *f = r->element;
        if (f[0]->type != REDIS_REPLY_STRING && u.missing < 0) u.missing = k;
        if (f[0]->type == REDIS_REPLY_STRING) u.units += strtoll(f[0]->str, NULL, 10);
        if (f[1]->type == REDIS_REPLY_STRING) u.units += strtoll(f[1]->str, NULL, 10);
        if (f[2]->type == REDIS_REPLY_STRING)
            u.supplied += strtoll(f[2]->str, NULL, 10);
        else
            u.nunsupplied++;
        if (f[3]->type == REDIS_REPLY_STRING) u.paused++;
        snprintf(gens[k], sizeof(gens[k]), "%s", f[4]->type == REDIS_REPLY_STRING ? f[4]->str : "");
        u.steps = u.steps * UINT64_C(1099511628211) + fnv1a64(gens[k]) +
                  (uint64_t)(f[5]->type == REDIS_REPLY_STRING ? strtoll(f[5]->str, NULL, 10) : 0);
        freeReplyObject(r);
    }
    for (int k = 0; k < nshards; k++)
        if (shard_given(c, sku_id, k, nshards, gens[k], &u.given, errbuf, errlen) != 0) return -1;
    u.units -= u.given;
    snprintf(u.gen, sizeof(u.gen), "%s", gens[0]);
    *out = u;
    return 0;
}

int sp_stock_cap_shard_lower(sp_redis *c, int64_t sku_id, int shard, int64_t most, const char *gen,
                             int64_t *removed, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    if (!shard_in_range(shard, errbuf, errlen)) return -1;
    sp_script_call_init(&call, &script_cap, 1);
    shard_key_arg(&call, sku_id, shard, "sale");
    sp_script_call_arg(&call, "lower");
    sp_script_call_arg(&call, "%" PRId64, most);
    sp_script_call_arg(&call, "%s", gen);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *removed = v;
    return 0;
}

int sp_stock_give_back_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *order_id,
                                int64_t user_id, int32_t qty, const char *reason, int64_t now_ms,
                                int *given, char *errbuf, size_t errlen) {
    sp_script_call call;
    long long v;
    char resv[SP_STOCK_KEY_MAX];
    if (!shard_in_range(shard, errbuf, errlen)) return -1;
    /* The Idempotency-Key the entry names (the shard's own), read first so the script can
     * declare it. */
    sp_stock_shard_key(resv, sku_id, shard, "resv");
    redisReply *entry = sp_redis_command(c, resv, errbuf, errlen, "HGET %s %s", resv, order_id);
    if (entry == NULL) return -1;
    if (entry->type == REDIS_REPLY_ERROR) {
        snprintf(errbuf, errlen, "HGET %s: %s", resv, entry->str);
        freeReplyObject(entry);
        return -1;
    }
    const char *idem = entry->type == REDIS_REPLY_STRING ? entry_idem_key(entry->str) : NULL;
    sp_script_call_init(&call, &script_give_back, idem ? 5 : 4);
    shard_key_arg(&call, sku_id, shard, "sale");
    shard_key_arg(&call, sku_id, shard, "users");
    shard_key_arg(&call, sku_id, shard, "resv");
    shard_key_arg(&call, sku_id, shard, "returned");
    if (idem) sp_script_call_arg(&call, "%s", idem);
    freeReplyObject(entry);
    sp_script_call_arg(&call, "%s", order_id);
    sp_script_call_arg(&call, "%" PRId64, user_id);
    sp_script_call_arg(&call, "%" PRId32, qty);
    sp_script_call_arg(&call, "%" PRId64, now_ms);
    sp_script_call_arg(&call, "%s", reason);
    if (run_integer(c, &call, &v, errbuf, errlen) != 0) return -1;
    *given = (int)v;
    return 0;
}
