"""pg_failover.py - the workers follow a PostgreSQL failover: the primary killed with -9 mid-sale,
its synchronous standby promoted, nothing lost and nothing applied twice.

Run by tests/e2e/pg_failover.sh (whose EXIT trap stops what it left behind), on a private stack
of its own (scripts/stack.sh with STACK_VAR in a scratch directory, ports of its own and
STACK_PG_STANDBY=1), so the shared stack is never touched. The checks, in order:

  standby              `up` made a streaming standby (pg_basebackup) that the primary names its
                       synchronous standby; PG_DSN names both nodes (target_session_attrs=read-write)
  sync visible         a row committed on the primary is on the standby at once
  sync waits           with the standby stopped a COMMIT on the primary does not return; it returns
                       once `up` has started the standby again
  failover             one producer, one consumer and two reapers sell a SKU to a paced stream of
                       buyers (half of them pay, the rest expire); mid-sale the primary's postmaster
                       gets SIGKILL and `scripts/stack.sh pg-promote` promotes the standby a second
                       later; the stream goes on. No worker exits; the consumer's and the reapers'
                       /readyz answer 503 after the kill and 200 again after the promotion
  outcome              once quiet: every order answered 202 is in PostgreSQL (the new primary), none
                       cancelled, no oversell (sampled during the sale too), nothing leaked, Redis =
                       PostgreSQL, every payment answered 202 left its order paid
  audit                `reaper audit` exits 0
  exactly once         the consumer's stored offsets are at the end of every partition; the events
                       it counted as applied, unchanged or dead are exactly the events in the topic
                       (none applied twice; those read again after an unanswered COMMIT are stale);
                       every order.created of the topic is one order in PostgreSQL; no dead letter
  lookups              the producer's PostgreSQL lookups (GET /v1/orders/ID) answer from the new
                       primary
  old primary          `up` rebuilds the old primary as a standby of the new one (never a second
                       primary), synchronous again
  hung host            a second producer, whose PG_DSN names first a host that takes connections
                       and never answers (a hung server), then the standby and the primary, reaches
                       the new primary after the failover (PQconnectPoll ignores connect_timeout:
                       producer/pg_async.c bounds each host itself and moves past it)
  exit                 every worker exits 0 on SIGTERM

It prints the figures measured (standby creation, promotion, the times from the kill until each
worker is ready again and until an order placed after the kill is stored) and, last,
`N passed, M failed`.
"""
import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import flashsale as fs  # noqa: E402
from testkit import (HOST, STACK_SH, Fail, Report, Stack, command, expect,  # noqa: E402
                     interrupt_on_sigterm, private_ports, raise_nofile)

PREFERRED_PORTS = {"STACK_REDIS_PORT": 43379, "STACK_PG_PORT": 43432, "STACK_PG_STANDBY_PORT": 43433,
                   "STACK_KAFKA_PORT": 43092, "STACK_KAFKA_CONTROLLER_PORT": 43093}
# Short timeouts, as the chaos suite's: the sale goes quiet within seconds of its end.
SETTINGS = {
    "producer": {"KAFKA_MESSAGE_TIMEOUT_MS": "2000"},
    "consumer": {"KAFKA_SESSION_TIMEOUT_MS": "6000"},
    "reaper": {"KAFKA_MESSAGE_TIMEOUT_MS": "2000", "RESV_LOST_AFTER_MS": "3500",
               "REAPER_INTERVAL_MS": "250", "RESV_SWEEP_INTERVAL_MS": "1000",
               "EXPIRY_RETRY_MS": "3000", "ACCEPTED_STALE_AFTER_MS": "3000"},
}
STOCK = 3000          # more than the stream asks for: orders are accepted all through the failover
USERS = 6000
RATE = 100            # orders per second
CONNS = 16
BEFORE_KILL = 4.0     # seconds of the sale before the kill
PROMOTE_AFTER = 1.0   # seconds from the kill to `pg-promote` (an operator's, or a tool's, delay)
AFTER_PROMOTE = 5.0   # seconds of the sale after the promotion
PAY_TIMEOUT = 3
STATUS_RE = re.compile(r"^postgres\s+(running|stopped)\s+(?:pid (\d+)\s+)?port (\d+)\s+(.*?)\s+"
                       r"data (\S+)$")
