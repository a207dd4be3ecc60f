/* resv_sweep.h - keeps every SKU's reservations in Redis honest: voids the ones whose producer
 *                died before Kafka answered, drops the entries of orders PostgreSQL holds,
 *                settles leftover return markers, and notices sales Redis lost.
 *
 * For each SKU of PostgreSQL's inventory, under its advisory lock (replicas take turns, a SKU
 * another one is sweeping is skipped), {sku:ID}:resv is scanned:
 *   'r:' older than RESV_LOST_AFTER_MS: Kafka's answer is overdue (the producer waits at most
 *        KAFKA_MESSAGE_TIMEOUT_MS). Order in PostgreSQL as a real order (its order.created made
 *        it; the consumer's clean-up was lost): the entry is dropped, nothing given back. Order
 *        cancelled: left to the ledger (give_back.lua drops it). Order unknown: order.voided is
 *        published (claimed once per EXPIRY_RETRY_MS in reaper_requests) and the consumer
 *        decides in log order: the order stands if its order.created came first, else it is
 *        cancelled with a ledger row, which gives the units back.
 *   'a:' older than ACCEPTED_STALE_AFTER_MS whose order PostgreSQL holds: the consumer committed
 *        and died before its HDEL: dropped.
 * Then the SKU's leftover return markers are settled (stock_return.h). A SKU whose sale is gone
 * from Redis (RESV_LOST_AFTER_MS after it opened) or paused by a reconcile that no longer runs is
 * reconciled (reconcile.h). A sale over N Redis shards (inventory.shards) is swept shard by shard:
 * each shard's {sku:ID/k}:resv, each action on the entry's own shard (its buyer's home, which
 * holds the buyer's count and Idempotency-Key), the markers of every shard; one shard missing or
 * paused counts as the sale missing or paused. See docs/reaper.md.
 */
#ifndef SP_RESV_SWEEP_H
#define SP_RESV_SWEEP_H

#include <stddef.h>
#include <stdint.h>

#include "reaper_ctx.h"

typedef struct sp_resv_sweep_stats {
    size_t nskus;       /* SKUs swept */
    size_t nvoided;     /* order.voided acknowledged by Kafka */
    size_t ndropped;    /* leftover entries dropped */
    size_t nsettled;    /* return markers settled */
    size_t nreconciled; /* SKUs reconciled */
} sp_resv_sweep_stats;

/* Registers the sweep's metrics (voided, dropped, errors). Call once at start. */
void sp_resv_sweep_register_metrics(void);

/* Sweeps every SKU once, as above, stopping early on SIGTERM. A SKU that fails is logged, counted
 * and left for the next sweep; the sweep goes on with the others. 0, or -1 with errbuf when the
 * SKUs could not be listed. */
int sp_resv_sweep(sp_reaper *rp, sp_resv_sweep_stats *st, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
