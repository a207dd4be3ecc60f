/* restock_catchup.h - gives Redis the restocks PostgreSQL applied and Redis missed, once each.
 *
 * A restock publishes its stock.add, then adds the units in Redis (restock.lua, once per request
 * id, recorded in {sku:ID}:restocks). When Redis fails in between, the event is in the log and the
 * consumer applies it (one `restocks` row per request id), but Redis never got the units. The
 * catch-up reads the rows not yet stamped applied_to_redis_at, runs restock.lua for each (which
 * adds the units unless Redis has counted that request id already: the producer's own call, an
 * admin's retry, another replica, a reconcile) and stamps the row. A row older than IDEM_TTL_S is
 * one whose request id Redis may have forgotten: it is stamped only when Redis still knows the
 * id, and otherwise its SKU is rebuilt from PostgreSQL (reconcile), whose marks the next round
 * finds. See docs/reaper.md.
 */
#ifndef SP_RESTOCK_CATCHUP_H
#define SP_RESTOCK_CATCHUP_H

#include <stddef.h>

#include "reaper_ctx.h"

/* Registers the metrics (restocks given to Redis, errors). Call once at start. */
void sp_restock_catchup_register_metrics(void);

/* One round over up to REAPER_BATCH unstamped rows, oldest first. Rows of a sale Redis lost or a
 * reconcile has paused wait for a later round. *napplied counts the restocks whose units this
 * round added to Redis. 0, or -1 with errbuf when PostgreSQL or Redis failed (counted). */
int sp_restock_catchup(sp_reaper *rp, size_t *napplied, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
