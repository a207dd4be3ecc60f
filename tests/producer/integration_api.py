#!/usr/bin/env python3
"""integration_api.py - the producer's HTTP order API against the real local stack.

Starts two producers ($BIN_DIR/producer, default bin/) on free loopback ports and proves:
  1. the admin API: opening a sale needs the admin token (401 otherwise, and nothing opens), a
     new sale is 201 and orderable at once, a second open is 409 `exists`, restock is 200 and
     grows `available` by `add`, restock of an unknown SKU is 404;
  2. no oversell under a burst: 20,000 orders from 5,000 users against 500 units with a limit of
     one per user, spread over both producers on hundreds of keep-alive connections, get exactly
     500 answers 202 (distinct order ids, one per user), every other answer is 409 `sold_out` or
     `limit_exceeded`, Redis ends at 0, and Kafka holds exactly those 500 `order.created` events;
  3. idempotency: a replayed Idempotency-Key gets the same order id and deducts nothing more,
     also when 20 copies race over both producers; a key belongs to one user;
  4. the per-user limit, and a refusal deducts nothing; a sale over 3 Redis shards sells every
     unit with no false sold_out and the limit exact (check_sharded);
  5. bad input (over 60 hostile requests) gets a 4xx JSON error and changes nothing;
  6. /metrics is Prometheus text; both producers drain and exit 0 on SIGTERM.
Prints `ok - NAME` / `not ok - NAME: DETAIL` per check and, last, `N passed, M failed`; exits
non-zero on any failure. Needs the stack env (REDIS_URL, KAFKA_BROKERS, KAFKA_TOPIC, PG_DSN; read
from var/stack.env when unset) and kcat. REDIS_URL may name one server or a Redis Cluster
(testkit.redis_cmd routes by key; SCRIPT FLUSH and INFO commandstats go to every primary).
Standard library only.
"""
import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
from http11 import REQ_TIMEOUT, Client, Conn, TransportError  # noqa: E402
from testkit import (Fail, Procs, Worker, command, expect, free_port,  # noqa: E402
                     mark_rebuilt, raise_nofile, redis_cmd, redis_cmd_lines, redis_each_primary,
                     redis_info_sum,
                     run_driver)

ADMIN = "test-admin"
PAYMENT = "test-pay"
MAX_ID = 2**53 - 1
TOTAL_BUDGET = 200.0  # seconds for the whole run, shutdown included
T0 = time.monotonic()


# ---- the producers under test ----------------------------------------------------------------

