#!/usr/bin/env python3
"""recovery.py - what buyers hear after Redis lost its data, and how long until every open sale is
back, by catalog size (issue 20).

  bench/recovery.py [--sizes 100,1000,10000] [--restart] [--bin-dir DIR] ...
  make bench-recovery [RECOVERY_ARGS="--sizes 300 --restart"]      (make bench runs it last)

On a private stack of its own (scripts/stack.sh with STACK_VAR in a scratch directory, ports
36379/35432/39092/39093 or free ones; never the shared stack: it FLUSHALLs that Redis), for each
catalog size N in turn, in a world of its own (database recovery_N, topic recovery.N, Redis
database i):
  1. starts one bin/producer, one bin/consumer and one bin/reaper (the chaos suite's short Kafka
     timeouts: the reaper's settle wait is KAFKA_MESSAGE_TIMEOUT_MS + 1 s, --kafka-timeout-ms);
  2. opens N SKUs through POST /v1/skus (--open-concurrency at a time): --open of them with
     --open-stock units (spread over the catalog, so that a rebuild in sku_id order would reach
     them late), the others finished (opened with stock 0); waits until PostgreSQL holds every
     inventory row and the pipeline is quiet (no lag, the reaper's first reconcile recorded);
  3. drives a paced stream of orders (--rate per second over --conns keep-alive connections, a
     new user and Idempotency-Key each, round-robin over the open sales) and, --before seconds
     in, loses Redis's data: FLUSHALL, or with --restart Redis stopped, its data files (AOF)
     removed, started again (scripts/stack.sh down redis / up: an empty Redis with a new
     run_id);
  4. measures, from the loss (the FLUSHALL sent; with --restart, the moment the stop began):
       open back   every open sale is back: its sale hash in Redis has `stock` and no `paused`,
                   and an order on it sent after the loss was answered 202 (the later of the two,
                   for the last of the open sales; polled every 50 ms);
       reconcile   the reaper's log says "reconcile of every SKU done" (read every 100 ms);
     the order answers between the loss and "open back", by status and error word; FALSE
     answers: 404 unknown_sku or 409 sold_out on an open sale that PostgreSQL still shows with
     units left at the end (no order of this bench expires or is paid within its run, so stock
     only goes down: it had units throughout); the reaper's CPU time (/proc/PID/stat utime +
     stime) from the loss to "reconcile done"; the reaper's own figures from its log (when it
     noticed the loss; ms from then to: every sale paused, the open sales back, every SKU done);
     and, when a reservation sweep met the missing sales before the loss was noticed, how many
     it reconciled one by one and at what pace (a line every 30 s while that goes on);
  5. keeps the stream --tail seconds after the open sales are back, stops it, waits for the full
     reconcile and for quiet, then checks: Redis = PostgreSQL (stock, supplied, no `paused`) for
     every SKU, nothing oversold or leaked per SKU (supplied = stock + pending + paid), every
     order answered 202 is in PostgreSQL, `reaper audit` exits 0.
Last, a table: catalog size, open sales, open back (s), full reconcile (s), false answers, the
answers in the window, the reaper's CPU seconds, the checks.

A figure is information, not a failure: false answers or a slow recovery do not change the exit
status. It is non-zero when the harness could not measure (a step timed out, a worker died) or a
check of step 5 failed (oversold, leaked, lost, Redis != PostgreSQL, audit). Standard library only
(tests/lib/testkit.py, tests/lib/http11.py, tests/e2e/flashsale.py).
"""
import argparse
import asyncio
import calendar
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import flashsale as fs  # noqa: E402
from flashsale import fmt_int  # noqa: E402
from http11 import HOST, Client, Conn, prepare  # noqa: E402
from testkit import (Fail, Stack, expect, interrupt_on_sigterm, private_ports,  # noqa: E402
                     raise_nofile)

PREFERRED_PORTS = {"STACK_REDIS_PORT": 36379, "STACK_PG_PORT": 35432, "STACK_KAFKA_PORT": 39092,
                   "STACK_KAFKA_CONTROLLER_PORT": 39093}
DONE_LINE = "reconcile of every SKU done"
ORDER_TIMEOUT = 20.0


def say(text=""):
    print(text, flush=True)


# ---- a small Redis client (RESP2 over asyncio), for polling without a process per command -------

class RespError(Exception):
    pass


