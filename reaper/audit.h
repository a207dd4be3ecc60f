/* audit.h - `reaper audit`: checks the invariants of the whole pipeline and reports each
 *           violation in a sentence; the running reaper's periodic audit behind its gauges.
 *
 * In PostgreSQL (always):
 *   - per SKU, what was ever put on sale equals what is left plus what is held:
 *     inventory.supplied = inventory.stock + qty of its pending and paid orders;
 *   - no order is both paid and expired: a paid order has no ledger row, no closed_at and no
 *     refund_due; a payment on an expired, rejected or cancelled order is marked refund_due;
 *   - every expired or cancelled order has exactly one ledger row, of its own reason, user, SKU and
 *     qty, and every ledger row belongs to such an order.
 * Against Redis (unless --pg-only), once the system is quiet (the consumer has stored every
 * partition up to its end, no ledger row waits to be given back, no reservation is in flight and
 * no sale is paused), waiting up to AUDIT_WAIT_MS for that:
 *   - per SKU, the sale exists, its stock equals inventory.stock and its supplied equals
 *     inventory.supplied;
 *   - per user, the units Redis counts equal the qty of the user's pending and paid orders.
 * A sale over N > 1 Redis shards (inventory.shards) is compared as one: its stock is the sum over
 * the shards of stock + moving, a transfer given and not yet settled counted once
 * (sp_stock_sharded_read), its supplied the shards' summed; a shard paused makes it busy, a shard
 * missing makes it missing; each user's count is read on the user's home shard.
 * A mismatch is reported only if it is still there a second later (it was not a moment in
 * flight). The running reaper runs the checks that need no quiet system every AUDIT_INTERVAL_MS
 * for its gauges (sp_audit_watch). See docs/reaper.md.
 */
#ifndef SP_AUDIT_H
#define SP_AUDIT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "reaper_ctx.h"

typedef struct sp_audit_opts {
    int pg_only; /* skip the comparison with Redis (e.g. during a sale) */
} sp_audit_opts;

/* Runs every check and writes a readable report to out: one line per violation (at most a
 * hundred per check, then how many more), then "audit passed" or "audit FAILED: N violations".
 * Returns the number of violations (0: passed), or -1 with errbuf when a backend could not be
 * read (the report then says so too). Memory is bounded: everything is read in pages. */
int sp_audit_run(sp_reaper *rp, const sp_audit_opts *opts, FILE *out, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* What one periodic audit found. */
typedef struct sp_audit_figures {
    int64_t oversold;   /* PostgreSQL: units held by pending and paid orders beyond supply */
    int64_t leaked;     /* PostgreSQL: units gone from stock that no pending or paid order holds */
    int64_t above;      /* quiet sales: units of Redis's stock beyond PostgreSQL's */
    int64_t below;      /* quiet sales: units of PostgreSQL's stock that Redis lacks */
    int64_t nskus;      /* SKUs audited */
    int64_t nsupply;    /* of them, oversold or leaked */
    int64_t ndiffering; /* quiet sales whose stock or supplied differ (or that Redis lacks) */
    int64_t nunchecked; /* sales not compared with Redis: not quiet, or changing meanwhile */
    int clean;          /* nothing oversold, leaked or differing */
} sp_audit_figures;

/* Registers the periodic audit's gauges and its errors. Call once at start. */
void sp_audit_register_metrics(void);

/* The running reaper's periodic audit (every AUDIT_INTERVAL_MS), behind its gauges: per SKU the
 * supply equation in PostgreSQL (oversold, leaked), and the stock and supplied of each quiet sale
 * in Redis against PostgreSQL's. It does not wait for a quiet system as `reaper audit` does: a sale
 * with reservations in flight, paused, owed ledger rows, whose partition the consumer has not
 * stored to its end, or that changed while it was read is counted unchecked and left out. Cost: per
 * page of SKU_PAGE SKUs two statements (the second sums each SKU's pending and paid orders through
 * orders_by_sku_user), one watermark query per partition, two Redis round trips per SKU; no lock,
 * no transaction. Sets the gauges (and the time of the last clean audit) when it completes; 0, or
 * -1 with errbuf when a backend failed (counted in stockpipe_reaper_errors_total{step="audit"};
 * the gauges keep the last complete audit's figures). */
int sp_audit_watch(sp_reaper *rp, sp_audit_figures *fig, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
