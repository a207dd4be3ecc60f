/* reaper_requests.h - the events the reaper published and waits to see applied (the table
 *                     reaper_requests, sql/003_reaper.sql): claiming, unclaiming, forgetting.
 *
 * A row (order_id, kind) says that replica requested_by published an order.expired ('expire') or
 * an order.voided ('void') for the order at requested_at. Claims are single statements (their own
 * short transactions) that return only the rows this replica won, so two replicas never publish
 * the same request within EXPIRY_RETRY_MS, and a replica that died is taken over after it. The
 * expiry's claim, which also picks the due orders, lives in expiry.c.
 */
#ifndef SP_REAPER_REQUESTS_H
#define SP_REAPER_REQUESTS_H

#include <stddef.h>
#include <stdint.h>

#include "reaper_ctx.h"

/* Claims voids of the n orders of sku_id: won[i] is 1 when this replica should publish the void
 * of ids[i] (no replica asked within EXPIRY_RETRY_MS), 0 otherwise. 0, or -1 with errbuf. */
int sp_requests_claim_voids(sp_reaper *rp, int64_t sku_id, const char *const *ids, size_t n,
                            int *won, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Gives back this replica's claims (kind "expire" or "void") of ids, whose events Kafka did not
 * take, so the next sweep tries them at once. Best effort: a failure is logged. */
void sp_requests_unclaim(sp_reaper *rp, const char *kind, const char *const *ids, size_t n);

/* Deletes up to `limit` requests the consumer has decided (expire: the order is no longer
 * pending; void: the order exists, or the request is a day old), so the table stays as small as
 * the work in flight. *ndeleted. 0, or -1 with errbuf. */
int sp_requests_forget_decided(sp_reaper *rp, int limit, size_t *ndeleted, char *errbuf,
                               size_t errlen) __attribute__((warn_unused_result));

#endif
