/* consumer.c - the consumer worker: reads the events topic as a member of a consumer group and
 *              applies it to PostgreSQL in batches, exactly once, or replays the whole log.
 *
 * Two threads and a two-stage pipeline (the health server has a thread of its own):
 *   the poller (the caller's thread) owns everything Kafka: it polls messages, decodes them into
 *     the filling batch, serves the rebalance callback (librdkafka calls it from inside
 *     rd_kafka_consumer_poll), seeks, commits offsets to Kafka, and keeps /readyz and the lag;
 *   the applier applies one batch at a time to PostgreSQL (order_store.c), produces its dead
 *     letters, counts it and makes the after-commit Redis corrections.
 * While the applier commits one batch the poller decodes the next one, so decoding and
 * PostgreSQL's work overlap. Batches are applied strictly one after the other, in the order they
 * were read, and the poller takes each one's outcome back (settle) before it hands over the next:
 * when one failed, the one being filled is dropped too and both are read again.
 *
 * Where a partition's events are read from is decided in one place for each case:
 *   assignment     the offset stored in PostgreSQL (Kafka's committed offset only if PostgreSQL
 *                  cannot be reached: it never passes PostgreSQL's, so at worst events are read
 *                  again and dropped as stale);
 *   failed batch   a seek back to the smallest offset of the failed batch and the dropped one; when
 *                  the store refused the batch because it started past PostgreSQL's stored offset
 *                  (this consumer's position was ahead of PostgreSQL's: the offsets in between were
 *                  never applied), a seek back to the stored offset;
 *   an offset gap  (a message beyond the one expected) a seek back to the expected offset, unless
 *                  the broker no longer has it (retention) or it was read again from there already
 *                  and the gap stayed (offsets with no message); in_sequence decides, and only
 *                  then does the message carry the gap (gap_from) that lets the store accept a
 *                  batch starting past its stored offset.
 * So no event is skipped, and one read twice is dropped by the stored offset.
 *
 * No wait on PostgreSQL is unbounded (docs/consumer.md, "Bounded waits"): the sessions carry
 * statement, lock and idle-in-transaction timeouts and the stores give up on a round trip the
 * server does not answer (order_store.h); the poller's own queries (readiness, offsets at an
 * assignment) have a shorter bound, since the group waits on the poller; and a revocation waits
 * at most REBALANCE_DRAIN_MS for the batches read to commit, then lets the partitions go with the
 * batch in flight still running (orphaned): whatever it commits later is stale for the next owner.
 */
#include "consumer.h"

#include <ctype.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "http.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "order_store.h"
#include "redis_store.h"
#include "signals.h"
#include "stock.h"

#define POLL_IDLE_MS     100  /* longest poll while no batch is open: the loop's tick */
#define POLL_BUSY_MS     5    /* poll while a due batch waits for the applier */
#define READY_EVERY_MS   2000 /* how often /readyz's backends are checked */
#define LAG_EVERY_MS     1000
#define SUMMARY_EVERY_MS 10000 /* an info line with the totals */
#define BACKOFF_MIN_MS   200   /* after a failed batch; doubles up to BACKOFF_MAX_MS */
#define BACKOFF_MAX_MS   5000
#define SEEK_TIMEOUT_MS  10000
#define DLQ_FLUSH_MS     15000
#define KAFKA_TIMEOUT_MS 10000 /* metadata, watermarks, offsets for times */
#define REDIS_TIMEOUT_MS 500
#define REDIS_RETRY_MS   1000 /* after a Redis failure, the next attempt waits this long */
#define ASSIGN_PG_TRIES  3
#define PG_CONNECT_S     5    /* libpq's connect_timeout, unless PG_DSN sets one */
#define PG_ANSWER_MS     2000 /* past PG_STATEMENT_TIMEOUT_MS, a round trip is given up */
#define PROBE_ANSWER_MS  3000 /* at most, for the poller's queries: the group waits on it */

/* ---- metrics ---- */

#define BY_TYPE(name, help, type) SP_METRIC_COUNTER(name, help, "type=\"" type "\"")
#define APPLIED(type)                                                                              \
    BY_TYPE("stockpipe_consumer_events_applied_total",                                             \
            "Events that changed the database, by type.", type)
#define UNCHANGED(type)                                                                            \
    BY_TYPE("stockpipe_consumer_events_unchanged_total",                                           \
            "Events the rules made a no-op (duplicates, races already decided), by type.", type)
static sp_metric m_applied[] = {
    [SP_EV_STOCK_SET] = APPLIED("stock.set"),
    [SP_EV_STOCK_ADD] = APPLIED("stock.add"),
    [SP_EV_ORDER_CREATED] = APPLIED("order.created"),
    [SP_EV_ORDER_PAID] = APPLIED("order.paid"),
    [SP_EV_ORDER_EXPIRED] = APPLIED("order.expired"),
    [SP_EV_ORDER_VOIDED] = APPLIED("order.voided"),
};
static sp_metric m_unchanged[] = {
    [SP_EV_STOCK_SET] = UNCHANGED("stock.set"),
    [SP_EV_STOCK_ADD] = UNCHANGED("stock.add"),
    [SP_EV_ORDER_CREATED] = UNCHANGED("order.created"),
    [SP_EV_ORDER_PAID] = UNCHANGED("order.paid"),
    [SP_EV_ORDER_EXPIRED] = UNCHANGED("order.expired"),
    [SP_EV_ORDER_VOIDED] = UNCHANGED("order.voided"),
};
#undef APPLIED
#undef UNCHANGED
#undef BY_TYPE
#define NTYPES ((int)(sizeof(m_applied) / sizeof(m_applied[0])))
#define REJECTED(reason)                                                                           \
    SP_METRIC_COUNTER("stockpipe_consumer_orders_rejected_total",                                  \
                      "Orders stored rejected, by reason.", "reason=\"" reason "\"")
static sp_metric m_rejected_stock = REJECTED("out_of_stock");
static sp_metric m_rejected_sku = REJECTED("unknown_sku");
#undef REJECTED
static sp_metric m_over_admitted = SP_METRIC_COUNTER(
    "stockpipe_consumer_over_admissions_total",
    "Orders Redis admitted that PostgreSQL's stock could not cover (stored rejected).", NULL);
static sp_metric m_capped = SP_METRIC_COUNTER(
    "stockpipe_consumer_redis_capped_units_total",
    "Units taken off Redis's stock after PostgreSQL refused orders (cap.lua).", NULL);
static sp_metric m_late = SP_METRIC_COUNTER(
    "stockpipe_consumer_late_payments_total",
    "Payments for orders already expired, rejected or cancelled: stored refund_due.", NULL);
static sp_metric m_dead = SP_METRIC_COUNTER(
    "stockpipe_consumer_dead_letters_total",
    "Events that could not be applied (sent to the dead-letter topic, or logged on replay).", NULL);
static sp_metric m_stale = SP_METRIC_COUNTER(
    "stockpipe_consumer_stale_events_total",
    "Events read again below their partition's stored offset, and skipped.", NULL);
static const int64_t batch_size_bounds[] = {1,    10,   50,    100,   250,   500,   1000,
                                            2000, 5000, 10000, 20000, 50000, 100000};
static sp_metric m_batch_size = SP_METRIC_HISTOGRAM(
    "stockpipe_consumer_batch_events", "Events per committed batch.", NULL, batch_size_bounds,
    (int)(sizeof(batch_size_bounds) / sizeof(batch_size_bounds[0])), 1);
static sp_metric m_batch_latency = SP_METRIC_LATENCY(
    "stockpipe_consumer_batch_seconds",
    "Time to apply and commit one batch (PostgreSQL transaction, dead letters).");
static sp_metric m_batch_failures = SP_METRIC_COUNTER(
    "stockpipe_consumer_batch_failures_total",
    "Batches rolled back and read again later (PostgreSQL or the dead-letter topic failed).", NULL);
static sp_metric m_redos = SP_METRIC_COUNTER(
    "stockpipe_consumer_batch_redos_total",
    "Transactions redone inside a batch: version conflicts, lost insert races, deadlocks.", NULL);
static sp_metric m_lag = SP_METRIC_GAUGE(
    "stockpipe_consumer_lag_events",
    "Events in the assigned partitions not yet applied (end offset minus stored offset).", NULL);
