/* metrics.h - counters, gauges and histograms, rendered as Prometheus text for /metrics. */
#ifndef SP_METRICS_H
#define SP_METRICS_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

typedef enum sp_metric_kind { SP_COUNTER, SP_GAUGE, SP_HISTOGRAM } sp_metric_kind;

#define SP_HIST_BUCKETS_MAX 16

/* One series: a name plus a fixed label set. Series sharing a name form one family and must agree
 * on help and kind. Metrics are static objects owned by the module that declares them; updates are
 * relaxed atomics, so any thread may update while /metrics renders from another. */
typedef struct sp_metric {
    const char *name;
    const char *help;
    const char *labels; /* e.g. "outcome=\"accepted\"", or NULL */
    sp_metric_kind kind;
    /* histograms: upper bounds in the observed unit, ascending; rendered multiplied by scale */
    const int64_t *bounds;
    int nbounds;
    double scale;
    _Atomic int64_t value; /* counter or gauge; a histogram's sum */
    _Atomic uint64_t count;
    _Atomic uint64_t buckets[SP_HIST_BUCKETS_MAX];
    struct sp_metric *next; /* registry link, set by sp_metrics_register */
} sp_metric;

/* clang-format 14 reads a braced initializer in a #define as a block: kept as written */
/* clang-format off */
#define SP_METRIC_COUNTER(n, h, l) {.name = (n), .help = (h), .labels = (l), .kind = SP_COUNTER}
#define SP_METRIC_GAUGE(n, h, l)   {.name = (n), .help = (h), .labels = (l), .kind = SP_GAUGE}
/* A gauge set in one unit and rendered multiplied by sc (e.g. ms set, seconds rendered: 1e-3). */
#define SP_METRIC_GAUGE_SCALED(n, h, l, sc)                                                        \
    {.name = (n), .help = (h), .labels = (l), .kind = SP_GAUGE, .scale = (sc)}
#define SP_METRIC_HISTOGRAM(n, h, l, b, nb, sc)                                                    \
    {.name = (n), .help = (h), .labels = (l), .kind = SP_HISTOGRAM, .bounds = (b),                 \
     .nbounds = (nb), .scale = (sc)}
/* clang-format on */

/* Latency buckets in microseconds (rendered in seconds): 100us .. 5s. */
#define SP_LATENCY_US_NBOUNDS 15
extern const int64_t sp_latency_us_bounds[SP_LATENCY_US_NBOUNDS];

/* A latency histogram observed in microseconds, rendered in seconds. */
#define SP_METRIC_LATENCY(n, h)                                                                    \
    SP_METRIC_HISTOGRAM(n, h, NULL, sp_latency_us_bounds, SP_LATENCY_US_NBOUNDS, 1e-6)

/* Adds m to the registry. Call during startup, before threads that render run. Registering the
 * same object twice is a no-op. */
void sp_metrics_register(sp_metric *m);

static inline void sp_metric_add(sp_metric *m, int64_t n) {
    atomic_fetch_add_explicit(&m->value, n, memory_order_relaxed);
}
static inline void sp_metric_inc(sp_metric *m) { sp_metric_add(m, 1); }
static inline void sp_metric_set(sp_metric *m, int64_t v) {
    atomic_store_explicit(&m->value, v, memory_order_relaxed);
}
static inline int64_t sp_metric_get(sp_metric *m) {
    return atomic_load_explicit(&m->value, memory_order_relaxed);
}

/* Records one observation of v (in the histogram's unit) into a histogram. */
void sp_metric_observe(sp_metric *m, int64_t v);

/* Writes every registered family in Prometheus text format 0.0.4, plus
 * process_resident_memory_bytes and stockpipe_build_info. Returns 0, or -1 on a write error. */
int sp_metrics_render(FILE *out);

#endif
