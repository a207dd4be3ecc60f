/* shard_refill.c - moving units to a buyer's home shard, and the sold-out reads (shard_refill.h).
 */
#include "shard_refill.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"

typedef struct refill refill;

/* One shard's read of a pass: the callback's data. */
typedef struct shard_read {
    refill *rf;
    int k;
} shard_read;

struct refill {
    sp_redis_async *ra;
    sp_order_ids *ids;
    sp_shard_transfer t; /* the transfer under way: to = home */
    int nshards;
    int donor; /* 1..nshards-1: the shard asked is (home + donor) mod nshards */
    int64_t want;
    int pass;       /* the reads: 0 then 1 */
    int reads_owed; /* replies still to come in this pass */
    int paused;     /* a shard read was paused by a reconcile */
    int64_t units[2];
    int64_t ver[2][SP_SHARDS_MAX];
    shard_read reads[SP_SHARDS_MAX];
    sp_refill_result res;
    sp_refill_done_fn *done;
    void *data;
};

static void finish(refill *rf) {
    rf->done(&rf->res, rf->data);
    free(rf);
}

static void failed(refill *rf, const char *what, const char *err) {
    sp_warn("sku %" PRId64 ": refill of shard %d: %s: %s", rf->t.sku_id, rf->t.to, what, err);
    rf->res.failed = 1;
    finish(rf);
}

static void read_pass(refill *rf);
static void take_next(refill *rf);

/* A settle is not waited for: until it lands the units count in the donor's `moving`, which only
 * makes a sold-out read more careful; one that never lands is the completer's. */
static void on_settled(redisReply *reply, void *data) {
    (void)data;
    if (reply == NULL || reply->type == REDIS_REPLY_ERROR)
        sp_warn("shard transfer settle: %s", reply ? reply->str : "no reply (left to the reaper)");
}

static void on_given(redisReply *reply, void *data) {
    refill *rf = data;
    long long given;
    char err[256];
    if (sp_stock_integer_parse(reply, "shard_give", &given, err, sizeof(err)) != 0) {
        failed(rf, "give", err); /* the transfer stays open: the completer gives or aborts it */
        return;
    }
    if (given < 0) { /* too late (-4), another generation, paused, no sale: left as it is */
        rf->res.stopped = 1;
        finish(rf);
        return;
    }
    if (given == 0) { /* given before its take: transfer ids repeated */
        failed(rf, "give", "the transfer was given before: ids not unique");
        return;
    }
    rf->res.moved += given;
    sp_script_call call;
    sp_stock_shard_settle_call(&call, &rf->t);
    if (sp_redis_async_eval_call(rf->ra, &call, on_settled, NULL) != 0)
        sp_warn("sku %" PRId64 ": transfer %s: settle not sent (left to the reaper)", rf->t.sku_id,
                rf->t.id);
    rf->donor++;
    take_next(rf);
}

static void on_taken(redisReply *reply, void *data) {
    refill *rf = data;
    int64_t taken, take_ts;
    char err[256];
    if (sp_stock_shard_take_parse(reply, &taken, &take_ts, err, sizeof(err)) != 0) {
        failed(rf, "take", err); /* a take that ran is the completer's to give */
        return;
    }
    if (taken < 0) { /* no sale there, paused, or another generation */
        rf->res.stopped = 1;
        finish(rf);
        return;
    }
    if (taken == 0) {
        rf->donor++;
        take_next(rf);
        return;
    }
    rf->res.transfers++;
    sp_script_call call;
    sp_stock_shard_give_call(&call, &rf->t, taken, take_ts, SP_SHARD_GIVE_WITHIN_MS);
    if (sp_redis_async_eval_call(rf->ra, &call, on_given, rf) != 0)
        failed(rf, "give", "not sent (left to the reaper)");
}

/* Asks the next donor for what is still missing; past the last one, reads the sale when nothing
 * came at all. */
