/* order_store.h - applies a batch of events to PostgreSQL in one transaction, exactly once: the
 *                 oversell guard, the order state machine's writes and the partitions' offsets.
 *
 * sp_order_store_apply runs, in one transaction (docs/consumer.md):
 *   1. lock the batch's partitions' rows in consumer_offsets (inserting missing ones) and read the
 *      next offset stored there; every item below it is STALE: applied before, by this consumer or
 *      by one that owned the partition until a rebalance (a zombie cannot apply twice). A batch
 *      that starts past a partition's stored offset is refused unless the caller found the
 *      offsets in between empty (sp_batch_item.gap_from): they would never be applied;
 *   2. read the inventory rows of the batch's SKUs and the orders its events name (and, only when
 *      the batch has a stock.add with a request_id, the restocks applied before under those ids);
 *   3. decide every event in log order in memory (order_rules.h);
 *   4. write: new inventory rows; per touched SKU one guarded, versioned update
 *        SET stock = stock - n, version = version + changes ... WHERE version = v AND stock >= n
 *      (all SKUs in one statement); the new orders by binary COPY; status changes of existing
 *      orders, the return-ledger rows and the keyed restocks applied, one statement each;
 *   5. call the caller's hook (the consumer produces the dead letters and flushes them there);
 *   6. store each partition's next offset, COMMIT.
 * A version conflict (another writer touched a SKU's row since it was read), a lost insert race
 * or a deadlock rolls the transaction back and decides the whole batch again from step 1, at most
 * SP_STORE_ATTEMPTS times. New orders are assumed new at first (their ids are not looked up); a
 * duplicate order.created then fails the COPY and the batch is redone with every id looked up, so
 * the common case costs no lookup.
 *
 * A store owns one PostgreSQL connection and belongs to one thread. It connects on demand and
 * reconnects after the connection broke. Every wait on the server is bounded (sp_store_bounds):
 * the session's statement, lock and idle-in-transaction timeouts, enforced by the server, and,
 * for a server that does not run at all (stalled, cut off), the store's own deadline on each
 * round trip, after which it closes the connection.
 */
#ifndef SP_ORDER_STORE_H
#define SP_ORDER_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "order_rules.h"

#define SP_STORE_ATTEMPTS 5

typedef struct sp_order_store sp_order_store;

/* Called inside the transaction after every write and before the offsets move past the batch:
 * the last moment to do something that must happen before the batch counts as applied (produce
 * the dead letters). -1 with errbuf rolls the batch back. */
typedef int (*sp_store_hook)(sp_batch *b, void *arg, char *errbuf, size_t errlen);

/* How long a store's session may wait, at most. */
typedef struct sp_store_bounds {
    int connect_timeout_s;    /* libpq's connect_timeout, unless the conninfo sets one */
    int statement_timeout_ms; /* the server's statement_timeout of the session */
    int lock_timeout_ms;      /* its lock_timeout: a row another session holds */
    int idle_in_tx_ms;        /* its idle_in_transaction_session_timeout: the server ends a session
                               * whose client went quiet inside a transaction, and frees its locks */
    int answer_ms;            /* the store's own: a round trip the server has not answered within
                               * this is given up and the connection closed (the server's timeouts
                               * need a server that runs); above statement_timeout_ms */
} sp_store_bounds;

/* A store for batches of up to batch_max events of `topic`, on the database dsn (libpq conninfo),
 * tagged application_name, its waits bounded by *bounds (copied). Connects nothing yet. NULL when
 * out of memory. dsn and topic are copied. */
sp_order_store *sp_order_store_new(const char *dsn, const char *application_name, const char *topic,
                                   size_t batch_max, const sp_store_bounds *bounds)
    __attribute__((warn_unused_result));

void sp_order_store_free(sp_order_store *s);

/* Connects (and prepares the statements) unless connected; then SELECT 1. 0 when the server
 * answered; -1 with errbuf. */
int sp_order_store_ping(sp_order_store *s, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Applies b as described above. 0 when committed: every item has its outcome, b->skus their stock
 * and supplied after the batch, b->parts their next_offset. -1 with errbuf when it was rolled back
 * (or its COMMIT's outcome is unknown: the connection broke, or was closed when the server did
 * not answer in time): nothing of it may be assumed applied, and the caller reads its events again
 * from b->parts[].first_offset, or from b->parts[].read_again_from where that is set (>= 0: the
 * batch was refused because the offsets from there to first_offset were never applied); applying
 * them again is safe, since whatever did commit is then STALE. */
int sp_order_store_apply(sp_order_store *s, sp_batch *b, sp_store_hook before_commit, void *arg,
                         char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Whether the last sp_order_store_apply that failed lost its connection (or closed it for want of
 * an answer) after sending COMMIT: the server may have committed the batch (the primary died
 * after writing it; with a synchronous standby, a promoted standby has it too), so its outcome is
 * unknown until its events are read again: what did commit is then STALE. */
int sp_order_store_in_doubt(const sp_order_store *s);

/* The next offsets stored for n partitions of the topic: next[i] for partitions[i], -1 where no
 * row exists. 0 or -1 with errbuf. */
int sp_order_store_offsets(sp_order_store *s, const int32_t *partitions, size_t n, int64_t *next,
                           char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* *has_orders, *has_inventory: whether those tables hold any row (replay refuses to write over
 * them). 0 or -1 with errbuf. */
int sp_order_store_nonempty(sp_order_store *s, int *has_orders, int *has_inventory, char *errbuf,
                            size_t errlen) __attribute__((warn_unused_result));

#endif
