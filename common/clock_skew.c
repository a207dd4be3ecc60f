/* clock_skew.c - how far this worker's wall clock is from Redis's (see clock_skew.h). */
#include "clock_skew.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "clock.h"
#include "log.h"
#include "metrics.h"

static sp_metric m_skew = SP_METRIC_GAUGE(
    "stockpipe_clock_skew_ms",
    "This worker's wall clock minus Redis's TIME, in ms, last measured (CLOCK_SKEW_MAX_MS bounds "
    "it for /readyz).",
    NULL);

static _Atomic int measured;   /* a measurement exists */
static _Atomic int was_beyond; /* the last check found the offset beyond the bound */

void sp_clock_skew_register_metrics(void) { sp_metrics_register(&m_skew); }

int sp_clock_redis_time_ms(const redisReply *r, int64_t *ms) {
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING)
        return -1;
    char *end;
    long long s = strtoll(r->element[0]->str, &end, 10);
    if (*end != '\0') return -1;
    long long us = strtoll(r->element[1]->str, &end, 10);
    if (*end != '\0') return -1;
    *ms = (int64_t)s * 1000 + (int64_t)us / 1000;
    return 0;
}

int64_t sp_clock_skew_record(int64_t sent_ms, int64_t replied_ms, int64_t redis_ms) {
    int64_t skew = sent_ms + (replied_ms - sent_ms) / 2 - redis_ms;
    sp_metric_set(&m_skew, skew);
    atomic_store(&measured, 1);
    return skew;
}

int sp_clock_redis_now_ms(sp_redis *c, const char *key, int64_t *redis_ms, char *errbuf,
                          size_t errlen) {
    int64_t sent = sp_clock_wall_ms(), now;
    redisReply *r = sp_redis_command(c, key, errbuf, errlen, "TIME");
    int64_t replied = sp_clock_wall_ms();
    if (r == NULL) return -1;
    int rc = sp_clock_redis_time_ms(r, &now);
    freeReplyObject(r);
    if (rc != 0) {
        snprintf(errbuf, errlen, "redis TIME: unexpected reply");
        return -1;
    }
    sp_clock_skew_record(sent, replied, now);
    *redis_ms = now;
    return 0;
}

int sp_clock_skew_exceeded(int64_t max_ms, char *why, size_t whylen) {
    if (!atomic_load(&measured)) return 0;
    int64_t skew = sp_metric_get(&m_skew);
    int beyond = llabs((long long)skew) > max_ms;
    if (beyond)
        snprintf(why, whylen,
                 "clock skew: this host's clock is %" PRId64 " ms %s Redis's (CLOCK_SKEW_MAX_MS "
                 "is %" PRId64 "): fix its time synchronisation",
                 (int64_t)llabs((long long)skew), skew > 0 ? "ahead of" : "behind", max_ms);
    int was = atomic_exchange(&was_beyond, beyond);
    if (beyond && !was)
        sp_warn("%s", why);
    else if (!beyond && was)
        sp_info("clock skew back within CLOCK_SKEW_MAX_MS: %" PRId64 " ms", skew);
    return beyond;
}
