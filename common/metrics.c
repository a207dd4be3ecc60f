/* metrics.c - counters, gauges and histograms, rendered as Prometheus text for /metrics. */
#include "metrics.h"

#include <string.h>
#include <unistd.h>

#ifndef SP_VERSION
#define SP_VERSION "dev"
#endif

const int64_t sp_latency_us_bounds[SP_LATENCY_US_NBOUNDS] = {
    100,   250,    500,    1000,   2500,    5000,    10000,  25000,
    50000, 100000, 250000, 500000, 1000000, 2500000, 5000000};

static sp_metric *registry = NULL;

void sp_metrics_register(sp_metric *m) {
    for (sp_metric *it = registry; it; it = it->next)
        if (it == m) return;
    if (m->kind == SP_HISTOGRAM && m->nbounds > SP_HIST_BUCKETS_MAX)
        m->nbounds = SP_HIST_BUCKETS_MAX;
    /* Append, so families render in the order the program declared them. */
    sp_metric **tail = &registry;
    while (*tail) tail = &(*tail)->next;
    m->next = NULL;
    *tail = m;
}

void sp_metric_observe(sp_metric *m, int64_t v) {
    int i;
    for (i = 0; i < m->nbounds; i++)
        if (v <= m->bounds[i]) {
            atomic_fetch_add_explicit(&m->buckets[i], 1, memory_order_relaxed);
            break;
        }
    /* Above the last bound: only +Inf (count) holds it. */
    atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->value, v, memory_order_relaxed);
}

static const char *kind_name(sp_metric_kind k) {
    return k == SP_COUNTER ? "counter" : k == SP_GAUGE ? "gauge" : "histogram";
}

/* Renders one series; the family header has been written already. */
static void render_series(FILE *out, sp_metric *m) {
    const char *l = m->labels;
    if (m->kind != SP_HISTOGRAM && m->scale != 0) {
        fprintf(out, "%s%s%s%s %g\n", m->name, l ? "{" : "", l ? l : "", l ? "}" : "",
                (double)sp_metric_get(m) * m->scale);
        return;
    }
    if (m->kind != SP_HISTOGRAM) {
        fprintf(out, "%s%s%s%s %lld\n", m->name, l ? "{" : "", l ? l : "", l ? "}" : "",
                (long long)sp_metric_get(m));
        return;
    }
    uint64_t cum = 0;
    for (int i = 0; i < m->nbounds; i++) {
        cum += atomic_load_explicit(&m->buckets[i], memory_order_relaxed);
        fprintf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", m->name, l ? l : "", l ? "," : "",
                (double)m->bounds[i] * m->scale, (unsigned long long)cum);
    }
    uint64_t count = atomic_load_explicit(&m->count, memory_order_relaxed);
    if (count < cum) count = cum; /* a racing observe may have bumped a bucket before count */
    fprintf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", m->name, l ? l : "", l ? "," : "",
            (unsigned long long)count);
    fprintf(out, "%s_sum%s%s%s %g\n", m->name, l ? "{" : "", l ? l : "", l ? "}" : "",
            (double)sp_metric_get(m) * m->scale);
    fprintf(out, "%s_count%s%s%s %llu\n", m->name, l ? "{" : "", l ? l : "", l ? "}" : "",
            (unsigned long long)count);
}

static long resident_bytes(void) {
    long pages = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL) return 0;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
    fclose(f);
    return rss * sysconf(_SC_PAGESIZE);
}

int sp_metrics_render(FILE *out) {
    for (sp_metric *m = registry; m; m = m->next) {
        int seen = 0;
        for (sp_metric *p = registry; p != m; p = p->next)
            if (strcmp(p->name, m->name) == 0) seen = 1;
        if (seen) continue; /* its family was written with the first series of that name */
        fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, kind_name(m->kind));
        for (sp_metric *s = m; s; s = s->next)
            if (strcmp(s->name, m->name) == 0) render_series(out, s);
    }
    fprintf(out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n"
            "process_resident_memory_bytes %ld\n",
            resident_bytes());
    fprintf(out,
            "# HELP stockpipe_build_info Build of this worker.\n"
            "# TYPE stockpipe_build_info gauge\n"
            "stockpipe_build_info{version=\"%s\"} 1\n",
            SP_VERSION);
    return ferror(out) ? -1 : 0;
}