class Redis:
    """One connection to HOST:port, database db; reconnects on the next call after a failure."""

    def __init__(self, port, db=0):
        self.port, self.db = port, db
        self.reader = self.writer = None

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    async def _reply(self):
        line = await self.reader.readuntil(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = await self.reader.readexactly(n + 2)
            return data[:-2].decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self._reply() for _ in range(n)]
        raise RespError("unexpected reply %r" % line[:50])

    async def pipeline(self, cmds, timeout=10.0):
        """The replies of the commands sent in one write (an error reply is a RespError in the
        list); raises OSError/RespError/TimeoutError on a broken connection."""
        async def go():
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                if self.db:
                    r = await self._call_one(["SELECT", self.db])
                    if isinstance(r, RespError):
                        raise r
            self.writer.write(b"".join(self.encode(c) for c in cmds))
            return [await self._reply() for _ in cmds]
        try:
            return await asyncio.wait_for(go(), timeout)
        except BaseException:
            self.close()
            raise

    async def _call_one(self, args):
        self.writer.write(self.encode(args))
        return await self._reply()

    async def call(self, *args, timeout=10.0):
        r = (await self.pipeline([list(args)], timeout))[0]
        if isinstance(r, RespError):
            raise r
        return r


def sale_key(sku):
    return "{sku:%d}:sale" % sku


# ---- the order stream --------------------------------------------------------------------------

class Answer:
    __slots__ = ("sku", "sent", "done", "status", "word", "order_id")

    def __init__(self, sku, sent, done, status, word, order_id):
        self.sku, self.sent, self.done = sku, sent, done
        self.status, self.word, self.order_id = status, word, order_id

    @property
    def label(self):
        return "%d %s" % (self.status, self.word) if self.status else "no answer"


class Stream:
    """Orders at about `rate` per second over `conns` keep-alive connections to one producer, a
    new user and Idempotency-Key each, round-robin over `skus`; no retries (every answer kept)."""

    def __init__(self, port, skus, rate, conns, user_base):
        self.port, self.skus, self.rate, self.conns = port, skus, rate, conns
        self.user_base = user_base
        self.answers = []
        self.stop_event = asyncio.Event()
        self.tasks = []
        self.seq = 0

    async def _one(self, conn, n):
        sku = self.skus[n % len(self.skus)]
        user = self.user_base + n
        data = prepare("POST", "/v1/orders", b'{"user_id":%d,"sku_id":%d,"qty":1}' % (user, sku),
                       {"Content-Type": "application/json",
                        "Idempotency-Key": "rb-%d-%d" % (user, n)}, self.port)
        t0 = time.monotonic()
        try:
            r = await conn.exchange_prepared(data, ORDER_TIMEOUT)
            word, oid = None, None
            j = r.json()
            if isinstance(j, dict):
                word = j.get("error") if r.status != 202 else "accepted"
                oid = j.get("order_id") if r.status == 202 else None
            a = Answer(sku, t0, time.monotonic(), r.status, word or "?", oid)
        except Exception as e:
            conn.close()
            a = Answer(sku, t0, time.monotonic(), 0, type(e).__name__, None)
        self.answers.append(a)
        return a

    def start(self):
        t0 = time.monotonic()

        async def worker():
            conn = Conn(self.port)
            while not self.stop_event.is_set():
                n = self.seq
                self.seq += 1
                delay = t0 + n / self.rate - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.stop_event.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                a = await self._one(conn, n)
                if a.status == 0:
                    await asyncio.sleep(0.05)  # no hot loop while the producer cannot answer
            conn.close()

        self.tasks = [asyncio.ensure_future(worker()) for _ in range(self.conns)]

    async def stop(self):
        self.stop_event.set()
        await asyncio.gather(*self.tasks)


# ---- one catalog size --------------------------------------------------------------------------

