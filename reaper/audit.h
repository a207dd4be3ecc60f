/* audit.h - `reaper audit`: checks the invariants of the whole pipeline and reports each
 *           violation in a sentence.
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
 * A mismatch is reported only if it is still there a second later (it was not a moment in
 * flight). See docs/reaper.md.
 */
#ifndef SP_AUDIT_H
#define SP_AUDIT_H

#include <stddef.h>
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

#endif
