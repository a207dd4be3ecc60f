#!/usr/bin/env python3
"""integration_http_hostile.py - hostile clients do not hurt service for a well-behaved one (a real producer).

Starts $BIN_DIR/producer (default bin/) on a free loopback port with HTTP_MAX_CONNECTIONS=200,
opens a sale of its own, and while a well-behaved buyer orders on its keep-alive connection:
  1. slow-loris: 120 connections each send a request line, then one header byte a second;
  2. a flood of invalid requests, each on a new connection: garbage bytes, oversized bodies
     (Content-Length and chunked: 413), huge headers and URIs, bad JSON, a disallowed method;
  3. idle connections fill the server up to its bound; 30 more are answered 503 and closed at once
     (counted in stockpipe_http_connections_refused_total);
  4. after the timeout (10 s to send a whole request) the server closes every slow-loris and idle
     connection itself, though the slow ones never stopped sending; then the open-connections
     gauge is back to the buyer's two connections (every close was accounted for), and a new
     connection is served.
The buyer gets every answer, 202, with p99 under 1 s; the invalid requests deducted nothing; the
producer stays healthy and exits 0 on SIGTERM. Prints `ok - NAME` / `not ok - NAME: DETAIL` per
check and, last, `N passed, M failed`. Needs the stack env (REDIS_URL, KAFKA_BROKERS, KAFKA_TOPIC,
PG_DSN; read from var/stack.env when unset). Standard library only: well-formed exchanges and the
answers to raw bytes go through tests/lib/http11.py; the slow-loris requests are written raw.
"""
import asyncio
import os
import random
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))

from http11 import HOST, Conn, prepare  # noqa: E402
from testkit import Fail, Procs, Worker, parse_metrics, run_driver  # noqa: E402

ADMIN = "test-admin"
BOUND = 200           # HTTP_MAX_CONNECTIONS of the producer under test
TIMEOUT_S = 10        # SP_HTTP_LIMITS_DEFAULT.timeout_s: to send a whole request
SLOW = 120            # slow-loris connections
EXTRA = 30            # connections over the bound
FLOOD_S = 4.0         # how long the flood of invalid requests lasts
FLOOD_WORKERS = 4
P99_MAX = 1.0         # seconds, the buyer's bound
ANSWER_S = 5.0        # seconds for an answer


