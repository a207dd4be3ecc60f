/* reconcile.h - notices that Redis lost data and rebuilds sales in Redis from PostgreSQL.
 *
 * Noticing: the reaper keeps, in PostgreSQL's reaper_state, the random epoch it wrote to Redis
 * (key stockpipe:reaper:epoch) after the last complete reconcile, and the server's run_id and
 * master_replid then. A Redis without that epoch was emptied or replaced; a new run_id is a
 * restart (AOF loses up to a second of writes); a new replication id is a failover (the promoted
 * replica may have missed writes); nothing recorded is a database the reaper never ran on (new, or
 * rebuilt from the log). Any of these reconciles every SKU. A single sale missing from
 * Redis, or left paused by a reconcile that died, is reconciled alone (resv_sweep.h notices).
 *
 * Rebuilding one SKU (under its advisory lock):
 *   1. pause: stock 0 and a `paused` token (reconcile_pause.lua); a lost sale comes back whole,
 *      closed;
 *   2. settle: wait KAFKA_MESSAGE_TIMEOUT_MS + 1 s after the pause (or the detection), so every
 *      reservation made before it has its answer from Kafka;
 *   3. take the high watermark of the SKU's partition and wait (RECONCILE_WAIT_MS at most) until
 *      the consumer stored that partition up to it: PostgreSQL then holds every order Kafka had;
 *   4. in one REPEATABLE READ snapshot: per-user units of pending and paid orders into
 *      {sku:ID}:users_rebuild; a marker for each ledger row not yet given back (the rebuild counts
 *      it); each resv entry the snapshot knows is dropped, the others staged;
 *   5. reconcile_apply.lua: stock = snapshot stock - units still in resv (+ restocks Redis saw
 *      that the snapshot did not), users = the rebuilt counts + those entries; sale reopened;
 *   6. staged entries that vanished meanwhile and turned out stored by the consumer are taken off
 *      (reconcile_adjust.lua); the markers are settled.
 * A failure or SIGTERM at any step leaves the sale paused (closed, never oversold): the next sweep
 * of any replica finds it and reconciles it again. See docs/reaper.md.
 */
#ifndef SP_RECONCILE_H
#define SP_RECONCILE_H

#include <stddef.h>
#include <stdint.h>

#include "reaper_ctx.h"

/* Registers the reconcile metrics. Call once at start. */
void sp_reconcile_register_metrics(void);

/* Checks whether Redis is the one the last reconcile left (epoch, run_id, replication id); if
 * not, and no other replica is on it, reconciles every SKU and records the new epoch. Nothing
 * recorded (the first start on a database, or one rebuilt from the log) counts as not. Afterwards
 * rp->seen.known says whether Redis is confirmed: until it is, nothing may be given back to it
 * (the ledger's stamps may not describe this Redis). 0, or -1 with errbuf. */
int sp_reconcile_check(sp_reaper *rp, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Reconciles every SKU of PostgreSQL's inventory (all paused first, then rebuilt one by one) and
 * records the new epoch, as the check does; why is logged. *busy is 1 when another replica holds
 * the reconcile lock (nothing done). 0 when every SKU was rebuilt; -1 with errbuf otherwise. */
int sp_reconcile_all(sp_reaper *rp, const char *why, int *busy, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Reconciles one SKU. wait_lock: wait (lock_timeout) for the SKU's lock instead of giving up at
 * once. *busy is 1 when the lock was not got (nothing done). 0, or -1 with errbuf. */
int sp_reconcile_sku(sp_reaper *rp, int64_t sku_id, const char *why, int wait_lock, int *busy,
                     char *errbuf, size_t errlen) __attribute__((warn_unused_result));

#endif