static sp_metric m_assigned = SP_METRIC_GAUGE("stockpipe_consumer_assigned_partitions",
                                              "Partitions this consumer owns.", NULL);
static sp_metric m_redis_errors = SP_METRIC_COUNTER(
    "stockpipe_consumer_redis_errors_total",
    "After-commit Redis corrections that failed (logged; the reaper's reconcile is the backstop).",
    NULL);
static sp_metric m_kafka_errors = SP_METRIC_COUNTER(
    "stockpipe_consumer_kafka_errors_total", "Errors the consumer's Kafka client reported.", NULL);
static sp_metric m_drain_timeouts = SP_METRIC_COUNTER(
    "stockpipe_consumer_rebalance_drain_timeouts_total",
    "Revocations that let the partitions go with a batch PostgreSQL had not committed within "
    "REBALANCE_DRAIN_MS (its events are read again by the next owner).",
    NULL);
static sp_metric m_gaps = SP_METRIC_COUNTER(
    "stockpipe_consumer_offset_gaps_total",
    "Gaps that made the consumer read a partition again: a message past the offset expected, or "
    "a batch refused for starting past PostgreSQL's stored offset.",
    NULL);

static void register_metrics(void) {
    for (int t = 1; t < NTYPES; t++) sp_metrics_register(&m_applied[t]);
    for (int t = 1; t < NTYPES; t++) sp_metrics_register(&m_unchanged[t]);
    sp_metric *all[] = {&m_rejected_stock, &m_rejected_sku,   &m_over_admitted, &m_capped,
                        &m_late,           &m_dead,           &m_stale,         &m_batch_size,
                        &m_batch_latency,  &m_batch_failures, &m_redos,         &m_lag,
                        &m_assigned,       &m_redis_errors,   &m_kafka_errors,  &m_gaps,
                        &m_drain_timeouts};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) sp_metrics_register(all[i]);
}

/* ---- state ---- */

/* A partition this consumer reads. The poller's alone. */
typedef struct part {
    int32_t partition;
    int64_t expect; /* the offset the next message should have; < 0: any (logical start) */
    int64_t reread; /* the offset last read again after a gap: a second gap there is real (also
                     * after a batch the store refused: read again from the stored offset, a gap
                     * that stays there ends the same way, not in a loop) */
    int64_t next;   /* the next offset stored in PostgreSQL, as far as this consumer knows; -1 */
    int64_t end;    /* replay: the end offset taken at start */
} part;

typedef struct consumer consumer;

/* One batch and its messages: filled by the poller, then applied by the applier. */
typedef struct slot {
    consumer *c;
    sp_batch *batch;
    rd_kafka_message_t **msgs; /* the batch's messages, parallel to batch->items, owned */
    int64_t started_ms;        /* when the batch got its first message */
    int done;                  /* the applier finished it (guarded by consumer.mu) */
    int ok;                    /* ... and committed it */
    int orphan; /* given up on at a revocation: its partitions went before it committed, so its
                 * outcome moves nothing (no seek, no back-off); the poller's */
} slot;

struct consumer {
    const sp_config *cfg;
    sp_consumer_opts opts;
    rd_kafka_t *rk; /* the group member (live), or a consumer with a manual assignment (replay) */
    /* The pipeline. */
    slot slots[2];
    slot *filling;  /* the poller's */
    slot *inflight; /* handed to the applier, its outcome not taken back yet; NULL when none */
    pthread_t applier;
    int applier_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    slot *job; /* the slot the applier is to apply (guarded by mu) */
    int quit;  /* the applier is to end (guarded by mu) */
    /* The poller's. */
    sp_order_store *probe; /* a connection of its own for stored offsets and /readyz */
    part *parts;
    size_t nparts, partcap;
    int failures; /* consecutive failed batches */
    int64_t backoff_until_ms;
    int last_ok; /* the last batch committed (the exit status on stop) */
    int64_t started_ms, last_summary_ms, last_ready_ms, last_lag_ms;
    int64_t summarized_batches; /* nbatches at the last summary line */
    int was_ready;
    /* The applier's. */
    sp_order_store *store;
    rd_kafka_t *dlq; /* the dead-letter producer; NULL on replay */
    int dlq_failed;  /* failed deliveries of the batch being committed (delivery callback) */
    char dlq_error[256];
    const char **ids;             /* scratch: one SKU's order ids for HDEL */
    sp_redis_target redis_target; /* Redis, live only, best effort */
    sp_redis *redis;
    int64_t redis_retry_ms;
    /* Totals for the summary lines: written by the applier, read by the poller. */
    _Atomic int64_t napplied, nunchanged, ndead, nstale, nbatches, nrejected;
};

