"""flashsale.py - drives a flash sale through a running stockpipe fleet and checks the outcome.

Shared by the demo (tests/e2e/demo.py, `make demo`) and the chaos suite (tests/chaos/chaos.py,
`make chaos`). Standard library only; the HTTP client is tests/lib/http11.py.

  World      what one sale runs against: a PostgreSQL database, an events topic and its
             dead-letter topic, a Redis URL (a db number, sentinel:// or redis-cluster://) and a
             consumer group; made (database migrated, topics created) when missing
  Fleet      the workers (bin/producer, bin/consumer, bin/reaper) on one World: started,
             SIGKILLed, restarted, stopped with SIGTERM (testkit.Worker); every pid is recorded
             in a directory (testkit.Procs) so a shell trap can kill what a crashed driver left
             behind
  Buyers     order traffic against one SKU: a burst (every order at once) or a paced stream, over
             many keep-alive connections spread across the producers, with payments; keeps every
             HTTP answer
  Progress   one line a second: accepted, sold out, persisted, expired, returned, and the most
             units PostgreSQL ever held as pending+paid (oversold would show there first)
  settle(), outcome(), audit()
             wait until the system is quiet, then what PostgreSQL and Redis hold for the SKU,
             checked against each other and against the answers the buyers got
"""
import asyncio
import os
import re
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
from http11 import Client, Conn, TransportError, prepare  # noqa: E402
import testkit  # noqa: E402
from testkit import (STACK_SH, Fail, Procs, command, expect, redis_cmd,  # noqa: E402
                     redis_cmd_lines, redis_identity)

MIGRATE_SH = os.path.join(ROOT, "scripts", "migrate.sh")
ADMIN = "flashsale-admin"
PAYMENT = "flashsale-pay"
ORDER_TIMEOUT = 20.0  # an order unanswered for this long counts as a hang (status 0)


def fmt_int(n):
    return "{:,}".format(n)


# ---- the stack ---------------------------------------------------------------------------------

def topic_exists(brokers, topic):
    out = command(["kcat", "-b", brokers, "-L", "-t", topic, "-m", "5"], timeout=20, check=False)
    return re.search(r'topic "%s" with [1-9]\d* partitions' % re.escape(topic), out) is not None \
        and "Unknown topic" not in out


def end_offsets(brokers, topic, partitions):
    """The high watermark of each partition (kcat -Q with the logical offset -1, the end)."""
    argv = ["kcat", "-b", brokers, "-Q"]
    for p in range(partitions):
        argv += ["-t", "%s:%d:-1" % (topic, p)]
    out = command(argv, timeout=20)
    ends = {}
    for m in re.finditer(r"^\S+ \[(\d+)\] offset (-?\d+)", out, re.M):
        ends[int(m.group(1))] = int(m.group(2))
    expect(len(ends) == partitions, "kcat -Q gave %r" % out[:300])
    return ends


def partition_count(brokers, topic):
    out = command(["kcat", "-b", brokers, "-L", "-t", topic, "-m", "5"], timeout=20)
    m = re.search(r'topic "%s" with (\d+) partitions' % re.escape(topic), out)
    expect(m is not None, "no metadata for topic %s: %s" % (topic, out[:200]))
    return int(m.group(1))


def create_topics(stack, topics, parallel=3):
    """Creates [(name, partitions)] with `scripts/stack.sh topic create`, `parallel` at a time
    (each is a JVM start of a few CPU seconds)."""
    todo = list(topics)
    while todo:
        batch, todo = todo[:parallel], todo[parallel:]
        procs = [(t, subprocess.Popen([STACK_SH, "topic", "create", t, str(n)], env=stack.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)) for t, n in batch]
        for t, p in procs:
            out = p.communicate(timeout=180)[0].decode("utf-8", "replace")
            expect(p.returncode == 0, "could not create topic %s: %s" % (t, out[-300:]))


# ---- a world: database, topics, Redis ------------------------------------------------------------

