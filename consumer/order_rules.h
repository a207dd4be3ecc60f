/* order_rules.h - the order state machine: decides a batch of events in log order against the
 *                 inventory and order rows read for it, in memory, with no I/O.
 *
 * The consumer collects a batch of events (sp_batch), the store (order_store.c) reads what the
 * batch touches from PostgreSQL into an sp_rules, sp_rules_decide takes every decision, and the
 * store writes the outcome back in a handful of statements. Keeping the decisions here, apart from
 * the SQL, is what lets a unit test drive the state machine event by event.
 *
 * Every decision depends only on the events, in partition order, and on the rows as they were
 * before the batch, so replaying the log rebuilds the same rows (docs/consumer.md):
 *   stock.set      creates the inventory row (stock = supplied) unless it exists
 *   stock.add      stock += add, supplied += add; for a SKU without a row it is a dead letter;
 *                  one with a request_id is applied once per (sku_id, request_id): a pair read
 *                  from the restocks table, or applied earlier in the batch, changes nothing (a
 *                  producer published the restock twice); an applied pair is a new restocks row
 *   order.created  pending if the SKU's stock covers qty (stock -= qty), else rejected with the
 *                  reason out_of_stock, or unknown_sku when the SKU has no row; an order id seen
 *                  before changes nothing
 *   order.paid     pending -> paid; on an expired, rejected or cancelled order the payment is
 *                  recorded (paid_at, refund_due) and the status stays; unknown order: dead letter
 *   order.expired  pending -> expired and qty back to stock, one ledger row (reason expired);
 *                  any other status: nothing; unknown order: dead letter
 *   order.voided   an order that exists stands (nothing); otherwise the order is recorded
 *                  cancelled with one ledger row (reason voided); stock is not credited, since
 *                  PostgreSQL never took it
 * An event that names an order of another SKU is a dead letter. The version of an inventory row
 * counts the events that changed it, so it too is the same however the log was cut into batches.
 */
#ifndef SP_ORDER_RULES_H
#define SP_ORDER_RULES_H

#include <stddef.h>
#include <stdint.h>

#include "event.h"

/* ---- a batch ---- */

typedef enum sp_item_outcome {
    SP_ITEM_APPLIED = 0, /* changed the database: a row written, stock moved */
    SP_ITEM_UNCHANGED,   /* by the rules it changes nothing: a duplicate, a race already decided */
    SP_ITEM_DEAD,        /* cannot be applied: belongs on the dead-letter topic; reason says why */
    SP_ITEM_STALE,       /* below its partition's stored offset: applied before (by anyone) */
} sp_item_outcome;

/* What an item did, for metrics and logs. */
typedef enum sp_item_effect {
    SP_EFFECT_NONE = 0,
    SP_EFFECT_OPENED,          /* stock.set created the row */
    SP_EFFECT_RESTOCKED,       /* stock.add */
    SP_EFFECT_PENDING,         /* order.created took the stock */
    SP_EFFECT_REJECTED_STOCK,  /* order.created refused: not enough stock (Redis over-admitted) */
    SP_EFFECT_REJECTED_NO_SKU, /* order.created refused: the SKU has no inventory row */
    SP_EFFECT_PAID,            /* pending -> paid */
    SP_EFFECT_LATE_PAYMENT,    /* a payment for an order that can no longer be paid: refund_due */
    SP_EFFECT_EXPIRED,         /* pending -> expired, stock returned */
    SP_EFFECT_CANCELLED,       /* a void recorded a never-logged order as cancelled */
} sp_item_effect;

#define SP_ITEM_REASON_MAX 160

typedef struct sp_batch_item {
    /* Filled by the caller. */
    int32_t partition;
    int64_t offset;
    /* The caller read the partition's offsets gap_from..offset-1 and found no event there (the
     * broker deleted them, or they hold no message); sp_batch_add sets it to offset: nothing is
     * known of the offsets before. Only what makes the store accept a batch that starts past the
     * partition's stored offset (order_store.h), so it must never claim more than was read. */
    int64_t gap_from;
    int bad;     /* the message could not be decoded: reason says why, ev is zeroed */
    sp_event ev; /* the decoded event */
    /* Filled by sp_rules_decide (reason also by the caller for a bad item). */
    sp_item_outcome outcome;
    sp_item_effect effect;
    char reason[SP_ITEM_REASON_MAX]; /* SP_ITEM_DEAD: why */
    int32_t next_same_sku;           /* index of the SKU's next item, -1 after its last */
} sp_batch_item;