CHECKS = ["standby", "sync visible", "sync waits", "failover", "outcome", "audit", "exactly once",
          "lookups", "old primary", "hung host", "exit"]


def say(text):
    print(text, flush=True)


class Run:
    def __init__(self, args):
        self.args = args
        self.rep = Report()
        self.done = set()
        self.rng = random.Random()
        self.ports = private_ports(PREFERRED_PORTS)
        env = dict(self.ports, STACK_PG_STANDBY=1)
        self.stack = Stack(os.path.join(args.workdir, "stack"), env,
                           log=os.path.join(args.workdir, "stack.log"))
        self.piddir = os.path.join(args.workdir, "pids")
        self.logdir = os.path.join(args.workdir, "logs")
        self.figures = []
        self.t_kill = None

    # -- reporting ---------------------------------------------------------------------------

    def ok(self, name, detail):
        self.done.add(name)
        self.rep.ok(name, detail)

    def not_ok(self, name, detail, notes=()):
        self.done.add(name)
        self.rep.not_ok(name, detail, notes)

    def figure(self, text):
        self.figures.append(text)
        say("#   " + text)

    # -- the stack ---------------------------------------------------------------------------

    def status(self):
        """[(role or note, state, pid, port, datadir)] of the PostgreSQL lines of `status`, and
        its whole output."""
        p = subprocess.run([STACK_SH, "status"], env=self.stack.env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        nodes = []
        for line in p.stdout.splitlines():
            m = STATUS_RE.match(line.strip())
            if m:
                nodes.append((m.group(4), m.group(1), int(m.group(2) or 0), int(m.group(3)),
                              m.group(5)))
        return nodes, p.stdout

    def node(self, role):
        nodes, out = self.status()
        for r, state, pid, port, datadir in nodes:
            if r == role and state == "running":
                return pid, port, datadir
        raise Fail("no running %s in `scripts/stack.sh status`:\n%s" % (role, out))

    def psql(self, port, sql, timeout=15):
        return command(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p",
                        str(port), "-U", "postgres", "-d", "postgres", "-c", sql],
                       timeout=timeout).strip()

    def pg_ctl(self, datadir, *args):
        with open(os.path.join(datadir, "PG_VERSION")) as f:
            bindir = "/usr/lib/postgresql/%s/bin" % f.read().strip()
        argv = [os.path.join(bindir, "pg_ctl"), "-D", datadir] + list(args)
        if os.geteuid() == 0:  # PostgreSQL runs as postgres (scripts/stack-postgres.sh)
            argv = ["runuser", "-u", "postgres", "--"] + argv
        subprocess.run(argv, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                       check=True)

    def sync_state(self, port):
        return self.psql(port, "SELECT string_agg(application_name || ' ' || state || ' ' || "
                               "sync_state, ', ') FROM pg_stat_replication")

    # -- the checks --------------------------------------------------------------------------

    async def check_standby(self):
        t = time.monotonic()
        await self.stack.ash("up", timeout=300)
        up_s = time.monotonic() - t
        with open(self.stack.log, errors="replace") as f:
            log = f.read()
        made = re.search(r"standby: made by pg_basebackup in (\d+) ms", log)
        ready = re.search(r"standby: streaming from the primary .*ready in (\d+) ms", log)
        self.figure("standby creation: pg_basebackup %s ms, streaming and synchronous %s ms after "
                    "the primary was up (the whole `up`: %.1f s)"
                    % (made.group(1) if made else "?", ready.group(1) if ready else "?", up_s))
        self.env = self.stack.stack_env()
        dsn = self.env.get("PG_DSN", "")
        self.primary = self.node("primary")
        self.standby = self.node("standby")
        expect(self.primary[0] == self.stack.pid_of("postgres"),
               "the primary's pid %d is not the one in var/run/postgres.pid (%s)"
               % (self.primary[0], self.stack.pid_of("postgres")))
        want = "host=127.0.0.1,127.0.0.1 port=%d,%d " % (self.primary[1], self.standby[1])
        expect(dsn.startswith(want) and "target_session_attrs=read-write" in dsn,
               "PG_DSN is %r, not both nodes with target_session_attrs=read-write" % dsn)
        st = self.sync_state(self.primary[1])
        expect(st == "standby streaming sync", "pg_stat_replication on the primary: %r" % st)
        names = self.psql(self.standby[1], "SHOW synchronous_standby_names")
        expect(names == "", "the standby names a synchronous standby itself: %r" % names)
        return "primary :%d, standby :%d streaming, sync; PG_DSN %s" % (
            self.primary[1], self.standby[1], dsn)

    async def check_visible(self):
        p, s = self.primary[1], self.standby[1]
        self.psql(p, "CREATE TABLE pgf_probe (n int)")
        self.psql(p, "INSERT INTO pgf_probe VALUES (1)")
        t = time.monotonic()
        reads = 0
        while True:
            reads += 1
            try:
                if self.psql(s, "SELECT count(*) FROM pgf_probe WHERE n = 1") == "1":
                    break
            except Fail:  # the table itself not replayed yet
                pass
            expect(time.monotonic() - t < 1.0, "the row committed on the primary is not on the "
                                               "standby 1 s later")
            await asyncio.sleep(0.01)
        return "on the standby at the %s read after the COMMIT returned (%.0f ms)" % (
            "first" if reads == 1 else "%dth" % reads, 1000 * (time.monotonic() - t))

    async def check_waits(self):
        p = self.primary[1]
        self.pg_ctl(self.standby[2], "-m", "fast", "-w", "stop")
        t = time.monotonic()
        ins = subprocess.Popen(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST,
                                "-p", str(p), "-U", "postgres", "-d", "postgres", "-c",
                                "INSERT INTO pgf_probe VALUES (2)"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        try:
            await asyncio.sleep(2.0)
            expect(ins.poll() is None, "the COMMIT returned (%s) with the standby stopped"
                   % ins.poll())
            t_up = time.monotonic()
            await self.stack.ash("up", timeout=120)
            end = time.monotonic() + 15
            while ins.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.05)
            expect(ins.poll() == 0, "the COMMIT did not return within 15 s of the standby's "
                                    "start (%s)" % ins.poll())
            waited = time.monotonic() - t
            back = time.monotonic() - t_up
        finally:
            if ins.poll() is None:
                ins.kill()
            ins.wait()
        self.standby = self.node("standby")
        n = self.psql(self.standby[1], "SELECT count(*) FROM pgf_probe")
        expect(n == "2", "the standby has %s rows of 2" % n)
        return "the COMMIT waited %.1f s, until %.1f s after `up` started the standby again" % (
            waited, back)

    async def watch(self, fleet):
        """Every 100 ms: each worker's /readyz status and whether it still runs, kept as
        transitions [(t, status)] per worker."""
        self.ready = dict((w.name, []) for w in fleet.workers)
        self.died = {}
        while True:
            for w in fleet.workers:
                if not w.alive():
                    self.died.setdefault(w.name, (time.monotonic(), w.proc.returncode))
                    continue
                status, _ = await w.readyz(timeout=1)
                seq = self.ready[w.name]
                if not seq or seq[-1][1] != status:
                    seq.append((time.monotonic(), status))
            await asyncio.sleep(0.1)

    async def failover(self, fleet, buyers):
        stack = self.stack
        await asyncio.sleep(BEFORE_KILL)
        pid = stack.pid_of("postgres")
        expect(pid == self.primary[0], "var/run/postgres.pid names %s, not the primary %d"
               % (pid, self.primary[0]))
        self.stored_before = int((await self.world.asql("SELECT count(*) FROM orders"))[0][0])
        os.kill(pid, 9)
        self.t_kill = time.monotonic()
        say("#   %.1fs kill -9 the primary's postmaster (pid %d, port %d; %d orders stored)"
            % (self.t_kill - self.t0, pid, self.primary[1], self.stored_before))
        await asyncio.sleep(self.args.promote_after)
        t = time.monotonic()
        await stack.ash("pg-promote", timeout=120)
        self.t_promoted = time.monotonic()
        self.promote_s = self.t_promoted - t
        say("#   %.1fs scripts/stack.sh pg-promote done in %.2f s" % (
            self.t_promoted - self.t0, self.promote_s))
        await asyncio.sleep(AFTER_PROMOTE)

    async def first_stored_after_kill(self, buyers):
        """The seconds from the kill until the first order sent after it (and answered 202) was
        in PostgreSQL; None after 60 s."""
        while self.t_kill is None:
            await asyncio.sleep(0.05)
        while time.monotonic() - self.t_kill < 60:
            first = next((a for a in buyers.answers if a.kind == "order" and a.status == 202
                          and a.sent > self.t_kill), None)
            if first is not None:
                try:
                    rows = await self.world.asql("SELECT 1 FROM orders WHERE order_id = '%s'"
                                                 % first.order_id)
                except Fail:
                    rows = []
                if rows:
                    return time.monotonic() - self.t_kill, first
            await asyncio.sleep(0.1)
        return None, None

    def readiness(self, name):
        """(went 503 after the kill, seconds from the kill until 200 again or None)."""
        seq = self.ready.get(name, [])
        before = [s for t, s in seq if t <= self.t_kill]
        after = [(t, s) for t, s in seq if t > self.t_kill]
        down = any(s != 200 for _, s in after)
        back = None
        for t, s in after:
            if s != 200:
                back = None
            elif back is None:
                back = t - self.t_kill
        if not after and before and before[-1] == 200:
            back = 0.0
        return down, back

    async def check_sale(self):
        """The failover mid-sale; reports failover, outcome, audit, exactly once, lookups."""
        args = self.args
        env = self.env
        self.world = fs.World(self.stack, env, env["PG_DSN"].split("dbname=")[1].split()[0],
                              env["KAFKA_TOPIC"], env["REDIS_URL"], "pg-failover",
                              dlq=env["KAFKA_DLQ_TOPIC"])
        self.world.partitions = fs.partition_count(self.world.brokers, self.world.topic)
        fleet = self.fleet = fs.Fleet(self.world, args.bin_dir, self.logdir, self.piddir,
                                      {"producer": 1, "consumer": 1, "reaper": 2},
                                      settings=SETTINGS, tag="pgf")
        t = time.monotonic()
        await fleet.start(timeout=60)
        self.start_hung()
        await fs.settle(self.world, [], 60)
        say("#   (the fleet started and settled: %.1f s)" % (time.monotonic() - t))
        sku = self.sku = self.rng.randrange(10**6, 10**9)
        r = await fleet.producers[0].client.request(
            "POST", "/v1/skus", {"sku_id": sku, "stock": STOCK, "per_user_limit": 1,
                                 "pay_timeout_s": PAY_TIMEOUT},
            {"Authorization": "Bearer " + fs.ADMIN})
        expect(r.status == 201, "opening the sale answered %r" % r)
        buyers = self.buyers = fs.Buyers(fleet, sku, self.rng, pay_fraction=0.5,
                                         pay_delay=(0.2, 2.0), retry=True)
        prog = self.prog = fs.Progress(self.world, sku, buyers, live=False, every=2.0,
                                       prefix="#   ")
        base = self.rng.randrange(10**6, 10**9)
        pool = [base + i for i in range(USERS)]
        watcher = asyncio.ensure_future(self.watch(fleet))
        self.t0 = prog.t0 = time.monotonic()
        prog.phase = "sale"
        prog.start()
        try:
            await buyers.stream(RATE, CONNS, pool)
            stored = asyncio.ensure_future(self.first_stored_after_kill(buyers))
            try:
                await self.failover(fleet, buyers)
            finally:
                prog.phase = "stopping"
                await buyers.stop()
            prog.phase = "settling"
            t = time.monotonic()
            try:
                await fs.settle(self.world, [sku], 60)
                settle_s = time.monotonic() - t
            finally:
                await prog.stop()
            stored_s, first = await stored
        finally:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
        self.report_failover(stored_s, first, settle_s)
        await self.guarded("outcome", self.check_outcome)
        await self.guarded("audit", self.check_audit)
        await self.guarded("exactly once", self.check_exactly_once)
        await self.guarded("lookups", self.check_lookups)

    def report_failover(self, stored_s, first, settle_s):
        problems = []
        if self.died:
            problems.append("workers exited: %s" % ", ".join(
                "%s (status %s)" % (n, c) for n, (_, c) in self.died.items()))
        lines = []
        for w in self.fleet.workers:
            down, back = self.readiness(w.name)
            if w.kind == "producer":  # orders never wait on PostgreSQL: it stays ready
                lines.append("%s %s" % (w.name, "stayed ready" if not down else
                                        "not ready for a while, ready again %s" % (
                                            "%.1f s after the kill" % back if back is not None
                                            else "NEVER")))
            else:
                if not down:
                    problems.append("%s's /readyz never left 200 after the kill" % w.name)
                if back is None:
                    problems.append("%s's /readyz is not 200 again (%s)" % (
                        w.name, self.ready.get(w.name, [])[-3:]))
                lines.append("%s ready again %s after the kill" % (
                    w.name, "%.1f s" % back if back is not None else "NEVER"))
                if back is not None:
                    self.figure("kill -> %s /readyz 200 again: %.1f s" % (w.name, back))
        if stored_s is None:
            problems.append("no order sent after the kill was stored within 60 s")
        else:
            self.figure("kill -> the first order sent after it (202 %.2f s after the kill) "
                        "stored on the new primary: %.1f s" % (first.done - self.t_kill, stored_s))
        acc = sorted(a.done for a in self.buyers.answers if a.kind == "order" and a.status == 202)
        gap = max((b - a for a, b in zip(acc, acc[1:]) if b > self.t_kill - 1), default=0.0)
        self.figure("producer: orders answered 202 all through (longest gap between two 202s "
                    "around the failover %.2f s); promotion (pg-promote) %.2f s" % (
                        gap, self.promote_s))
        detail = "kill -9, pg-promote %.1f s later (took %.2f s); %s; quiet %.1f s after the " \
                 "sale" % (self.args.promote_after, self.promote_s, "; ".join(lines), settle_s)
        if problems:
            self.not_ok("failover", problems[0], problems[1:] + [detail])
        else:
            self.ok("failover", detail)

    async def check_outcome(self):
        facts, problems = await asyncio.to_thread(fs.outcome, self.world, self.sku, self.buyers,
                                                  STOCK)
        self.facts = facts
        if self.prog.max_held > STOCK:
            problems.append("OVERSOLD during the sale: PostgreSQL held %d units pending+paid of %d"
                            % (self.prog.max_held, STOCK))
        if facts["orders"]["rejected"]:
            problems.append("%d orders rejected by PostgreSQL" % facts["orders"]["rejected"])
        allowed = {"accepted", "sold_out", "limit_exceeded", "in_progress", "unavailable",
                   "no answer"}
        odd = self.buyers.odd_answers(allowed)
        if odd:
            problems.append("%d unexpected order answers, e.g. %s" % (
                len(odd), "; ".join(a.text or a.word for a in odd[:3])))
        if self.buyers.n("order", "accepted") == 0:
            problems.append("no order was accepted at all")
        detail = "%d orders (%s); payments: %s; PostgreSQL: %s; max held %d of %d; " \
                 "stock %s = Redis %s" % (
                     self.buyers.n_orders, self.buyers.summary(), self.buyers.summary("pay"),
                     ", ".join("%s %d" % (k, v) for k, v in facts["orders"].items() if v),
                     max(self.prog.max_held, facts["held"]), STOCK, facts["stock"],
                     facts["redis_stock"])
        if problems:
            self.not_ok("outcome", problems[0], problems[1:] + [detail])
        else:
            self.ok("outcome", detail)

    async def check_audit(self):
        rc, report = await asyncio.to_thread(fs.audit, self.world, self.args.bin_dir,
                                             self.fleet.reaper_env())
        if rc == 0:
            self.ok("audit", "reaper audit exited 0")
        else:
            self.not_ok("audit", "reaper audit exited %d" % rc, report.splitlines()[:30])

    def topic_events(self, topic):
        out = command(["kcat", "-C", "-b", self.world.brokers, "-t", topic, "-o", "beginning",
                       "-e", "-q", "-f", "%p %o %s\\n"], timeout=60)
        return [l for l in out.splitlines() if l.strip()]

    async def check_exactly_once(self):
        w = self.world
        problems = []
        ends = await asyncio.to_thread(fs.end_offsets, w.brokers, w.topic, w.partitions)
        stored = dict((int(p), int(o)) for p, o in await w.asql(
            "SELECT partition, next_offset FROM consumer_offsets WHERE topic = '%s'" % w.topic))
        off = dict((p, (stored.get(p), e)) for p, e in ends.items() if stored.get(p, 0) != e)
        if off:
            problems.append("stored offsets not at the end of the log (partition: stored, end): %s"
                            % off)
        m = await self.fleet.of("consumer")[0].metrics()

        def total(prefix):
            return int(sum(v for k, v in m.items() if k.startswith(prefix)))
        applied = total("stockpipe_consumer_events_applied_total")
        unchanged = total("stockpipe_consumer_events_unchanged_total")
        dead = total("stockpipe_consumer_dead_letters_total")
        stale = total("stockpipe_consumer_stale_events_total")
        in_log = sum(ends.values())
        # One consumer, assigned its partitions once: it reads an event again only after a batch
        # failed. Applied twice, an event would count twice here; one whose COMMIT got no answer
        # but did commit (it reached the standby before the primary died) counts once, as stale
        # when read again.
        with open(self.fleet.of("consumer")[0].log_path, errors="replace") as f:
            assigned = f.read().count('"msg":"assigned; reading from')
        counted = applied + unchanged + dead + stale
        if assigned != w.partitions:
            problems.append("the consumer was assigned partitions %d times, not once each (a "
                            "rebalance): the counts below prove nothing" % assigned)
        elif counted != in_log:
            problems.append("the consumer counted %d events applied + %d unchanged + %d dead + %d "
                            "stale = %d, the topic holds %d" % (applied, unchanged, dead, stale,
                                                              counted, in_log))
        lines = await asyncio.to_thread(self.topic_events, w.topic)
        if len(lines) != in_log:
            problems.append("kcat read %d events of %d" % (len(lines), in_log))
        created = set(re.findall(r'"type":"order\.created".*?"order_id":"([^"]+)"',
                                 "\n".join(lines)))
        n_orders = int((await w.asql("SELECT count(*) FROM orders"))[0][0])
        if n_orders != len(created):
            problems.append("%d orders in PostgreSQL, %d distinct order.created in the topic"
                            % (n_orders, len(created)))
        dead_letters = await asyncio.to_thread(self.topic_events, w.dlq)
        if dead_letters:
            problems.append("%d dead letters, e.g. %s" % (len(dead_letters), dead_letters[0][:200]))
        with open(self.fleet.of("consumer")[0].log_path, errors="replace") as f:
            in_doubt = f.read().count("no answer to its COMMIT")
        detail = "%d events in %d partitions, offsets stored at the end of each; the consumer " \
                 "applied %d, %d unchanged, %d dead, %d read again and found stale (%d batches " \
                 "whose COMMIT got no answer); %d order.created = %d orders" % (
                     in_log, len(ends), applied, unchanged, dead, stale, in_doubt, len(created),
                     n_orders)
        if problems:
            self.not_ok("exactly once", problems[0], problems[1:] + [detail])
        else:
            self.ok("exactly once", detail)

    async def check_lookups(self):
        after = [a for a in self.buyers.answers if a.kind == "order" and a.status == 202
                 and a.sent > self.t_promoted]
        expect(after, "no order was accepted after the promotion")
        a = after[len(after) // 2]
        r = await self.fleet.producers[0].client.request("GET", "/v1/orders/%s" % a.order_id)
        j = r.json() or {}
        # The accepted entry leaves Redis once the order is stored: this answer is PostgreSQL's.
        expect(r.status == 200 and j.get("status") in ("pending", "paid", "expired"),
               "GET /v1/orders/%s answered %r" % (a.order_id, r))
        self.ok("lookups", "GET /v1/orders/%s: %s, from the new primary" % (a.order_id,
                                                                            j.get("status")))

    async def check_old_primary(self):
        old_dir = self.primary[2]
        nodes, out = self.status()
        expect(any(r.startswith("old primary") and s == "stopped" and d == old_dir
                   for r, s, _, _, d in nodes),
               "`status` after pg-promote does not show the old primary stopped:\n%s" % out)
        t = time.monotonic()
        await self.stack.ash("up", timeout=120)
        took = time.monotonic() - t
        new_primary = self.node("primary")
        standby = self.node("standby")
        expect(new_primary[2] != old_dir and standby[2] == old_dir,
               "after `up` the primary is %s and the standby %s; the old primary was %s"
               % (new_primary[2], standby[2], old_dir))
        st = self.sync_state(new_primary[1])
        expect(st == "standby streaming sync", "pg_stat_replication on the new primary: %r" % st)
        n = self.psql(new_primary[1], "INSERT INTO pgf_probe VALUES (3); "
                                      "SELECT count(*) FROM pgf_probe")
        on_standby = self.psql(standby[1], "SELECT count(*) FROM pgf_probe")
        expect(n == on_standby, "after a commit the new primary has %s probe rows, the standby %s"
               % (n, on_standby))
        with open(self.stack.log, errors="replace") as f:
            made = re.findall(r"standby: made by pg_basebackup in (\d+) ms", f.read())
        self.figure("old primary rebuilt as a standby: pg_basebackup %s ms, the whole `up` %.1f s"
                    % (made[-1] if made else "?", took))
        return "`up` rebuilt it (pg_basebackup) as a standby of the new primary :%d, " \
               "synchronous, in %.1f s; the workers kept running" % (new_primary[1], took)

    def start_hung(self):
        """A second producer, out of the buyers' way, whose PG_DSN names first a host that never
        answers (it takes the TCP connection and says nothing, as a hung server does), then the
        standby, then the primary: its lookups must find the primary before and after the
        failover."""
        self.bh = socket.socket()
        self.bh.bind((HOST, 0))
        self.bh.listen(64)  # never accepted: the kernel completes the handshakes, nobody answers
        self.hung_dsn = re.sub(r"host=\S+ port=\S+", "host=%s,%s,%s port=%d,%d,%d" % (
            HOST, HOST, HOST, self.bh.getsockname()[1], self.standby[1], self.primary[1]),
            self.env["PG_DSN"])
        self.hung = fs.Worker(self.fleet, "producer", 9, dict(
            SETTINGS["producer"], ADMIN_TOKEN=fs.ADMIN, PAYMENT_TOKEN=fs.PAYMENT,
            PG_DSN=self.hung_dsn))
        self.hung.start()

    async def check_hung_host(self):
        w = self.hung
        try:
            await w.wait_ready(10)
            order = next(a.order_id for a in self.buyers.answers
                         if a.kind == "order" and a.status == 202 and a.sent > self.t_promoted)
            t = time.monotonic()
            last = None
            while time.monotonic() - t < 20:
                try:
                    last = await w.client.request("GET", "/v1/orders/%s" % order, timeout=5)
                    if last.status == 200 and (last.json() or {}).get("status") in (
                            "pending", "paid", "expired"):
                        break
                except fs.TransportError as e:
                    last = e
                await asyncio.sleep(0.2)
            else:
                raise Fail("GET /v1/orders/%s through PG_DSN %r still answers %r after 20 s"
                           % (order, self.hung_dsn, last))
            code = await w.stop()
            expect(code == 0, "%s exited %s on SIGTERM" % (w.name, code))
        finally:
            w.kill()
            self.bh.close()
        with open(w.log_path, errors="replace") as f:
            log = f.read()
        skipped = log.count("did not answer within")
        return "its PG_DSN names first a host that never answers: GET /v1/orders/ID of an order " \
               "placed after the promotion answered from the new primary (%d connection " \
               "attempts given up on that host, then the next one tried)" % skipped

    async def check_exit(self):
        codes = await self.fleet.stop()
        bad = dict((n, c) for n, c in codes.items() if c != 0)
        expect(not bad, "workers that did not exit 0 on SIGTERM: %s" % bad)
        return "%d workers exited 0" % len(codes)

    # -- the run -----------------------------------------------------------------------------

    async def step(self, name, fn, budget):
        """One check within budget seconds (Report.run_check); whether it passed."""
        t = time.monotonic()
        ok = await self.rep.run_check(name, fn, budget)
        self.done.add(name)
        say("#   (%s: %.1f s)" % (name, time.monotonic() - t))
        return ok

    async def guarded(self, name, fn):
        """A check that reports itself (ok / not_ok); a Fail or an error it raises is its not
        ok."""
        t = time.monotonic()
        try:
            await fn()
            say("#   (%s: %.1f s)" % (name, time.monotonic() - t))
        except Fail as e:
            self.not_ok(name, e)
        except Exception as e:  # a bug in one check must not hide the others
            self.not_ok(name, "%s: %s" % (type(e).__name__, e))

    async def run(self):
        say("# private stack in %s, ports %s, STACK_PG_STANDBY=1" % (
            self.stack.var, ", ".join("%s=%d" % kv for kv in self.ports.items())))
        self.fleet = None
        try:
            if not await self.step("standby", self.check_standby, 300):
                return
            await self.step("sync visible", self.check_visible, 30)
            if not await self.step("sync waits", self.check_waits, 120):
                return
            try:
                await asyncio.wait_for(self.check_sale(), 240)
            except Fail as e:
                self.not_ok("failover" if "failover" not in self.done else "sale", e)
                return
            except asyncio.TimeoutError:
                self.not_ok("failover" if "failover" not in self.done else "sale",
                            "the sale did not end within 240 s")
                return
            except Exception as e:  # a bug here must still stop the workers and the stack
                self.not_ok("failover" if "failover" not in self.done else "sale",
                            "%s: %s" % (type(e).__name__, e))
                return
            await self.step("old primary", self.check_old_primary, 120)
            await self.step("hung host", self.check_hung_host, 60)
            await self.step("exit", self.check_exit, 60)
        finally:
            if self.fleet is not None:
                self.fleet.kill_all()
            if getattr(self, "hung", None) is not None:
                self.hung.kill()
                self.bh.close()
            left = [c for c in CHECKS if c not in self.done]
            if left:
                self.rep.skip(left, "an earlier step failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="where the private stack, logs and pids go")
    ap.add_argument("--bin-dir", default=None)
    ap.add_argument("--promote-after", type=float, default=PROMOTE_AFTER,
                    help="seconds from the kill to pg-promote, while no node takes writes "
                         "(default %(default)s)")
    args = ap.parse_args()
    bin_dir = args.bin_dir or os.environ.get("BIN_DIR", "bin")
    if not os.path.isabs(bin_dir):
        bin_dir = os.path.join(ROOT, bin_dir)
    args.bin_dir = os.path.abspath(bin_dir)
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="sp-pgf-")
    os.chmod(args.workdir, 0o755)  # as root, PostgreSQL runs as `postgres` and must reach it
    raise_nofile(8192)
    run = Run(args)
    t0 = time.monotonic()
    missing = [b for b in ("producer", "consumer", "reaper")
               if not os.access(os.path.join(args.bin_dir, b), os.X_OK)]
    if missing:
        run.rep.not_ok("setup", "missing %s in %s (make)" % (", ".join(missing), args.bin_dir))
    else:
        interrupt_on_sigterm()  # pg_failover.sh's trap: stop the workers on the way out
        try:
            asyncio.run(run.run())
        except KeyboardInterrupt:
            run.rep.not_ok("interrupted", "stopped by a signal")
        finally:
            if own_workdir:  # without pg_failover.sh: tear down here
                run.stack.sh("down", "--purge", timeout=180)
                if not run.rep.failed:
                    shutil.rmtree(args.workdir, ignore_errors=True)
    for f in run.figures:
        say("# measured: " + f)
    if run.rep.failed:
        say("# logs kept in %s" % args.workdir)
    return run.rep.summary("pg failover, %.0f s" % (time.monotonic() - t0))


if __name__ == "__main__":
    sys.exit(main())