def dsn_with_db(dsn, db):
    if re.search(r"\bdbname=\S+", dsn):
        return re.sub(r"\bdbname=\S+", "dbname=" + db, dsn)
    return dsn + " dbname=" + db


class World:
    """One sale's backends. `redis_url` may carry a db number (redis://h:p/3), be sentinel:// or
    redis-cluster:// (database 0 only)."""

    def __init__(self, stack, stack_env, db, topic, redis_url, group, partitions=4, dlq=None):
        self.stack = stack
        self.brokers = stack_env["KAFKA_BROKERS"]
        self.admin_dsn = stack_env["PG_DSN"]
        self.db = db
        self.dsn = dsn_with_db(stack_env["PG_DSN"], db)
        self.topic, self.dlq = topic, dlq or topic + ".dlq"
        self.redis_url = redis_url
        self.group = group
        self.partitions = partitions

    def env(self):
        return {"PG_DSN": self.dsn, "KAFKA_BROKERS": self.brokers, "KAFKA_TOPIC": self.topic,
                "KAFKA_DLQ_TOPIC": self.dlq, "REDIS_URL": self.redis_url,
                "KAFKA_GROUP": self.group}

    def prepare_db(self):
        """The database, created and migrated when missing (migrate.sh skips what is applied)."""
        have = command(["psql", self.admin_dsn, "-X", "-A", "-t", "-c",
                        "SELECT 1 FROM pg_database WHERE datname = '%s'" % self.db], timeout=30)
        if have.strip() != "1":
            command(["psql", self.admin_dsn, "-X", "-q", "-c", 'CREATE DATABASE "%s"' % self.db],
                    timeout=60)
        command([MIGRATE_SH, "--dsn", self.dsn], timeout=120)

    def topics_missing(self):
        return [(t, n) for t, n in ((self.topic, self.partitions), (self.dlq, 1))
                if not topic_exists(self.brokers, t)]

    def prepare_topics(self):
        """Both topics, created when missing (each is a JVM start: run in parallel)."""
        create_topics(self.stack, self.topics_missing())
        self.partitions = partition_count(self.brokers, self.topic)

    # -- reading the state -------------------------------------------------------------------

    def sql(self, text, timeout=30):
        """Rows of a query (tab-separated fields); the text must be trusted (ids are integers)."""
        out = command(["psql", self.dsn, "-X", "-q", "-A", "-t", "-F", "\t", "-v",
                       "ON_ERROR_STOP=1"], timeout=timeout, input_text=text)
        return [l.split("\t") for l in out.splitlines() if l]

    async def asql(self, text, timeout=30):
        return await asyncio.to_thread(self.sql, text, timeout)

    def redis(self, *args, timeout=10):
        """One command about keys on the world's Redis, its output (testkit.redis_cmd: the
        server and its database, the primary a Sentinel names now, or in a Redis Cluster the node
        serving the key's slot)."""
        return redis_cmd(self.redis_url, *args, timeout=timeout)

    def redis_lines(self, *args):
        return redis_cmd_lines(self.redis_url, *args)

    def reaper_settled(self):
        """The reaper's last complete reconcile left Redis as it is now (reaper_state names this
        Redis's epoch, run_id and replication id; in a cluster those of every primary, joined as
        the reaper joins them: testkit.redis_identity): no reconcile is due or under way."""
        rows = dict((r[0], r[1]) for r in self.sql(
            "SELECT name, value FROM reaper_state WHERE name IN "
            "('redis_epoch', 'redis_run_id', 'redis_replid')"))
        if len(rows) < 3:
            return False
        return (rows["redis_epoch"], rows["redis_run_id"], rows["redis_replid"]) == \
            redis_identity(self.redis_url)

    def consumer_lag(self):
        ends = end_offsets(self.brokers, self.topic, self.partitions)
        stored = dict((int(r[0]), int(r[1])) for r in self.sql(
            "SELECT partition, next_offset FROM consumer_offsets WHERE topic = '%s'"
            % self.topic.replace("'", "''")))
        return sum(max(0, end - stored.get(p, 0)) for p, end in ends.items())


