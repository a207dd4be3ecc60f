/* shard_transfers.h - completes the stock transfers between the shards of a sharded sale that
 * their callers left open (docs/reservation.md, "Hot-SKU sharding"; issue 17 part 3).
 *
 * The reaper's loop runs sp_shard_transfers_sweep with the reservation sweep (every
 * RESV_SWEEP_INTERVAL_MS): each sharded sale under its SKU's lock (SP_LOCK_SKU), so one replica is
 * the one completer of a sale's transfers at a time. */
#ifndef SP_SHARD_TRANSFERS_H
#define SP_SHARD_TRANSFERS_H

#include <stdint.h>

#include "reaper_ctx.h"

/* What one pass over a sale's shards did. */
typedef struct sp_shard_sweep {
    int completed; /* given (or found given before) and settled on the donor */
    int aborted;   /* never given: back to the donor's stock */
    int dropped;   /* "in:" records old enough to go */
    int waiting;   /* open, and nothing to do yet (too young, the recipient paused or gone) */
} sp_shard_sweep;

/* One pass over the transfer records of the nshards shards of sku_id, each judged by its age on
 * its own server's clock:
 *   "out:" older than SP_SHARD_COMPLETE_AFTER_MS: given (bounded by SP_SHARD_COMPLETE_WITHIN_MS;
 *          a give that finds its "in:" adds nothing) and settled on the donor;
 *   "out:" older than SP_SHARD_ABORT_AFTER_MS: settled when the recipient holds its "in:" (read
 *          now, after every give's bound), else given back to the donor (sp_stock_shard_abort);
 *   "in:"  older than SP_SHARD_IN_KEEP_MS: dropped.
 * 0, or -1 with errbuf when Redis failed (the next pass goes on). */
int sp_shard_transfers_complete(sp_reaper *rp, int64_t sku_id, int nshards, sp_shard_sweep *sw,
                                char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Every sharded sale of PostgreSQL's inventory (shards > 1) whose SKU lock is free: one pass of
 * sp_shard_transfers_complete under it; *total sums them. -1 with errbuf on the first failure. */
int sp_shard_transfers_sweep(sp_reaper *rp, sp_shard_sweep *total, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