static void sleep_ms(int64_t ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static part *find_part(consumer *c, int32_t partition) {
    for (size_t i = 0; i < c->nparts; i++)
        if (c->parts[i].partition == partition) return &c->parts[i];
    return NULL;
}

/* The partition's entry, added when missing; NULL when out of memory. */
static part *add_part(consumer *c, int32_t partition) {
    part *p = find_part(c, partition);
    if (p) return p;
    if (c->nparts == c->partcap) {
        size_t cap = c->partcap ? c->partcap * 2 : 16;
        part *np = realloc(c->parts, cap * sizeof(*np));
        if (np == NULL) return NULL;
        c->parts = np;
        c->partcap = cap;
    }
    p = &c->parts[c->nparts++];
    *p = (part){.partition = partition, .expect = -1, .reread = -1, .next = -1, .end = -1};
    return p;
}

/* ---- arguments ---- */

/* "1732240000000" or "2026-11-22T10:00:00[.123]Z" (also with a space, or "+00:00"). */
static int parse_time(const char *s, int64_t *ms) {
    int y, mo, d, h, mi, sec, n = 0;
    char *end;
    if (isdigit((unsigned char)s[0]) && strspn(s, "0123456789") == strlen(s)) {
        long long v = strtoll(s, &end, 10);
        if (*end != '\0' || v < 0 || v > SP_TS_MAX) return -1;
        *ms = v;
        return 0;
    }
    if (sscanf(s, "%4d-%2d-%2d%*1[T ]%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6)
        return -1;
    const char *rest = s + n;
    int frac = 0;
    if (*rest == '.') {
        int digits = 0;
        for (rest++; isdigit((unsigned char)*rest); rest++, digits++)
            if (digits < 3) frac = frac * 10 + (*rest - '0');
        for (; digits < 3; digits++) frac *= 10;
    }
    if (strcmp(rest, "Z") != 0 && strcmp(rest, "+00:00") != 0 && *rest != '\0') return -1;
    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
        return -1;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    if (t == (time_t)-1) return -1;
    *ms = (int64_t)t * 1000 + frac;
    return 0;
}

int sp_consumer_parse_args(int nargs, char *const *args, sp_consumer_opts *opts, char *errbuf,
                           size_t errlen) {
    sp_consumer_opts o = {.replay_from_ms = -1};
    for (int i = 0; i < nargs; i++) {
        const char *a = args[i];
        if (strcmp(a, "--replay") == 0) {
            o.replay = 1;
        } else if (strcmp(a, "--replay-force") == 0) {
            o.replay_force = 1;
        } else if (strncmp(a, "--replay-from=", 14) == 0 || strcmp(a, "--replay-from") == 0) {
            if (a[13] != '=' && i + 1 >= nargs) {
                snprintf(errbuf, errlen, "--replay-from needs a TIME; see consumer --help");
                return -1;
            }
            const char *v = a[13] == '=' ? a + 14 : args[++i];
            if (parse_time(v, &o.replay_from_ms) != 0) {
                snprintf(errbuf, errlen,
                         "--replay-from=\"%.40s\" is not a time; give milliseconds since the "
                         "epoch or an ISO 8601 UTC time such as 2026-11-22T10:00:00Z",
                         v);
                return -1;
            }
            o.replay = 1;
        } else {
            snprintf(errbuf, errlen, "unexpected argument \"%.*s\"; see consumer --help",
                     sp_config_arg_shown(a, 60), a);
            return -1;
        }
    }
    if (o.replay_force && !o.replay) {
        snprintf(errbuf, errlen, "--replay-force only goes with --replay; see consumer --help");
        return -1;
    }
    *opts = o;
    return 0;
}

/* ======== the applier's side ======== */

/* ---- Redis after a commit (live only; best effort) ---- */

/* A usable connection, or NULL while Redis failed less than REDIS_RETRY_MS ago. */
static sp_redis *redis_conn(consumer *c) {
    char err[256];
    if (c->redis) return c->redis;
    if (sp_clock_mono_ms() < c->redis_retry_ms) return NULL;
    c->redis = sp_redis_open(&c->redis_target, REDIS_TIMEOUT_MS, err, sizeof(err));
    if (c->redis == NULL) {
        sp_metric_inc(&m_redis_errors);
        sp_warn("redis unreachable, after-commit corrections skipped for %d ms: %s", REDIS_RETRY_MS,
                err);
        c->redis_retry_ms = sp_clock_mono_ms() + REDIS_RETRY_MS;
    }
    return c->redis;
}

static void redis_failed(consumer *c, int64_t sku_id, const char *err) {
    sp_log_ctx ctx = {.sku_id = sku_id};
    sp_metric_inc(&m_redis_errors);
    SP_LOG_CTX(SP_LOG_WARN, &ctx, "after-commit redis correction failed: %s", err);
    sp_redis_close(c->redis);
    c->redis = NULL;
    c->redis_retry_ms = sp_clock_mono_ms() + REDIS_RETRY_MS;
}

/* The cap of a sale over sku->shards Redis shards (docs/consumer.md): what the shards hold,
 * summed (sp_stock_sharded_read: stock + moving, transfers given and not yet settled counted
 * once), against what PostgreSQL can still sell plus the restocks it has not applied yet (the
 * shards' `supplied`, summed, beyond PostgreSQL's); the excess is taken off the shards' stock in
 * turn (cap.lua's `lower`), never below 0 (units moving between shards are beyond its reach: they
 * land in a recipient's stock, and the next cap or the reaper's reconcile sees them). The shards
 * are read twice, and the cap acts only when no transfer step ran on any shard between the reads
 * (the same `steps`): a transfer running while a read passes its two shards can be counted
 * twice, and a cap on that figure would hold back units PostgreSQL has.
 * Units reserved meanwhile are not in PostgreSQL yet either, so taking the excess off still
 * leaves what PostgreSQL allows. A missing or paused shard: no cap (the reaper's reconcile
 * rebuilds the sale), and why says so. *removed: the units taken away. -1 when Redis failed. */
static int cap_sharded(sp_redis *rc, const sp_batch_sku *sku, int64_t *removed, char *why,
                       size_t whylen, char *err, size_t errlen) {
    sp_sharded_units read[2];
    *removed = 0;
    for (int i = 0; i < 2; i++) {
        if (sp_stock_sharded_read(rc, sku->sku_id, sku->shards, &read[i], err, errlen) != 0)
            return -1;
        if (read[i].missing >= 0 || read[i].paused > 0) {
            snprintf(why, whylen, "%s",
                     read[i].missing >= 0 ? "a shard is missing" : "a reconcile has it paused");
            return 0;
        }
    }
    /* Two reads with the same `ver` and generation on every shard (every step of a transfer
     * counts in `ver`): no transfer ran while they passed the shards, so neither counted a unit
     * twice. Otherwise no cap now: it only hurries what PostgreSQL's guard and the next batch's
     * cap do anyway, while a cap on a figure inflated by a transfer would remove units
     * PostgreSQL has, for good. */
    if (read[0].steps != read[1].steps) {
        snprintf(why, whylen, "units were moving between shards while they were read");
        return 0;
    }
    const sp_sharded_units *u = read[1].units < read[0].units ? &read[1] : &read[0];
    int64_t unseen = u->supplied - sku->supplied;
    int64_t excess = u->units - (sku->stock + (unseen > 0 ? unseen : 0));
    for (int k = 0; k < sku->shards && excess > 0; k++) {
        int64_t taken = 0;
        if (sp_stock_cap_shard_lower(rc, sku->sku_id, k, excess, u->gen, &taken, err, errlen) != 0)
            return -1;
        *removed += taken;
        excess -= taken;
    }
    if (excess > 0)
        snprintf(why, whylen, "%" PRId64 " units more are moving between shards", excess);
    return 0;
}

/* For each SKU of the committed batch: where PostgreSQL refused orders, cap Redis's stock to what
 * PostgreSQL can still sell, so the producers stop admitting; give the buyers of refused orders
 * their per-user units back (with the order's `resv` entry, once); then drop the batch's other
 * orders from `resv` (they are in PostgreSQL now: no reservation is needed). On a sale sharded in
 * Redis, an order's entry, its buyer's count and its Idempotency-Key are on the buyer's home shard
 * (docs/reservation.md, "Hot-SKU sharding"): each is corrected there, one pass per shard. */
static void correct_redis(consumer *c, const sp_batch *b) {
    char err[256];
    for (size_t k = 0; k < b->nskus; k++) {
        const sp_batch_sku *sku = &b->skus[k];
        sp_redis *rc = redis_conn(c);
        if (rc == NULL) return;
        if (sku->nrejected > 0 && sku->exists && sku->shards > 1) {
            int64_t removed = 0;
            char why[128] = "";
            if (cap_sharded(rc, sku, &removed, why, sizeof(why), err, sizeof(err)) != 0) {
                redis_failed(c, sku->sku_id, err);
                return;
            }
            sp_metric_add(&m_capped, removed);
            sp_log_ctx ctx = {.sku_id = sku->sku_id};
            SP_LOG_CTX(SP_LOG_WARN, &ctx,
                       "%d orders rejected out_of_stock: Redis admitted more than PostgreSQL "
                       "holds (stock %" PRId64 "); Redis stock over %d shards capped by %" PRId64
                       " units%s%s",
                       (int)sku->nrejected, sku->stock, (int)sku->shards, removed,
                       why[0] ? ": " : "", why);
        } else if (sku->nrejected > 0 && sku->exists) {
            int64_t removed = 0;
            sp_log_ctx ctx = {.sku_id = sku->sku_id};
            if (sp_stock_cap(rc, sku->sku_id, sku->stock, sku->supplied, &removed, err,
                             sizeof(err)) != 0) {
                redis_failed(c, sku->sku_id, err);
                return;
            }
            sp_metric_add(&m_capped, removed);
            SP_LOG_CTX(SP_LOG_WARN, &ctx,
                       "%d orders rejected out_of_stock: Redis admitted more than PostgreSQL "
                       "holds (stock %" PRId64 "); Redis stock capped by %" PRId64 " units",
                       (int)sku->nrejected, sku->stock, removed);
        }
        for (int shard = 0; shard < sku->shards; shard++) {
            size_t n = 0;
            for (int32_t i = sku->first_item; i >= 0; i = b->items[i].next_same_sku) {
                const sp_batch_item *it = &b->items[i];
                if (it->ev.type != SP_EV_ORDER_CREATED ||
                    (it->outcome != SP_ITEM_APPLIED && it->outcome != SP_ITEM_UNCHANGED) ||
                    sp_stock_home_shard(it->ev.user_id, sku->shards) != shard)
                    continue;
                if (it->outcome == SP_ITEM_APPLIED && (it->effect == SP_EFFECT_REJECTED_STOCK ||
                                                       it->effect == SP_EFFECT_REJECTED_NO_SKU)) {
                    /* Refused here (status rejected, whatever the reason, as the reaper's sweep
                     * and reconcile read it): the buyer's units in Redis come back with the
                     * entry. */
                    int units = 0;
                    if (sp_stock_rejected_forget_on_shard(rc, sku->sku_id, shard, it->ev.order_id,
                                                          it->ev.user_id, it->ev.qty, &units, err,
                                                          sizeof(err)) != 0) {
                        redis_failed(c, sku->sku_id, err);
                        return;
                    }
                    continue;
                }
                c->ids[n++] = it->ev.order_id;
            }
            if (n > 0 && sp_stock_accepted_forget_on_shard(rc, sku->sku_id, shard, c->ids, n, err,
                                                           sizeof(err)) != 0) {
                redis_failed(c, sku->sku_id, err);
                return;
            }
        }
    }
}

/* ---- dead letters ---- */

static void on_dlq_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    consumer *c = opaque;
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        c->dlq_failed++;
        snprintf(c->dlq_error, sizeof(c->dlq_error), "%s", rd_kafka_err2str(m->err));
    }
}

/* The store's before-commit hook (arg: the slot): every dead item goes to the dead-letter topic,
 * and all of them are acknowledged, before the offsets move past them. On replay they are only
 * counted (the live run sent them). Runs on the applier, which alone serves the producer. */
static int send_dead_letters(sp_batch *b, void *arg, char *errbuf, size_t errlen) {
    slot *s = arg;
    consumer *c = s->c;
    int n = 0;
    if (c->dlq == NULL) return 0;
    c->dlq_failed = 0;
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        const rd_kafka_message_t *m = s->msgs[i];
        if (it->outcome != SP_ITEM_DEAD) continue;
        for (int tries = 0;; tries++) {
            if (sp_kafka_produce_dead_letter(
                    c->dlq, c->cfg->kafka_dlq_topic, c->cfg->kafka_topic, it->partition, it->offset,
                    m->key, m->key_len, m->payload, m->len, it->reason, c, errbuf, errlen) == 0)
                break;
            if (tries >= 50) return -1; /* the local queue stays full: the broker is gone */
            rd_kafka_poll(c->dlq, 100);
        }
        n++;
    }
    if (n == 0) return 0;
    rd_kafka_flush(c->dlq, DLQ_FLUSH_MS);
    if (rd_kafka_outq_len(c->dlq) > 0 || c->dlq_failed > 0) {
        snprintf(errbuf, errlen, "dead-letter topic %s did not take %d of %d events: %s",
                 c->cfg->kafka_dlq_topic, c->dlq_failed ? c->dlq_failed : rd_kafka_outq_len(c->dlq),
                 n, c->dlq_failed ? c->dlq_error : "flush timed out");
        return -1;
    }
    return 0;
}