# ---- the workers ---------------------------------------------------------------------------------

class Worker(testkit.Worker):
    """A worker of the fleet on its World, with the fleet's settings for its kind."""

    def __init__(self, fleet, kind, index, env):
        name = "%s-%d" % (kind, index)
        super().__init__(fleet.procs, name, os.path.join(fleet.bin_dir, kind),
                         os.path.join(fleet.logdir, name + ".log"))
        self.fleet, self.kind, self.index = fleet, kind, index
        self.env = env

    def start(self):
        env = dict(self.fleet.world.env())
        env.update(self.env)
        env["WORKER_ID"] = "%s-%s-%d" % (self.fleet.tag, self.name, self.starts)
        super().start(env, banner=b"--- start %d\n" % self.starts)

    async def wait_ready(self, timeout=60):
        await super().wait_ready(timeout=timeout, with_log=True)


# Settings that make a sale short enough to watch: expiries and returns within a second of being
# due, lost reservations voided a few seconds after Kafka gave up on them.
FAST_SETTINGS = {
    "producer": {"KAFKA_MESSAGE_TIMEOUT_MS": "3000"},
    "consumer": {"KAFKA_SESSION_TIMEOUT_MS": "6000"},
    "reaper": {"KAFKA_MESSAGE_TIMEOUT_MS": "3000", "REAPER_INTERVAL_MS": "250",
               "RESV_SWEEP_INTERVAL_MS": "1000", "RESV_LOST_AFTER_MS": "5000",
               "EXPIRY_RETRY_MS": "4000", "ACCEPTED_STALE_AFTER_MS": "3000",
               "RECONCILE_WAIT_MS": "60000"},
}


class Fleet:
    """The workers of one World. counts: {"producer": 2, "consumer": 2, "reaper": 1}."""

    def __init__(self, world, bin_dir, logdir, piddir, counts, settings=None, tag="sale"):
        self.world, self.bin_dir, self.logdir = world, bin_dir, logdir
        self.tag = tag
        os.makedirs(logdir, exist_ok=True)
        self.procs = Procs(piddir)
        self.workers = []
        for kind in ("producer", "consumer", "reaper"):
            env = dict(FAST_SETTINGS[kind])
            env.update((settings or {}).get(kind, {}))
            if kind == "producer":
                env.update(ADMIN_TOKEN=ADMIN, PAYMENT_TOKEN=PAYMENT)
            for i in range(counts.get(kind, 0)):
                self.workers.append(Worker(self, kind, i + 1, env))

    def of(self, kind):
        return [w for w in self.workers if w.kind == kind]

    @property
    def producers(self):
        return self.of("producer")

    def get(self, name):
        return next(w for w in self.workers if w.name == name)

    async def start(self, timeout=60):
        for w in self.workers:
            w.start()
        await asyncio.gather(*(w.wait_ready(timeout) for w in self.workers))

    async def restart(self, w, timeout=60):
        w.start()
        await w.wait_ready(timeout)

    def reaper_env(self):
        env = dict(self.world.env())
        reapers = self.of("reaper")
        env.update(reapers[0].env if reapers else FAST_SETTINGS["reaper"])
        return env

    async def stop(self):
        """SIGTERM to every worker at once; {name: exit status or None}."""
        codes = await asyncio.gather(*(w.stop() for w in self.workers))
        return dict((w.name, c) for w, c in zip(self.workers, codes))

    def kill_all(self):
        for w in self.workers:
            w.kill()


