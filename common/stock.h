/* stock.h - the Redis side of a sale: its keys, and the Lua scripts that open, restock, reserve,
 *           confirm, release and cap, each one atomic and one round trip.
 *
 * Every key of one SKU carries the hash tag {sku:ID}, so a SKU lives in one Redis Cluster slot and
 * one script may touch all of its keys:
 *   {sku:ID}:sale          hash  stock (what may still be admitted), limit, pay_timeout_s,
 *                                supplied (units ever put on sale: open + restocks)
 *   {sku:ID}:users         hash  user_id -> units the user holds
 *   {sku:ID}:resv          hash  order_id -> "r:user:qty:ts_ms:idem_key" (ts_ms: Redis's TIME)
 * while Kafka has not answered, then "a:user:qty:ts_ms" (accepted: in Kafka, maybe not yet in
 * PostgreSQL) until the consumer has stored the order {sku:ID}:idem:USER:KEY string
 * "state:order_id" for an Idempotency-Key, with a TTL {sku:ID}:opening       string the token of
 * the open that may publish the SKU's stock.set, with a TTL (sale_claim.lua), until the sale is
 * open and the reaper's (docs/reaper.md): {sku:ID}:returned      hash  order_id -> ms:
 * return-ledger rows given back to Redis whose PostgreSQL stamp may still be missing (the
 * exactly-once guard) {sku:ID}:users_rebuild hash  a reconcile's per-user counts, before they
 * replace users {sku:ID}:resv_staged   hash  the resv entries a reconcile's snapshot did not know
 * See docs/reservation.md for the life of a reservation.
 */
#ifndef SP_STOCK_H
#define SP_STOCK_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>

#include "event.h"
#include "redis_store.h"

#define SP_IDEM_KEY_MAX       SP_REQUEST_ID_MAX /* bytes of an Idempotency-Key (a request id) */
#define SP_IDEM_TTL_S         (24 * 3600) /* default IDEM_TTL_S: how long a key pins an order */
#define SP_IDEM_REFUSAL_TTL_S 30 /* default IDEM_REFUSAL_TTL_S: how long it pins a refusal */

/* "Redis holds every sale PostgreSQL has": the reaper writes this key (its epoch as the value)
 * on every primary (sp_redis_key_on: SP_STOCK_REBUILT_KEY:{N} on each primary of a cluster) when
 * a reconcile of every SKU has finished, and whenever it finds Redis unchanged since the last one
 * (reaper/reconcile.c). A primary that lost its data has lost its copy too, and it comes back
 * only once every sale is rebuilt: while the copy on a missing sale's own primary is missing, the
 * sale may be one the reaper has yet to rebuild, so the producer answers "recovering", not
 * "unknown_sku". */
#define SP_STOCK_REBUILT_KEY "stockpipe:reaper:rebuilt"

/* How long an Idempotency-Key pins its answer: ttl_s for an order (pending, then accepted),
 * refusal_ttl_s for sold_out and limit_exceeded (0: a refusal is not pinned, a retry is decided
 * afresh, e.g. after a restock). ttl_s is also how long restock.lua remembers a restock's request
 * id. Process-wide; set once at start-up, before other threads run. */
void sp_stock_idem_ttls(int32_t ttl_s, int32_t refusal_ttl_s);

typedef enum sp_reserve_outcome {
    SP_RESERVE_OK = 0,      /* reserved under the new order id */
    SP_RESERVE_DUP,         /* the idempotency key was used before: see dup_state, order_id */
    SP_RESERVE_UNKNOWN_SKU, /* no sale open for this SKU */
    SP_RESERVE_SOLD_OUT,
    SP_RESERVE_LIMIT,      /* the user's units would pass per_user_limit */
    SP_RESERVE_RECOVERING, /* a reconcile has the sale paused (rebuilding it from PostgreSQL):
                            * nothing changed, the Idempotency-Key is not pinned; try later */
    SP_RESERVE_MOVED,      /* a sharded sale, and the buyer's home is another shard: nothing
                            * changed; send it to sp_stock_home_shard(user_id, nshards) */
} sp_reserve_outcome;

typedef struct sp_reserve_request {
    int64_t sku_id;
    int64_t user_id;
    int32_t qty;
    int64_t ts_ms; /* the producer's clock: the order's time in its event (the reservation entry
                    * carries Redis's own time instead, see reserve.lua) */
    char order_id[SP_ORDER_ID_MAX + 1]; /* fresh, unique: used only if the outcome is OK */
    char idem_key[SP_IDEM_KEY_MAX + 1]; /* empty: no Idempotency-Key */
    int32_t shard; /* a sharded sale: the buyer's home shard (sp_stock_home_shard); 0 otherwise */
} sp_reserve_request;