/* One SKU of a decided batch; stock and supplied are the row's values once the batch is written
 * (filled in by the store after its guarded update). */
typedef struct sp_batch_sku {
    int64_t sku_id;
    int exists; /* has an inventory row */
    int64_t stock, supplied;
    int32_t nrejected;  /* orders refused for lack of stock: Redis admitted more than there is */
    int32_t shards;     /* its sale's shards in Redis (1: unsharded, or no row): an order's entry
                         * and its buyer's count are on shard sp_stock_home_shard(user, shards) */
    int32_t first_item; /* its first item; the others follow through next_same_sku */
} sp_batch_sku;

/* One partition of a batch. */
typedef struct sp_batch_partition {
    int32_t partition;
    int64_t first_offset; /* the batch's smallest offset on it: where to re-read after a failure */
    int64_t gap_from;     /* that item's gap_from: offsets gap_from..first_offset-1 hold no event */
    int64_t last_offset;  /* its largest */
    int64_t stored;       /* the next offset stored in PostgreSQL before the batch; -1 unknown */
    int64_t next_offset;  /* after a commit: the next offset stored with it */
    /* After the store refused the batch because offsets stored..first_offset-1 were neither
     * applied nor known to hold no event: the stored offset, where the partition must be read
     * again (not first_offset: that would skip them). -1 otherwise. */
    int64_t read_again_from;
} sp_batch_partition;

/* Events in the order they were read (offset order within each partition), and what became of
 * them. Arrays are allocated once for `cap` events; nothing allocates per batch. */
typedef struct sp_batch {
    sp_batch_item *items;
    size_t n, cap;
    sp_batch_sku *skus;
    size_t nskus;
    sp_batch_partition *parts;
    size_t nparts;
    int attempts;  /* transactions the last apply took (1 when nothing had to be redone) */
    int conflicts; /* redos: version conflicts, lost insert races, deadlocks */
} sp_batch;

/* A batch for up to cap events; NULL when out of memory. */
sp_batch *sp_batch_new(size_t cap) __attribute__((warn_unused_result));
void sp_batch_free(sp_batch *b);

/* Empties the batch (keeps its memory). */
void sp_batch_clear(sp_batch *b);

/* Appends an item, zeroed, for the caller to fill; NULL when the batch is full. */
sp_batch_item *sp_batch_add(sp_batch *b, int32_t partition, int64_t offset);

/* Recomputes b->parts from the items: each partition once, with its first and last offset (and
 * the first item's gap_from); stored, next_offset and read_again_from -1. */
void sp_batch_index_partitions(sp_batch *b);

/* ---- the decisions ---- */

/* Order statuses as the rules keep them; sp_order_status_name gives the SQL text. */
typedef enum sp_order_status {
    SP_ORDER_NONE = 0, /* no such order */
    SP_ORDER_PENDING,
    SP_ORDER_PAID,
    SP_ORDER_EXPIRED,
    SP_ORDER_REJECTED,
    SP_ORDER_CANCELLED,
} sp_order_status;

/* "pending" etc.; NULL for SP_ORDER_NONE or an unknown value. */
const char *sp_order_status_name(sp_order_status st);

/* Parses a status column; SP_ORDER_NONE for anything unknown. */
sp_order_status sp_order_status_parse(const char *s);

/* A SKU as read and as decided. */
typedef struct sp_rules_sku {
    int64_t sku_id;
    int in_db;               /* its inventory row was read */
    int64_t version;         /* as read (0 for a row opened in this batch) */
    int64_t stock, supplied; /* as read, then after each decision */
    int opened;              /* stock.set created the row in this batch */
    int64_t open_stock;      /* the stock.set that opened it: */
    int32_t per_user_limit, pay_timeout_s;
    int32_t shards; /* its sale's shards in Redis (1: unsharded): as read, or as opened */
    int64_t open_ms;
    int64_t taken, returned, added; /* units, since the row was read or opened */
    int64_t changes;    /* events that changed the row: the version moves by this much */
    int64_t updated_ms; /* ts of the last of them */
    int32_t last_item;  /* the SKU's last item so far, while sp_rules_begin links them */
} sp_rules_sku;