def audit(world, bin_dir, env_extra, timeout=120):
    """`reaper audit` on the world; (exit status, its report)."""
    env = dict(os.environ, **world.env())
    env.update(env_extra)
    env.update(AUDIT_WAIT_MS=env_extra.get("AUDIT_WAIT_MS", "30000"), LOG_LEVEL="error")
    p = subprocess.run([os.path.join(bin_dir, "reaper"), "audit"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr).strip()


# ---- the buyers ----------------------------------------------------------------------------------

class Answer:
    """One HTTP exchange: kind "order" or "pay"; status 0 when no answer came (refused
    connection, reset, timeout)."""
    __slots__ = ("kind", "user", "key", "sent", "done", "status", "error", "order_id",
                 "producer", "text")

    def __init__(self, kind, user, key, sent, done, status, error, order_id, producer, text):
        self.kind, self.user, self.key, self.sent, self.done = kind, user, key, sent, done
        self.status, self.error, self.order_id = status, error, order_id
        self.producer, self.text = producer, text

    @property
    def word(self):
        if self.status == 202:
            return "accepted" if self.kind == "order" else "payment_recorded"
        if self.status == 0:
            return "no answer"
        return self.error or "?"


def order_id_of(r):
    j = r.json()
    if r.status == 202 and isinstance(j, dict) and isinstance(j.get("order_id"), str):
        return j["order_id"]
    return None


class Buyers:
    """Orders for one SKU from many users over many connections spread across the producers.

    Every order and payment answer is kept in self.answers. A buyer whose order got 503 or no
    answer retries once with the same Idempotency-Key (every order carries one), on another
    producer, as a real client would. With pay_fraction > 0 each accepted order is paid with
    that probability, after a delay drawn from pay_delay (seconds), on any producer."""

    def __init__(self, fleet, sku, rng, pay_fraction=0.0, pay_delay=(0.0, 1.0), retry=True):
        self.fleet, self.sku, self.rng = fleet, sku, rng
        self.pay_fraction, self.pay_delay, self.retry = pay_fraction, pay_delay, retry
        self.answers = []
        self.pay_tasks = set()
        self.pay_clients = {}
        self.counts = {}
        self.stop_event = asyncio.Event()
        self.order_latencies = []
        self.n_orders = 0

    def count(self, a):
        k = (a.kind, a.word)
        self.counts[k] = self.counts.get(k, 0) + 1

    def n(self, kind, word):
        return self.counts.get((kind, word), 0)

    def producer_ports(self):
        return [w.port for w in self.fleet.producers]

    async def _order(self, conn_box, pidx, user, key):
        """One POST /v1/orders on the worker's connection; moves to the next producer after a
        transport failure. Returns (Answer, pidx)."""
        ports = self.producer_ports()
        port = ports[pidx % len(ports)]
        data = prepare("POST", "/v1/orders", b'{"user_id":%d,"sku_id":%d,"qty":1}'
                       % (user, self.sku), {"Content-Type": "application/json",
                                            "Idempotency-Key": key}, port)
        t0 = time.monotonic()
        conn = conn_box[0]
        if conn is None or conn.port != port:
            if conn is not None:
                conn.close()
            conn = conn_box[0] = Conn(port)
        try:
            r = await conn.exchange_prepared(data, ORDER_TIMEOUT)
            a = Answer("order", user, key, t0, time.monotonic(), r.status,
                       (r.json() or {}).get("error") if r.status != 202 else None,
                       order_id_of(r), pidx % len(ports), None)
            if r.status not in (202, 409):
                a.text = repr(r)
        except Exception as e:  # one failed request is counted; the worker goes on
            conn.close()
            conn_box[0] = None
            a = Answer("order", user, key, t0, time.monotonic(), 0, None, None,
                       pidx % len(ports), "%s: %s" % (type(e).__name__, e))
            pidx += 1
        self.answers.append(a)
        self.count(a)
        if a.status == 202:
            self.order_latencies.append(a.done - a.sent)
            if self.pay_fraction and self.rng.random() < self.pay_fraction:
                t = asyncio.ensure_future(self._pay_later(
                    a.order_id, user, self.rng.uniform(*self.pay_delay)))
                self.pay_tasks.add(t)
                t.add_done_callback(self.pay_tasks.discard)
        return a, pidx

    async def _buy(self, conn_box, pidx, user, key):
        a, pidx = await self._order(conn_box, pidx, user, key)
        if self.retry and (a.status == 0 or a.status == 503):
            if a.status == 503:
                pidx += 1  # (after no answer _order has moved on already)
            await asyncio.sleep(self.rng.uniform(0.1, 0.5))
            a, pidx = await self._order(conn_box, pidx, user, key)
        if a.status not in (202, 409):
            await asyncio.sleep(0.05)  # no hot loop while a producer is down
        return pidx

    async def pay(self, order_id, user, pidx=None):
        ports = self.producer_ports()
        pidx = self.rng.randrange(len(ports)) if pidx is None else pidx
        port = ports[pidx % len(ports)]
        client = self.pay_clients.get(port)
        if client is None:
            client = self.pay_clients[port] = Client(port)
        t0 = time.monotonic()
        try:
            # Every order of the drive is of one unit: the payment names them.
            r = await client.request("POST", "/v1/orders/%s/pay" % order_id, {"qty": 1},
                                     {"Authorization": "Bearer " + PAYMENT}, timeout=ORDER_TIMEOUT)
            a = Answer("pay", user, None, t0, time.monotonic(), r.status,
                       (r.json() or {}).get("error") if r.status != 202 else None,
                       order_id, pidx, None if r.status == 202 else repr(r))
        except TransportError as e:
            a = Answer("pay", user, None, t0, time.monotonic(), 0, None, order_id, pidx, str(e))
        self.answers.append(a)
        self.count(a)
        return a

    async def _pay_later(self, order_id, user, delay):
        await asyncio.sleep(delay)
        await self.pay(order_id, user)

    async def burst(self, users, n_orders, conns, on_start=None):
        """n_orders orders from `users` (a list of ids; every user orders at least once, some
        more), all at once over `conns` connections connected before the clock starts. Returns
        the seconds from the first request to the last answer."""
        jobs = list(users) + [self.rng.choice(users) for _ in range(n_orders - len(users))]
        self.rng.shuffle(jobs)
        it = iter(jobs)
        start = asyncio.Event()
        ready = []
        ports = self.producer_ports()

        async def worker(i):
            box = [Conn(ports[i % len(ports)])]
            for _ in range(3):
                try:
                    await asyncio.wait_for(box[0].connect(), 10)
                    break
                except OSError:
                    box[0].close()
                    await asyncio.sleep(0.2)
            ready.append(1)
            await start.wait()
            pidx = i % len(ports)
            for user in it:
                self.n_orders += 1
                pidx = await self._buy(box, pidx, user, "b-%d-%d" % (user, self.n_orders))
            if box[0] is not None:
                box[0].close()

        tasks = [asyncio.ensure_future(worker(i)) for i in range(conns)]
        end = time.monotonic() + 20
        while len(ready) < conns and time.monotonic() < end:
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        if on_start:
            on_start()
        start.set()
        await asyncio.gather(*tasks)
        return time.monotonic() - t0

    async def spike(self, pidx, n, user_pool):
        """n orders at once to producer number pidx, each on a connection of its own, from users
        of user_pool (a crowd arriving together; the chaos suite kills the producer under it)."""
        async def one(i):
            self.n_orders += 1
            user = self.rng.choice(user_pool)
            box = [None]
            await self._buy(box, pidx, user, "k-%d-%d-%d" % (user, pidx, self.n_orders))
            if box[0] is not None:
                box[0].close()
        await asyncio.gather(*(one(i) for i in range(n)))

    async def stream(self, rate, conns, user_pool):
        """Orders at about `rate` per second over `conns` connections until stop() is called;
        users drawn from user_pool (a list), each order with a fresh Idempotency-Key."""
        t0 = time.monotonic()
        seq = [0]
        ports = self.producer_ports()

        async def worker(i):
            box = [None]
            pidx = i % len(ports)
            while not self.stop_event.is_set():
                n = seq[0]
                seq[0] += 1
                due = t0 + n / rate
                delay = due - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.stop_event.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                user = self.rng.choice(user_pool)
                self.n_orders += 1
                pidx = await self._buy(box, pidx, user, "s-%d-%d" % (user, n))
            if box[0] is not None:
                box[0].close()

        self.stream_tasks = [asyncio.ensure_future(worker(i)) for i in range(conns)]

    async def stop(self):
        """Ends a stream: waits for the orders under way and for every payment scheduled."""
        self.stop_event.set()
        await asyncio.gather(*getattr(self, "stream_tasks", []))
        while self.pay_tasks:
            await asyncio.gather(*list(self.pay_tasks))
        for c in self.pay_clients.values():
            c.close()

    # -- the answers -------------------------------------------------------------------------

    def accepted(self):
        """{order_id: Answer} of the orders answered 202."""
        return dict((a.order_id, a) for a in self.answers if a.kind == "order" and a.status == 202)

    def paid(self):
        return set(a.order_id for a in self.answers if a.kind == "pay" and a.status == 202)

    def paid_closed(self):
        """Payments answered 409 order_closed: their orders had expired (or were cancelled)."""
        return set(a.order_id for a in self.answers
                   if a.kind == "pay" and a.status == 409 and a.error == "order_closed")

    def summary(self, kind="order"):
        items = sorted(((w, n) for (k, w), n in self.counts.items() if k == kind),
                       key=lambda x: -x[1])
        return ", ".join("%s %s" % (fmt_int(n), w) for w, n in items) or "none"

    def odd_answers(self, allowed):
        """Order answers whose word is not in `allowed`."""
        return [a for a in self.answers if a.kind == "order" and a.word not in allowed]


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


# ---- watching and checking -------------------------------------------------------------------------

STATUSES = ("pending", "paid", "expired", "rejected", "cancelled")


def sku_state(world, sku):
    """What PostgreSQL holds for the SKU: orders and units per status, the inventory row and
    the ledger (one query)."""
    rows = world.sql(
        "SELECT status::text, count(*), coalesce(sum(qty), 0), count(*) FILTER (WHERE refund_due)"
        "  FROM orders WHERE sku_id = %(sku)d GROUP BY status"
        " UNION ALL SELECT 'inventory', stock, supplied, 0 FROM inventory WHERE sku_id = %(sku)d"
        " UNION ALL SELECT 'ledger', count(*), count(returned_to_redis_at), coalesce(sum(qty), 0)"
        "  FROM stock_returns WHERE sku_id = %(sku)d" % {"sku": sku})
    st = {"orders": dict((s, 0) for s in STATUSES), "units": dict((s, 0) for s in STATUSES),
          "refund_due": 0, "stock": None, "supplied": None}
    for name, a, b, c in rows:
        if name == "inventory":
            st["stock"], st["supplied"] = int(a), int(b)
        elif name == "ledger":
            st["ledger"], st["returned"], st["ledger_units"] = int(a), int(b), int(c)
        else:
            st["orders"][name], st["units"][name] = int(a), int(b)
            st["refund_due"] += int(c)
    st["persisted"] = sum(st["orders"].values())
    st["held"] = st["units"]["pending"] + st["units"]["paid"]
    return st


class Progress:
    """Samples PostgreSQL (and the buyers' answers) once a second while a sale runs, prints a
    live line, and keeps the most units PostgreSQL ever held as pending+paid."""

    def __init__(self, world, sku, buyers, out=sys.stdout, live=None, every=1.0, prefix=""):
        self.world, self.sku, self.buyers = world, sku, buyers
        self.out, self.every, self.prefix = out, every, prefix
        self.live = out.isatty() if live is None else live
        self.max_held = 0
        self.supplied = None
        self.last = None
        self.errors = 0
        self.t0 = time.monotonic()
        self.task = None
        self.phase = ""

    def start(self):
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            await self.sample()
            await asyncio.sleep(self.every)

    async def sample(self, show=True):
        try:
            st = await asyncio.to_thread(sku_state, self.world, self.sku)
        except Fail:
            self.errors += 1  # PostgreSQL may be down on purpose; the next sample will do
            st = None
        if st is not None:
            self.last = st
            self.max_held = max(self.max_held, st["held"])
            if st["supplied"] is not None:
                self.supplied = st["supplied"]
        if show:
            self.show()

    def line(self):
        b, st = self.buyers, self.last
        pg = ("persisted %s  paid %s  expired %s  returned %s%s" % (
            fmt_int(st["persisted"]), fmt_int(st["orders"]["paid"]),
            fmt_int(st["orders"]["expired"]), fmt_int(st["returned"]),
            "".join("  %s %s" % (s, fmt_int(st["orders"][s])) for s in ("rejected", "cancelled")
                    if st["orders"][s]))
            if st else "PostgreSQL: no answer")
        other = sum(n for (k, w), n in b.counts.items()
                    if k == "order" and w not in ("accepted", "sold_out", "limit_exceeded"))
        return "%s%5.1fs %-9s accepted %s  sold out %s  limit %s%s | %s" % (
            self.prefix, time.monotonic() - self.t0, self.phase,
            fmt_int(b.n("order", "accepted")), fmt_int(b.n("order", "sold_out")),
            fmt_int(b.n("order", "limit_exceeded")),
            "  other %s" % fmt_int(other) if other else "", pg)

    def show(self):
        if self.live:
            self.out.write("\r\033[K" + self.line())
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await self.sample(show=True)
        if self.live:
            self.out.write("\n")
            self.out.flush()


def quiet_reasons(world, skus):
    """What still moves (empty when quiet): pending orders of the SKUs, reservations in Redis,
    ledger rows owed to Redis, a paused sale, the consumer's lag, a reconcile due."""
    why = []
    if skus:
        n = int(world.sql("SELECT count(*) FROM orders WHERE status = 'pending' AND sku_id IN (%s)"
                          % ",".join("%d" % s for s in skus))[0][0])
        if n:
            why.append("%d orders pending" % n)
    n = int(world.sql("SELECT count(*) FROM stock_returns WHERE returned_to_redis_at IS NULL")[0][0])
    if n:
        why.append("%d ledger rows owed to Redis" % n)
    for sku in skus:
        r = int(world.redis("HLEN", "{sku:%d}:resv" % sku) or 0)
        if r:
            why.append("sku %d: %d reservations in Redis" % (sku, r))
        if world.redis("HGET", "{sku:%d}:sale" % sku, "paused"):
            why.append("sku %d: paused by a reconcile" % sku)
    lag = world.consumer_lag()
    if lag:
        why.append("consumer lag %d events" % lag)
    if not world.reaper_settled():
        why.append("a reconcile is due or under way")
    return why


async def settle(world, skus, timeout):
    """Waits until quiet_reasons() is empty; the seconds it took, or Fail with what still
    moves."""
    t0 = time.monotonic()
    why = ["not asked yet"]
    while time.monotonic() - t0 < timeout:
        try:
            why = await asyncio.to_thread(quiet_reasons, world, skus)
        except Fail as e:
            why = [str(e)]
        if not why:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise Fail("not quiet after %d s: %s" % (timeout, "; ".join(why)))


def outcome(world, sku, buyers, supplied_expected=None):
    """The sale's end state, checked. Returns (facts, problems): facts is a dict for tables,
    problems a list of sentences (empty when every guarantee held)."""
    st = sku_state(world, sku)
    problems = []
    f = dict(st)
    supplied = st["supplied"]
    if supplied is None:
        return f, ["sku %d has no inventory row in PostgreSQL" % sku]
    if supplied_expected is not None and supplied != supplied_expected:
        problems.append("PostgreSQL says %d units were supplied, %d were put on sale"
                        % (supplied, supplied_expected))
    f["oversold"] = max(0, st["held"] - supplied)
    f["leaked"] = supplied - st["stock"] - st["held"]
    if f["oversold"]:
        problems.append("OVERSOLD: %d units pending+paid of %d supplied" % (st["held"], supplied))
    if f["leaked"]:
        problems.append("LEAKED: supplied %d - stock %d - pending+paid %d = %d"
                        % (supplied, st["stock"], st["held"], f["leaked"]))
    # Redis against PostgreSQL, for the SKU: stock, supplied, every user's units (under a per-user
    # limit; without one Redis keeps no counts).
    sale = world.redis_lines("HMGET", "{sku:%d}:sale" % sku, "stock", "supplied", "paused")
    r_stock = int(sale[0]) if sale and sale[0] else None
    r_supplied = int(sale[1]) if len(sale) > 1 and sale[1] else None
    f["redis_stock"], f["redis_supplied"] = r_stock, r_supplied
    flat = world.redis_lines("HGETALL", "{sku:%d}:users" % sku)
    r_users = dict((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2))
    pg_users = dict((int(u), int(q)) for u, q in world.sql(
        "SELECT user_id, sum(qty) FROM orders WHERE sku_id = %d AND status IN ('pending', 'paid')"
        " GROUP BY user_id" % sku))
    limit = world.sql("SELECT per_user_limit FROM inventory WHERE sku_id = %d" % sku)
    if limit and int(limit[0][0]) == 0:
        # No per-user limit: Redis keeps no per-user counts (reserve.lua), so it must hold none.
        users_off = [(u, q, None) for u, q in r_users.items()]
    else:
        users_off = [(u, r_users.get(u, 0), pg_users.get(u, 0)) for u in set(r_users) | set(pg_users)
                     if r_users.get(u, 0) != pg_users.get(u, 0)]
    f["users"] = len(pg_users)
    f["users_off"] = len(users_off)
    f["redis_eq_pg"] = (r_stock == st["stock"] and r_supplied == supplied and not users_off)
    if not f["redis_eq_pg"]:
        problems.append("Redis != PostgreSQL: Redis stock %s supplied %s, PostgreSQL stock %d "
                        "supplied %d; %d users' counts differ (user, Redis, PostgreSQL): %s"
                        % (r_stock, r_supplied, st["stock"], supplied, len(users_off),
                           users_off[:3]))
    # The answers the buyers got.
    acc = buyers.accepted()
    f["accepted"] = len(acc)
    found = {}
    ids = sorted(acc)
    for i in range(0, len(ids), 2000):
        chunk = ids[i:i + 2000]
        for oid, status, refund in world.sql(
                "SELECT order_id, status, refund_due FROM orders WHERE order_id IN (%s)"
                % ",".join("'%s'" % o for o in chunk if re.match(r"^[0-9A-Za-z._-]+$", o))):
            found[oid] = (status, refund == "t")
    missing = [o for o in ids if o not in found]
    f["accepted_found"] = len(ids) - len(missing)
    if missing:
        problems.append("LOST: %d orders answered 202 are not in PostgreSQL, e.g. %s"
                        % (len(missing), missing[:3]))
    cancelled = [o for o in ids if found.get(o, ("",))[0] == "cancelled"]
    if cancelled:
        problems.append("LOST: %d orders answered 202 were cancelled as lost reservations, "
                        "e.g. %s" % (len(cancelled), cancelled[:3]))
    paid = buyers.paid()
    f["payments"] = len(paid)
    unpaid = [o for o in paid if o in found and not (found[o][0] == "paid" or found[o][1])]
    if unpaid:
        problems.append("%d payments answered 202 left their order neither paid nor "
                        "refund_due, e.g. %s" % (len(unpaid), [(o, found[o]) for o in unpaid[:3]]))
    f["paid_from_answers"] = sum(1 for o in paid if found.get(o, ("",))[0] == "paid")
    closed = buyers.paid_closed()
    f["payments_closed"] = len(closed)
    not_refunded = [o for o in closed
                    if not (o in found and found[o][0] in ("expired", "cancelled", "rejected")
                            and found[o][1])]
    if not_refunded:
        problems.append("%d payments answered order_closed left their order without a refund due, "
                        "e.g. %s" % (len(not_refunded),
                                     [(o, found.get(o)) for o in not_refunded[:3]]))
    return f, problems