def percentile(values, p):
    """The p-th percentile, p in 0..100 (flashsale.percentile takes a fraction and
    interpolates the rank differently: the bound below was set with this one)."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))]


# ---- raw bytes, answers read by http11 ------------------------------------------------------

async def one_shot(port, raw, timeout=ANSWER_S):
    """Sends raw bytes on a new connection (b"": nothing); the answer as a Response, or None if
    the server closed the connection without one. Raises when it cannot connect, or with
    TimeoutError when no answer comes within `timeout` s."""
    c = Conn(port)
    try:
        await c.connect()
        try:
            return await asyncio.wait_for(c.exchange_raw(raw), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    finally:
        c.close()


# ---- the actors ------------------------------------------------------------------------------

class Ctx:
    def __init__(self, port, sku):
        self.port, self.sku = port, sku
        self.stop_buyer = False
        self.latencies, self.codes, self.buyer_errors = [], {}, []
        self.accepted = 0
        self.monitor = Conn(port)

    async def metric(self, name):
        r = await self.monitor.request("GET", "/metrics", timeout=ANSWER_S)
        if r.status != 200:
            raise Fail("/metrics answered %d" % r.status)
        value = parse_metrics(r.body).get(name)
        if value is None:
            raise Fail("/metrics has no %s" % name)
        return value


async def buyer(ctx):
    """Orders one unit for a new user every 20 ms on one keep-alive connection."""
    c = Conn(ctx.port)
    user = random.randint(10**9, 10**12)
    while not ctx.stop_buyer:
        user += 1
        t = time.monotonic()
        try:
            r = await c.request("POST", "/v1/orders",
                                {"user_id": user, "sku_id": ctx.sku, "qty": 1}, timeout=ANSWER_S)
            ctx.latencies.append(time.monotonic() - t)
            ctx.codes[r.status] = ctx.codes.get(r.status, 0) + 1
            if r.status == 202:
                ctx.accepted += 1
        except Exception as e:  # a missing answer is what this test is about: counted
            ctx.buyer_errors.append("%.1f s: %s %s" % (time.monotonic() - t, type(e).__name__, e))
        await asyncio.sleep(0.02)
    c.close()


async def slowloris(port, results):
    """A request line, then one header byte a second until the server closes: (seconds the
    connection lived, bytes trickled, what the server sent)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    opened = time.monotonic()
    sent, got = 0, b""
    writer.write(b"POST /v1/orders HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    try:
        while time.monotonic() - opened < TIMEOUT_S + 8:
            try:
                data = await asyncio.wait_for(reader.read(4096), 1.0)
                got += data
                if not data:
                    break  # EOF: the server closed it
            except asyncio.TimeoutError:
                writer.write(b"a")
                await writer.drain()
                sent += 1
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()
    results.append((time.monotonic() - opened, sent, got))


def hostile_requests(sku, port=0):
    """(label, raw request, answers allowed)."""
    big = "x" * 9000
    return [
        ("garbage bytes", b"\x16\x03\x01\x02\x00\x01\xff garbage\r\n\r\n", {400}),
        ("oversized body (Content-Length 100000)",
         b"POST /v1/orders HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
         b"Content-Length: 100000\r\n\r\n", {413}),
        ("oversized body (5000 bytes, over the 4096 limit)",
         b"POST /v1/orders HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
         b"Content-Length: 5000\r\n\r\n", {413}),
        ("oversized chunk",
         b"POST /v1/orders HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n186A0\r\n", {413}),
        ("9000-byte header", ("GET /healthz HTTP/1.1\r\nHost: h\r\nX-Big: %s\r\n\r\n" % big).encode(),
         {400, 413, 431}),
        ("9000-byte URI", ("GET /%s HTTP/1.1\r\nHost: h\r\n\r\n" % big).encode(), {400, 413, 414}),
        ("bad JSON", prepare("POST", "/v1/orders", b'{"user_id":1,"sku_id":', port=port), {400}),
        ("an order for qty 0", prepare("POST", "/v1/orders",
                                       {"user_id": 1, "sku_id": sku, "qty": 0}, port=port), {400}),
        ("method PUT", prepare("PUT", "/v1/orders", {"user_id": 1}, port=port), {405, 501}),
    ]


async def flood(port, sku, until, tally):
    kinds = hostile_requests(sku, port)
    i = random.randrange(len(kinds))
    while time.monotonic() < until:
        label, raw, want = kinds[i % len(kinds)]
        i += 1
        try:
            r = await one_shot(port, raw)
            status = r.status if r else 0
        except Exception as e:
            status = "%s" % type(e).__name__
        key = (label, status in want)
        tally[key] = tally.get(key, 0) + 1
        if status not in want:
            tally.setdefault("wrong", []).append("%s: %s" % (label, status))


async def over_the_bound(port):
    """A connection made while the server is full: its answer (503 expected), or 0 if closed."""
    try:
        r = await one_shot(port, b"", 3.0)  # the server speaks first
    except asyncio.TimeoutError:
        return -1, b""  # left open: the bound did not hold
    return (r.status, r.body) if r else (0, b"")


# ---- the run ---------------------------------------------------------------------------------

async def run(rep, binary, logdir):
    producer = Worker(Procs(), "producer", binary, os.path.join(logdir, "producer.log"))
    port = producer.port
    producer.start({"ADMIN_TOKEN": ADMIN, "PAYMENT_TOKEN": "test-pay", "USER_RATE_LIMIT": "0",
                    "HTTP_MAX_CONNECTIONS": str(BOUND),
                    "WORKER_ID": "itest-hostile-%d" % os.getpid()})
    ctx = None
    try:
        try:
            await producer.wait_ready(timeout=30)
            ready = True
        except Fail as e:
            ready, why = False, e
        producer.client.close()  # the probe's connection: the buyer and the monitor are counted
        rep.check("the producer starts with HTTP_MAX_CONNECTIONS=%d and is ready" % BOUND, ready,
                  "port %d" % port if ready else "%s (log %s)" % (why, producer.log_path))
        if not ready:
            return
        sku = random.randint(10**9, 2**53 - 1)
        ctx = Ctx(port, sku)
        r = await ctx.monitor.request(
            "POST", "/v1/skus", {"sku_id": sku, "stock": 1000000, "per_user_limit": 0,
                                 "pay_timeout_s": 600}, {"Authorization": "Bearer " + ADMIN},
            timeout=ANSWER_S)
        rep.check("a sale of its own opens", r.status == 201, "sku %d" % sku if r.status == 201
                  else repr(r))
        refused0 = await ctx.metric("stockpipe_http_connections_refused_total")
        timeouts0 = await ctx.metric("stockpipe_http_request_timeouts_total")

        t0 = time.monotonic()
        buying = asyncio.ensure_future(buyer(ctx))
        await asyncio.sleep(0.5)
        slow_results = []
        slow = [asyncio.ensure_future(slowloris(port, slow_results)) for _ in range(SLOW)]
        tally = {}
        await asyncio.gather(*(flood(port, sku, time.monotonic() + FLOOD_S, tally)
                               for _ in range(FLOOD_WORKERS)))
        wrong = tally.pop("wrong", [])
        n_flood = sum(tally.values())
        rep.check("a flood of invalid requests gets 4xx answers (400, 413, 501...)",
                  not wrong and n_flood > 0,
                  "%d requests in %.0f s, %d kinds" % (n_flood, FLOOD_S, len(hostile_requests(sku)))
                  if not wrong else "%d of %d wrong, e.g. %s" % (len(wrong), n_flood, wrong[:5]))

        # Fill the server up to its bound with idle connections, then go over it.
        # Topped up a few times: connections of the flood may still be closing when first counted.
        open_now = int(await ctx.metric("stockpipe_http_connections"))
        holders = []
        full = open_now
        for _ in range(5):
            for _ in range(max(0, BOUND - full)):
                c = Conn(port)
                await c.connect()
                holders.append(c)
            await asyncio.sleep(0.3)
            full = int(await ctx.metric("stockpipe_http_connections"))
            if full >= BOUND:
                break
        rep.check("idle connections fill the server up to its bound", full == BOUND,
                  "%d were open, %d idle ones added: %d open" % (open_now, len(holders), full))
        answers = await asyncio.gather(*(over_the_bound(port) for _ in range(EXTRA)))
        n503 = sum(1 for s, b in answers if s == 503 and b"too_many_connections" in b)
        closed = sum(1 for s, _ in answers if s == 0)
        refused = await ctx.metric("stockpipe_http_connections_refused_total") - refused0
        rep.check("connections over the bound are answered 503 and closed at once",
                  n503 + closed == EXTRA and n503 > 0,
                  "%d x 503, %d closed, others %s" % (n503, closed,
                                                     [s for s, _ in answers if s not in (0, 503)]))
        rep.check("refused connections are counted in stockpipe_http_connections_refused_total",
                  refused == EXTRA, "+%d" % refused)
        still = int(await ctx.metric("stockpipe_http_connections"))
        rep.check("the refused ones never counted as open", still == BOUND, "%d open" % still)

        # The slow-loris connections: closed by the server after the timeout, though they kept
        # sending. The idle holders follow them.
        await asyncio.gather(*slow)
        lives = [r[0] for r in slow_results]
        answered = [r for r in slow_results if r[2]]
        in_window = [l for l in lives if TIMEOUT_S - 0.5 <= l <= TIMEOUT_S + 4]
        rep.check("the server closes every slow-loris connection after the %d s timeout" % TIMEOUT_S,
                  len(in_window) == SLOW,
                  "%d connections lived %.1f..%.1f s, trickling %d..%d bytes each"
                  % (SLOW, min(lives), max(lives), min(r[1] for r in slow_results),
                     max(r[1] for r in slow_results)) if lives else "no result")
        rep.check("slow-loris connections got no answer, just a close", not answered,
                  "%d answered, e.g. %r" % (len(answered), answered[0][2][:80]) if answered else "")
        end = time.monotonic() + TIMEOUT_S + 8
        open_now = -1
        while time.monotonic() < end:
            open_now = int(await ctx.metric("stockpipe_http_connections"))
            if open_now <= 2:
                break
            await asyncio.sleep(0.5)
        rep.check("idle connections are closed too, and every close is accounted for",
                  open_now == 2, "stockpipe_http_connections %d (the buyer and the monitor)"
                  % open_now)
        timeouts = await ctx.metric("stockpipe_http_request_timeouts_total") - timeouts0
        rep.check("the closes are counted in stockpipe_http_request_timeouts_total",
                  timeouts >= SLOW + len(holders), "+%d" % timeouts)
        for c in holders:
            c.close()

        fresh = Conn(port)
        r = await fresh.request("GET", "/healthz", timeout=ANSWER_S)
        fresh.close()
        rep.check("a new connection is served again", r.status == 200, "healthz %d" % r.status)

        ctx.stop_buyer = True
        await buying
        lat = ctx.latencies
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        n = len(lat) + len(ctx.buyer_errors)
        rep.check("the well-behaved buyer got every answer, each 202",
                  not ctx.buyer_errors and ctx.codes.get(202, 0) == len(lat) and len(lat) > 100,
                  "%d orders over %.0f s: %s; errors %s" % (n, time.monotonic() - t0, ctx.codes,
                                                           ctx.buyer_errors[:3]))
        rep.check("the buyer's latency stayed low: p99 under %.1f s" % P99_MAX, p99 < P99_MAX,
                  "p50 %.1f ms, p99 %.1f ms, max %.1f ms over %d orders"
                  % (p50 * 1000, p99 * 1000, max(lat) * 1000 if lat else 0, len(lat)))
        r = await ctx.monitor.request("GET", "/v1/skus/%d" % sku, timeout=ANSWER_S)
        avail = (r.json() or {}).get("available") if r.status == 200 else None
        rep.check("the invalid requests deducted nothing", avail == 1000000 - ctx.accepted,
                  "available %s after %d accepted orders" % (avail, ctx.accepted))
    except Exception as e:
        rep.check("the run completes", False, "%s: %s" % (type(e).__name__, e))
    finally:
        if ctx:
            ctx.monitor.close()
        rc = await producer.stop(15)
        rep.check("the producer drains and exits 0 on SIGTERM", rc == 0,
                  "exit %s" % ("none within 15 s" if rc is None else rc))


def main():
    return run_driver(run, ("REDIS_URL", "KAFKA_BROKERS", "KAFKA_TOPIC", "PG_DSN"),
                      "sp-http-hostile-", "the producer's log is")


if __name__ == "__main__":
    sys.exit(main())