/* An order as read and as decided. */
typedef struct sp_rules_order {
    char order_id[SP_ORDER_ID_MAX + 1];
    int64_t sku_id, user_id;
    int32_t qty;
    sp_order_status status_db; /* as read; SP_ORDER_NONE when the batch creates it */
    int refund_due_db;
    sp_order_status status; /* after the decisions so far */
    int refund_due;
    int changed;                    /* an existing row must be updated */
    int64_t created_ms, expires_ms; /* new orders */
    int64_t paid_ms, closed_ms;     /* -1: unchanged (existing) or NULL (new) */
    const char *reject_reason;      /* new orders: "out_of_stock", "unknown_sku", a void's reason */
    int32_t partition;              /* new orders: where their order.created is; -1: none */
    int64_t offset;
} sp_rules_order;

/* One row of the return ledger (stock_returns) to insert. */
typedef struct sp_rules_return {
    int32_t order;      /* index into orders */
    const char *reason; /* "expired" or "voided" */
    int64_t ts_ms;
} sp_rules_return;

/* A keyed restock (a stock.add with a request_id): a row of the restocks table read from the
 * database, or one applied in this batch, to be inserted. */
typedef struct sp_rules_restock {
    int64_t sku_id;
    char request_id[SP_REQUEST_ID_MAX + 1];
    int is_new;         /* applied in this batch: a row to insert (the fields below are set) */
    int64_t add, ts_ms; /* the event's units and time */
    int32_t partition;  /* where the stock.add is */
    int64_t offset;
} sp_rules_restock;

/* Working memory for deciding batches of up to cap events. The arrays are public so the store can
 * turn them into statements; only the functions below change them. */
typedef struct sp_rules {
    size_t cap;
    sp_rules_sku *skus; /* parallel to the batch's skus */
    size_t nskus;
    sp_rules_order *orders;
    size_t norders;
    sp_rules_return *returns;
    size_t nreturns;
    /* Read and new alike: every pair is one of the batch's keyed stock.add, so at most cap. */
    sp_rules_restock *restocks;
    size_t nrestocks;
    int32_t *sku_slots, *order_slots; /* open-addressing hash tables of indexes, -1 = empty */
    int32_t *restock_slots;           /* the same, keyed by (sku_id, request_id) */
    size_t nslots;                    /* a power of two, at least 2 * cap */
} sp_rules;

sp_rules *sp_rules_new(size_t cap) __attribute__((warn_unused_result));
void sp_rules_free(sp_rules *r);

/* Starts a decision round for b: forgets every SKU, order and restock, marks each item below its
 * partition's stored offset STALE and each bad item DEAD, registers the SKU of every other item
 * (b->skus, linked through next_same_sku). Items' outcomes are reset, so a batch can be decided
 * again after a rollback. b->parts must carry the stored offsets (sp_batch_partition.stored). */
void sp_rules_begin(sp_rules *r, sp_batch *b);

/* The SKU with this id, or NULL when no item of the batch names it. */
sp_rules_sku *sp_rules_find_sku(sp_rules *r, int64_t sku_id);

/* Records an order row read from the database. -1 when the table is full (more rows than cap, which
 * a query keyed by the batch's ids cannot return). */
int sp_rules_add_order(sp_rules *r, const char *order_id, int64_t sku_id, int64_t user_id,
                       int32_t qty, sp_order_status status, int refund_due)
    __attribute__((warn_unused_result));

/* Records a row of the restocks table read from the database: (sku_id, request_id) was applied
 * before. -1 when the table is full (more rows than cap, which a query keyed by the batch's pairs
 * cannot return). */
int sp_rules_add_restock(sp_rules *r, int64_t sku_id, const char *request_id)
    __attribute__((warn_unused_result));

/* Takes every decision for the items sp_rules_begin left undecided, in batch order, and fills
 * b->skus (exists, stock and supplied as decided, nrejected). */
void sp_rules_decide(sp_rules *r, sp_batch *b);

#endif
