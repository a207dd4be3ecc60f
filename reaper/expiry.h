/* expiry.h - expires unpaid orders: publishes order.expired for every pending order past its
 *            deadline, once per EXPIRY_RETRY_MS however many reapers run.
 *
 * A sweep claims due orders in one short statement: the pending orders whose expires_at passed
 * (read through the partial index orders_pending_by_expiry, oldest first) and that no replica
 * asked to expire within EXPIRY_RETRY_MS get a row in reaper_requests. Concurrent replicas
 * conflict on that row and only one of them gets it back, so each order is published by one
 * replica; no lock is held while Kafka answers. The consumer applies order.expired in log order
 * (pending -> expired, stock back to inventory, one ledger row), and a payment that came first
 * wins there. An event Kafka did not acknowledge is unclaimed and tried again on the next sweep;
 * a claim whose replica died is taken over after EXPIRY_RETRY_MS. See docs/reaper.md.
 */
#ifndef SP_EXPIRY_H
#define SP_EXPIRY_H

#include <stddef.h>
#include <stdint.h>

#include "reaper_ctx.h"

/* Registers the expiry metrics (expired, lateness, errors). Call once at start. */
void sp_expiry_register_metrics(void);

/* One sweep: claims up to REAPER_BATCH due orders at a time, publishes their order.expired and
 * waits for the acknowledgements; goes on while batches come back full, for at most budget_ms or
 * until SIGTERM. *nexpired counts the events Kafka acknowledged. 0, or -1 with errbuf when
 * PostgreSQL failed (counted in the errors metric; the next sweep retries). */
int sp_expiry_sweep(sp_reaper *rp, int64_t budget_ms, size_t *nexpired, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