static void take_next(refill *rf) {
    if (rf->donor < rf->nshards && rf->res.moved < rf->want) {
        rf->t.from = (rf->t.to + rf->donor) % rf->nshards;
        sp_order_id_next(rf->ids, sp_clock_wall_ms(), rf->t.sku_id, rf->t.id);
        sp_script_call call;
        sp_stock_shard_take_call(&call, &rf->t, rf->want - rf->res.moved);
        if (sp_redis_async_eval_call(rf->ra, &call, on_taken, rf) != 0)
            failed(rf, "take", "not sent");
        return;
    }
    if (rf->res.moved > 0) {
        finish(rf);
        return;
    }
    read_pass(rf);
}

static void on_shard_read(redisReply *reply, void *data) {
    shard_read *sr = data;
    refill *rf = sr->rf;
    int64_t units;
    char err[256];
    int rc = sp_stock_shard_read_parse(reply, &units, &rf->ver[rf->pass][sr->k], err, sizeof(err));
    if (rc < 0) {
        sp_warn("sku %" PRId64 ": sold-out read of shard %d: %s", rf->t.sku_id, sr->k, err);
        rf->res.failed = 1;
    } else {
        rf->units[rf->pass] += units;
        if (rc == 1) rf->paused = 1; /* a reconcile rebuilds the sale: nothing is known */
    }
    if (--rf->reads_owed > 0) return;
    if (rf->res.failed) {
        finish(rf);
        return;
    }
    if (rf->paused) { /* decided again: the paused shard answers recovering */
        rf->res.stopped = 1;
        finish(rf);
        return;
    }
    if (rf->pass == 0) {
        rf->pass = 1;
        read_pass(rf);
        return;
    }
    rf->res.collected = 1;
    rf->res.units = rf->units[0] > rf->units[1] ? rf->units[0] : rf->units[1];
    rf->res.stable = memcmp(rf->ver[0], rf->ver[1], sizeof(rf->ver[0][0]) * (size_t)rf->nshards) ==
                     0;
    finish(rf);
}

/* One read of every shard, all sent at once (they may sit on different primaries). */
static void read_pass(refill *rf) {
    rf->units[rf->pass] = 0;
    rf->reads_owed = 0;
    for (int k = 0; k < rf->nshards; k++) {
        char key[SP_STOCK_KEY_MAX];
        sp_stock_shard_key(key, rf->t.sku_id, k, "sale");
        rf->reads[k] = (shard_read){.rf = rf, .k = k};
        if (sp_redis_async_send(rf->ra, on_shard_read, &rf->reads[k], key, SP_STOCK_SHARD_READ_FMT,
                                key) == 0)
            rf->reads_owed++;
        else
            rf->res.failed = 1;
    }
    if (rf->reads_owed == 0) finish(rf); /* nothing sent: failed */
}

int sp_refill_start(sp_redis_async *ra, sp_order_ids *ids, int64_t sku_id, int nshards,
                    const char *gen, int home, int64_t want, sp_refill_done_fn *done, void *data) {
    if (nshards < 2 || nshards > SP_SHARDS_MAX || home < 0 || home >= nshards || want < 1)
        return -1;
    refill *rf = calloc(1, sizeof(*rf));
    if (rf == NULL) return -1;
    rf->ra = ra;
    rf->ids = ids;
    rf->t.sku_id = sku_id;
    rf->t.to = home;
    snprintf(rf->t.gen, sizeof(rf->t.gen), "%s", gen);
    rf->nshards = nshards;
    rf->donor = 1;
    rf->want = want;
    rf->done = done;
    rf->data = data;
    rf->t.from = (home + 1) % nshards;
    sp_order_id_next(ids, sp_clock_wall_ms(), sku_id, rf->t.id);
    sp_script_call call;
    sp_stock_shard_take_call(&call, &rf->t, want);
    if (sp_redis_async_eval_call(ra, &call, on_taken, rf) != 0) {
        free(rf);
        return -1;
    }
    return 0;
}