/* Counts and logs what a committed batch did. */
static void account(consumer *c, const sp_batch *b, int64_t took_us) {
    int64_t napplied = 0, nunchanged = 0, ndead = 0, nstale = 0, nrejected = 0;
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        int t = (int)it->ev.type;
        switch (it->outcome) {
        case SP_ITEM_APPLIED:
            napplied++;
            if (t > 0 && t < NTYPES) sp_metric_inc(&m_applied[t]);
            if (it->effect == SP_EFFECT_REJECTED_STOCK) {
                sp_metric_inc(&m_rejected_stock);
                sp_metric_inc(&m_over_admitted);
                nrejected++;
            } else if (it->effect == SP_EFFECT_REJECTED_NO_SKU) {
                sp_metric_inc(&m_rejected_sku);
                nrejected++;
            } else if (it->effect == SP_EFFECT_LATE_PAYMENT) {
                sp_log_ctx ctx = {.order_id = it->ev.order_id,
                                  .sku_id = it->ev.sku_id,
                                  .has_kafka = 1,
                                  .partition = it->partition,
                                  .offset = it->offset};
                sp_metric_inc(&m_late);
                SP_LOG_CTX(SP_LOG_INFO, &ctx,
                           "payment for an order that can no longer be "
                           "paid: stored refund_due");
            }
            break;
        case SP_ITEM_UNCHANGED:
            nunchanged++;
            if (t > 0 && t < NTYPES) sp_metric_inc(&m_unchanged[t]);
            break;
        case SP_ITEM_DEAD: {
            sp_log_ctx ctx = {.order_id = it->ev.order_id[0] ? it->ev.order_id : NULL,
                              .sku_id = it->ev.sku_id,
                              .has_kafka = 1,
                              .partition = it->partition,
                              .offset = it->offset};
            ndead++;
            sp_metric_inc(&m_dead);
            SP_LOG_CTX(SP_LOG_WARN, &ctx, "dead letter%s: %s",
                       c->dlq ? "" : " (replay: not sent again)", it->reason);
            break;
        }
        case SP_ITEM_STALE:
            nstale++;
            sp_metric_inc(&m_stale);
            break;
        }
    }
    c->napplied += napplied;
    c->nunchanged += nunchanged;
    c->ndead += ndead;
    c->nstale += nstale;
    c->nrejected += nrejected;
    c->nbatches++;
    sp_metric_observe(&m_batch_size, (int64_t)b->n);
    sp_metric_observe(&m_batch_latency, took_us);
    sp_metric_add(&m_redos, b->conflicts);
    if (b->conflicts > 0)
        sp_debug("batch of %zu events took %d transactions (a repeated order id, a version "
                 "conflict or a lost race)",
                 b->n, b->attempts);
    sp_debug("batch of %zu events committed in %" PRId64 " us", b->n, took_us);
}

/* Applies one slot's batch: the transaction (with its dead letters), then, once committed, the
 * counting and the Redis corrections. Sets s->ok. */
static void apply_slot(consumer *c, slot *s) {
    char err[1024];
    sp_batch *b = s->batch;
    int64_t t0 = sp_clock_mono_us();
    s->ok = sp_order_store_apply(c->store, b, send_dead_letters, s, err, sizeof(err)) == 0;
    int64_t took = sp_clock_mono_us() - t0;
    if (s->ok) {
        account(c, b, took);
        if (!c->opts.replay) correct_redis(c, b);
        return;
    }
    sp_metric_inc(&m_batch_failures);
    for (size_t i = 0; i < b->nparts; i++)
        if (b->parts[i].read_again_from >= 0) sp_metric_inc(&m_gaps);
    sp_log_ctx ctx = {.has_kafka = 1,
                      .partition = b->parts[0].partition,
                      .offset = b->parts[0].first_offset};
    if (sp_order_store_in_doubt(c->store))
        SP_LOG_CTX(SP_LOG_ERROR, &ctx,
                   "batch of %zu events: no answer to its COMMIT (%s); committed or not, it is "
                   "read again, and what did commit is found stale",
                   b->n, err);
    else
        SP_LOG_CTX(SP_LOG_ERROR, &ctx, "batch of %zu events not applied (rolled back): %s", b->n,
                   err);
}

