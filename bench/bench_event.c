/* bench_event.c - how fast the event codec encodes and decodes order.created events.
 *
 * Usage: bench_event [N]   (N events per run, default 1000000; 5 runs each, median reported)
 *
 * Every result feeds a checksum that is printed at the end, so the compiler cannot drop the
 * work. The ids vary per event so that the numbers are not those of one cached string.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "event.h"

#define RUNS     5
#define NSAMPLES 1024 /* distinct encoded events cycled through by the decode benchmark */

static double now_s(void) {
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

/* Fills ev as the i-th order.created of the run. */
static void make_event(sp_event *ev, uint64_t i) {
    memset(ev, 0, sizeof(*ev));
    ev->type = SP_EV_ORDER_CREATED;
    ev->ts_ms = INT64_C(1732240000000) + (int64_t)(i % 1000000);
    ev->sku_id = 1001 + (int64_t)(i % 16);
    snprintf(ev->order_id, sizeof(ev->order_id), "01JDX3F6K2ZQ8T4V%010" PRIu64, i);
    ev->user_id = 1 + (int64_t)(i % 100000);
    ev->qty = 1 + (int32_t)(i % 3);
    ev->expires_ms = ev->ts_ms + 600000;
}

static void report(const char *name, long n, double *secs) {
    double med;

    qsort(secs, RUNS, sizeof(secs[0]), cmp_double);
    med = secs[RUNS / 2];
    printf("%-13s N=%ld  median %.2f s  %.2f M ops/s  %.0f ns/op\n", name, n, med,
           (double)n / med / 1e6, med * 1e9 / (double)n);
}

int main(int argc, char **argv) {
    static char samples[NSAMPLES][SP_EVENT_MAX];
    static size_t sample_len[NSAMPLES];
    char buf[SP_EVENT_MAX], err[256];
    double secs[RUNS], t0;
    uint64_t checksum = 0;
    sp_event ev;
    size_t len;
    long n = 1000000;

    if (argc > 1 && (n = strtol(argv[1], NULL, 10)) <= 0) {
        fprintf(stderr, "usage: %s [N > 0]\n", argv[0]);
        return 2;
    }

    /* encode: the event is filled outside the timed loop's codec call but inside the loop, as a
     * producer would; filling costs far less than encoding. */
    for (int r = 0; r < RUNS; r++) {
        t0 = now_s();
        for (long i = 0; i < n; i++) {
            make_event(&ev, (uint64_t)i);
            if (sp_event_encode(&ev, buf, sizeof(buf), &len, err, sizeof(err)) != 0) {
                fprintf(stderr, "encode failed: %s\n", err);
                return 1;
            }
            checksum += len + (unsigned char)buf[len - 2];
        }
        secs[r] = now_s() - t0;
    }
    report("event_encode", n, secs);

    for (int i = 0; i < NSAMPLES; i++) {
        make_event(&ev, (uint64_t)i * 7919);
        if (sp_event_encode(&ev, samples[i], sizeof(samples[i]), &sample_len[i], err,
                            sizeof(err)) != 0) {
            fprintf(stderr, "encode failed: %s\n", err);
            return 1;
        }
    }
    for (int r = 0; r < RUNS; r++) {
        t0 = now_s();
        for (long i = 0; i < n; i++) {
            int k = (int)(i % NSAMPLES);

            if (sp_event_decode(samples[k], sample_len[k], &ev, err, sizeof(err)) != 0) {
                fprintf(stderr, "decode failed: %s\n", err);
                return 1;
            }
            checksum += (uint64_t)ev.user_id + (uint64_t)ev.qty + (unsigned char)ev.order_id[25];
        }
        secs[r] = now_s() - t0;
    }
    report("event_decode", n, secs);

    printf("checksum %" PRIu64 "\n", checksum);
    return 0;
}
