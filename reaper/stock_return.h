/* stock_return.h - gives the return ledger back to Redis, exactly once per row.
 *
 * stock_returns holds one row per order whose units Redis is owed (expired orders, whose units
 * went back to inventory in the same transaction, and voided reservations, whose units PostgreSQL
 * never took). Each row not yet returned goes through give_back.lua, which gives the qty back to
 * the sale's stock and the user's count and sets the order's marker in {sku:ID}:returned in the
 * same atomic step; then the row is stamped returned_to_redis_at; then the marker is removed. A
 * crash between the steps is harmless: a marker makes the redo give nothing, and a marker left
 * behind is settled (row stamped, marker removed) by the next sweep of its SKU. See
 * docs/reaper.md.
 *
 * A sale over N Redis shards (inventory.shards): each row goes to its order's home shard
 * (sp_stock_home_shard of the row's user), which holds the order's entry, its buyer's count and
 * Idempotency-Key; its marker lives there too ({sku:ID/k}:returned), so the guard and the units it
 * guards change in one atomic step on one shard.
 */
#ifndef SP_STOCK_RETURN_H
#define SP_STOCK_RETURN_H

#include <stddef.h>
#include <stdint.h>

#include "reaper_ctx.h"

/* Registers the metrics (returned rows and units, errors). Call once at start. */
void sp_stock_return_register_metrics(void);

/* One drain: up to REAPER_BATCH rows per short transaction (SELECT ... FOR UPDATE SKIP LOCKED:
 * replicas split the rows and never wait for each other), each given back by one script call,
 * the given-back ones stamped, COMMIT, their markers removed; goes on while there are rows, for at
 * most budget_ms or until SIGTERM. Rows of a SKU whose sale Redis lost (reconcile rebuilds it) or
 * that a reconcile has paused are left for a later drain. *nreturned counts the rows stamped. 0,
 * or -1 with errbuf when PostgreSQL or Redis failed (counted; what was stamped stays stamped). */
int sp_stock_return_drain(sp_reaper *rp, int64_t budget_ms, size_t *nreturned, char *errbuf,
                          size_t errlen) __attribute__((warn_unused_result));

/* Settles sku_id's leftover markers, on every shard of its sale (inventory.shards, read here; 1
 * when PostgreSQL has no row): a marker means the units are in Redis, so its row is stamped (when
 * it is not yet) and the marker removed. Needs the SKU's lock (SP_LOCK_SKU), so no reconcile of the
 * SKU runs meanwhile. *nsettled counts the markers removed. 0 or -1 with errbuf. */
int sp_stock_return_settle_markers(sp_reaper *rp, int64_t sku_id, size_t *nsettled, char *errbuf,
                                   size_t errlen) __attribute__((warn_unused_result));

/* The same for a caller that has the sale's shards at hand (the reservation sweep lists them with
 * the SKUs): shards 0..nshards-1 (out of 1..SP_SHARDS_MAX: 1). */
int sp_stock_return_settle_markers_on_shards(sp_reaper *rp, int64_t sku_id, int nshards,
                                             size_t *nsettled, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
