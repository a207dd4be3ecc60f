/* order_api.h - the producer's HTTP API: open and restock sales, take orders, record payments.
 *
 * Everything runs on one libevent loop: HTTP (evhttp), Redis (redis_async.h: concurrent requests
 * share one pipelined connection per server, or per primary of a cluster) and Kafka (librdkafka's
 * delivery reports are woken into the loop through a pipe). An order is admitted by one Lua script
 * in Redis, then published as order.created; the buyer hears 202 only from the delivery report that
 * says Kafka has it.
 */
#ifndef SP_ORDER_API_H
#define SP_ORDER_API_H

#include <stddef.h>

#include "config.h"
#include "http.h"

struct event_base;
typedef struct sp_order_api sp_order_api;

/* Connects to Kafka (the producer handle) and routes the API on http. Redis is connected by the
 * loop and re-connected whenever it drops. cfg and http must outlive the API. NULL with errbuf. */
sp_order_api *sp_order_api_new(struct event_base *base, sp_http *http, const sp_config *cfg,
                               char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Called every 100 ms by the loop: (re)connects Redis, polls Kafka, updates /readyz. */
void sp_order_api_tick(sp_order_api *api);

/* Requests still waiting for Redis or Kafka. */
int sp_order_api_inflight(const sp_order_api *api);

/* Waits up to timeout_ms for Kafka to deliver what is queued; returns the messages still
 * undelivered (their reservations stay for the reaper). */
int sp_order_api_flush(sp_order_api *api, int timeout_ms);

void sp_order_api_free(sp_order_api *api);

#endif
