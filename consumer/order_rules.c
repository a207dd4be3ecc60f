/* order_rules.c - the order state machine: decides a batch of events in log order against the
 *                 inventory and order rows read for it, in memory, with no I/O. */
#include "order_rules.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a batch ---- */

sp_batch *sp_batch_new(size_t cap) {
    sp_batch *b = calloc(1, sizeof(*b));
    if (b == NULL) return NULL;
    b->cap = cap;
    b->items = calloc(cap, sizeof(*b->items));
    b->skus = calloc(cap, sizeof(*b->skus));
    b->parts = calloc(cap, sizeof(*b->parts));
    if (b->items == NULL || b->skus == NULL || b->parts == NULL) {
        sp_batch_free(b);
        return NULL;
    }
    return b;
}

void sp_batch_free(sp_batch *b) {
    if (b == NULL) return;
    free(b->items);
    free(b->skus);
    free(b->parts);
    free(b);
}

void sp_batch_clear(sp_batch *b) {
    b->n = b->nskus = b->nparts = 0;
    b->attempts = b->conflicts = 0;
}

sp_batch_item *sp_batch_add(sp_batch *b, int32_t partition, int64_t offset) {
    if (b->n >= b->cap) return NULL;
    sp_batch_item *it = &b->items[b->n++];
    memset(it, 0, sizeof(*it));
    it->partition = partition;
    it->offset = offset;
    it->gap_from = offset;
    it->next_same_sku = -1;
    return it;
}

void sp_batch_index_partitions(sp_batch *b) {
    size_t last = 0;
    b->nparts = 0;
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        /* Items come in runs of one partition; look at the previous one first. */
        if (b->nparts == 0 || b->parts[last].partition != it->partition) {
            for (last = 0; last < b->nparts; last++)
                if (b->parts[last].partition == it->partition) break;
            if (last == b->nparts) {
                b->parts[b->nparts++] = (sp_batch_partition){.partition = it->partition,
                                                             .first_offset = it->offset,
                                                             .gap_from = it->gap_from,
                                                             .last_offset = it->offset,
                                                             .stored = -1,
                                                             .next_offset = -1,
                                                             .read_again_from = -1};
                continue;
            }
        }
        sp_batch_partition *p = &b->parts[last];
        if (it->offset < p->first_offset) {
            p->first_offset = it->offset;
            p->gap_from = it->gap_from;
        }
        if (it->offset > p->last_offset) p->last_offset = it->offset;
    }
}

/* ---- statuses ---- */

static const char *const status_names[] = {
    [SP_ORDER_PENDING] = "pending",     [SP_ORDER_PAID] = "paid",
    [SP_ORDER_EXPIRED] = "expired",     [SP_ORDER_REJECTED] = "rejected",
    [SP_ORDER_CANCELLED] = "cancelled",
};
#define NSTATUS (sizeof(status_names) / sizeof(status_names[0]))

const char *sp_order_status_name(sp_order_status st) {
    return (size_t)st < NSTATUS ? status_names[st] : NULL;
}

sp_order_status sp_order_status_parse(const char *s) {
    for (size_t i = 1; i < NSTATUS; i++)
        if (strcmp(s, status_names[i]) == 0) return (sp_order_status)i;
    return SP_ORDER_NONE;
}

/* ---- the tables ---- */

sp_rules *sp_rules_new(size_t cap) {
    sp_rules *r = calloc(1, sizeof(*r));
    if (r == NULL) return NULL;
    r->cap = cap;
    r->nslots = 16;
    while (r->nslots < 2 * cap) r->nslots *= 2;
    r->skus = calloc(cap, sizeof(*r->skus));
    r->orders = calloc(cap, sizeof(*r->orders));
    r->returns = calloc(cap, sizeof(*r->returns));
    r->restocks = calloc(cap, sizeof(*r->restocks));
    r->sku_slots = malloc(r->nslots * sizeof(*r->sku_slots));
    r->order_slots = malloc(r->nslots * sizeof(*r->order_slots));
    r->restock_slots = malloc(r->nslots * sizeof(*r->restock_slots));
    if (r->skus == NULL || r->orders == NULL || r->returns == NULL || r->restocks == NULL ||
        r->sku_slots == NULL || r->order_slots == NULL || r->restock_slots == NULL) {
        sp_rules_free(r);
        return NULL;
    }
    return r;
}

