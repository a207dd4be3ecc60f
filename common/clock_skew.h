/* clock_skew.h - how far this worker's wall clock is from Redis's, the clock that decisions
 *                spanning hosts are taken on.
 *
 * Pods on different nodes do not share a clock. A reservation's age is measured on Redis's clock
 * alone (reserve.lua stamps it with TIME, the reaper's sweep reads TIME), so no skew can make a
 * reservation still waiting for Kafka look lost. What still comes from a worker's own clock: an
 * order's time and pay deadline (the producer's, compared with PostgreSQL's now() by the reaper's
 * expiry) and event timestamps. So every worker that talks to Redis measures its offset from
 * Redis's TIME; one off by more than CLOCK_SKEW_MAX_MS says so in its log, in the gauge
 * stockpipe_clock_skew_ms and in /readyz (a producer then gets no traffic from its Service).
 *
 * The state is one process-wide measurement: any thread may record or read it. */
#ifndef SP_CLOCK_SKEW_H
#define SP_CLOCK_SKEW_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>

#include "redis_store.h"

/* Registers stockpipe_clock_skew_ms. */
void sp_clock_skew_register_metrics(void);

/* A TIME reply in ms since the epoch; 0, or -1 when r is not one. */
int sp_clock_redis_time_ms(const redisReply *r, int64_t *ms);

/* Records one measurement: this host's wall clock when TIME was sent and when its reply came, and
 * Redis's time in it. Returns the offset, this host minus Redis, at the midpoint. */
int64_t sp_clock_skew_record(int64_t sent_ms, int64_t replied_ms, int64_t redis_ms);

/* Reads Redis's clock on a blocking connection (one TIME) into *redis_ms, and records this host's
 * offset from it; 0, or -1 with errbuf (the connection may be broken). In a Redis Cluster every
 * primary has a clock of its own: key names the one whose clock counts (the node of a SKU's keys,
 * whose TIME stamped its reservations); NULL: any. */
int sp_clock_redis_now_ms(sp_redis *c, const char *key, int64_t *redis_ms, char *errbuf,
                          size_t errlen) __attribute__((warn_unused_result));

/* 1 when the last offset measured is beyond max_ms either way, with a sentence in why for /readyz;
 * 0 otherwise (also before any measurement). Logs a warning when the offset goes beyond the bound
 * and a note when it comes back. */
int sp_clock_skew_exceeded(int64_t max_ms, char *why, size_t whylen);

#endif