static void *applier_main(void *arg) {
    consumer *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (c->job == NULL && !c->quit) pthread_cond_wait(&c->cv, &c->mu);
        if (c->job == NULL) break; /* quit, with nothing left to do */
        slot *s = c->job;
        pthread_mutex_unlock(&c->mu);
        apply_slot(c, s);
        pthread_mutex_lock(&c->mu);
        s->done = 1;
        c->job = NULL;
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ======== the poller's side ======== */

static void update_lag(consumer *c);

static void free_messages(slot *s) {
    for (size_t i = 0; i < s->batch->n; i++) {
        rd_kafka_message_destroy(s->msgs[i]);
        s->msgs[i] = NULL;
    }
    sp_batch_clear(s->batch);
}

/* The broker's oldest offset of a partition, or -1 when it cannot be asked. */
static int64_t low_watermark(consumer *c, int32_t partition) {
    int64_t lo = -1, hi = -1;
    if (rd_kafka_query_watermark_offsets(c->rk, c->cfg->kafka_topic, partition, &lo, &hi,
                                         KAFKA_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return -1;
    return lo;
}

/* Reads partitions again from the given offsets, waiting until messages fetched before can no
 * longer come. -1 when librdkafka could not do it. */
static int seek_to(consumer *c, rd_kafka_topic_partition_list_t *list) {
    char err[256] = "";
    int rc = 0;
    rd_kafka_error_t *e = rd_kafka_seek_partitions(c->rk, list, SEEK_TIMEOUT_MS);
    if (e) {
        snprintf(err, sizeof(err), "%s", rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
        rc = -1;
    }
    for (int i = 0; i < list->cnt; i++) {
        part *p = find_part(c, list->elems[i].partition);
        if (list->elems[i].err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(err, sizeof(err), "%s", rd_kafka_err2str(list->elems[i].err));
            rc = -1;
        } else if (p) {
            p->expect = list->elems[i].offset;
        }
    }
    if (rc != 0) sp_error("seek failed: %s", err);
    return rc;
}

/* True when the message may join the batch: it is the offset expected on its partition (or the
 * partition's start is not known exactly). A message past the expected offset means something
 * was skipped: the partition is read again from the expected offset and the message is dropped,
 * unless the broker deleted that offset (retention) or it was read again from there already and
 * the gap stayed (offsets that hold no message, such as transaction markers). *gap_from gets where
 * the empty offsets before an accepted message begin: its own offset, or the expected one when a
 * gap was accepted (the store accepts a batch past its stored offset only so). */
static int in_sequence(consumer *c, const rd_kafka_message_t *m, int64_t *gap_from) {
    part *p = find_part(c, m->partition);
    *gap_from = m->offset;
    if (p == NULL) return 1; /* not ours any more: the store decides by the stored offset */
    if (p->expect < 0 || m->offset <= p->expect) {
        p->expect = m->offset + 1;
        return 1;
    }
    int64_t lo = low_watermark(c, m->partition);
    sp_log_ctx ctx = {.has_kafka = 1, .partition = m->partition, .offset = m->offset};
    if (lo > p->expect || p->reread == p->expect) {
        SP_LOG_CTX(SP_LOG_WARN, &ctx,
                   "offsets %" PRId64 "..%" PRId64 " hold no event (%s); going on from %" PRId64,
                   p->expect, m->offset - 1,
                   lo > p->expect ? "deleted by retention" : "still missing when read again",
                   m->offset);
        *gap_from = p->expect;
        p->expect = m->offset + 1;
        return 1;
    }
    sp_metric_inc(&m_gaps);
    SP_LOG_CTX(SP_LOG_WARN, &ctx, "message past the expected offset %" PRId64 "; reading again",
               p->expect);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
    if (list) {
        rd_kafka_topic_partition_list_add(list, c->cfg->kafka_topic, m->partition)->offset =
            p->expect;
        /* Marked as read again only once the seek is made: after a failed one the next message
         * still comes from the old position and must not pass for "still missing when read
         * again" (it is tried again instead; the messages meanwhile are dropped, not applied). */
        if (seek_to(c, list) == 0) p->reread = p->expect;
        rd_kafka_topic_partition_list_destroy(list);
    }
    return 0;
}

/* Decodes a message into the filling batch (which takes it over), with the gap in_sequence found
 * before it. The key must be the event's sku_id: a SKU's events stay in order only within one
 * partition. */
static void add_message(consumer *c, rd_kafka_message_t *m, int64_t gap_from) {
    char err[SP_ITEM_REASON_MAX - 16], key[24];
    slot *s = c->filling;
    sp_batch_item *it = sp_batch_add(s->batch, m->partition, m->offset);
    it->gap_from = gap_from;
    if (s->batch->n == 1) s->started_ms = sp_clock_mono_ms();
    s->msgs[s->batch->n - 1] = m;
    const char *value = m->payload ? (const char *)m->payload : "";
    if (sp_event_decode(value, m->payload ? m->len : 0, &it->ev, err, sizeof(err)) != 0) {
        it->bad = 1;
        snprintf(it->reason, sizeof(it->reason), "undecodable: %s", err);
        return;
    }
    int n = snprintf(key, sizeof(key), "%" PRId64, it->ev.sku_id);
    if (m->key == NULL || m->key_len != (size_t)n || memcmp(m->key, key, (size_t)n) != 0) {
        it->bad = 1;
        snprintf(it->reason, sizeof(it->reason),
                 "message key \"%.*s\" is not the event's sku_id %s: the SKU's events would not "
                 "stay in order",
                 m->key ? (int)(m->key_len < 24 ? m->key_len : 24) : 0,
                 m->key ? (const char *)m->key : "", key);
        memset(&it->ev, 0, sizeof(it->ev));
    }
}

/* Commits a committed batch's offsets to Kafka too, asynchronously: only informative. */
static void commit_to_kafka(consumer *c, const sp_batch *b) {
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new((int)b->nparts);
    if (list == NULL) return;
    for (size_t i = 0; i < b->nparts; i++)
        if (find_part(c, b->parts[i].partition))
            rd_kafka_topic_partition_list_add(list, c->cfg->kafka_topic, b->parts[i].partition)
                ->offset = b->parts[i].next_offset;
    if (list->cnt > 0) (void)rd_kafka_commit(c->rk, list, 1);
    rd_kafka_topic_partition_list_destroy(list);
}

/* After a failed batch: every partition of it and of the batch being filled (dropped with it) is
 * read again from the smallest offset either holds, or from PostgreSQL's stored offset where the
 * store refused the batch for starting past it (read_again_from), after a back-off. When the seek
 * itself fails the consumer leaves and rejoins the group, which assigns from PostgreSQL's
 * offsets. */
static void read_again(consumer *c, const sp_batch *failed) {
    sp_batch *filling = c->filling->batch;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(
        (int)(failed->nparts + filling->n) + 1);
    if (list == NULL) return;
    sp_batch_index_partitions(filling);
    const sp_batch *both[] = {failed, filling};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < both[k]->nparts; i++) {
            const sp_batch_partition *bp = &both[k]->parts[i];
            if (find_part(c, bp->partition) == NULL) continue; /* not ours any more */
            int64_t from = bp->first_offset;
            if (bp->read_again_from >= 0 && bp->read_again_from < from) {
                sp_log_ctx ctx = {.has_kafka = 1,
                                  .partition = bp->partition,
                                  .offset = bp->read_again_from};
                SP_LOG_CTX(SP_LOG_WARN, &ctx,
                           "this consumer was ahead of PostgreSQL's stored offset %" PRId64
                           " (batch from %" PRId64 "); reading the partition again from there",
                           bp->read_again_from, bp->first_offset);
                from = bp->read_again_from;
            }
            rd_kafka_topic_partition_t *tp = rd_kafka_topic_partition_list_find(
                list, c->cfg->kafka_topic, bp->partition);
            if (tp == NULL)
                rd_kafka_topic_partition_list_add(list, c->cfg->kafka_topic, bp->partition)
                    ->offset = from;
            else if (from < tp->offset)
                tp->offset = from;
        }
    if (list->cnt > 0 && seek_to(c, list) != 0 && !c->opts.replay) {
        sp_error("re-joining the group to read again from PostgreSQL's offsets");
        rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
        if (sub) {
            rd_kafka_topic_partition_list_add(sub, c->cfg->kafka_topic, RD_KAFKA_PARTITION_UA);
            (void)rd_kafka_unsubscribe(c->rk);
            (void)rd_kafka_subscribe(c->rk, sub);
            rd_kafka_topic_partition_list_destroy(sub);
        }
    }
    rd_kafka_topic_partition_list_destroy(list);
}

/* Hands the filling batch to the applier (none may be in flight) and starts filling the other
 * slot. */
static void submit(consumer *c) {
    slot *s = c->filling;
    pthread_mutex_lock(&c->mu);
    s->done = 0;
    c->job = s;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    c->inflight = s;
    c->filling = s == &c->slots[0] ? &c->slots[1] : &c->slots[0];
}

/* True when the batch in flight has been applied (or there is none). */
static int inflight_done(consumer *c) {
    if (c->inflight == NULL) return 1;
    pthread_mutex_lock(&c->mu);
    int done = c->inflight->done;
    pthread_mutex_unlock(&c->mu);
    return done;
}

/* Takes back the outcome of the batch in flight, waiting for it when wait is set (else only if it
 * is done). Committed: its offsets are noted and committed to Kafka. Failed: the batch being
 * filled is dropped as well and, when seek_back, both are read again after a back-off. Returns
 * -1 when a batch failed, else 0. */
static int settle(consumer *c, int wait, int seek_back) {
    slot *s = c->inflight;
    if (s == NULL) return 0;
    pthread_mutex_lock(&c->mu);
    while (wait && !s->done) pthread_cond_wait(&c->cv, &c->mu);
    int done = s->done;
    pthread_mutex_unlock(&c->mu);
    if (!done) return 0;
    c->inflight = NULL;
    sp_batch *b = s->batch;
    if (s->orphan) {
        /* Its partitions were let go, and read from PostgreSQL's offsets at the assignment since:
         * if it committed after all, its events are stale there; if not, they are read again. */
        s->orphan = 0;
        if (s->ok)
            for (size_t i = 0; i < b->nparts; i++) {
                part *p = find_part(c, b->parts[i].partition);
                if (p && b->parts[i].next_offset > p->next) p->next = b->parts[i].next_offset;
            }
        sp_info("the batch of %zu events let go at a rebalance was %s", b->n,
                s->ok ? "committed after all (stale for whoever reads its events now)"
                      : "rolled back (its events are read again by their partitions' owner)");
        free_messages(s);
        return 0;
    }
    if (s->ok) {
        for (size_t i = 0; i < b->nparts; i++) {
            part *p = find_part(c, b->parts[i].partition);
            if (p) p->next = b->parts[i].next_offset;
        }
        if (!c->opts.replay) commit_to_kafka(c, b);
        update_lag(c);
        c->failures = 0;
        c->last_ok = 1;
        free_messages(s);
        return 0;
    }
    c->failures++;
    c->last_ok = 0;
    int64_t backoff = BACKOFF_MIN_MS << (c->failures < 6 ? c->failures - 1 : 5);
    if (backoff > BACKOFF_MAX_MS) backoff = BACKOFF_MAX_MS;
    if (seek_back) {
        c->backoff_until_ms = sp_clock_mono_ms() + backoff;
        sp_warn("reading %zu + %zu events again in %" PRId64 " ms", b->n, c->filling->batch->n,
                backoff);
        read_again(c, b);
    }
    free_messages(s);
    free_messages(c->filling);
    return -1;
}

/* Applies everything read so far, synchronously: the batch in flight, then the one being filled.
 * For a stop: afterwards nothing is held (the applier's waits are bounded). 0 when all of it
 * committed. */
static int drain(consumer *c) {
    if (settle(c, 1, 0) != 0) return -1;
    if (c->filling->batch->n == 0) return 0;
    submit(c);
    return settle(c, 1, 0);
}

/* Waits until the batch in flight (if any) is applied, at most until deadline (monotonic ms);
 * 1 when it is. */
static int wait_inflight(consumer *c, int64_t deadline) {
    slot *s = c->inflight;
    if (s == NULL) return 1;
    pthread_mutex_lock(&c->mu);
    while (!s->done) {
        int64_t left = deadline - sp_clock_mono_ms();
        if (left <= 0) break;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts); /* the condition variable's clock (sp_consumer_run) */
        ts.tv_sec += (time_t)(left / 1000);
        ts.tv_nsec += (long)(left % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    int done = s->done;
    pthread_mutex_unlock(&c->mu);
    return done;
}

/* drain() for a revocation, bounded: the whole group waits while a member lets its partitions go,
 * so at most REBALANCE_DRAIN_MS. A batch PostgreSQL has not committed by then stays with the
 * applier, orphaned (settle takes its outcome later and moves nothing), and the one being filled is
 * dropped: the partitions' next owner reads both again from PostgreSQL's offsets. Should the
 * orphan still commit, the owner's transaction waits for its offsets rows, then finds those
 * events stale; nothing is applied twice. 0 when everything committed. */
static int drain_for_revocation(consumer *c) {
    int64_t deadline = sp_clock_mono_ms() + c->cfg->rebalance_drain_ms;
    if (!wait_inflight(c, deadline)) goto let_go;
    if (settle(c, 0, 0) != 0) return -1;
    if (c->filling->batch->n == 0) return 0;
    submit(c);
    if (!wait_inflight(c, deadline)) goto let_go;
    return settle(c, 0, 0);
let_go:
    sp_metric_inc(&m_drain_timeouts);
    sp_warn("the batch of %zu events in flight did not commit within REBALANCE_DRAIN_MS (%d ms); "
            "letting the partitions go without it (dropping %zu events read behind it): their "
            "next owner reads them again",
            c->inflight->batch->n, c->cfg->rebalance_drain_ms, c->filling->batch->n);
    c->inflight->orphan = 1;
    free_messages(c->filling);
    return -1;
}

/* ---- the group ---- */

/* Sets each partition of list to the offset stored in PostgreSQL: the beginning when there is no
 * row (the log is the whole history), Kafka's committed offset when PostgreSQL cannot answer. */
static void offsets_from_store(consumer *c, rd_kafka_topic_partition_list_t *list) {
    char err[512];
    int32_t *ids = calloc((size_t)list->cnt + 1, sizeof(*ids));
    int64_t *next = calloc((size_t)list->cnt + 1, sizeof(*next));
    int ok = ids && next;
    for (int i = 0; ok && i < list->cnt; i++) ids[i] = list->elems[i].partition;
    for (int tries = 1; ok; tries++) {
        if (sp_order_store_offsets(c->probe, ids, (size_t)list->cnt, next, err, sizeof(err)) == 0)
            break;
        sp_warn("reading the stored offsets failed (try %d of %d): %s", tries, ASSIGN_PG_TRIES,
                err);
        if (tries >= ASSIGN_PG_TRIES)
            ok = 0;
        else
            sleep_ms(1000);
    }
    for (int i = 0; i < list->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &list->elems[i];
        part *p = add_part(c, tp->partition);
        if (!ok) {
            /* Kafka's committed offset is committed after PostgreSQL's, so never ahead of it. */
            tp->offset = RD_KAFKA_OFFSET_INVALID;
        } else {
            tp->offset = next[i] >= 0 ? next[i] : RD_KAFKA_OFFSET_BEGINNING;
        }
        if (p) {
            p->expect = tp->offset >= 0 ? tp->offset : -1;
            p->next = tp->offset >= 0 ? tp->offset : -1;
        }
        sp_log_ctx ctx = {.has_kafka = 1, .partition = tp->partition, .offset = tp->offset};
        SP_LOG_CTX(SP_LOG_INFO, &ctx, "assigned; reading from %s",
                   !ok            ? "Kafka's committed offset (PostgreSQL unreachable)"
                   : next[i] >= 0 ? "the offset stored in PostgreSQL"
                                  : "the beginning (nothing stored yet)");
    }
    free(ids);
    free(next);
}

/* The group's rebalances (eager protocol: every rebalance revokes the whole assignment, then
 * assigns the new one). Runs on the poller, inside rd_kafka_consumer_poll. */
static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *list, void *opaque) {
    consumer *c = opaque;
    rd_kafka_resp_err_t rerr;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        offsets_from_store(c, list);
        rerr = rd_kafka_assign(rk, list);
    } else {
        /* Revoked (or lost): what was read from these partitions is committed first, while this
         * consumer still owns them, for REBALANCE_DRAIN_MS at most. If that fails, or PostgreSQL
         * takes longer, the new owner reads it again: nothing is lost. */
        (void)drain_for_revocation(c);
        if (err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
            sp_warn("rebalance error: %s", rd_kafka_err2str(err));
        for (int i = 0; i < list->cnt; i++) {
            sp_log_ctx ctx = {.has_kafka = 1, .partition = list->elems[i].partition, .offset = -1};
            SP_LOG_CTX(SP_LOG_INFO, &ctx, "revoked");
        }
        c->nparts = 0;
        rerr = rd_kafka_assign(rk, NULL);
    }
    if (rerr != RD_KAFKA_RESP_ERR_NO_ERROR) sp_error("rebalance: %s", rd_kafka_err2str(rerr));
    sp_metric_set(&m_assigned, (int64_t)c->nparts);
}

/* ---- the loop ---- */

/* /readyz: PostgreSQL and Kafka answer. */
static void check_ready(consumer *c) {
    char err[512], why[600];
    int npartitions = 0, ready = 0;
    if (sp_order_store_ping(c->probe, err, sizeof(err)) != 0)
        snprintf(why, sizeof(why), "postgresql unreachable: %s", err);
    else if (sp_kafka_topic_partitions(c->rk, c->cfg->kafka_topic, 1000, &npartitions, err,
                                       sizeof(err)) != 0)
        snprintf(why, sizeof(why), "kafka unreachable: %s", err);
    else
        ready = 1;
    sp_health_set_ready(ready, ready ? "" : why);
    if (ready != c->was_ready) {
        if (ready)
            sp_info("ready: PostgreSQL and Kafka answer");
        else
            sp_warn("not ready: %s", why);
        c->was_ready = ready;
    }
}

/* The lag of the assigned partitions: Kafka's end offset (as of the last fetch) minus the
 * stored one. */
static void update_lag(consumer *c) {
    int64_t lag = 0;
    for (size_t i = 0; i < c->nparts; i++) {
        int64_t lo = -1, hi = -1;
        if (rd_kafka_get_watermark_offsets(c->rk, c->cfg->kafka_topic, c->parts[i].partition, &lo,
                                           &hi) != RD_KAFKA_RESP_ERR_NO_ERROR ||
            hi < 0)
            continue;
        int64_t from = c->parts[i].next >= 0 ? c->parts[i].next : (lo >= 0 ? lo : 0);
        if (hi > from) lag += hi - from;
    }
    sp_metric_set(&m_lag, lag);
}

static void summary(consumer *c, const char *what) {
    double secs = (double)(sp_clock_mono_ms() - c->started_ms) / 1000.0;
    sp_info("%s: %" PRId64 " events applied (%" PRId64 " orders rejected), %" PRId64
            " unchanged, %" PRId64 " dead letters, %" PRId64 " stale, in %" PRId64
            " batches over %.1f s",
            what, (int64_t)c->napplied, (int64_t)c->nrejected, (int64_t)c->nunchanged,
            (int64_t)c->ndead, (int64_t)c->nstale, (int64_t)c->nbatches, secs);
}

static void housekeeping(consumer *c) {
    int64_t now = sp_clock_mono_ms();
    sp_health_beat();
    if (!c->opts.replay && now - c->last_ready_ms >= READY_EVERY_MS) {
        c->last_ready_ms = now;
        check_ready(c);
    }
    if (now - c->last_lag_ms >= LAG_EVERY_MS) {
        c->last_lag_ms = now;
        update_lag(c);
    }
    if (now - c->last_summary_ms >= SUMMARY_EVERY_MS) {
        int64_t nbatches = c->nbatches;
        c->last_summary_ms = now;
        if (nbatches != c->summarized_batches) summary(c, "so far"); /* silent while idle */
        c->summarized_batches = nbatches;
    }
}

/* Polls messages into the filling batch until it is full, or BATCH_WAIT_MS passed since its first
 * message and the applier is free to take it, or a stop was requested; returns at once after an
 * idle tick with no message. While the applier is busy the batch goes on filling: that is the
 * pipeline. The rebalance callback may drain the batch (and swap slots) inside the poll. */
static void collect(consumer *c) {
    while (c->filling->batch->n < c->filling->batch->cap && !sp_signal_stop_requested()) {
        const sp_batch *b = c->filling->batch;
        int64_t timeout = POLL_IDLE_MS;
        if (b->n > 0) {
            timeout = c->filling->started_ms + c->cfg->batch_wait_ms - sp_clock_mono_ms();
            if (timeout <= 0) {
                /* Due: hand it over as soon as the applier is free, filling it meanwhile. */
                timeout = inflight_done(c) ? 0 : POLL_BUSY_MS;
            }
        }
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c->rk, (int)timeout);
        if (m == NULL) {
            if (c->filling->batch->n == 0 || timeout == 0) return;
            continue;
        }
        if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF) {
                sp_metric_inc(&m_kafka_errors);
                sp_warn("kafka: %s", rd_kafka_message_errstr(m));
            }
            rd_kafka_message_destroy(m);
            continue;
        }
        int64_t gap_from;
        if (!in_sequence(c, m, &gap_from)) {
            rd_kafka_message_destroy(m);
            continue;
        }
        add_message(c, m, gap_from);
    }
}