def settings(kafka_timeout_ms):
    t = str(kafka_timeout_ms)
    # the reaper refuses RESV_LOST_AFTER_MS below KAFKA_MESSAGE_TIMEOUT_MS + 1 s
    lost = str(max(3500, kafka_timeout_ms + 1500))
    return {"producer": {"KAFKA_MESSAGE_TIMEOUT_MS": t},
            "consumer": {"KAFKA_SESSION_TIMEOUT_MS": "6000"},
            "reaper": {"KAFKA_MESSAGE_TIMEOUT_MS": t, "RESV_LOST_AFTER_MS": lost,
                       "REAPER_INTERVAL_MS": "250", "RESV_SWEEP_INTERVAL_MS": "1000",
                       "EXPIRY_RETRY_MS": "3000", "ACCEPTED_STALE_AFTER_MS": "3000"}}


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (None when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class LogWatch:
    """Reads the lines a worker's JSON log gained since `offset`, every 100 ms; remembers when
    each interesting message was first seen (monotonic time) and the message."""

    KEYS = {"noticed": "reconcile of every SKU: ", "paused": "sales paused in",
            "open_back": "open sales are back", "done": DONE_LINE}

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.seen = {}      # key -> (monotonic time seen, msg, ts)
        self.rebuilt = []   # the ts of each "sale rebuilt and reopened"
        self.rebuilt_all = []  # those of the reconcile of every SKU
        self.failed = []    # "reconcile failed" messages
        self.one_by_one = []  # (ts, sku) a sweep reconciled alone before the loss was noticed
        self.buf = b""
        self.task = None

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            try:
                j = json.loads(raw)
            except ValueError:
                continue
            msg = j.get("msg", "")
            for k, needle in self.KEYS.items():
                if needle in msg and k not in self.seen:
                    self.seen[k] = (now, msg, j.get("ts"))
            if "sale rebuilt and reopened" in msg:
                self.rebuilt.append(j.get("ts"))
                if "noticed" in self.seen:
                    self.rebuilt_all.append(j.get("ts"))
            elif "reconciling the SKU:" in msg and "noticed" not in self.seen:
                self.one_by_one.append((j.get("ts"), j.get("sku_id")))
            elif "reconcile failed" in msg:
                self.failed.append(msg)

    def start(self):
        async def run():
            while True:
                self.poll()
                await asyncio.sleep(0.1)
        self.task = asyncio.ensure_future(run())

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.poll()


def ts_wall(ts):
    """A log line's "ts" (2026-12-03T13:30:20.277Z) as seconds since the epoch; None if not."""
    try:
        return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1e3
    except (TypeError, ValueError):
        return None


def reaper_ms(msg, after):
    """The number of ms a reaper message gives right after the text `after` ("... in 123 ms")."""
    i = msg.find(after)
    if i < 0:
        return None
    words = msg[i + len(after):].split()
    try:
        return int(words[0])
    except (IndexError, ValueError):
        return None


class Run:
    """One catalog size: its world, fleet, catalog, the loss and the figures."""

    def __init__(self, bench, size, index):
        self.bench, self.size, self.index = bench, size, index
        b = bench
        self.rng = random.Random("%d-%d" % (b.seed, size))
        self.world = fs.World(b.stack, b.stack_env, "recovery_%d" % size, "recovery.%d" % size,
                              "%s/%d" % (b.stack_env["REDIS_URL"], index), "recovery-%d" % size,
                              dlq="recovery.dlq")
        self.logdir = os.path.join(b.workdir, "size-%d" % size)
        self.base = self.rng.randrange(10**6, 10**9)
        self.skus = [self.base + i for i in range(size)]
        n_open = min(b.args.open, size)
        self.open = sorted(self.skus[(2 * i + 1) * size // (2 * n_open)] for i in range(n_open))
        self.figures = {"size": size, "open": n_open}
        self.problems = []

    def note(self, text):
        say("#   %s" % text)

    async def open_catalog(self, port):
        a = self.bench.args
        client_pool = [Client(port) for _ in range(a.open_concurrency)]
        open_set = set(self.open)
        todo = iter(self.skus)
        failures = []

        async def opener(client):
            for sku in todo:
                body = {"sku_id": sku, "stock": a.open_stock if sku in open_set else 0,
                        "per_user_limit": 1, "pay_timeout_s": a.pay_timeout}
                for attempt in range(5):
                    try:
                        r = await client.request("POST", "/v1/skus", body,
                                                 {"Authorization": "Bearer " + fs.ADMIN},
                                                 timeout=30)
                        if r.status in (201, 409):
                            break
                        last = repr(r)
                    except fs.TransportError as e:
                        last = str(e)
                    await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    failures.append((sku, last))
            client.close()

        await asyncio.gather(*(opener(c) for c in client_pool))
        expect(not failures, "%d SKUs could not be opened, e.g. %s" % (len(failures),
                                                                       failures[:2]))

    async def wait_inventory(self, timeout):
        t0 = time.monotonic()
        while True:
            n = int((await self.world.asql(
                "SELECT count(*) FROM inventory WHERE sku_id BETWEEN %d AND %d"
                % (self.skus[0], self.skus[-1])))[0][0])
            if n == self.size:
                return
            expect(time.monotonic() - t0 < timeout, "PostgreSQL holds %d of the %d inventory rows "
                   "after %d s" % (n, self.size, timeout))
            await asyncio.sleep(0.2)

    def quiet_reasons(self):
        why = fs.quiet_reasons(self.world, [])
        for sku in self.open:
            r = int(self.world.redis("HLEN", "{sku:%d}:resv" % sku) or 0)
            if r:
                why.append("sku %d: %d reservations in Redis" % (sku, r))
                break
        return why

    async def settle(self, timeout):
        t0 = time.monotonic()
        why = ["not asked yet"]
        while time.monotonic() - t0 < timeout:
            try:
                why = await asyncio.to_thread(self.quiet_reasons)
            except Fail as e:
                why = [str(e)]
            if not why:
                return time.monotonic() - t0
            await asyncio.sleep(0.5)
        raise Fail("not quiet after %d s: %s" % (timeout, "; ".join(why)))

    async def lose_redis(self):
        """FLUSHALL, or (--restart) stop Redis, remove its files, start it; the moment of the
        loss (monotonic)."""
        b = self.bench
        if not b.args.restart:
            r = Redis(b.redis_port)
            await r.call("PING")
            t = time.monotonic()  # from here on an order may meet the emptied Redis
            await r.call("FLUSHALL")
            r.close()
            self.note("FLUSHALL")
            return t
        t = time.monotonic()
        await b.stack.ash("down", "redis")
        t_stopped = time.monotonic()
        d = os.path.join(b.stack.var, "redis")
        removed = 0
        for name in os.listdir(d):
            path = os.path.join(d, name)
            removed += 1
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        await b.stack.ash("up")
        self.figures["redis_down"] = time.monotonic() - t
        self.note("Redis stopped (%.1f s), its data files removed (%d), started again empty: "
                  "unreachable for %.1f s" % (t_stopped - t, removed, time.monotonic() - t))
        return t

    async def watch_sales(self, t_loss, back, stop):
        """Polls the open sales' hashes every 50 ms; back[sku] = when one was first seen with
        `stock` and without `paused` after the loss."""
        r = Redis(self.bench.redis_port, self.index)
        cmds = [["HMGET", sale_key(s), "stock", "paused"] for s in self.open]
        while not stop.is_set():
            try:
                replies = await r.pipeline(cmds, timeout=5)
                now = time.monotonic()
                for sku, rep in zip(self.open, replies):
                    if sku not in back and isinstance(rep, list) and rep[0] is not None \
                            and rep[1] is None and now > t_loss:
                        back[sku] = now
            except (OSError, RespError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(0.05)
        r.close()

    async def run(self):
        b, a, f = self.bench, self.bench.args, self.figures
        say("# --- catalog of %s SKUs: %d open (%s units each), %s finished (stock 0)" % (
            fmt_int(self.size), len(self.open), fmt_int(a.open_stock),
            fmt_int(self.size - len(self.open))))
        await asyncio.to_thread(self.world.prepare_db)
        await asyncio.to_thread(self.world.prepare_topics)
        fleet = self.fleet = fs.Fleet(self.world, b.bin_dir, self.logdir, b.piddir,
                                      {"producer": 1, "consumer": 1, "reaper": 1},
                                      settings=settings(a.kafka_timeout_ms),
                                      tag="recovery-%d" % self.size)
        try:
            await fleet.start()
            producer, reaper = fleet.producers[0], fleet.of("reaper")[0]
            await self.settle(60)
            t = time.monotonic()
            await self.open_catalog(producer.port)
            f["open_s"] = time.monotonic() - t
            await self.wait_inventory(max(60, self.size / 50))
            f["setup_s"] = time.monotonic() - t
            await self.settle(max(60, self.size / 50))
            self.note("catalog opened in %.1f s (%.0f SKUs/s), in PostgreSQL and quiet %.1f s "
                      "after the first open" % (f["open_s"], self.size / f["open_s"],
                                                f["setup_s"]))
            await self.measure(producer, reaper)
        finally:
            codes = await fleet.stop()
        bad = dict((n, c) for n, c in codes.items() if c != 0)
        if bad:
            self.problems.append("workers that did not exit 0 on SIGTERM: %s" % bad)

    async def measure(self, producer, reaper):
        b, a, f = self.bench, self.bench.args, self.figures
        stream = Stream(producer.port, self.open, a.rate, a.conns,
                        self.rng.randrange(10**6, 10**9))
        watch = LogWatch(reaper.log_path)
        stream.start()
        await asyncio.sleep(a.before)
        watch.start()
        cpu0 = cpu_seconds(reaper.proc.pid)
        t_loss = await self.lose_redis()
        wall_loss = t_loss + (time.time() - time.monotonic())
        back, stop = {}, asyncio.Event()
        poller = asyncio.ensure_future(self.watch_sales(t_loss, back, stop))
        # The open sales are back when each has its hash without `paused` and a 202 sent after
        # the loss; the stream goes on --tail s after that (or until --max-wait).
        first_202 = {}
        t_back = None
        seen = 0
        while time.monotonic() - t_loss < a.max_wait:
            for x in stream.answers[seen:]:
                if x.status == 202 and x.sent > t_loss and x.sku not in first_202:
                    first_202[x.sku] = x.done
            seen = len(stream.answers)
            if len(first_202) == len(self.open) and len(back) == len(self.open):
                t_back = max(max(first_202.values()), max(back.values()))
                break
            if not reaper.alive() or not producer.alive():
                break
            await asyncio.sleep(0.05)
        if t_back is not None:
            await asyncio.sleep(a.tail)
        await stream.stop()
        stop.set()
        await poller
        f["open_back_s"] = t_back - t_loss if t_back is not None else None
        if t_back is None:
            f["open_back_n"] = sum(1 for s in self.open if s in back and s in first_202)
        # The full reconcile.
        deadline = t_loss + a.reconcile_timeout
        next_note = time.monotonic() + 30
        while "done" not in watch.seen and time.monotonic() < deadline and reaper.alive():
            await asyncio.sleep(0.1)
            if time.monotonic() > next_note:
                next_note += 30
                self.note("%.0f s after the loss: %s; %d sales reconciled one by one by the "
                          "reservation sweep" % (
                              time.monotonic() - t_loss, "reconcile of every SKU under way"
                              if "noticed" in watch.seen else "the loss not noticed yet",
                              len(watch.one_by_one)))
        await watch.stop()
        cpu1 = cpu_seconds(reaper.proc.pid)
        f["reconcile_s"] = watch.seen["done"][0] - t_loss if "done" in watch.seen else None
        f["reaper_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        f["reaper"] = dict((k, v[1]) for k, v in watch.seen.items())
        f["rebuilt"] = len(watch.rebuilt)
        if "noticed" in watch.seen and ts_wall(watch.seen["noticed"][2]) is not None:
            f["noticed_ms"] = 1000 * (ts_wall(watch.seen["noticed"][2]) - wall_loss)
        walls = [w for w in map(ts_wall, watch.rebuilt_all) if w is not None]
        if len(walls) > 1:
            f["per_sku_ms"] = 1000 * (walls[-1] - walls[0]) / (len(walls) - 1)
        f["failed"] = watch.failed
        # A reservation sweep under way when the loss came finds the sales missing one by one
        # and reconciles each alone (its own settle wait): how many, at what pace, and how many
        # SKUs it still had ahead of it (it goes in sku_id order).
        obo = [(ts_wall(ts), sku) for ts, sku in watch.one_by_one if ts_wall(ts) is not None]
        f["one_by_one"] = len(watch.one_by_one)
        if obo:
            f["one_by_one_first"] = sum(1 for s in self.skus if s < obo[0][1])
            f["one_by_one_ahead"] = sum(1 for s in self.skus if s > obo[-1][1])
        if len(obo) > 1:
            f["one_by_one_each_s"] = (obo[-1][0] - obo[0][0]) / (len(obo) - 1)
        if not reaper.alive():
            self.problems.append("the reaper died (exit %s)" % reaper.proc.returncode)
        # The answers.
        end = t_back if t_back is not None else time.monotonic()
        self.t_loss, self.t_end = t_loss, end
        window = [x for x in stream.answers if t_loss <= x.sent <= end]
        f["window"] = {}
        for x in window:
            f["window"][x.label] = f["window"].get(x.label, 0) + 1
        f["orders"] = len(stream.answers)
        f["accepted"] = sum(1 for x in stream.answers if x.status == 202)
        self.stream = stream
        await self.count_false()
        # Quiet, then the checks (only once the reconcile is done: before, Redis differs).
        if f["reconcile_s"] is None:
            f["unchecked"] = "the reconcile did not finish within %d s" % a.reconcile_timeout
            return
        try:
            t = await self.settle(a.settle_timeout)
            self.note("quiet %.1f s after the stream stopped and the reconcile was done" % t)
        except Fail as e:
            self.problems.append(str(e))
        await self.check()

    async def count_false(self):
        """False answers: 404 unknown_sku / 409 sold_out on an open sale PostgreSQL still shows
        with units (stock only goes down during a run: it had units at every earlier moment)."""
        f = self.figures
        stock = dict((int(r[0]), int(r[1])) for r in await self.world.asql(
            "SELECT sku_id, stock FROM inventory WHERE sku_id IN (%s)"
            % ",".join("%d" % s for s in self.open)))
        f["open_left_min"] = min(stock.values()) if stock else None
        false = [x for x in self.stream.answers
                 if stock.get(x.sku, 0) > 0
                 and ((x.status == 404 and x.word == "unknown_sku")
                      or (x.status == 409 and x.word == "sold_out"))]
        f["false"] = len(false)
        f["false_404"] = sum(1 for x in false if x.status == 404)
        f["false_409"] = len(false) - f["false_404"]
        f["false_outside"] = sum(1 for x in false if not self.t_loss <= x.sent <= self.t_end)

    async def check(self):
        b, f = self.bench, self.figures
        w = self.world
        inv = dict((int(r[0]), (int(r[1]), int(r[2]), int(r[3]), int(r[4])))
                   for r in await w.asql(
            "SELECT i.sku_id, i.stock, i.supplied,"
            "       coalesce(sum(o.qty) FILTER (WHERE o.status IN ('pending', 'paid')), 0),"
            "       count(o.*) FILTER (WHERE o.status = 'rejected')"
            "  FROM inventory i LEFT JOIN orders o ON o.sku_id = i.sku_id"
            " WHERE i.sku_id BETWEEN %d AND %d GROUP BY i.sku_id, i.stock, i.supplied"
            % (self.skus[0], self.skus[-1]), timeout=120))
        # Redis = PostgreSQL for every SKU.
        r = Redis(b.redis_port, self.index)
        off = []
        for i in range(0, len(self.skus), 1000):
            chunk = self.skus[i:i + 1000]
            reps = await r.pipeline([["HMGET", sale_key(s), "stock", "supplied", "paused"]
                                     for s in chunk], timeout=30)
            for sku, rep in zip(chunk, reps):
                pg = inv.get(sku)
                if pg is None or not isinstance(rep, list) or rep[2] is not None \
                        or rep[0] is None or int(rep[0]) != pg[0] or rep[1] is None \
                        or int(rep[1]) != pg[1]:
                    off.append((sku, rep, pg[:2] if pg else None))
        r.close()
        f["redis_eq_pg"] = not off and len(inv) == self.size
        if off:
            self.problems.append("Redis != PostgreSQL for %d SKUs, e.g. (sku, Redis stock/"
                                 "supplied/paused, PostgreSQL stock/supplied): %s"
                                 % (len(off), off[:3]))
        if len(inv) != self.size:
            self.problems.append("PostgreSQL holds %d of the %d SKUs" % (len(inv), self.size))
        oversold = [s for s, v in inv.items() if v[2] > v[1]]
        leaked = [s for s, v in inv.items() if v[1] - v[0] - v[2] != 0]
        rejected = sum(v[3] for v in inv.values())
        f["oversold"], f["leaked"], f["rejected"] = len(oversold), len(leaked), rejected
        if oversold:
            self.problems.append("OVERSOLD: %d SKUs, e.g. %s" % (len(oversold), [
                (s, inv[s]) for s in oversold[:3]]))
        if leaked:
            self.problems.append("LEAKED: %d SKUs (supplied != stock + pending + paid), e.g. %s"
                                 % (len(leaked), [(s, inv[s]) for s in leaked[:3]]))
        # Every 202 in PostgreSQL.
        ids = [x.order_id for x in self.stream.answers if x.status == 202 and x.order_id]
        found = 0
        for i in range(0, len(ids), 2000):
            chunk = [o for o in ids[i:i + 2000] if all(c.isalnum() or c in "._-" for c in o)]
            found += int((await w.asql("SELECT count(*) FROM orders WHERE order_id IN (%s)"
                                       % ",".join("'%s'" % o for o in chunk)))[0][0])
        f["lost"] = len(ids) - found
        if f["lost"]:
            self.problems.append("LOST: %d orders answered 202 are not in PostgreSQL" % f["lost"])
        rc, report = await asyncio.to_thread(fs.audit, w, b.bin_dir, self.fleet.reaper_env(),
                                             300)
        f["audit"] = rc == 0
        if rc != 0:
            self.problems.append("reaper audit exited %d:\n%s" % (rc, "\n".join(
                "#     " + l for l in report.splitlines()[:20])))

    def print_details(self):
        f = self.figures
        fmt_s = lambda v: "%.1f s" % v if v is not None else "-"  # noqa: E731
        a = self.bench.args
        say("#   open sales back %s; every SKU reconciled %s; the reaper used %s of CPU meanwhile"
            % ("%.1f s after the loss" % f["open_back_s"] if f.get("open_back_s") is not None
               else "NOT within %d s (%d of %d back; the stream stopped then)" % (
                   a.max_wait, f.get("open_back_n", 0), f["open"]),
               "%.1f s after it" % f["reconcile_s"] if f.get("reconcile_s") is not None
               else "NOT within %d s" % a.reconcile_timeout, fmt_s(f.get("reaper_cpu_s"))))
        rp = f.get("reaper", {})
        parts = []
        for k, after in (("paused", "paused in"), ("open_back", "are back"),
                         ("done", "rebuilt in")):
            if k in rp:
                ms = reaper_ms(rp[k], after)
                if ms is not None:
                    parts.append("%s %s ms" % ({"paused": "every sale paused",
                                                "open_back": "open sales back",
                                                "done": "every SKU done"}[k], fmt_int(ms)))
        say("#   the reaper %s; its own account from then: %s; %s sales rebuilt%s%s" % (
            "noticed the loss %.0f ms after it" % f["noticed_ms"] if "noticed_ms" in f
            else "had not noticed the loss (no \"reconcile of every SKU\" line)",
            ", ".join(parts) or "(no reconcile lines)", fmt_int(f.get("rebuilt", 0)),
            " (%.1f ms each in the reconcile of every SKU)" % f["per_sku_ms"]
            if "per_sku_ms" in f else "",
            "; %d 'reconcile failed', e.g. %s" % (len(f["failed"]), f["failed"][0][:200])
            if f.get("failed") else ""))
        if f.get("one_by_one"):
            each = f.get("one_by_one_each_s")
            say("#   before the loss was noticed, the reaper's reservation sweep (in sku_id order; "
                "it met the loss at SKU %s of %s) reconciled %s sales one by one (\"its sale is "
                "missing from Redis\"), %s%s" % (
                    fmt_int(f.get("one_by_one_first", 0) + 1), fmt_int(self.size),
                    fmt_int(f["one_by_one"]),
                    "%.1f s each (its own settle wait)" % each if each else "",
                    "" if "noticed" in f.get("reaper", {}) else
                    "; %s SKUs still ahead of it: about %.0f s more at that pace" % (
                        fmt_int(f.get("one_by_one_ahead", 0)),
                        f.get("one_by_one_ahead", 0) * (each or 0))))
        say("#   answers from the loss until the open sales were back: %s" % (
            ", ".join("%s %s" % (fmt_int(n), k) for k, n in sorted(
                f.get("window", {}).items(), key=lambda kv: -kv[1])) or "none"))
        say("#   %s orders, %s accepted; FALSE answers (404 unknown_sku / 409 sold_out on an open "
            "sale with units in PostgreSQL): %s (%d 404, %d 409; %d of them outside that "
            "window)" % (
                fmt_int(f.get("orders", 0)), fmt_int(f.get("accepted", 0)),
                fmt_int(f.get("false", 0)), f.get("false_404", 0), f.get("false_409", 0),
                f.get("false_outside", 0)))
        if f.get("unchecked"):
            say("#   after quiet: not checked: %s" % f["unchecked"])
        else:
            say("#   after quiet: Redis = PostgreSQL for every SKU: %s; oversold SKUs %s, leaked "
                "%s, rejected orders %s, 202s not in PostgreSQL %s; audit %s" % (
                    "yes" if f.get("redis_eq_pg") else "NO", f.get("oversold", "-"),
                    f.get("leaked", "-"), f.get("rejected", "-"), f.get("lost", "-"),
                    "passed" if f.get("audit") else "FAILED" if "audit" in f else "-"))
        for p in self.problems:
            say("#   PROBLEM: %s" % p)


# ---- the bench ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.workdir = args.workdir
        self.piddir = os.path.join(self.workdir, "pids")
        os.makedirs(self.piddir, exist_ok=True)
        self.bin_dir = args.bin_dir
        self.ports = private_ports(PREFERRED_PORTS)
        self.redis_port = self.ports["STACK_REDIS_PORT"]
        self.stack = Stack(os.path.join(self.workdir, "stack"), self.ports,
                           log=os.path.join(self.workdir, "stack.log"))
        self.runs = []
        self.failed = False

    async def run(self):
        t = time.monotonic()
        await self.stack.ash("up")
        self.stack_env = self.stack.stack_env()
        say("# private stack up in %.0f s: ports %s (STACK_VAR=%s)" % (
            time.monotonic() - t, ", ".join(str(p) for p in self.ports.values()), self.stack.var))
        runs = [Run(self, n, i + 1) for i, n in enumerate(self.args.sizes)]
        t = time.monotonic()
        await asyncio.to_thread(fs.create_topics, self.stack, [("recovery.dlq", 1)] + [
            (r.world.topic, 4) for r in runs])
        say("# topics ready in %.0f s" % (time.monotonic() - t))
        for r in runs:
            self.runs.append(r)
            self.current = r
            t = time.monotonic()
            try:
                await r.run()
            except Fail as e:
                r.problems.append(str(e))
                self.failed = True
            except Exception as e:
                r.problems.append("%s: %s" % (type(e).__name__, e))
                self.failed = True
                if getattr(r, "fleet", None):
                    r.fleet.kill_all()
            r.figures["run_s"] = time.monotonic() - t
            r.print_details()
            if r.problems:
                self.failed = True
            say("#   (%.0f s for this size)" % r.figures["run_s"])
            if self.args.restart and r.problems:
                try:  # a failed restart may have left Redis down
                    await self.stack.ash("up")
                except Fail:
                    pass

    def table(self):
        a = self.args
        how = ("restarted without its data: stopped, AOF removed, started" if a.restart
               else "FLUSHALL")
        say("")
        say("recovery after Redis lost its data mid-stream (%s): %s orders/s over %d connections "
            "on the open sales, KAFKA_MESSAGE_TIMEOUT_MS %d (the reaper's settle wait %.1f s); "
            "bin %s" % (how, fmt_int(a.rate), a.conns, a.kafka_timeout_ms,
                        a.kafka_timeout_ms / 1000 + 1, a.bin_dir))
        say("open sales back: hash with stock and no `paused`, and an order sent after the loss "
            "answered 202 (the last open sale); full reconcile: the reaper logs %r; false: 404 "
            "unknown_sku or 409 sold_out on an open sale with units in PostgreSQL" % DONE_LINE)
        head = ("catalog", "open", "loss noticed (s)", "open back (s)", "full reconcile (s)",
                "false answers", "answers loss -> open back", "reaper CPU (s)", "checks")
        rows = []
        for r in self.runs:
            f = r.figures
            w = f.get("window", {})
            rows.append((
                fmt_int(f["size"]), str(f["open"]),
                "%.1f" % (f["noticed_ms"] / 1000) if "noticed_ms" in f
                else ">%d" % a.reconcile_timeout if "window" in f else "-",
                "%.1f" % f["open_back_s"] if f.get("open_back_s") is not None
                else ">%d" % a.max_wait if "window" in f else "-",
                "%.1f" % f["reconcile_s"] if f.get("reconcile_s") is not None
                else ">%d" % a.reconcile_timeout if "window" in f else "-",
                "%s%s (%d 404, %d 409)" % (
                    ">=" if f.get("open_back_s") is None and f["false"] else "",
                    fmt_int(f["false"]),
                    f["false_404"], f["false_409"]) if "false" in f else "-",
                ", ".join("%s %s" % (fmt_int(n), k) for k, n in sorted(
                    w.items(), key=lambda kv: -kv[1])) or "-",
                "%.1f" % f["reaper_cpu_s"] if f.get("reaper_cpu_s") is not None else "-",
                "FAILED" if r.problems else "not run" if f.get("unchecked") else "ok"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        say("| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(head)) + " |")
        say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            say("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000",
                    help="catalog sizes, comma-separated (default 100,1000,10000)")
    ap.add_argument("--open", type=int, default=20, help="open sales in each catalog (20)")
    ap.add_argument("--open-stock", type=int, default=1000, help="units of each open sale (1000)")
    ap.add_argument("--rate", type=float, default=300, help="orders per second (300)")
    ap.add_argument("--conns", type=int, default=6, help="connections of the stream (6)")
    ap.add_argument("--before", type=float, default=3.0,
                    help="seconds of stream before the loss (3)")
    ap.add_argument("--tail", type=float, default=2.0,
                    help="seconds of stream after the open sales are back (2)")
    ap.add_argument("--max-wait", type=int, default=60,
                    help="seconds to wait for the open sales to come back (60)")
    ap.add_argument("--reconcile-timeout", type=int, default=90,
                    help="seconds from the loss to wait for the full reconcile (90); the checks "
                    "after quiet are skipped when it did not finish")
    ap.add_argument("--settle-timeout", type=int, default=120)
    ap.add_argument("--restart", action="store_true",
                    help="restart Redis without its data files instead of FLUSHALL")
    ap.add_argument("--kafka-timeout-ms", type=int, default=2000,
                    help="KAFKA_MESSAGE_TIMEOUT_MS of the producer and the reaper (2000, as the "
                    "chaos suite; production's default is 10000)")
    ap.add_argument("--pay-timeout", type=int, default=600,
                    help="pay_timeout_s of the sales (600: nothing expires during a run)")
    ap.add_argument("--open-concurrency", type=int, default=32)
    ap.add_argument("--bin-dir", default=None, help="the workers' binaries (default $BIN_DIR "
                    "or bin)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default a new one)")
    ap.add_argument("--keep", action="store_true", help="keep the logs even when all went well")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        assert args.sizes and all(n >= 1 for n in args.sizes)
    except (ValueError, AssertionError):
        ap.error("--sizes: positive integers, comma-separated")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big") % 1000000
    bin_dir = args.bin_dir or os.environ.get("BIN_DIR", "bin")
    if not os.path.isabs(bin_dir):
        bin_dir = os.path.join(ROOT, bin_dir)
    args.bin_dir = os.path.abspath(bin_dir)
    missing = [w for w in ("producer", "consumer", "reaper")
               if not os.access(os.path.join(args.bin_dir, w), os.X_OK)]
    if missing:
        say("recovery bench: missing %s in %s (make)" % (", ".join(missing), args.bin_dir))
        return 1
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="sp-recovery-")
    os.makedirs(args.workdir, exist_ok=True)
    os.chmod(args.workdir, 0o755)  # as root, PostgreSQL runs as `postgres` and must reach it
    raise_nofile(8192)
    say("# recovery bench: sizes %s, %s, seed %d; work directory %s" % (
        ", ".join(fmt_int(n) for n in args.sizes), "restart" if args.restart else "FLUSHALL",
        args.seed, args.workdir))
    bench = Bench(args)
    t0 = time.monotonic()
    interrupt_on_sigterm()
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        say("# interrupted")
        bench.failed = True
        if getattr(bench, "current", None) is not None:
            bench.current.problems.append("interrupted")
    except Fail as e:
        say("# %s" % e)
        bench.failed = True
    finally:
        for r in bench.runs:
            if getattr(r, "fleet", None):
                r.fleet.kill_all()
        try:
            bench.stack.sh("down", "--purge", timeout=180)
        except Exception as e:
            say("# stopping the private stack: %s" % e)
    bench.table()
    secs = time.monotonic() - t0
    if bench.failed or args.keep:
        shutil.rmtree(os.path.join(args.workdir, "stack"), ignore_errors=True)
        say("# %.0f s; logs kept in %s" % (secs, args.workdir))
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        say("# %.0f s" % secs)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
