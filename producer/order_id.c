/* order_id.c - order ids: unique across a fleet of producers, sortable by time, carrying the
 * SKU. */
#include "order_id.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void sp_order_ids_init(sp_order_ids *g, const char *worker_id) {
    size_t n = strlen(worker_id), start = n > 20 ? n - 20 : 0, o = 0;
    for (size_t i = start; i < n; i++) {
        char c = worker_id[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.';
        g->worker[o++] = ok ? c : '.'; /* '-' separates fields, so it is not kept */
    }
    if (o == 0) g->worker[o++] = 'w';
    g->worker[o] = '\0';
    /* A random start keeps a restarted worker (same WORKER_ID, same millisecond) from reusing
     * ids. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    g->seq = (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 16);
}

void sp_order_id_next(sp_order_ids *g, int64_t now_ms, int64_t sku_id,
                      char out[SP_ORDER_ID_MAX + 1]) {
    snprintf(out, SP_ORDER_ID_MAX + 1, "%012" PRIx64 "-%" PRId64 "-%s-%08" PRIx32, (uint64_t)now_ms,
             sku_id, g->worker, g->seq++);
}

int sp_order_id_sku(const char *s, int64_t *sku_id) {
    const char *dash = strchr(s, '-');
    char *end;
    if (!sp_order_id_valid(s) || dash == NULL || dash - s != 12) return -1;
    if (dash[1] < '1' || dash[1] > '9') return -1;
    long long v = strtoll(dash + 1, &end, 10);
    if (*end != '-' || v < 1 || v > SP_ID_MAX) return -1;
    *sku_id = v;
    return 0;
}