def psql(sql, *params):
    """Runs one statement against the stack's PostgreSQL with psql variables :'p1', :'p2', ...
    (psql quotes them, so nothing is pasted into SQL text); returns the unaligned output."""
    args = ["psql", os.environ["PG_DSN"], "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    for i, v in enumerate(params, 1):
        args += ["-v", "p%d=%s" % (i, v)]
    out = subprocess.run(args, input=sql, capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise Fail("psql failed: %s" % out.stderr.strip()[:300])
    return out.stdout.strip()


class Producer(Worker):
    """A producer under test (testkit.Worker), started at once: the tokens of these tests and
    `settings` on top of our environment, HTTP on a free port or `port`, the log
    LOGDIR/producer-NAME.log; its pid recorded in procs when given."""

    def __init__(self, name, binary, logdir, port=None, procs=None, **settings):
        super().__init__(procs or Procs(), name, binary,
                         os.path.join(logdir, "producer-%s.log" % name), port)
        env = dict(ADMIN_TOKEN=ADMIN, PAYMENT_TOKEN=PAYMENT,
                   WORKER_ID="itest-%d-%s-%06x" % (os.getpid(), name, random.getrandbits(24)))
        env.update(settings)
        self.start(env)


async def ready_errors(producers, timeout=20):
    """Waits until every producer answers /readyz 200; what went wrong, one text each."""
    got = await asyncio.gather(*(p.wait_ready(timeout=timeout) for p in producers),
                               return_exceptions=True)
    return [str(e) for e in got if isinstance(e, Exception)]


# ---- helpers for the checks ------------------------------------------------------------------

def new_sku():
    return random.randint(10**9, MAX_ID)


def admin(token=ADMIN):
    return {"Authorization": "Bearer " + token} if token is not None else {}


async def open_sale(c, sku, stock, limit, pay=600, token=ADMIN):
    return await c.request("POST", "/v1/skus", {"sku_id": sku, "stock": stock,
                                                "per_user_limit": limit, "pay_timeout_s": pay},
                           admin(token))


async def must_open(c, sku, stock, limit):
    r = await open_sale(c, sku, stock, limit)
    expect(r.status == 201, "opening SKU %d answered %r, wanted 201" % (sku, r))


async def available(c, sku):
    r = await c.request("GET", "/v1/skus/%d" % sku)
    j = r.json()
    expect(r.status == 200 and isinstance(j, dict) and isinstance(j.get("available"), int)
           and not isinstance(j.get("available"), bool),
           "GET /v1/skus/%d answered %r, wanted 200 with an integer available" % (sku, r))
    expect(j.get("sku_id") == sku, "GET /v1/skus/%d names sku_id %r" % (sku, j.get("sku_id")))
    return j["available"]


async def order(c, user, sku, qty=1, key=None):
    return await c.request("POST", "/v1/orders", {"user_id": user, "sku_id": sku, "qty": qty},
                           {"Idempotency-Key": key} if key else None)


def accepted_id(r):
    """The order id of a well-formed 202, else None."""
    j = r.json()
    if r.status == 202 and isinstance(j, dict) and j.get("status") == "accepted" \
            and isinstance(j.get("order_id"), str) and j["order_id"]:
        return j["order_id"]
    return None


# ---- the checks ------------------------------------------------------------------------------

async def check_admin(ctx):
    a = ctx.a
    sku = new_sku()
    for label, tok in (("no token", None), ("a wrong token", "nope"),
                       ("the payment token", PAYMENT), ("the admin token plus a suffix", ADMIN + "x")):
        r = await open_sale(a, sku, 10, 1, token=tok)
        expect(r.status == 401, "open with %s answered %r, wanted 401" % (label, r))
    r = await a.request("POST", "/v1/skus", {"sku_id": sku, "stock": 10, "per_user_limit": 1,
                                             "pay_timeout_s": 600}, {"Authorization": ADMIN})
    expect(r.status == 401, "open with a bare token (no Bearer) answered %r, wanted 401" % r)
    r = await a.request("GET", "/v1/skus/%d" % sku)
    expect(r.status == 404 and r.error() == "unknown_sku",
           "after refused opens GET answered %r, wanted 404 unknown_sku" % r)
    return "5 refusals, nothing opened"


async def check_open(ctx):
    sku = ctx.admin_sku = new_sku()
    await must_open(ctx.a, sku, 500, 1)
    got = await available(ctx.b, sku)  # asked of the other producer, at once
    expect(got == 500, "right after the 201 available is %d, wanted 500" % got)
    r = await order(ctx.b, random.randint(1, 10**9), sku)
    expect(accepted_id(r), "an order right after the 201 answered %r, wanted 202 accepted" % r)
    expect(await available(ctx.a, sku) == 499, "available did not drop to 499 after one order")
    return "available 500 at once, first order accepted"


async def check_reopen(ctx):
    sku = ctx.admin_sku
    expect(sku, "skipped: no SKU was opened")
    for stock in (500, 7):
        r = await open_sale(ctx.b, sku, stock, 1)
        expect(r.status == 409 and r.error() == "exists",
               "re-open with stock %d answered %r, wanted 409 exists" % (stock, r))
    got = await available(ctx.a, sku)
    expect(got == 499, "after re-opens available is %d, wanted 499" % got)


async def check_restock(ctx):
    sku = ctx.admin_sku
    expect(sku, "skipped: no SKU was opened")
    before = await available(ctx.a, sku)
    r = await ctx.a.request("POST", "/v1/skus/%d/restock" % sku, {"add": 50}, admin("nope"))
    expect(r.status == 401, "restock with a wrong token answered %r, wanted 401" % r)
    r = await ctx.a.request("POST", "/v1/skus/%d/restock" % sku, {"add": 50}, admin())
    expect(r.status == 200, "restock answered %r, wanted 200" % r)
    got, end = await available(ctx.b, sku), time.monotonic() + 5
    while got == before and time.monotonic() < end:  # bounded, in case restock is asynchronous
        await asyncio.sleep(0.05)
        got = await available(ctx.b, sku)
    expect(got == before + 50, "available went %d -> %d after restock 50" % (before, got))
    unknown = new_sku()
    r = await ctx.a.request("POST", "/v1/skus/%d/restock" % unknown, {"add": 5}, admin())
    expect(r.status == 404, "restock of an unknown SKU answered %r, wanted 404" % r)
    r = await ctx.a.request("GET", "/v1/skus/%d" % unknown)
    expect(r.status == 404 and r.error() == "unknown_sku",
           "GET of an unknown SKU answered %r, wanted 404 unknown_sku" % r)
    return "available %d -> %d" % (before, got)


async def burst_worker(conn, producer_idx, jobs, sku, results, start, connected):
    for _ in range(3):  # connect before the clock starts; bounded
        try:
            await asyncio.wait_for(conn.connect(), REQ_TIMEOUT)
            break
        except OSError:  # asyncio.TimeoutError is an OSError too
            conn.close()
            await asyncio.sleep(0.2)
    connected.append(conn.writer is not None)
    await start.wait()
    for user in jobs:  # one iterator shared by all workers
        try:
            r = await asyncio.wait_for(
                conn.exchange("POST", "/v1/orders", {"user_id": user, "sku_id": sku, "qty": 1}),
                REQ_TIMEOUT)
            results.append((user, producer_idx, r.status, r.error(), accepted_id(r), r))
        except Exception as e:  # one failed request is counted, the worker goes on
            conn.close()
            results.append((user, producer_idx, 0, None, None, "%s: %s" % (type(e).__name__, e)))
    conn.close()


def shard_key(sku, k, suffix="sale"):
    """Shard k's key of a sharded sale (shard 0 is the unsharded sale's own)."""
    return "{sku:%d}:%s" % (sku, suffix) if k == 0 else "{sku:%d/%d}:%s" % (sku, k, suffix)


async def sharded_worker(conn, pidx, jobs, sku, results, start):
    await start.wait()
    for user in jobs:  # one iterator shared by all workers
        sent = time.monotonic()
        try:
            r = await asyncio.wait_for(
                conn.exchange("POST", "/v1/orders", {"user_id": user, "sku_id": sku, "qty": 1}),
                REQ_TIMEOUT)
            results.append((user, pidx, sent, time.monotonic(), r.status, r.error(),
                            accepted_id(r), r))
        except Exception as e:  # one failed request is counted, the worker goes on
            conn.close()
            results.append((user, pidx, sent, time.monotonic(), 0, None, None,
                            "%s: %s" % (type(e).__name__, e)))
    conn.close()


async def check_sharded(ctx, stock=90, shards=3, users=300, tries=4, conns=60):
    """A hot SKU over 3 Redis shards (issue 17 part 3), through both producers: 90 units (30 a
    shard), limit 2, 300 buyers of whom 200 have their home on shard 1 (user_id mod 3), each
    ordering 4 times. Exactly 90 sold, none over a buyer's limit, and no false sold_out: no
    order sent after some buyer heard sold_out is accepted later (nothing is returned in this
    sale). Shard 1 runs dry long before the others, so a naive split (each shard on its own)
    refuses its buyers while 60 units remain. The shards end empty, no transfer left open; an
    order on shard 1 is found by GET and paid; GET /v1/skus says what every shard holds. An open
    over more shards than SALE_SHARDS_MAX is 400 and opens nothing."""
    sku = new_sku()
    body = {"sku_id": sku, "stock": stock, "per_user_limit": 2, "pay_timeout_s": 600}
    r = await ctx.a.request("POST", "/v1/skus", dict(body, shards=shards + 1), admin())
    expect(r.status == 400 and r.error() == "invalid_request",
           "open over %d shards (SALE_SHARDS_MAX=%d) answered %r, wanted 400"
           % (shards + 1, shards, r))
    r = await ctx.a.request("POST", "/v1/skus", dict(body, shards=shards), admin())
    expect(r.status == 201, "open over %d shards answered %r, wanted 201" % (shards, r))
    url = os.environ["REDIS_URL"]
    got = [redis_cmd(url, "HGET", shard_key(sku, k), "stock") for k in range(shards)]
    expect(got == [str(stock // shards)] * shards,
           "the shards hold %r, wanted %d each" % (got, stock // shards))
    left = await available(ctx.b, sku)
    expect(left == stock, "GET /v1/skus says %d available, wanted the sale's %d (every shard)"
           % (left, stock))
    base = 3 * random.randint(10**8, 10**11)
    buyers = [base + 1 + 3 * i for i in range(users * 2 // 3)]  # home shard 1
    buyers += [base + 3 * i for i in range(users - len(buyers))]  # home shard 0
    jobs = buyers * tries
    random.shuffle(jobs)
    jobs_it, results, start = iter(jobs), [], asyncio.Event()
    ports = (ctx.pa.port, ctx.pb.port)
    workers = [asyncio.ensure_future(sharded_worker(Conn(ports[i % 2]), i % 2, jobs_it, sku,
                                                    results, start)) for i in range(conns)]
    t = time.monotonic()
    start.set()
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - t
    counts, odd = {}, []
    for user, pidx, sent, recv, status, err, oid, r in results:
        word = "accepted" if oid else (err or "?")
        counts[(status, word)] = counts.get((status, word), 0) + 1
        if not (oid or (status == 409 and err in ("sold_out", "limit_exceeded"))
                or (status == 503 and err == "recovering")):
            odd.append("user %d via %s: %r" % (user, "AB"[pidx], r))
    summary = ", ".join("%d %s: %d" % (st, w, n) for (st, w), n in sorted(counts.items()))
    expect(not odd, "%d unexpected answers (%s); e.g. %s" % (len(odd), summary, "; ".join(odd[:3])))
    wins = [(u, recv) for u, _, _, recv, _, _, oid, _ in results if oid]
    expect(len(wins) == stock, "%d answers 202, wanted exactly %d (%s)" % (len(wins), stock, summary))
    per_user = {}
    for u, _ in wins:
        per_user[u] = per_user.get(u, 0) + 1
    over = [u for u, n in per_user.items() if n > 2]
    expect(not over, "%d buyers got more than their limit of 2" % len(over))
    first_sold_out = min((recv for _, _, _, recv, _, err, _, _ in results if err == "sold_out"),
                         default=None)
    if first_sold_out is not None:
        late = [u for u, _, sent, _, _, _, oid, _ in results if oid and sent > first_sold_out]
        expect(not late, "a sold_out was false: %d orders sent after it were accepted (%s)"
               % (len(late), summary))
    def held(k):  # stock + moving of shard k (HMGET's nil prints as an empty line)
        return sum(int(x) for x in redis_cmd_lines(url, "HMGET", shard_key(sku, k), "stock",
                                                   "moving") if x.strip())
    for _ in range(50):  # the last settles land within moments
        left = [held(k) for k in range(shards)]
        if not any(left):
            break
        await asyncio.sleep(0.1)
    expect(not any(left), "the shards hold %r units (stock + moving) after the sale, wanted 0"
           % (left,))
    # An order whose entry is on shard 1 (the order id does not say so) is found by GET and pay.
    oid, buyer = next((oid, u) for u, _, _, _, _, _, oid, _ in results
                      if oid and u % shards == 1)
    r = await ctx.b.request("GET", "/v1/orders/%s" % oid)
    j = r.json()
    expect(r.status == 200 and isinstance(j, dict) and j.get("user_id") == buyer,
           "GET of order %s (home shard 1) answered %r" % (oid, r))
    r = await ctx.a.request("POST", "/v1/orders/%s/pay" % oid, {"qty": 1},
                            {"Authorization": "Bearer " + PAYMENT})
    expect(r.status == 202, "paying order %s (home shard 1) answered %r" % (oid, r))
    moved = int(redis_cmd(url, "HGET", shard_key(sku, 1), "ver") or 0)
    expect(moved > 0, "shard 1 never received units (ver %d): nothing was moved" % moved)
    return "sku %d over %d shards: %d requests in %.2f s; %s; %d transfers into shard 1" % (
        sku, shards, len(results), elapsed, summary, moved)


def read_kafka(sku, brokers=None, topic=None):
    """Events of `sku` in the topic (default: the stack env's), via kcat (bounded); a line that
    is no JSON as {"unparsable": ...}."""
    out = command(["kcat", "-b", brokers or os.environ["KAFKA_BROKERS"], "-C", "-t",
                   topic or os.environ["KAFKA_TOPIC"], "-o", "beginning", "-e", "-q",
                   "-f", "%k\t%s\n"], timeout=60)
    events, key = [], str(sku)
    for line in out.splitlines():
        k, _, v = line.partition("\t")
        if k == key:
            try:
                events.append(json.loads(v))
            except ValueError:
                events.append({"unparsable": v[:100]})
    return events


async def check_burst(ctx, users=5000, tries=4, stock=500, conns=600):
    sku = new_sku()
    await must_open(ctx.a, sku, stock, 1)
    base = random.randint(10**9, 10**12)
    jobs = [base + i for i in range(users)] * tries
    random.shuffle(jobs)
    jobs_it, results, start, connected = iter(jobs), [], asyncio.Event(), []
    ports = (ctx.pa.port, ctx.pb.port)
    workers = [asyncio.ensure_future(burst_worker(Conn(ports[i % 2]), i % 2, jobs_it, sku, results,
                                                  start, connected)) for i in range(conns)]
    end = time.monotonic() + 20
    while len(connected) < conns and time.monotonic() < end:  # all connected before the clock
        await asyncio.sleep(0.05)
    t = time.monotonic()
    start.set()
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - t
    rate = len(results) / elapsed if elapsed > 0 else 0.0

    pre = "sku %d, %.2f s, %.0f req/s: " % (sku, elapsed, rate)

    def want(cond, detail):
        expect(cond, pre + detail)

    want(len(results) == len(jobs), "%d answers for %d requests" % (len(results), len(jobs)))
    counts, odd = {}, []
    for user, pidx, status, err, oid, r in results:
        word = "accepted" if oid else (err or "?")
        counts[(status, word)] = counts.get((status, word), 0) + 1
        if not (oid or (status == 409 and err in ("sold_out", "limit_exceeded"))):
            odd.append("user %d via %s: %r" % (user, "AB"[pidx], r))
    summary = ", ".join("%d %s: %d" % (s, w, n) for (s, w), n in sorted(counts.items()))
    want(not odd, "%d unexpected answers (%s); e.g. %s" % (len(odd), summary, "; ".join(odd[:3])))
    wins = [(user, oid) for user, _, _, _, oid, _ in results if oid]
    want(len(wins) == stock, "%d answers 202, wanted exactly %d (%s)" % (len(wins), stock, summary))
    winners = [u for u, _ in wins]
    want(len(set(winners)) == len(winners), "%d users got two 202s"
         % (len(winners) - len(set(winners))))
    ids = {oid for _, oid in wins}
    want(len(ids) == len(wins), "%d duplicate order ids among the 202s" % (len(wins) - len(ids)))
    left = await available(ctx.a, sku)
    want(left == 0, "available is %d after the sale, wanted 0" % left)
    per_prod = [sum(1 for r in results if r[1] == i) for i in (0, 1)]

    events = await asyncio.to_thread(read_kafka, sku)
    created = [e for e in events if e.get("type") == "order.created"]
    got_ids = [e.get("order_id") for e in created]
    want(len(created) == stock, "Kafka holds %d order.created for the SKU, wanted %d"
         % (len(created), stock))
    want(set(got_ids) == ids and len(set(got_ids)) == stock,
         "Kafka order ids differ from the 202s: %d missing, %d extra, %d duplicates"
         % (len(ids - set(got_ids)), len(set(got_ids) - ids), len(got_ids) - len(set(got_ids))))
    by_id = {oid: u for u, oid in wins}
    bad = [e for e in created if e.get("user_id") != by_id.get(e.get("order_id"))
           or e.get("qty") != 1 or e.get("sku_id") != sku]
    want(not bad, "%d order.created events disagree with the 202s, e.g. %s" % (len(bad), bad[:1]))
    return ("sku %d: %d requests (A %d, B %d) on %d connections in %.2f s = %.0f req/s; %s; "
            "Kafka agrees" % (sku, len(results), per_prod[0], per_prod[1], conns, elapsed, rate,
                              summary))


async def check_idempotency(ctx):
    sku = new_sku()
    await must_open(ctx.a, sku, 100, 0)
    u1, key = random.randint(1, 10**9), "itest-%016x" % random.getrandbits(64)
    before = await available(ctx.a, sku)
    r1 = await order(ctx.a, u1, sku, key=key)
    id1 = accepted_id(r1)
    expect(id1, "first request with a key answered %r, wanted 202" % r1)
    r2 = await order(ctx.b, u1, sku, key=key)
    expect(accepted_id(r2) == id1, "the replay answered %r, wanted 202 with order_id %s" % (r2, id1))
    mid = await available(ctx.a, sku)
    expect(mid == before - 1, "available went %d -> %d for one keyed order" % (before, mid))

    u2, key2 = u1 + 1, key + "-race"
    rs = await asyncio.gather(*(order(ctx.a if i % 2 else ctx.b, u2, sku, key=key2)
                                for i in range(20)))
    odd = [r for r in rs if not accepted_id(r) and not (r.status == 409 and r.error() == "in_progress")]
    expect(not odd, "racing copies got %d unexpected answers, e.g. %r" % (len(odd), odd[0] if odd else None))
    ids = {accepted_id(r) for r in rs} - {None}
    expect(len(ids) <= 1, "racing copies of one key created %d orders" % len(ids))
    after = await available(ctx.a, sku)
    expect(after == mid - len(ids), "available went %d -> %d for %d order(s)" % (mid, after, len(ids)))
    if ids:
        r = await order(ctx.a, u2, sku, key=key2)
        expect(accepted_id(r) in ids, "a replay after the race answered %r" % r)
    in_progress = sum(1 for r in rs if r.status == 409)
    # The key belongs to (SKU, user): another user with the same key gets an order of their own.
    r3 = await order(ctx.b, u1 + 2, sku, key=key)
    id3 = accepted_id(r3)
    expect(id3 and id3 != id1, "another user with the same key answered %r, wanted a new order" % r3)
    expect(await available(ctx.a, sku) == after - 1, "the other user's order did not deduct one")
    return "race: %d x 202 same id, %d x 409 in_progress" % (20 - in_progress, in_progress)


async def check_limits(ctx):
    sku = new_sku()
    await must_open(ctx.a, sku, 3, 2)
    u = random.randint(1, 10**9)
    r = await order(ctx.a, u, sku, qty=2)
    expect(accepted_id(r), "qty 2 within a limit of 2 answered %r, wanted 202" % r)
    expect(await available(ctx.a, sku) == 1, "available is not 1 after qty 2 of 3")
    r = await order(ctx.b, u, sku, qty=1)
    expect(r.status == 409 and r.error() == "limit_exceeded",
           "a third unit for the same user answered %r, wanted 409 limit_exceeded" % r)
    r = await order(ctx.a, u + 1, sku, qty=3)
    expect(r.status == 409 and r.error() == "limit_exceeded",
           "qty 3 over a limit of 2 answered %r, wanted 409 limit_exceeded" % r)
    r = await order(ctx.a, u + 1, sku, qty=2)
    expect(r.status == 409 and r.error() == "sold_out",
           "qty 2 with 1 left answered %r, wanted 409 sold_out" % r)
    got = await available(ctx.b, sku)
    expect(got == 1, "refusals changed available to %d, wanted 1" % got)
    r = await order(ctx.b, u + 1, sku, qty=1)
    expect(accepted_id(r), "the last unit answered %r, wanted 202" % r)
    expect(await available(ctx.a, sku) == 0, "available is not 0 after the last unit")


def hostile_requests(sku, unknown):
    """(label, method, path, body, headers, wanted statuses, wanted error word or None)."""
    o = '{"user_id":7,"sku_id":%d,"qty":1}' % sku  # a valid order; every variant is one bad step off
    bad = []

    def add(label, body, h=None, want=(400,), word="invalid_request"):
        bad.append((label, "POST", "/v1/orders", body, h, set(want), word))

    def order_with(**fields):
        return json.dumps(dict({"user_id": 7, "sku_id": sku, "qty": 1}, **fields))

    add("empty body", b"")
    add("'{'", "{")
    add("truncated JSON", o[:-5])
    for text in ("[]", '"str"', "null", "true", "42", "{}", "[" + o + "]"):
        add(text[:20], text)
    add("[ x 4000", "[" * 4000)
    add('{"a": x 800', '{"a":' * 800)
    wrong_values = {  # written verbatim into an otherwise valid order
        "qty": ("1e400", "99999999999999999999999", '"1"', "1.5", "null", "true", "[1]",
                '{"n":1}', "-1", "0"),
        "user_id": ("1e400", "99999999999999999999999", '"7"', "1.5", "[1]", "0"),
        "sku_id": ("1e400", '"%d"' % sku, "1.5", "[1]", "0")}
    for field, values in wrong_values.items():
        for val in values:
            fields = {"user_id": "7", "sku_id": str(sku), "qty": "1", field: val}
            add("%s %s" % (field, val), "{%s}" % ",".join('"%s":%s' % kv for kv in fields.items()))
    add("qty 1001", order_with(qty=1001))
    add("qty -1000", order_with(qty=-1000))
    add("user_id 2^53", order_with(user_id=MAX_ID + 1))
    add("sku_id 2^53", order_with(sku_id=MAX_ID + 1))
    add("user_id -7", order_with(user_id=-7))
    add("missing user_id", '{"sku_id":%d,"qty":1}' % sku)
    add("missing sku_id", '{"user_id":7,"qty":1}')
    add("missing qty", '{"user_id":7,"sku_id":%d}' % sku)
    add("unknown fields only", '{"foo":1,"bar":"x"}')
    add("NUL after the object", o.encode() + b"\x00")
    add("NUL before the object", b"\x00" + o.encode())
    add("NUL inside a key", o.replace('"qty"', '"q\x00ty"').encode())
    add("invalid UTF-8 in a string", o[:-1].encode() + b',"note":"\xc3\x28"}')
    add("overlong UTF-8 in a key", o.replace('"qty"', '"qty\xc0\xaf"').encode("latin-1"))
    add("garbage after the object", o + " x")
    add("two objects", o + o)
    add("text/plain with valid JSON", o, {"Content-Type": "text/plain"}, (400, 415), None)
    add("form-encoded", "user_id=7&sku_id=%d&qty=1" % sku,
        {"Content-Type": "application/x-www-form-urlencoded"}, (400, 415), None)
    add("5000-byte valid order", o + " " * (5000 - len(o)), want=(413,), word=None)
    add("[ x 10000", "[" * 10000, want=(413,), word=None)
    add("unknown SKU", order_with(sku_id=unknown), want=(404,), word="unknown_sku")
    bad.append(("GET /v1/orders", "GET", "/v1/orders", None, None, {404, 405}, None))
    bad.append(("GET /v1/skus/abc", "GET", "/v1/skus/abc", None, None, {400, 404}, None))
    rs = "/v1/skus/%d/restock" % sku
    for val in ("0", "-5", "1.5", '"5"', "null", "1e400", "1000000000001"):
        bad.append(("add " + val, "POST", rs, '{"add":%s}' % val, admin(), {400}, "invalid_request"))
    for body in ("{}", "{", ""):
        bad.append(("restock %r" % body, "POST", rs, body, admin(), {400}, "invalid_request"))
    bad.append(("restock without token", "POST", rs, '{"add":5}', None, {401}, None))
    bad.append(("restock, payment token", "POST", rs, '{"add":5}', admin(PAYMENT), {401}, None))
    return bad


async def check_bad_input(ctx):
    sku = ctx.bad_sku = new_sku()
    await must_open(ctx.a, sku, 50, 0)
    before = await available(ctx.a, sku)
    reqs = hostile_requests(sku, new_sku())
    wrong = []
    for i, (label, method, path, body, headers, want, word) in enumerate(reqs):
        c = ctx.a if i % 2 == 0 else ctx.b
        try:
            r = await c.request(method, path, body, headers)
        except TransportError as e:
            wrong.append("%s: %s" % (label, e))
            continue
        j = r.json()
        if r.status not in want:
            wrong.append("%s: %r (wanted %s)" % (label, r, "/".join(map(str, sorted(want)))))
        elif r.status != 413 and not (isinstance(j, dict) and isinstance(j.get("error"), str)):
            wrong.append("%s: %r (no JSON error)" % (label, r))
        elif word and j.get("error") != word:
            wrong.append("%s: %r (wanted error %s)" % (label, r, word))
    ctx.bad_before = before
    expect(not wrong, "%d of %d answers wrong: %s" % (len(wrong), len(reqs), "; ".join(wrong[:6])))
    return "%d hostile requests refused" % len(reqs)


async def check_bad_changed_nothing(ctx):
    expect(ctx.bad_sku and ctx.bad_before is not None, "skipped: no bad-input SKU")
    got = await available(ctx.b, ctx.bad_sku)
    expect(got == ctx.bad_before, "available went %d -> %d" % (ctx.bad_before, got))
    bad_opens = [{"sku_id": 0, "stock": 5, "per_user_limit": 1, "pay_timeout_s": 600},
                 {"stock": -1}, {"stock": 1.5}, {"stock": "5"}, {"per_user_limit": -1},
                 {"pay_timeout_s": -1}, {"stock": None}]
    for i, fields in enumerate(bad_opens):
        s = new_sku()
        body = dict({"sku_id": s, "stock": 5, "per_user_limit": 1, "pay_timeout_s": 600}, **fields)
        r = await ctx.a.request("POST", "/v1/skus", body, admin())
        expect(r.status == 400 and r.error() == "invalid_request",
               "open with %s answered %r, wanted 400 invalid_request" % (fields, r))
        r = await ctx.b.request("GET", "/v1/skus/%d" % s)
        expect(r.status == 404, "a refused open of %s left GET answering %r" % (fields, r))
    for p in ctx.producers:
        expect(p.proc.poll() is None, "producer %s exited (%s)" % (p.name, p.proc.returncode))
        r = await p.client.request("GET", "/healthz")
        expect(r.status == 200, "producer %s /healthz answered %r" % (p.name, r))
    return "available still %d; %d bad opens refused; both producers healthy" % (got, len(bad_opens))


async def get_order(c, order_id):
    return await c.request("GET", "/v1/orders/%s" % order_id)


async def check_get_order(ctx):
    sku = new_sku()
    await must_open(ctx.a, sku, 10, 0)
    user = random.randint(1, 10**9)
    r = await order(ctx.a, user, sku, qty=2)
    oid = accepted_id(r)
    expect(oid, "an order answered %r, wanted 202" % r)
    # In Kafka, not yet in PostgreSQL (no consumer runs here): "accepted", from either producer.
    for c in (ctx.a, ctx.b):
        g = await get_order(c, oid)
        j = g.json() or {}
        expect(g.status == 200 and j.get("status") == "accepted" and j.get("order_id") == oid
               and j.get("sku_id") == sku and j.get("user_id") == user and j.get("qty") == 2,
               "GET of a fresh order answered %r, wanted 200 accepted with its fields" % g)
    # Once PostgreSQL has it, PostgreSQL's status wins.
    psql("INSERT INTO orders (order_id, user_id, sku_id, qty, status, created_at, expires_at,"
         " paid_at) VALUES (:'p1', :'p2', :'p3', 2, 'paid', now(), now() + interval '10 min',"
         " now())", oid, user, sku)
    try:
        g = await get_order(ctx.b, oid)
        j = g.json() or {}
        expect(g.status == 200 and j.get("status") == "paid" and isinstance(j.get("paid_ms"), int)
               and j.get("refund_due") is False,
               "GET of a paid order answered %r, wanted 200 paid" % g)
    finally:
        psql("DELETE FROM orders WHERE order_id = :'p1'", oid)
    # The consumer drops the accepted entry after its commit; with neither, the order is unknown.
    redis_cmd(os.environ["REDIS_URL"], "HDEL", "{sku:%d}:resv" % sku, oid)
    g = await get_order(ctx.a, oid)
    expect(g.status == 404 and g.error() == "unknown_order",
           "GET of an order in neither place answered %r, wanted 404 unknown_order" % g)
    for bad in ("not-an-order", "x" * 65, "%00", "0000000000000000-1-x-1"):
        g = await get_order(ctx.a, bad)
        expect(g.status == 404, "GET /v1/orders/%s answered %r, wanted 404" % (bad, g))
    return "accepted -> paid from PostgreSQL -> 404 once gone"


async def check_get_sku_stock(ctx):
    sku = new_sku()
    await must_open(ctx.a, sku, 7, 0)
    r = await ctx.a.request("GET", "/v1/skus/%d" % sku)
    j = r.json() or {}
    expect(r.status == 200 and j.get("available") == 7 and "stock" in j and j["stock"] is None,
           "GET of a sale PostgreSQL has not seen answered %r, wanted available 7, stock null" % r)
    psql("INSERT INTO inventory (sku_id, stock, supplied, per_user_limit, pay_timeout_s,"
         " created_at, updated_at) VALUES (:'p1', 5, 7, 0, 600, now(), now())", sku)
    try:
        r = await ctx.b.request("GET", "/v1/skus/%d" % sku)
        j = r.json() or {}
        expect(r.status == 200 and j.get("available") == 7 and j.get("stock") == 5
               and j.get("supplied") == 7,
               "GET answered %r, wanted available 7 (Redis) and stock 5 (PostgreSQL)" % r)
    finally:
        psql("DELETE FROM inventory WHERE sku_id = :'p1'", sku)
    r = await ctx.a.request("GET", "/v1/skus/%d" % new_sku())
    expect(r.status == 404 and r.error() == "unknown_sku", "an unknown SKU answered %r" % r)
    return "available from Redis, stock from PostgreSQL"


async def check_rate_limits(ctx):
    """A third producer with USER_RATE_LIMIT=5 and ORDER_RATE_LIMIT=20."""
    p = Producer("C", ctx.binary, ctx.logdir, USER_RATE_LIMIT="5", ORDER_RATE_LIMIT="20")
    ctx.producers.append(p)
    await p.wait_ready(timeout=20)
    c = p.client
    sku = new_sku()
    await must_open(c, sku, 1000, 0)
    user = random.randint(1, 10**9)
    t = time.monotonic()
    rs = await asyncio.gather(*(order(c, user, sku) for _ in range(20)))
    spent = time.monotonic() - t
    ok = sum(1 for r in rs if accepted_id(r))
    limited = sum(1 for r in rs if r.status == 429 and r.error() == "rate_limited")
    expect(ok + limited == 20, "20 orders of one user: %d x 202, %d x 429, others %r"
           % (ok, limited, [r for r in rs if r.status not in (202, 429)][:2]))
    expect(5 <= ok <= 5 + int(5 * spent) + 1,
           "one user got %d orders through a limit of 5/s in %.2f s" % (ok, spent))
    expect(await available(c, sku) == 1000 - ok, "429s changed the stock")
    await asyncio.sleep(1.1)  # the worker's bucket refills
    t = time.monotonic()
    rs = await asyncio.gather(*(order(c, user + 1 + i, sku) for i in range(60)))
    spent = time.monotonic() - t
    ok2 = sum(1 for r in rs if accepted_id(r))
    limited2 = sum(1 for r in rs if r.status == 429 and r.error() == "rate_limited")
    expect(ok2 + limited2 == 60, "60 users: %d x 202, %d x 429" % (ok2, limited2))
    expect(20 <= ok2 <= 20 + int(20 * spent) + 1,
           "%d orders through a worker limit of 20/s in %.2f s" % (ok2, spent))
    expect(await available(c, sku) == 1000 - ok - ok2, "429s changed the stock")
    return "one user: %d x 202, %d x 429; 60 users: %d x 202, %d x 429" % (ok, limited, ok2, limited2)


async def check_metrics(ctx):
    for p in ctx.producers:
        r = await p.client.request("GET", "/metrics")
        expect(r.status == 200, "producer %s /metrics answered %r" % (p.name, r))
        lines = r.body.decode("utf-8", "replace").splitlines()
        expect(any(l.startswith(("stockpipe_", "sp_")) for l in lines),
               "producer %s /metrics has no stockpipe_ or sp_ line" % p.name)


# ---- the runner ------------------------------------------------------------------------------

class Ctx:
    admin_sku = bad_sku = bad_before = None


async def check_script_cache_lost(ctx):
    """Redis forgets its scripts (SCRIPT FLUSH, as after a restart or failover) under running
    producers: orders keep working, and afterwards the producers are back on EVALSHA (the
    scripts are in the server's cache again) instead of sending every script body."""
    sku = new_sku()
    await must_open(ctx.a, sku, 10, 0)
    url = os.environ["REDIS_URL"]
    # Every primary forgets (one server, or each primary of a Redis Cluster); the commands are
    # counted over all of them.
    flushed = redis_each_primary(url, "SCRIPT", "FLUSH")
    for i, c in enumerate((ctx.a, ctx.b, ctx.a, ctx.b)):
        r = await order(c, random.randint(1, 10**9), sku)
        expect(accepted_id(r), "order %d after SCRIPT FLUSH answered %r, wanted 202" % (i, r))
    expect(await available(ctx.a, sku) == 6, "available is not 6 after 4 orders of 10")
    before = redis_info_sum(url, "commandstats")
    for i in range(4):
        r = await order(ctx.a if i % 2 else ctx.b, random.randint(1, 10**9), sku)
        expect(accepted_id(r), "order %d answered %r, wanted 202" % (i + 4, r))
    after = redis_info_sum(url, "commandstats")
    def calls(stats, cmd):
        return int(stats.get("cmdstat_%s.calls" % cmd, 0))
    expect(calls(after, "eval") == calls(before, "eval"),
           "producers still send EVAL with the script body after the cache was restored "
           "(%d more EVAL calls)" % (calls(after, "eval") - calls(before, "eval")))
    expect(calls(after, "evalsha") > calls(before, "evalsha"), "no EVALSHA was counted")
    return "SCRIPT FLUSH on %d primar%s; %d more EVALSHA, no EVAL" % (
        len(flushed), "y" if len(flushed) == 1 else "ies",
        calls(after, "evalsha") - calls(before, "evalsha"))


async def check_reuse_port(ctx):
    """HTTP_REUSE_PORT=1: two producers listen on one port and the kernel spreads new connections
    over both; a producer without it cannot take the port and exits with a clear error."""
    port = free_port()
    pair = [Producer(n, ctx.binary, ctx.logdir, port=port, HTTP_REUSE_PORT="1") for n in ("D", "E")]
    ctx.producers.extend(pair)
    errs = await ready_errors(pair)
    expect(not errs, "; ".join(errs))
    sku = new_sku()
    await must_open(pair[0].client, sku, 1000, 0)
    by_worker = {}
    for i in range(60):  # a new connection per order, as many buyers would
        c = Client(port)
        try:
            r = await order(c, random.randint(1, 10**9), sku)
        finally:
            c.close()
        oid = accepted_id(r)
        expect(oid, "order %d on the shared port answered %r, wanted 202" % (i, r))
        worker = oid.split("-")[2]
        by_worker[worker] = by_worker.get(worker, 0) + 1
    expect(len(by_worker) == 2,
           "60 connections all reached one producer (%r): the port is not shared" % by_worker)
    lone = Producer("F", ctx.binary, ctx.logdir, port=port)
    try:
        code = await asyncio.get_running_loop().run_in_executor(None, lone.proc.wait, 10)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        lone.kill()
    expect(code not in (None, 0), "a producer without HTTP_REUSE_PORT started on the shared port")
    with open(lone.log_path, "rb") as f:
        log = f.read().decode("utf-8", "replace")
    expect("cannot listen on" in log,
           "the refused producer's log does not say it cannot listen: %s" % log[-300:])
    return "60 orders over new connections: %s to the two; one without the option exits %s" % (
        " and ".join(str(n) for n in sorted(by_worker.values())), code)


CHECKS = [
    ("admin: open without or with a wrong token is 401 and opens nothing", check_admin, 20),
    ("admin: open is 201 and the sale is orderable at once on every producer", check_open, 20),
    ("admin: a second open is 409 exists and changes nothing", check_reopen, 20),
    ("admin: restock is 200 and available grows by add; unknown SKU is 404", check_restock, 20),
    ("burst: 20000 orders, 5000 users, 500 units over two producers sell exactly 500", check_burst, 100),
    ("idempotency: a replayed or racing key yields one order and one deduction", check_idempotency, 30),
    ("limits: per_user_limit and stock are enforced and refusals deduct nothing", check_limits, 20),
    ("sharded sale: 3 shards, both producers: all sold, limit exact, no false sold_out", check_sharded, 30),
    ("bad input: every hostile request gets a 4xx JSON error", check_bad_input, 40),
    ("bad input changes nothing and the producers stay healthy", check_bad_changed_nothing, 20),
    ("redis script cache lost: orders go on and EVALSHA resumes", check_script_cache_lost, 30),
    ("GET order: accepted until PostgreSQL has it, then PostgreSQL's status; 404 unknown", check_get_order, 30),
    ("GET sku: available from Redis and stock from PostgreSQL", check_get_sku_stock, 20),
    ("rate limits: per user and per worker answer 429 and deduct nothing", check_rate_limits, 40),
    ("metrics: /metrics is Prometheus text with stockpipe_ lines", check_metrics, 10),
    ("reuse port: two producers share one port with HTTP_REUSE_PORT=1", check_reuse_port, 40),
]


async def run(rep, binary, logdir):
    # No reaper runs here: say for it that this Redis holds every sale PostgreSQL has (a reaper
    # writes the key when it finds so), else a missing sale answers 503 recovering, not 404.
    try:
        mark_rebuilt(os.environ["REDIS_URL"], "integration-api")
    except Fail as e:
        print("# could not mark Redis rebuilt: %s" % e, flush=True)
    ctx = Ctx()
    ctx.producers = []
    ctx.binary, ctx.logdir = binary, logdir
    try:
        ctx.pa, ctx.pb = (Producer("A", binary, logdir, SALE_SHARDS_MAX="3"),
                          Producer("B", binary, logdir, SALE_SHARDS_MAX="3"))
        ctx.producers = [ctx.pa, ctx.pb]
        ctx.a, ctx.b = ctx.pa.client, ctx.pb.client
        errs = await ready_errors(ctx.producers)
        if errs:
            rep.not_ok("two producers start and answer /readyz 200 within 20 s", "; ".join(errs))
            for p in ctx.producers:
                print(p.log_tail(), flush=True)
            rep.skip([name for name, _, _ in CHECKS], "the producers are not ready")
        else:
            rep.ok("two producers start and answer /readyz 200 within 20 s",
                   "ports %d, %d" % (ctx.pa.port, ctx.pb.port))
            for name, fn, budget in CHECKS:
                left = TOTAL_BUDGET - 15 - (time.monotonic() - T0)
                if left < 1:
                    rep.skip([name], "out of time")
                    continue
                await rep.run_check(name, functools.partial(fn, ctx), min(budget, left))
        if ctx.producers:
            codes = await asyncio.gather(*(p.stop(10.0) for p in ctx.producers))
            for p, code in zip(ctx.producers, codes):
                if code == 0:
                    rep.ok("producer %s drains and exits 0 on SIGTERM" % p.name)
                else:
                    rep.not_ok("producer %s drains and exits 0 on SIGTERM" % p.name,
                               "exit status %s" % ("none within 10 s" if code is None else code))
                    print(p.log_tail(), flush=True)
    finally:
        for p in ctx.producers:
            p.client.close()
            p.kill()


def main():
    raise_nofile(4096)
    return run_driver(run, ("REDIS_URL", "KAFKA_BROKERS", "KAFKA_TOPIC", "PG_DSN"),
                      "sp-producer-api-", "the producers' logs are")


if __name__ == "__main__":
    sys.exit(main())