/* Waits out the back-off after a failed batch, still beating for /healthz. */
static void back_off(consumer *c) {
    while (!sp_signal_stop_requested() && sp_clock_mono_ms() < c->backoff_until_ms) {
        housekeeping(c);
        int64_t left = c->backoff_until_ms - sp_clock_mono_ms();
        sleep_ms(left < POLL_IDLE_MS ? (left > 0 ? left : 0) : POLL_IDLE_MS);
    }
}

static int replay_done(consumer *c) {
    for (size_t i = 0; i < c->nparts; i++)
        if (c->parts[i].next < c->parts[i].end) return 0;
    return 1;
}

/* ---- set-up ---- */

static rd_kafka_t *new_kafka_consumer(consumer *c, char *errbuf, size_t errlen) {
    char session[16], heartbeat[16], group[300];
    const sp_config *cfg = c->cfg;
    rd_kafka_conf_t *conf = sp_kafka_conf_new(cfg->kafka_brokers, cfg->worker_id, cfg, errbuf,
                                              errlen);
    if (conf == NULL) return NULL;
    snprintf(session, sizeof(session), "%d", cfg->kafka_session_timeout_ms);
    snprintf(heartbeat, sizeof(heartbeat), "%d", cfg->kafka_session_timeout_ms / 3);
    /* The eager protocol (on_rebalance relies on it: a revocation takes every partition, so
     * draining both batches never leaves a partition behind), and a prefetch of at most 8 MiB,
     * which is plenty of batches ahead. */
    if (sp_kafka_conf_set(conf, "partition.assignment.strategy", "range,roundrobin", errbuf,
                          errlen) != 0 ||
        sp_kafka_conf_set(conf, "session.timeout.ms", session, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "heartbeat.interval.ms", heartbeat, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "queued.max.messages.kbytes", "8192", errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "fetch.wait.max.ms", "100", errbuf, errlen) != 0) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_opaque(conf, c);
    if (!c->opts.replay) rd_kafka_conf_set_rebalance_cb(conf, on_rebalance);
    /* A replay never joins the group: it assigns its partitions itself and commits nothing. */
    snprintf(group, sizeof(group), "%s%s", cfg->kafka_group, c->opts.replay ? ".replay" : "");
    return sp_kafka_consumer_new(&conf, group, errbuf, errlen);
}

