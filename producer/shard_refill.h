/* shard_refill.h - the producer's side of a sharded sale (docs/reservation.md, "Hot-SKU
 *                  sharding"): when a buyer's home shard is short, units move to it from the
 *                  other shards, and only when none came is the sale as a whole read, twice.
 *
 * One refill serves the orders of one (SKU, home shard) that found it short; the order API keeps
 * them waiting meanwhile and decides each again from the result. A refill runs on the event
 * loop's Redis handle, one script call at a time:
 *   1. for each other shard in turn (home + 1, home + 2, ... mod N), until `want` units came:
 *      shard_take.lua there (units into its `moving`), shard_give.lua on the home shard (bounded
 *      by SP_SHARD_GIVE_WITHIN_MS), then shard_done.lua's settle on the donor, not waited for (the
 *      units count in the donor's `moving` until it lands; a lost settle is the completer's);
 *   2. when no unit came: every shard's stock + moving and `ver` read, then read again
 *      (SP_STOCK_SHARD_READ_FMT): a unit moving from a shard not yet read to one read already is
 *      seen by the other read or changes a `ver`.
 * A transfer whose give failed or came too late is left open: the reaper's completer gives or
 * aborts it (reaper/shard_transfers.c). Transfer ids are order ids of this worker (unique across
 * the fleet, sp_order_id_next).
 */
#ifndef SP_SHARD_REFILL_H
#define SP_SHARD_REFILL_H

#include <stdint.h>

#include "order_id.h"
#include "redis_async.h"
#include "stock.h"

typedef struct sp_refill_result {
    int64_t moved; /* units that came to the home shard */
    int stopped;   /* a shard answered paused, no sale or another generation: decide again */
    int failed;    /* Redis failed or did not answer: the outcome of a step is unknown */
    int collected; /* nothing moved, nothing stopped: both reads of every shard were made */
    int64_t units; /* collected: stock + moving over every shard, the larger of the two reads */
    int stable;    /* collected: no shard's `ver` changed between the reads */
    int transfers; /* transfers begun (takes that took units) */
} sp_refill_result;

typedef void sp_refill_done_fn(const sp_refill_result *result, void *data);

/* Starts a refill of `want` units for shard `home` of the sale (sku_id, nshards, gen as its
 * shards answered). done(result, data) is called exactly once, later, from a Redis callback;
 * -1 (done never called) when out of memory or Redis would not take the first command. */
int sp_refill_start(sp_redis_async *ra, sp_order_ids *ids, int64_t sku_id, int nshards,
                    const char *gen, int home, int64_t want, sp_refill_done_fn *done, void *data)
    __attribute__((warn_unused_result));

#endif
