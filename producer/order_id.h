/* order_id.h - order ids: unique across a fleet of producers, sortable by time, carrying the SKU.
 *
 * Form: TTTTTTTTTTTT-SKU-WORKER-SEQ
 *   TTTTTTTTTTTT 12 lowercase hex digits of the creation time in ms (fixed width: ids sort by time)
 *   SKU          the decimal sku_id (so /pay and GET can key an event or a lookup without a read)
 *   WORKER       the last 20 characters of WORKER_ID, reduced to [A-Za-z0-9.-] (pod names are
 *                unique in their random suffix, which is kept)
 *   SEQ          8 hex digits of a per-process counter that starts at a random value
 * At most 12+1+16+1+20+1+8 = 59 bytes, within SP_ORDER_ID_MAX.
 */
#ifndef SP_ORDER_ID_H
#define SP_ORDER_ID_H

#include <stdint.h>

#include "event.h"

typedef struct sp_order_ids {
    char worker[21];
    uint32_t seq;
} sp_order_ids;

/* Prepares a generator for this worker. Not thread-safe: one per thread. */
void sp_order_ids_init(sp_order_ids *g, const char *worker_id);

/* Writes a new id for sku_id at time now_ms into out (SP_ORDER_ID_MAX + 1 bytes). */
void sp_order_id_next(sp_order_ids *g, int64_t now_ms, int64_t sku_id,
                      char out[SP_ORDER_ID_MAX + 1]);

/* The sku_id an order id carries: 0 and *sku_id, or -1 when s is not such an id. */
int sp_order_id_sku(const char *s, int64_t *sku_id) __attribute__((warn_unused_result));

#endif