static rd_kafka_t *new_dlq_producer(consumer *c, char *errbuf, size_t errlen) {
    char client[128];
    snprintf(client, sizeof(client), "%s-dlq", c->cfg->worker_id);
    rd_kafka_conf_t *conf = sp_kafka_conf_new(c->cfg->kafka_brokers, client, c->cfg, errbuf,
                                              errlen);
    if (conf == NULL) return NULL;
    /* A dead letter that cannot be delivered in time fails the batch (it is read again later)
     * rather than waiting librdkafka's default five minutes. */
    if (sp_kafka_conf_set(conf, "message.timeout.ms", "10000", errbuf, errlen) != 0) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_dr_msg_cb(conf, on_dlq_delivery);
    return sp_kafka_producer_new(&conf, errbuf, errlen);
}

/* Replay: refuse a database that holds rows (unless forced), then assign every partition from
 * where the replay starts, and note where it ends. */
static int replay_setup(consumer *c, char *errbuf, size_t errlen) {
    int npart = 0, has_orders = 0, has_inventory = 0, rc = -1;
    const char *topic = c->cfg->kafka_topic;
    rd_kafka_topic_partition_list_t *list = NULL;
    int32_t *ids = NULL;
    int64_t *stored = NULL;
    if (sp_order_store_nonempty(c->probe, &has_orders, &has_inventory, errbuf, errlen) != 0)
        return -1;
    if (c->opts.replay_from_ms < 0 && !c->opts.replay_force && (has_orders || has_inventory)) {
        snprintf(errbuf, errlen,
                 "the database already holds %s; a full replay rebuilds an empty database (see "
                 "the README's runbook), or pass --replay-force to apply the log on top of it "
                 "(events below the stored offsets are skipped)",
                 has_orders && has_inventory ? "orders and inventory rows"
                 : has_orders                ? "orders"
                                             : "inventory rows");
        return -1;
    }
    if (sp_kafka_topic_partitions(c->rk, topic, KAFKA_TIMEOUT_MS, &npart, errbuf, errlen) != 0)
        return -1;
    list = rd_kafka_topic_partition_list_new(npart);
    ids = calloc((size_t)npart + 1, sizeof(*ids));
    stored = calloc((size_t)npart + 1, sizeof(*stored));
    if (list == NULL || ids == NULL || stored == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    for (int i = 0; i < npart; i++) {
        ids[i] = i;
        rd_kafka_topic_partition_list_add(list, topic, i)->offset = c->opts.replay_from_ms;
    }
    if (sp_order_store_offsets(c->probe, ids, (size_t)npart, stored, errbuf, errlen) != 0) goto out;
    if (c->opts.replay_from_ms >= 0) {
        rd_kafka_resp_err_t err = rd_kafka_offsets_for_times(c->rk, list, KAFKA_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(errbuf, errlen, "kafka offsets for time %" PRId64 ": %s",
                     c->opts.replay_from_ms, rd_kafka_err2str(err));
            goto out;
        }
    }
    for (int i = 0; i < npart; i++) {
        rd_kafka_topic_partition_t *tp = &list->elems[i];
        int64_t lo = -1, hi = -1;
        rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(c->rk, topic, i, &lo, &hi,
                                                                   KAFKA_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR || tp->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(errbuf, errlen, "kafka offsets of %s [%d]: %s", topic, i,
                     rd_kafka_err2str(err ? err : tp->err));
            goto out;
        }
        /* From a time: the first event at or after it (none: the end). Else the beginning, or
         * past what is stored already (those events would be stale anyway). */
        int64_t from = c->opts.replay_from_ms >= 0 ? (tp->offset >= 0 ? tp->offset : hi) : lo;
        if (c->opts.replay_from_ms < 0 && stored[i] > from) from = stored[i];
        tp->offset = from;
        part *p = add_part(c, i);
        if (p == NULL) {
            snprintf(errbuf, errlen, "out of memory");
            goto out;
        }
        /* Expected from what PostgreSQL stored when that is below where reading starts: the
         * offsets in between are then judged like any gap (in_sequence): deleted by retention,
         * or still in the log and read (a batch past the stored offset would be refused). */
        p->expect = stored[i] >= 0 && stored[i] < from ? stored[i] : from;
        p->next = stored[i] > from ? stored[i] : from;
        p->end = hi;
        sp_log_ctx ctx = {.has_kafka = 1, .partition = i, .offset = from};
        SP_LOG_CTX(SP_LOG_INFO, &ctx, "replaying offsets %" PRId64 "..%" PRId64, from, hi - 1);
    }
    rd_kafka_resp_err_t err = rd_kafka_assign(c->rk, list);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka assign: %s", rd_kafka_err2str(err));
        goto out;
    }
    sp_metric_set(&m_assigned, npart);
    rc = 0;
out:
    if (list) rd_kafka_topic_partition_list_destroy(list);
    free(ids);
    free(stored);
    return rc;
}