void sp_rules_free(sp_rules *r) {
    if (r == NULL) return;
    free(r->skus);
    free(r->orders);
    free(r->returns);
    free(r->restocks);
    free(r->sku_slots);
    free(r->order_slots);
    free(r->restock_slots);
    free(r);
}

static uint64_t hash_u64(uint64_t x) { /* splitmix64's finalizer */
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static uint64_t hash_str(const char *s) { /* FNV-1a */
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (; *s; s++) h = (h ^ (unsigned char)*s) * UINT64_C(0x100000001b3);
    return h;
}

/* The slot that holds sku_id, or the empty slot where it would go. The table never fills up: it
 * has at least twice as many slots as there can be SKUs. */
static size_t sku_slot(const sp_rules *r, int64_t sku_id) {
    size_t mask = r->nslots - 1, i = (size_t)hash_u64((uint64_t)sku_id) & mask;
    while (r->sku_slots[i] >= 0 && r->skus[r->sku_slots[i]].sku_id != sku_id) i = (i + 1) & mask;
    return i;
}

static size_t order_slot(const sp_rules *r, const char *order_id) {
    size_t mask = r->nslots - 1, i = (size_t)hash_str(order_id) & mask;
    while (r->order_slots[i] >= 0 && strcmp(r->orders[r->order_slots[i]].order_id, order_id) != 0)
        i = (i + 1) & mask;
    return i;
}

/* The slot that holds the restock (sku_id, request_id), or the empty slot where it would go; as
 * full at most as the others (one pair per item). */
static size_t restock_slot(const sp_rules *r, int64_t sku_id, const char *request_id) {
    size_t mask = r->nslots - 1;
    size_t i = (size_t)(hash_u64((uint64_t)sku_id) ^ hash_str(request_id)) & mask;
    for (int32_t k; (k = r->restock_slots[i]) >= 0; i = (i + 1) & mask)
        if (r->restocks[k].sku_id == sku_id && strcmp(r->restocks[k].request_id, request_id) == 0)
            break;
    return i;
}

sp_rules_sku *sp_rules_find_sku(sp_rules *r, int64_t sku_id) {
    int32_t k = r->sku_slots[sku_slot(r, sku_id)];
    return k >= 0 ? &r->skus[k] : NULL;
}

static sp_rules_order *find_order(sp_rules *r, const char *order_id) {
    int32_t k = r->order_slots[order_slot(r, order_id)];
    return k >= 0 ? &r->orders[k] : NULL;
}

/* A new, zeroed order under order_id; NULL when the table is full. */
static sp_rules_order *new_order(sp_rules *r, const char *order_id) {
    if (r->norders >= r->cap) return NULL;
    size_t slot = order_slot(r, order_id);
    sp_rules_order *o = &r->orders[r->norders];
    memset(o, 0, sizeof(*o));
    snprintf(o->order_id, sizeof(o->order_id), "%s", order_id);
    o->paid_ms = o->closed_ms = -1;
    o->partition = -1;
    o->offset = -1;
    r->order_slots[slot] = (int32_t)r->norders++;
    return o;
}

int sp_rules_add_order(sp_rules *r, const char *order_id, int64_t sku_id, int64_t user_id,
                       int32_t qty, sp_order_status status, int refund_due) {
    if (find_order(r, order_id)) return 0; /* a query never returns a primary key twice */
    sp_rules_order *o = new_order(r, order_id);
    if (o == NULL) return -1;
    o->sku_id = sku_id;
    o->user_id = user_id;
    o->qty = qty;
    o->status_db = o->status = status;
    o->refund_due_db = o->refund_due = refund_due;
    return 0;
}

/* Records the restock (sku_id, request_id) under the empty slot restock_slot() gave; NULL when
 * the table is full. */
static sp_rules_restock *new_restock(sp_rules *r, size_t slot, int64_t sku_id,
                                     const char *request_id) {
    if (r->nrestocks >= r->cap) return NULL;
    sp_rules_restock *rs = &r->restocks[r->nrestocks];
    memset(rs, 0, sizeof(*rs));
    rs->sku_id = sku_id;
    snprintf(rs->request_id, sizeof(rs->request_id), "%s", request_id);
    rs->partition = -1;
    rs->offset = -1;
    r->restock_slots[slot] = (int32_t)r->nrestocks++;
    return rs;
}

int sp_rules_add_restock(sp_rules *r, int64_t sku_id, const char *request_id) {
    size_t slot = restock_slot(r, sku_id, request_id);
    if (r->restock_slots[slot] >= 0) return 0; /* a query never returns a primary key twice */
    return new_restock(r, slot, sku_id, request_id) ? 0 : -1;
}

void sp_rules_begin(sp_rules *r, sp_batch *b) {
    size_t ip = 0;
    r->nskus = r->norders = r->nreturns = r->nrestocks = 0;
    memset(r->sku_slots, 0xff, r->nslots * sizeof(*r->sku_slots));
    memset(r->order_slots, 0xff, r->nslots * sizeof(*r->order_slots));
    memset(r->restock_slots, 0xff, r->nslots * sizeof(*r->restock_slots));
    b->nskus = 0;
    for (size_t i = 0; i < b->n; i++) {
        sp_batch_item *it = &b->items[i];
        it->outcome = SP_ITEM_APPLIED;
        it->effect = SP_EFFECT_NONE;
        it->next_same_sku = -1;
        if (ip >= b->nparts || b->parts[ip].partition != it->partition)
            for (ip = 0; ip < b->nparts && b->parts[ip].partition != it->partition; ip++) {}
        if (ip < b->nparts && it->offset < b->parts[ip].stored) {
            it->outcome = SP_ITEM_STALE;
            continue;
        }
        if (it->bad) {
            it->outcome = SP_ITEM_DEAD;
            continue;
        }
        it->reason[0] = '\0';
        size_t slot = sku_slot(r, it->ev.sku_id);
        int32_t k = r->sku_slots[slot];
        if (k < 0) { /* the batch has at most cap items, so at most cap SKUs */
            k = (int32_t)r->nskus++;
            r->sku_slots[slot] = k;
            memset(&r->skus[k], 0, sizeof(r->skus[k]));
            r->skus[k].sku_id = it->ev.sku_id;
            b->skus[k] = (sp_batch_sku){.sku_id = it->ev.sku_id, .first_item = (int32_t)i};
            b->nskus = r->nskus;
        } else {
            b->items[r->skus[k].last_item].next_same_sku = (int32_t)i;
        }
        r->skus[k].last_item = (int32_t)i;
    }
}

/* ---- the decisions ---- */

static void dead(sp_batch_item *it, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dead(sp_batch_item *it, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it->reason, sizeof(it->reason), fmt, ap);
    va_end(ap);
    it->outcome = SP_ITEM_DEAD;
}

static int sku_exists(const sp_rules_sku *sk) { return sk->in_db || sk->opened; }

static void changed_row(sp_rules_sku *sk, int64_t ts_ms) {
    sk->changes++;
    sk->updated_ms = ts_ms;
}

/* The order an order.* event names, or NULL after marking the item dead: unknown (when `known` is
 * required) or of another SKU. *found says whether it exists at all. */
static sp_rules_order *named_order(sp_rules *r, sp_batch_item *it, int required, int *found) {
    sp_rules_order *o = find_order(r, it->ev.order_id);
    const char *type = sp_event_type_name(it->ev.type);
    *found = o != NULL;
    if (o == NULL) {
        if (required)
            dead(it, "%s for order %s, which no order.created or order.voided before it made", type,
                 it->ev.order_id);
        return NULL;
    }
    if (o->sku_id != it->ev.sku_id) {
        dead(it, "%s for order %s of sku %" PRId64 " names sku %" PRId64, type, o->order_id,
             o->sku_id, it->ev.sku_id);
        return NULL;
    }
    return o;
}

static void decide_created(sp_rules *r, sp_rules_sku *sk, sp_batch_item *it) {
    const sp_event *ev = &it->ev;
    int found;
    if (named_order(r, it, 0, &found) != NULL || found) {
        if (it->outcome != SP_ITEM_DEAD) it->outcome = SP_ITEM_UNCHANGED; /* a duplicate */
        return;
    }
    sp_rules_order *o = new_order(r, ev->order_id);
    if (o == NULL) { /* cannot happen: one order per item at most */
        dead(it, "internal: order table full");
        return;
    }
    o->sku_id = ev->sku_id;
    o->user_id = ev->user_id;
    o->qty = ev->qty;
    o->created_ms = ev->ts_ms;
    o->expires_ms = ev->expires_ms;
    o->partition = it->partition;
    o->offset = it->offset;
    if (!sku_exists(sk)) {
        o->status = SP_ORDER_REJECTED;
        o->reject_reason = "unknown_sku";
        it->effect = SP_EFFECT_REJECTED_NO_SKU;
    } else if (sk->stock >= ev->qty) {
        o->status = SP_ORDER_PENDING;
        sk->stock -= ev->qty;
        sk->taken += ev->qty;
        changed_row(sk, ev->ts_ms);
        it->effect = SP_EFFECT_PENDING;
    } else {
        o->status = SP_ORDER_REJECTED;
        o->reject_reason = "out_of_stock";
        it->effect = SP_EFFECT_REJECTED_STOCK;
    }
}

static void decide_paid(sp_rules *r, sp_batch_item *it) {
    int found;
    sp_rules_order *o = named_order(r, it, 1, &found);
    if (o == NULL) return;
    if (o->status == SP_ORDER_PENDING) {
        o->status = SP_ORDER_PAID;
        o->paid_ms = it->ev.ts_ms;
        o->changed = 1;
        it->effect = SP_EFFECT_PAID;
    } else if (o->status != SP_ORDER_PAID && !o->refund_due) {
        /* Expired, rejected or cancelled: the money came for units the buyer will not get. */
        o->refund_due = 1;
        o->paid_ms = it->ev.ts_ms;
        o->changed = 1;
        it->effect = SP_EFFECT_LATE_PAYMENT;
    } else {
        it->outcome = SP_ITEM_UNCHANGED;
    }
}

static void add_return(sp_rules *r, const sp_rules_order *o, const char *reason, int64_t ts_ms) {
    /* At most one return per order and one order per item: never more than cap. */
    r->returns[r->nreturns++] = (sp_rules_return){.order = (int32_t)(o - r->orders),
                                                  .reason = reason,
                                                  .ts_ms = ts_ms};
}

static void decide_expired(sp_rules *r, sp_rules_sku *sk, sp_batch_item *it) {
    int found;
    sp_rules_order *o = named_order(r, it, 1, &found);
    if (o == NULL) return;
    if (o->status != SP_ORDER_PENDING) { /* paid first, or expired before: nothing to give back */
        it->outcome = SP_ITEM_UNCHANGED;
        return;
    }
    if (!sku_exists(sk)) { /* a pending order whose inventory row someone deleted */
        dead(it, "order.expired for order %s: sku %" PRId64 " has no inventory row to return to",
             o->order_id, it->ev.sku_id);
        return;
    }
    o->status = SP_ORDER_EXPIRED;
    o->closed_ms = it->ev.ts_ms;
    o->changed = 1;
    sk->stock += o->qty;
    sk->returned += o->qty;
    changed_row(sk, it->ev.ts_ms);
    add_return(r, o, "expired", it->ev.ts_ms);
    it->effect = SP_EFFECT_EXPIRED;
}

/* A stock.add: applied unless its request id was applied to the SKU before (read from restocks,
 * or earlier in the batch); a keyed one that is applied becomes a new restocks row. */
static void decide_added(sp_rules *r, sp_rules_sku *sk, sp_batch_item *it) {
    const sp_event *ev = &it->ev;
    size_t slot = 0;
    if (ev->request_id[0] != '\0') {
        slot = restock_slot(r, ev->sku_id, ev->request_id);
        if (r->restock_slots[slot] >= 0) { /* the producer published the restock twice */
            it->outcome = SP_ITEM_UNCHANGED;
            return;
        }
    }
    if (!sku_exists(sk)) {
        dead(it, "stock.add for sku %" PRId64 ", which no stock.set opened", ev->sku_id);
        return;
    }
    if (ev->request_id[0] != '\0') {
        sp_rules_restock *rs = new_restock(r, slot, ev->sku_id, ev->request_id);
        if (rs == NULL) { /* cannot happen: one pair per item at most */
            dead(it, "internal: restock table full");
            return;
        }
        rs->is_new = 1;
        rs->add = ev->stock;
        rs->ts_ms = ev->ts_ms;
        rs->partition = it->partition;
        rs->offset = it->offset;
    }
    sk->stock += ev->stock;
    sk->supplied += ev->stock;
    sk->added += ev->stock;
    changed_row(sk, ev->ts_ms);
    it->effect = SP_EFFECT_RESTOCKED;
}

static void decide_voided(sp_rules *r, sp_batch_item *it) {
    const sp_event *ev = &it->ev;
    int found;
    if (named_order(r, it, 0, &found) != NULL || found) {
        if (it->outcome != SP_ITEM_DEAD) it->outcome = SP_ITEM_UNCHANGED; /* the order stands */
        return;
    }
    sp_rules_order *o = new_order(r, ev->order_id);
    if (o == NULL) {
        dead(it, "internal: order table full");
        return;
    }
    o->sku_id = ev->sku_id;
    o->user_id = ev->user_id;
    o->qty = ev->qty;
    o->status = SP_ORDER_CANCELLED;
    o->created_ms = o->expires_ms = o->closed_ms = ev->ts_ms;
    o->reject_reason = ev->reason[0] ? ev->reason : "voided";
    /* PostgreSQL never took these units (only Redis did): the ledger row is for Redis alone. */
    add_return(r, o, "voided", ev->ts_ms);
    it->effect = SP_EFFECT_CANCELLED;
}

void sp_rules_decide(sp_rules *r, sp_batch *b) {
    for (size_t i = 0; i < b->n; i++) {
        sp_batch_item *it = &b->items[i];
        if (it->outcome != SP_ITEM_APPLIED) continue; /* stale or bad */
        const sp_event *ev = &it->ev;
        sp_rules_sku *sk = sp_rules_find_sku(r, ev->sku_id);
        switch (ev->type) {
        case SP_EV_STOCK_SET:
            if (sku_exists(sk)) {
                it->outcome = SP_ITEM_UNCHANGED; /* a sale opens once */
                break;
            }
            sk->opened = 1;
            sk->open_stock = sk->stock = sk->supplied = ev->stock;
            sk->per_user_limit = ev->per_user_limit;
            sk->pay_timeout_s = ev->pay_timeout_s;
            sk->shards = ev->shards > 1 ? ev->shards : 1;
            sk->open_ms = sk->updated_ms = ev->ts_ms;
            it->effect = SP_EFFECT_OPENED;
            break;
        case SP_EV_STOCK_ADD:
            decide_added(r, sk, it);
            break;
        case SP_EV_ORDER_CREATED:
            decide_created(r, sk, it);
            break;
        case SP_EV_ORDER_PAID:
            decide_paid(r, it);
            break;
        case SP_EV_ORDER_EXPIRED:
            decide_expired(r, sk, it);
            break;
        case SP_EV_ORDER_VOIDED:
            decide_voided(r, it);
            break;
        default:
            dead(it, "event type %d has no rule", (int)ev->type);
            break;
        }
    }
    for (size_t k = 0; k < r->nskus; k++) {
        const sp_rules_sku *sk = &r->skus[k];
        b->skus[k].exists = sku_exists(sk);
        b->skus[k].stock = sk->stock;
        b->skus[k].supplied = sk->supplied;
        b->skus[k].shards = sk->shards > 1 ? sk->shards : 1;
        b->skus[k].nrejected = 0;
    }
    for (size_t i = 0; i < b->n; i++) {
        const sp_batch_item *it = &b->items[i];
        if (it->outcome == SP_ITEM_APPLIED && it->effect == SP_EFFECT_REJECTED_STOCK)
            b->skus[sp_rules_find_sku(r, it->ev.sku_id) - r->skus].nrejected++;
    }
}