typedef struct sp_reserve_result {
    sp_reserve_outcome outcome;
    char order_id[SP_ORDER_ID_MAX + 1]; /* OK: the new order (filled by sp_stock_reserve and
                                         * _batch; the reply does not repeat it, so
                                         * sp_stock_reserve_parse leaves it empty); DUP: the first
                                         * attempt's (may be empty) */
    char dup_state[16];    /* DUP: "pending", "accepted", "sold_out" or "limit_exceeded" */
    int64_t stock_left;    /* OK, SOLD_OUT, LIMIT: stock after the call */
    int32_t pay_timeout_s; /* OK: the sale's, for the order's deadline */
    int32_t nshards;       /* answered by a shard of a sharded sale: the sale's shards (its
                            * SOLD_OUT is that shard's only, never pinned); 0 otherwise */
    char gen[64];          /* with nshards: the sale's generation */
} sp_reserve_result;

/* True when s is an acceptable Idempotency-Key (1..SP_IDEM_KEY_MAX printable ASCII, no blanks). */
int sp_idem_key_valid(const char *s);

/* Opens the sale (stock, per-user limit, pay timeout) unless it is open already: *opened is 1 when
 * this call opened it, 0 when it existed (nothing changed). */
int sp_stock_open(sp_redis *c, int64_t sku_id, int64_t stock, int32_t per_user_limit,
                  int32_t pay_timeout_s, int *opened, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* What restock.lua did with a request. */
typedef enum sp_restock_status {
    SP_RESTOCK_PAUSED = -2,  /* a reconcile has the sale paused: nothing added, try later */
    SP_RESTOCK_NO_SALE = -1, /* the SKU is not open in Redis: nothing added */
    SP_RESTOCK_SEEN = 0,     /* the request id was applied (or counted by a reconcile) before */
    SP_RESTOCK_APPLIED = 1,  /* this call added the units */
} sp_restock_status;

/* Adds units once per (SKU, request id) (restock.lua); *stock is the sale's stock after the
 * request's apply (-1 for PAUSED and NO_SALE). -1 with errbuf only when Redis failed. */
int sp_stock_restock(sp_redis *c, int64_t sku_id, int64_t add, const char *request_id,
                     sp_restock_status *status, int64_t *stock, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
/* Reads restock.lua's reply; -1 with errbuf for an error or a malformed reply. */
int sp_stock_restock_parse(const redisReply *r, sp_restock_status *status, int64_t *stock,
                           char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* The atomic admission: idempotency key, sale open and not paused, per-user limit, stock >= qty,
 * then decrement, count the user's units and record the reservation. -1 with errbuf only when
 * Redis failed (the context must then be replaced); every business outcome is in *res. */
int sp_stock_reserve(sp_redis *c, const sp_reserve_request *req, sp_reserve_result *res,
                     char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Kafka acknowledged the order req reserved: its reservation becomes accepted (the units stay
 * sold; nothing can release them any more) and its idempotency key answers "accepted".
 * *was_reserved is 1 when the reservation was still there (0: released, or already stored by the
 * consumer). */
int sp_stock_confirm(sp_redis *c, const sp_reserve_request *req, int32_t partition, int64_t offset,
                     int *was_reserved, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Kafka definitely refused the order: gives the reservation's units back to the stock and the
 * user, exactly once (a second call, or one after confirm, returns 0 units). *qty_returned. */
int sp_stock_release(sp_redis *c, const sp_reserve_request *req, int *qty_returned, char *errbuf,
                     size_t errlen) __attribute__((warn_unused_result));

/* After a committed batch: lowers the sale's Redis stock to at most pg_stock plus the restocks
 * PostgreSQL has not applied yet (Redis `supplied` - pg_supplied); never raises it. *removed is
 * the number of units taken away (0 normally; more after Redis over-admitted). */
int sp_stock_cap(sp_redis *c, int64_t sku_id, int64_t pg_stock, int64_t pg_supplied,
                 int64_t *removed, char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* PostgreSQL refused order_id (out of stock: Redis over-admitted): drops its `resv` entry and,
 * only if the entry was still there, gives user_id's qty units back in `users`
 * (rejected_forget.lua). *units is what came back (0 the second time). */
int sp_stock_rejected_forget(sp_redis *c, int64_t sku_id, const char *order_id, int64_t user_id,
                             int32_t qty, int *units, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* The consumer stored these orders: drops their entries from {sku:ID}:resv (HDEL, chunked), so
 * the producer's confirm or release finds nothing left to do for them. An entry still 'r:' with an
 * Idempotency-Key (its producer died between Kafka's ack and the confirm) goes through
 * resv_drop.lua instead, which turns the key's "pending" into "accepted": a retry is answered with
 * the order at once, not in_progress until the key expires. */
int sp_stock_accepted_forget(sp_redis *c, int64_t sku_id, const char *const *order_ids, size_t n,
                             char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* The stock Redis holds for a SKU: 0 and *stock, or 0 and *stock = -1 when the SKU is not open. */
int sp_stock_available(sp_redis *c, int64_t sku_id, int64_t *stock, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* ---- the same calls, split for an async connection: build, send, parse ---- */

/* Loads every script of this module (SCRIPT LOAD) on every primary of a blocking connection.
 * (The producer's async calls need no loading: producer/redis_async.c names a script by its SHA-1
 * and sends its body on NOSCRIPT.) */
int sp_stock_scripts_load(sp_redis *c, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* An open is claimed before its stock.set is published (sale_claim.lua: 1 claimed, 0 the sale is
 * open already, -1 another open holds the claim), opened once the event is in the log with the
 * claim's token (sale_open.lua drops the claim), and unclaimed when Kafka definitely did not take
 * the event. Only the claim's holder publishes: two racing opens leave one stock.set. */
void sp_stock_claim_call(sp_script_call *call, int64_t sku_id, const char *token, int64_t claim_ms);
void sp_stock_open_call(sp_script_call *call, int64_t sku_id, int64_t stock, int32_t per_user_limit,
                        int32_t pay_timeout_s, const char *token);
/* Shard `shard` of a sale opened over nshards (its share of stock: stock / nshards, plus one for
 * the first stock % nshards shards) with the sale's generation gen; shard 0 last, with the
 * claim's token (it is the sale's presence for the claim and for EXISTS). */
void sp_stock_open_shard_call(sp_script_call *call, int64_t sku_id, int shard, int nshards,
                              int64_t stock, int32_t per_user_limit, int32_t pay_timeout_s,
                              const char *gen, const char *token);
void sp_stock_unclaim_call(sp_script_call *call, int64_t sku_id, const char *token);
void sp_stock_restock_call(sp_script_call *call, int64_t sku_id, int64_t add,
                           const char *request_id);
void sp_stock_reserve_call(sp_script_call *call, const sp_reserve_request *req);
/* Kafka put req's order.created at partition/offset: the accepted entry keeps that position. */
void sp_stock_confirm_call(sp_script_call *call, const sp_reserve_request *req, int32_t partition,
                           int64_t offset);
void sp_stock_release_call(sp_script_call *call, const sp_reserve_request *req);
void sp_stock_cap_call(sp_script_call *call, int64_t sku_id, int64_t pg_stock, int64_t pg_supplied);

/* Several confirms of one SKU in one script call, for a producer that gets Kafka's
 * acknowledgements in bursts. The batch points into the single calls it is given (built by
 * sp_stock_confirm_call), which must outlive it. */
#define SP_CONFIRM_BATCH_MAX 120 /* 1 + 4 * 120 argv: within SP_REDIS_SCRIPT_ARGV_MAX */
typedef struct sp_confirm_batch {
    int64_t sku_id;
    int n, nkeys, nargs;                        /* orders; keys and arguments so far */
    const char *keys[1 + SP_CONFIRM_BATCH_MAX]; /* the resv key, then the idempotency keys */
    size_t keyslen[1 + SP_CONFIRM_BATCH_MAX];
    const char *args[3 * SP_CONFIRM_BATCH_MAX]; /* (order_id, key index, position) per order */
    size_t argslen[3 * SP_CONFIRM_BATCH_MAX];
    char index[SP_CONFIRM_BATCH_MAX][12]; /* each order's key index, as text */
} sp_confirm_batch;

/* Adds one confirm (of sku_id) to b; -1 when b is full or holds another SKU's confirms. */
int sp_stock_confirm_batch_add(sp_confirm_batch *b, int64_t sku_id, const sp_script_call *one);

/* b as one call of confirm.lua: *script, and its keys then arguments in argv/argvlen (room for
 * 1 + 4 * SP_CONFIRM_BATCH_MAX); returns how many (b->nkeys of them keys). The reply is the
 * integer count of orders turned accepted. The producer sends it on its event loop's
 * connection (producer/redis_async.h). */
int sp_stock_confirm_batch_argv(const sp_confirm_batch *b, sp_redis_script **script,
                                const char **argv, size_t *argvlen);

/* Several orders of one SKU in one reserve.lua call, for a producer that takes many orders in one
 * event-loop turn: Redis runs one script instead of one per order. The batch points into the
 * requests' single calls (built by sp_stock_reserve_call), which must outlive it. */
#define SP_RESERVE_BATCH_MAX 64
typedef struct sp_reserve_batch {
    int64_t sku_id;
    int32_t shard; /* every order of a batch goes to one shard of one sale */
    int n;         /* orders in the batch */
    int nkeys, nargs;
    const char *keys[3 + SP_RESERVE_BATCH_MAX]; /* sale, users, resv, the idempotency keys */
    size_t keyslen[3 + SP_RESERVE_BATCH_MAX];
    const char *args[2 + 4 * SP_RESERVE_BATCH_MAX]; /* the two TTLs, then four per order */
    size_t argslen[2 + 4 * SP_RESERVE_BATCH_MAX];
    char index[SP_RESERVE_BATCH_MAX][12]; /* each order's key index, as text */
} sp_reserve_batch;

/* Adds the order req (its call one) to b; -1 when b is full or holds another SKU's (or another
 * shard's) orders. */
int sp_stock_reserve_batch_add(sp_reserve_batch *b, const sp_reserve_request *req,
                               const sp_script_call *one);

/* b as one call of reserve.lua, the same way (room for SP_REDIS_SCRIPT_ARGV_MAX); its reply is
 * read by sp_stock_reserve_parse, one answer per order in the order they were added. */
int sp_stock_reserve_batch_argv(const sp_reserve_batch *b, sp_redis_script **script,
                                const char **argv, size_t *argvlen);

/* The same on a blocking connection: res[i] for the i-th order of b. -1 with errbuf when Redis
 * failed or answered with an error. */
int sp_stock_reserve_batch(sp_redis *c, const sp_reserve_batch *b, sp_reserve_result *res,
                           char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Reads the answer for the i-th order (from 0) of a reserve reply ({pay_timeout_s, shards, gen,
 * answer...}, reserve.lua) into *res; -1 with errbuf for an error reply or an unexpected shape. */
int sp_stock_reserve_parse(const redisReply *r, size_t i, sp_reserve_result *res, char *errbuf,
                           size_t errlen) __attribute__((warn_unused_result));

/* Reads the integer reply of open/restock/confirm/release; -1 with errbuf otherwise. */
int sp_stock_integer_parse(const redisReply *r, const char *what, long long *v, char *errbuf,
                           size_t errlen) __attribute__((warn_unused_result));

/* ---- the reaper's scripts (docs/reaper.md) ---- */

#define SP_GIVE_BACK_NO_SALE (-1) /* the sale is not in Redis: reconcile rebuilds it */
#define SP_GIVE_BACK_PAUSED  (-2) /* a reconcile has the sale paused: try again later */

/* Gives one return-ledger row (reason "expired" or "voided") back to Redis (give_back.lua):
 * stock += qty, the user's count -= qty, the order's leftover 'r:' entry and its idempotency key
 * dropped, all guarded by the order's marker in {sku:ID}:returned; a voided row gives only while
 * its 'r:' entry is there. *given is qty, 0 when there was nothing (left) to give, or
 * SP_GIVE_BACK_NO_SALE / SP_GIVE_BACK_PAUSED (nothing changed). */
int sp_stock_give_back(sp_redis *c, int64_t sku_id, const char *order_id, int64_t user_id,
                       int32_t qty, const char *reason, int64_t now_ms, int *given, char *errbuf,
                       size_t errlen) __attribute__((warn_unused_result));
/* The same on shard `shard` (0..SP_SHARDS_MAX-1) of a sharded sale: the order's home shard
 * (sp_stock_home_shard of the row's user), which holds its entry, its buyer's count and its
 * Idempotency-Key; the marker goes into that shard's {sku:ID/shard}:returned. Shard 0 is
 * sp_stock_give_back. */
int sp_stock_give_back_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *order_id,
                                int64_t user_id, int32_t qty, const char *reason, int64_t now_ms,
                                int *given, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Drops the n entries of {sku:ID}:resv that still hold values[i], as the caller read them
 * (resv_drop.lua); gives nothing back. *dropped counts them. The callers drop entries of orders
 * PostgreSQL holds: an 'r:' entry's Idempotency-Key still pending on its order then answers
 * accepted (its producer died between Kafka's ack and the confirm). */
int sp_stock_resv_drop(sp_redis *c, int64_t sku_id, const char *const *order_ids,
                       const char *const *values, size_t n, int *dropped, char *errbuf,
                       size_t errlen) __attribute__((warn_unused_result));

/* Closes the sale to new orders for the reconcile that owns token (reconcile_pause.lua): stock 0,
 * `paused` = token, the other fields from PostgreSQL's inventory row; a sale Redis lost comes
 * back whole but closed. */
int sp_stock_reconcile_pause(sp_redis *c, int64_t sku_id, const char *token, int32_t per_user_limit,
                             int32_t pay_timeout_s, int64_t supplied, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* One sale for sp_stock_reconcile_pause_many: its inventory row's fields. */
typedef struct sp_pause_sale {
    int64_t sku_id, supplied;
    int32_t per_user_limit, pay_timeout_s;
    int32_t shards; /* its shards in Redis (0 or 1: unsharded) */
} sp_pause_sale;

/* Pauses n sales for token in one pipelined round trip (the same script as above, per sale).
 * -1 with errbuf when Redis failed or refused one (the caller pauses them again: a pause is
 * idempotent for its token). */
int sp_stock_reconcile_pause_many(sp_redis *c, const sp_pause_sale *sales, size_t n,
                                  const char *token, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* An entry a reconcile staged that was gone from resv when the sale was rebuilt. */
typedef struct sp_vanished {
    char order_id[SP_ORDER_ID_MAX + 1];
    int64_t user_id;
    int32_t qty;
} sp_vanished;

/* Rebuilds a paused sale from PostgreSQL's snapshot (pg_stock, pg_supplied, limit, timeout) and
 * the staged keys, and reopens it (reconcile_apply.lua). *owned is 0 when the sale is not paused
 * by token any more (nothing changed); else *stock and *inflight are set and *vanished is a
 * malloc'd array of *nvanished entries the caller frees (NULL when none). */
int sp_stock_reconcile_apply(sp_redis *c, int64_t sku_id, const char *token, int64_t pg_stock,
                             int64_t pg_supplied, int32_t per_user_limit, int32_t pay_timeout_s,
                             int *owned, int64_t *stock, int64_t *inflight, sp_vanished **vanished,
                             size_t *nvanished, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Lifts the pause of the reconcile that owns token (reconcile_open.lua), after its mend; *owned
 * is 0 when another reconcile (or a data loss) took the sale meanwhile (nothing changed). */
int sp_stock_reconcile_open(sp_redis *c, int64_t sku_id, const char *token, int *owned,
                            char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Takes qty off a rebuilt sale's stock (not below 0) and counts them for user_id
 * (reconcile_adjust.lua), only while the sale is paused by token. *owned is 0 when it is not (a
 * reconcile that lost its SKU lock: nothing changed); else *stock is the stock after. */
int sp_stock_reconcile_adjust(sp_redis *c, int64_t sku_id, const char *token, int64_t user_id,
                              int32_t qty, int *owned, int64_t *stock, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* What a reconcile's snapshot writes into Redis (reconcile_stage.lua), each write only while the
 * sale is paused by its token. */
typedef enum sp_stage_what {
    SP_STAGE_CLEAR,    /* delete users_rebuild and resv_staged (n = 0) */
    SP_STAGE_USERS,    /* users_rebuild: user -> units in pending and paid orders */
    SP_STAGE_ENTRIES,  /* resv_staged: order -> the resv entries the snapshot did not know */
    SP_STAGE_MARKERS,  /* returned: order -> ms, unless set: ledger rows the rebuild counts */
    SP_STAGE_RESTOCKS, /* restocks: request id -> "ms:", unless set: restocks the rebuild counts */
} sp_stage_what;

/* Writes n pairs (in as many calls as the script's argument bound needs). *owned is 0 when the
 * sale is not paused by token any more: another reconcile took it over, and the writes from that
 * point on were refused (the caller gives up; the owner's rebuild does not see them). */
int sp_stock_reconcile_stage(sp_redis *c, int64_t sku_id, const char *token, sp_stage_what what,
                             const char *const *fields, const char *const *values, size_t n,
                             int *owned, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* ---- stock transfers between the shards of a sharded sale (issue 17 part 3) ----
 *
 * Built step by step: the scripts and these calls exist and are tested
 * (tests/common/integration_stock_redis.c), the workers do not use them yet. A sharded sale's
 * shard k keeps its keys under the hash tag {sku:ID/k} (shard 0: {sku:ID}, today's), so the
 * shards of one sale sit on different slots, and in a cluster on different primaries. A transfer
 * moves units from the shard `from` to the shard `to`, exactly once however often each step is
 * retried and wherever its caller stops, each step an atomic script on one shard:
 *   1. sp_stock_shard_take on `from`: up to `want` units leave its stock (counted in its `moving`
 *      field meanwhile), recorded as "out:" under the transfer's id, stamped with `from`'s clock;
 *   2. sp_stock_shard_give on `to`: the units taken join its stock, recorded as "in:"; refused
 *      when the take is older than max_age_ms (SP_SHARD_GIVE_WITHIN_MS for the caller that took);
 *   3. sp_stock_shard_done on `from`: the "out:" record goes, and the units leave `moving`;
 *   4. sp_stock_shard_done on `to` with a minimum age (SP_SHARD_IN_KEEP_MS): the "in:" record goes.
 * The one completer of transfers left open (the reaper, under the SKU's lock: not built yet) takes
 * "out:" records older than SP_SHARD_COMPLETE_AFTER_MS through steps 2 (bounded by
 * SP_SHARD_COMPLETE_WITHIN_MS) and 3; an "out:" record older than SP_SHARD_ABORT_AFTER_MS whose
 * recipient holds no "in:" record (read after that age) goes back to the donor's stock
 * (sp_stock_shard_abort: no give can succeed any more); "in:" records go as step 4. Every give is
 * bounded by age on the recipient's clock and an "in:" record outlives every give that could still
 * come, so none is counted twice. Transfer ids must never repeat (a prefix unique per process run).
 * The generation `gen` (the sale's `gen` field; "" for none) makes a transfer of a sale rebuilt
 * since (a reconcile counts every unit afresh) give nothing. */
#define SP_SHARD_GIVE_WITHIN_MS     10000  /* a caller's own give, after its take */
#define SP_SHARD_COMPLETE_AFTER_MS  60000  /* the completer starts, after the take */
#define SP_SHARD_COMPLETE_WITHIN_MS 300000 /* the completer's give, after the take */
#define SP_SHARD_CLOCK_SKEW_MS      50000  /* the most two Redis servers' clocks may differ */
#define SP_SHARD_ABORT_AFTER_MS     (SP_SHARD_COMPLETE_WITHIN_MS + SP_SHARD_CLOCK_SKEW_MS)
#define SP_SHARD_IN_KEEP_MS         600000 /* an "in:" record's least age when dropped */
typedef struct sp_shard_transfer {
    int64_t sku_id;
    int from, to;                 /* shard numbers */
    char id[SP_ORDER_ID_MAX + 1]; /* unique across the fleet: the producer uses an order id */
    char gen[64];                 /* the sale's generation, as read */
} sp_shard_transfer;

/* Step 1. *taken: the units taken (0: none here), or -1 no sale on the shard, -2 paused, -3 the
 * generation differs; *take_ts_ms: the take's time on `from`'s clock. A retry with the same id
 * answers the same and changes nothing. */
int sp_stock_shard_take(sp_redis *c, const sp_shard_transfer *t, int64_t want, int64_t *taken,
                        int64_t *take_ts_ms, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Step 2, with units and take_ts_ms as step 1 answered. *given: the units given, 0 when given
 * before, -1, -2, -3 as above (-3: the sale was rebuilt after the take; nothing is owed), -4 when
 * the take is older than max_age_ms (0: no bound) on `to`'s clock (left to the completer). */
int sp_stock_shard_give(sp_redis *c, const sp_shard_transfer *t, int64_t units, int64_t take_ts_ms,
                        int64_t max_age_ms, int64_t *given, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Gives an open transfer's units back to the donor's stock (t->from) if its "out:" record is at
 * least min_age_ms old (SP_SHARD_ABORT_AFTER_MS) and still there. *units: the units, 0 when the
 * record is gone, -1 when younger. */
int sp_stock_shard_abort(sp_redis *c, const sp_shard_transfer *t, int64_t min_age_ms,
                         int64_t *units, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Steps 3 and 4: settles the transfer on `shard` (t->from, then much later t->to) if its record is
 * at least min_age_ms old. *units: the units its record named, 0 when settled before, -1 when the
 * record is younger (it stays). */
int sp_stock_shard_done(sp_redis *c, const sp_shard_transfer *t, int shard, int64_t min_age_ms,
                        int64_t *units, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* The same steps split for an async connection (the producer's): build, send, parse. The settle
 * is step 3 on the donor (t->from) without a minimum age; its reply is the integer of
 * sp_stock_shard_done, read by sp_stock_integer_parse, as the give's. */
void sp_stock_shard_take_call(sp_script_call *call, const sp_shard_transfer *t, int64_t want);
int sp_stock_shard_take_parse(const redisReply *r, int64_t *taken, int64_t *take_ts_ms,
                              char *errbuf, size_t errlen) __attribute__((warn_unused_result));
void sp_stock_shard_give_call(sp_script_call *call, const sp_shard_transfer *t, int64_t units,
                              int64_t take_ts_ms, int64_t max_age_ms);
void sp_stock_shard_settle_call(sp_script_call *call, const sp_shard_transfer *t);

/* One shard's part of a sold-out check: SP_STOCK_SHARD_READ_FMT on its sale key, whose reply
 * sp_stock_shard_read_parse reads into *units (stock + moving: units it holds or is passing on)
 * and *ver (the count of its stock's changes, mixed with its generation: a rebuild between two
 * reads changes it too). A missing shard reads as 0 units. Returns 1 when the shard is paused by
 * a reconcile (its stock says nothing: never a sold-out), 0, or -1 with errbuf. */
#define SP_STOCK_SHARD_READ_FMT "HMGET %s stock moving ver paused gen"
int sp_stock_shard_read_parse(const redisReply *r, int64_t *units, int64_t *ver, char *errbuf,
                              size_t errlen) __attribute__((warn_unused_result));

/* A sharded sale as a caller of the calls below sees it. */
typedef struct sp_sharded_sale {
    int64_t sku_id;
    int nshards;             /* 1..SP_SHARDS_MAX */
    char gen[64];            /* its generation (sp_stock_open_sharded's gen) */
    const char *xfer_prefix; /* unique per process run (e.g. worker id + start time): ids never
                              * repeat */
    uint64_t xfer_seq;       /* the last transfer id's number */
} sp_sharded_sale;

/* The home shard of a buyer: every order of user_id goes there (its per-user count and
 * Idempotency-Keys with it, so the per-user limit stays exact). */
int sp_stock_home_shard(int64_t user_id, int nshards);

/* Opens the N shards of a sale (sale_open.lua on each, with gen and N), stock spread evenly: shard
 * k gets stock / N, plus one for k < stock % N. *opened: the shards opened now (0: open before). */
int sp_stock_open_sharded(sp_redis *c, const sp_sharded_sale *sale, int64_t stock,
                          int32_t per_user_limit, int32_t pay_timeout_s, int *opened, char *errbuf,
                          size_t errlen) __attribute__((warn_unused_result));

/* sp_stock_rejected_forget and sp_stock_accepted_forget on shard `shard` (0..SP_SHARDS_MAX-1) of
 * a sale: its `resv` and `users`, and the Idempotency-Keys its 'r:' entries name (reserve.lua
 * was given the shard's own, {sku:ID/shard}:idem:USER:KEY). An order's entry, its buyer's count
 * and its key live on the buyer's home shard (sp_stock_home_shard), so that is the shard to
 * name; shard 0 is {sku:ID}, every unsharded sale's. (The consumer calls these; the shard-0
 * functions above are what the reaper and tests/common still call, the same on shard 0.) */
int sp_stock_rejected_forget_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *order_id,
                                      int64_t user_id, int32_t qty, int *units, char *errbuf,
                                      size_t errlen) __attribute__((warn_unused_result));
int sp_stock_accepted_forget_on_shard(sp_redis *c, int64_t sku_id, int shard,
                                      const char *const *order_ids, size_t n, char *errbuf,
                                      size_t errlen) __attribute__((warn_unused_result));

/* sp_stock_resv_drop and the reconcile's calls above on shard `shard` of a sharded sale (the
 * calls above are shard 0 of an unsharded one). The pause of a shard of a sale over nshards > 1
 * also sets the sale's generation to token (transfers begun before it give and settle nothing any
 * more), its shards, and drops `moving` (the rebuild counts every unit afresh).
 * sp_pause_sale.shards pauses every shard of a sale (its supplied on shard 0, none on the others).
 */
int sp_stock_resv_drop_on_shard(sp_redis *c, int64_t sku_id, int shard,
                                const char *const *order_ids, const char *const *values, size_t n,
                                int *dropped, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
int sp_stock_reconcile_pause_on_shard(sp_redis *c, int64_t sku_id, int shard, int nshards,
                                      const char *token, int32_t per_user_limit,
                                      int32_t pay_timeout_s, int64_t supplied, char *errbuf,
                                      size_t errlen) __attribute__((warn_unused_result));
int sp_stock_reconcile_apply_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                      int64_t pg_stock, int64_t pg_supplied, int32_t per_user_limit,
                                      int32_t pay_timeout_s, int *owned, int64_t *stock,
                                      int64_t *inflight, sp_vanished **vanished, size_t *nvanished,
                                      char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
int sp_stock_reconcile_open_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                     int *owned, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
int sp_stock_reconcile_adjust_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                       int64_t user_id, int32_t qty, int *owned, int64_t *stock,
                                       char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
int sp_stock_reconcile_stage_on_shard(sp_redis *c, int64_t sku_id, int shard, const char *token,
                                      sp_stage_what what, const char *const *fields,
                                      const char *const *values, size_t n, int *owned, char *errbuf,
                                      size_t errlen) __attribute__((warn_unused_result));

/* What a sharded sale holds in Redis, as sp_stock_sharded_read found it. */
typedef struct sp_sharded_units {
    int64_t units;    /* the sum over the shards of stock + moving, minus the units of transfers
                       * given and not yet settled (counted on both sides meanwhile) */
    int64_t supplied; /* the sum of the shards' `supplied` */
    int64_t given;    /* the units subtracted above */
    int missing;      /* the first shard with no sale hash; -1 when every shard has one */
    int paused;       /* shards paused by a reconcile */
    int nunsupplied;  /* shards without a `supplied` field */
    char gen[64];     /* shard 0's generation ("" when none) */
    uint64_t steps;   /* a fingerprint of every shard's `ver` and generation: two reads with the
                       * same one saw no transfer step, rise or rebuild on any shard between them */
} sp_sharded_units;

/* Reads the units a sale over nshards (2..SP_SHARDS_MAX) Redis shards holds: each shard's sale
 * hash, then its transfers ({sku:ID/k}:xfer, HSCAN): an "out:" record of the shard's own
 * generation whose recipient holds the matching "in:" record (the same transfer id) has its units
 * both in the recipient's `stock` and in the donor's `moving`, and they are counted once. (An
 * "out:" record of an older generation counts nothing: the rebuild since counted every unit
 * afresh.) The shards are read one after another, not atomically: a transfer that runs while the
 * read passes its two shards can be counted twice (donor read before its take, recipient after
 * its give) or not at all; a caller that acts on the figure reads twice and acts only when both
 * reads have the same `steps` (the consumer's cap). Cost: per shard an HMGET, the HSCAN of its
 * transfers and an HGET per open "out:" record. -1 with errbuf when Redis failed or nshards is out
 * of range. */
int sp_stock_sharded_read(sp_redis *c, int64_t sku_id, int nshards, sp_sharded_units *out,
                          char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* The cap of a sharded sale, one shard's share (cap.lua, mode `lower`): lowers shard `shard`'s
 * stock by at most `most` units, never below 0, unless the shard is missing, paused or of another
 * generation than gen (a rebuild since the caller read the shards counted every unit afresh).
 * *removed: the units taken away. The caller weighs the sale's excess over the sum of its shards
 * (sp_stock_sharded_read) and takes it off the shards in turn. */
int sp_stock_cap_shard_lower(sp_redis *c, int64_t sku_id, int shard, int64_t most, const char *gen,
                             int64_t *removed, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Key names for a SKU; each buffer is SP_STOCK_KEY_MAX bytes. */
#define SP_STOCK_KEY_MAX 160
void sp_stock_key(char *buf, int64_t sku_id, const char *suffix);
/* The same for shard `shard` of a sharded sale: {sku:ID/shard}:suffix, shard 0 {sku:ID}:suffix. */
void sp_stock_shard_key(char *buf, int64_t sku_id, int shard, const char *suffix);

#endif