static int subscribe(consumer *c, char *errbuf, size_t errlen) {
    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(1);
    if (topics == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    rd_kafka_topic_partition_list_add(topics, c->cfg->kafka_topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t err = rd_kafka_subscribe(c->rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka subscribe to %s: %s", c->cfg->kafka_topic,
                 rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}

/* The two slots, the stores and the scratch; -1 when out of memory. */
static int alloc_state(consumer *c, size_t cap) {
    const sp_config *cfg = c->cfg;
    sp_store_bounds bounds = {.connect_timeout_s = PG_CONNECT_S,
                              .statement_timeout_ms = cfg->pg_statement_timeout_ms,
                              .lock_timeout_ms = cfg->pg_lock_timeout_ms,
                              .idle_in_tx_ms = cfg->pg_idle_tx_timeout_ms,
                              .answer_ms = cfg->pg_statement_timeout_ms + PG_ANSWER_MS};
    c->store = sp_order_store_new(cfg->pg_dsn, cfg->worker_id, cfg->kafka_topic, cap, &bounds);
    if (bounds.answer_ms > PROBE_ANSWER_MS) bounds.answer_ms = PROBE_ANSWER_MS;
    c->probe = sp_order_store_new(cfg->pg_dsn, cfg->worker_id, cfg->kafka_topic, 1, &bounds);
    c->ids = calloc(cap, sizeof(*c->ids));
    if (c->store == NULL || c->probe == NULL || c->ids == NULL) return -1;
    for (int i = 0; i < 2; i++) {
        c->slots[i].c = c;
        c->slots[i].batch = sp_batch_new(cap);
        c->slots[i].msgs = calloc(cap, sizeof(*c->slots[i].msgs));
        if (c->slots[i].batch == NULL || c->slots[i].msgs == NULL) return -1;
    }
    c->filling = &c->slots[0];
    return 0;
}

static void free_state(consumer *c) {
    for (int i = 0; i < 2; i++) {
        if (c->slots[i].batch && c->slots[i].msgs) free_messages(&c->slots[i]);
        sp_batch_free(c->slots[i].batch);
        free(c->slots[i].msgs);
    }
    sp_order_store_free(c->store);
    sp_order_store_free(c->probe);
    free(c->ids);
    free(c->parts);
}

static void stop_applier(consumer *c) {
    if (!c->applier_started) return;
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->applier, NULL);
    c->applier_started = 0;
}

int sp_consumer_run(const sp_config *cfg, const sp_consumer_opts *opts) {
    consumer c = {.cfg = cfg, .opts = *opts, .last_ok = 1, .was_ready = -1};
    sp_http_thread *http = NULL;
    char err[1024];
    int status = 2;
    size_t cap = (size_t)cfg->batch_max;

    pthread_condattr_t cv_attr;
    pthread_condattr_init(&cv_attr);
    pthread_condattr_setclock(&cv_attr, CLOCK_MONOTONIC); /* wait_inflight's deadlines */
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, &cv_attr);
    pthread_condattr_destroy(&cv_attr);
    register_metrics();
    c.started_ms = c.last_summary_ms = sp_clock_mono_ms();
    if (alloc_state(&c, cap) != 0) {
        sp_error("cannot start: out of memory for batches of %zu events; lower BATCH_MAX", cap);
        goto out;
    }
    if (!opts->replay &&
        sp_redis_parse_url(cfg->redis_url, &c.redis_target, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s", err);
        goto out;
    }
    c.rk = new_kafka_consumer(&c, err, sizeof(err));
    if (c.rk == NULL) {
        sp_error("cannot start: %s", err);
        goto out;
    }
    if (opts->replay) {
        if (replay_setup(&c, err, sizeof(err)) != 0) {
            sp_error("cannot replay: %s", err);
            goto out;
        }
    } else {
        c.dlq = new_dlq_producer(&c, err, sizeof(err));
        if (c.dlq == NULL) {
            sp_error("cannot start: %s", err);
            goto out;
        }
        http = sp_http_thread_start(cfg->http_addr, cfg->http_port, err, sizeof(err));
        if (http == NULL) {
            sp_error("cannot start: %s", err);
            goto out;
        }
    }
    if (pthread_create(&c.applier, NULL, applier_main, &c) != 0) {
        sp_error("cannot start: cannot create the applier thread");
        goto out;
    }
    c.applier_started = 1;
    if (!opts->replay) {
        if (subscribe(&c, err, sizeof(err)) != 0) {
            sp_error("cannot start: %s", err);
            goto out;
        }
        sp_info("consumer started: group %s, topic %s, dead letters to %s; HTTP on %s:%d",
                cfg->kafka_group, cfg->kafka_topic, cfg->kafka_dlq_topic, cfg->http_addr,
                cfg->http_port);
    }

    status = 0;
    while (!sp_signal_stop_requested()) {
        (void)settle(&c, 0, 1);
        if (opts->replay && c.inflight == NULL && c.filling->batch->n == 0 && replay_done(&c))
            break;
        if (opts->replay && c.failures >= SP_STORE_ATTEMPTS) {
            sp_error("replay stopped: the same batch failed %d times", c.failures);
            status = 1;
            break;
        }
        housekeeping(&c);
        back_off(&c);
        collect(&c);
        if (c.filling->batch->n == 0) continue;
        /* The previous batch must be settled before the next goes: a failure drops this one. */
        if (settle(&c, 1, 1) != 0) continue;
        submit(&c);
    }
    /* A stop applies what was read (collect returned early), then leaves the group. */
    if (drain(&c) != 0 || !c.last_ok) status = status == 0 ? 1 : status;
    if (opts->replay) {
        if (status == 0 && !replay_done(&c)) status = 1;
        summary(&c, status == 0 ? "replay done" : "replay stopped");
        if (status == 0)
            printf("replay done: %" PRId64 " events applied (%" PRId64 " orders rejected), %" PRId64
                   " unchanged, %" PRId64 " dead letters, %" PRId64 " stale\n",
                   (int64_t)c.napplied, (int64_t)c.nrejected, (int64_t)c.nunchanged,
                   (int64_t)c.ndead, (int64_t)c.nstale);
    } else {
        summary(&c, "stopping");
    }
out:
    if (c.rk) {
        /* Leaving the group runs the revocation, which drains (nothing is left by now). */
        rd_kafka_resp_err_t cerr = rd_kafka_consumer_close(c.rk);
        if (cerr != RD_KAFKA_RESP_ERR_NO_ERROR)
            sp_warn("leaving the group: %s", rd_kafka_err2str(cerr));
    }
    stop_applier(&c);
    if (c.rk) rd_kafka_destroy(c.rk);
    if (c.dlq) {
        rd_kafka_flush(c.dlq, DLQ_FLUSH_MS);
        rd_kafka_destroy(c.dlq);
    }
    sp_http_thread_stop(http);
    if (c.redis) sp_redis_close(c.redis);
    free_state(&c);
    pthread_cond_destroy(&c.cv);
    pthread_mutex_destroy(&c.mu);
    if (status == 0 && !opts->replay) sp_info("left the group; exiting");
    return status;
}
