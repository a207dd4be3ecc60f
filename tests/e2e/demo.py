#!/usr/bin/env python3
"""demo.py - the flash-sale demo (`make demo`, run by scripts/demo.sh once the stack is up).

Starts two producers, two consumers and a reaper on the running stack, opens a sale (1,000 units,
one per user, five seconds to pay), fires 30,000 orders from 20,000 users at once over 500
connections spread across both producers, pays 60% of the accepted orders, lets the rest expire
and come back on sale, waits until the pipeline is quiet, runs `reaper audit`, prints a table and
stops the workers. A live line shows the sale once a second.

The demo keeps to a world of its own on the stack, so neither tests nor earlier runs get in its
way and its audit is about the demo alone: the database stockpipe_demo, the topic stockpipe.demo
(and stockpipe.demo.dlq), Redis database 1. Each run sells a new SKU; the world is made on the
first run and kept (a second run audits both sales). On a Redis Cluster (STACK_REDIS_CLUSTER=1,
REDIS_URL=redis-cluster://...), which has only database 0, the demo uses database 0: its sale's
keys ({sku:ID}:..., a new SKU each run) are its own anyway; the reaper's few keys of its own
(stockpipe:reaper:epoch:{N}, :rebuilt, :recovery) are shared with the stack's other worlds, so
after a reaper of another world ran, the demo's reaper rebuilds the demo's sales once before the
sale opens (which the demo waits for anyway).

Exit status 0 only when nothing was oversold or leaked, every 202 is in PostgreSQL, Redis equals
PostgreSQL and the audit passed. Standard library only.
"""
import argparse
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashsale as fs  # noqa: E402
from flashsale import Fail, fmt_int  # noqa: E402
from testkit import Stack, interrupt_on_sigterm, raise_nofile  # noqa: E402

DEMO_DB = "stockpipe_demo"
DEMO_TOPIC = "stockpipe.demo"
DEMO_REDIS_DB = 1


def say(text):
    print("demo: " + text, flush=True)


def redis_url_with_db(url, db):
    """url with database db; a Redis Cluster has only database 0, so its url as it is."""
    if url.startswith("redis-cluster://"):
        return url
    base = url.rstrip("/")
    if base.count("/") > 2:  # already names a database
        base = base.rsplit("/", 1)[0]
    return "%s/%d" % (base, db)


async def run(args, stack, workdir):
    stack_env = stack.stack_env()
    world = fs.World(stack, stack_env, DEMO_DB, DEMO_TOPIC,
                     redis_url_with_db(stack_env["REDIS_URL"], DEMO_REDIS_DB), "stockpipe-demo")
    t = time.monotonic()
    await asyncio.to_thread(world.prepare_db)
    missing = await asyncio.to_thread(world.topics_missing)
    if missing:
        say("creating the demo's topics %s (once)" % ", ".join(t_ for t_, _ in missing))
    await asyncio.to_thread(world.prepare_topics)
    say("world: database %s, topic %s (%d partitions), %s (%.1f s)"
        % (DEMO_DB, DEMO_TOPIC, world.partitions,
           "Redis Cluster %s (database 0, the SKU's keys its own)"
           % world.redis_url[len("redis-cluster://"):]
           if world.redis_url.startswith("redis-cluster://") else "Redis db %d" % DEMO_REDIS_DB,
           time.monotonic() - t))

    fleet = fs.Fleet(world, args.bin_dir, os.path.join(workdir, "logs"),
                     os.path.join(workdir, "pids"),
                     {"producer": args.producers, "consumer": args.consumers,
                      "reaper": args.reapers},
                     settings={"reaper": {"REAPER_INTERVAL_MS": "200"}}, tag="demo")
    try:
        return await sale(args, world, fleet)
    finally:
        codes = await fleet.stop()
        bad = dict((n, c) for n, c in codes.items() if c != 0)
        if bad:
            say("workers that did not exit 0 on SIGTERM: %s (logs: %s)"
                % (bad, os.path.join(workdir, "logs")))
        else:
            say("workers stopped (SIGTERM, each exited 0)")


async def sale(args, world, fleet):
    rng = random.Random(args.seed)
    t = time.monotonic()
    await fleet.start()
    say("workers ready in %.1f s: %s" % (time.monotonic() - t, ", ".join(
        "%s :%d" % (w.name, w.port) for w in fleet.workers)))
    # A reaper that meets a Redis it has not seen (a first run, or the stack restarted since)
    # rebuilds every sale from PostgreSQL first; the new sale opens after that.
    t = time.monotonic()
    await fs.settle(world, [], 120)
    say("the reaper has checked Redis against PostgreSQL (%.1f s)" % (time.monotonic() - t))

    sku = int(time.time() * 1000)
    p1 = fleet.producers[0]
    r = await p1.client.request("POST", "/v1/skus",
                                {"sku_id": sku, "stock": args.stock,
                                 "per_user_limit": args.limit, "pay_timeout_s": args.pay_timeout},
                                {"Authorization": "Bearer " + fs.ADMIN})
    if r.status != 201:
        raise Fail("opening the sale answered %r" % r)
    say("sale open: SKU %d, %s units, %d per user, %d s to pay (POST /v1/skus: 201)"
        % (sku, fmt_int(args.stock), args.limit, args.pay_timeout))

    # 60% of the buyers who got a 202 pay within two seconds (well inside the pay timeout);
    # the others never pay and their orders expire.
    buyers = fs.Buyers(fleet, sku, rng, pay_fraction=args.pay_fraction, pay_delay=(0.3, 2.0),
                       retry=False)
    prog = fs.Progress(world, sku, buyers)
    base = rng.randrange(10**6, 10**9)
    users = [base + i for i in range(args.users)]
    say("burst: %s orders from %s users over %d connections to %d producers; %d%% of the "
        "buyers who get a 202 pay within 2 s, the others never do"
        % (fmt_int(args.orders), fmt_int(args.users), args.conns, len(fleet.producers),
           round(100 * args.pay_fraction)))
    prog.phase = "burst"
    secs = await buyers.burst(users, args.orders, args.conns, on_start=prog.start)
    prog.phase = "paying"
    await buyers.stop()
    accepted = buyers.accepted()

    # The unpaid orders expire pay_timeout after they were made: the reaper publishes
    # order.expired, the consumer returns the units to PostgreSQL, the reaper gives them back
    # to Redis, and they are on sale again.
    prog.phase = "expiring"
    t_wait = time.monotonic()
    try:
        await fs.settle(world, [sku], args.pay_timeout + 90)
    finally:
        await prog.stop()
    say("quiet %.1f s after the burst" % (time.monotonic() - t_wait))

    rc, report = await asyncio.to_thread(fs.audit, world, args.bin_dir, fleet.reaper_env())
    facts, problems = await asyncio.to_thread(fs.outcome, world, sku, buyers, args.stock)
    odd = buyers.odd_answers({"accepted", "sold_out", "limit_exceeded"})
    if odd:
        problems.append("%d order answers other than 202 / 409 sold_out / 409 limit_exceeded, "
                        "e.g. %s" % (len(odd), odd[0].text or odd[0].word))
    bad_pays = [a for a in buyers.answers if a.kind == "pay" and a.status != 202]
    if bad_pays:
        problems.append("%d payments not answered 202, e.g. %s" % (len(bad_pays),
                                                                 bad_pays[0].text))
    if facts["accepted"] < min(args.stock, args.users):
        problems.append("only %d orders answered 202 for %d units and %d buyers"
                        % (facts["accepted"], args.stock, args.users))
    if rc != 0:
        problems.append("reaper audit failed (exit %d)" % rc)

    lat = buyers.order_latencies
    all_lat = [a.done - a.sent for a in buyers.answers if a.kind == "order"]
    st = facts
    rows = [
        ("sale", "SKU %d: %s units, %d per user, %d s to pay"
         % (sku, fmt_int(args.stock), args.limit, args.pay_timeout)),
        ("burst", "%s orders from %s users, %d connections, %d producers"
         % (fmt_int(buyers.n_orders), fmt_int(args.users), args.conns, len(fleet.producers))),
        ("answers", buyers.summary()),
        ("throughput", "%s orders/s (%s answers in %.2f s)"
         % (fmt_int(int(len(all_lat) / secs)) if secs else "-", fmt_int(len(all_lat)), secs)),
        ("latency, all answers", "p50 %.1f ms, p99 %.1f ms, max %.1f ms"
         % (1000 * fs.percentile(all_lat, 0.5), 1000 * fs.percentile(all_lat, 0.99),
            1000 * max(all_lat))),
        ("latency, 202s", "p50 %.1f ms, p99 %.1f ms (Kafka acknowledged each)"
         % (1000 * fs.percentile(lat, 0.5), 1000 * fs.percentile(lat, 0.99))),
        ("payments", "%s of %s accepted orders paid (%s): %s in time, %s after the expiry "
         "(refund due)" % (fmt_int(facts["payments"] + facts["payments_closed"]),
                           fmt_int(len(accepted)), buyers.summary("pay"),
                           fmt_int(facts["paid_from_answers"]),
                           fmt_int(facts["payments"] + facts["payments_closed"]
                                   - facts["paid_from_answers"]))),
        ("orders in PostgreSQL", "%s: %s" % (fmt_int(st["persisted"]), ", ".join(
            "%s %s" % (s, fmt_int(st["orders"][s])) for s in fs.STATUSES))),
        ("units sold (paid)", "%s of %s" % (fmt_int(st["units"]["paid"]), fmt_int(st["supplied"]))),
        ("expired, returned", "%s orders expired; %s units back in PostgreSQL and Redis, on sale "
         "again" % (fmt_int(st["orders"]["expired"]), fmt_int(st["ledger_units"]))),
        ("oversold", "%d   (pending+paid never above %s: at most %s seen)"
         % (st["oversold"], fmt_int(st["supplied"]), fmt_int(max(prog.max_held, st["held"])))),
        ("leaked", "%d   (supplied %s = stock %s + pending %s + paid %s)"
         % (st["leaked"], fmt_int(st["supplied"]), fmt_int(st["stock"]),
            fmt_int(st["units"]["pending"]), fmt_int(st["units"]["paid"]))),
        ("Redis = PostgreSQL", "%s   (stock %s / %s, supplied %s / %s, %s users' units agree)"
         % ("yes" if st["redis_eq_pg"] else "NO", st["redis_stock"], st["stock"],
            st["redis_supplied"], st["supplied"], fmt_int(st["users"] - st["users_off"]))),
        ("202s in PostgreSQL", "%s of %s" % (fmt_int(st["accepted_found"]),
                                              fmt_int(st["accepted"]))),
        ("reaper audit", "passed" if rc == 0 else "FAILED (exit %d)" % rc),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print("\n" + line)
    for k, v in rows:
        print("%-*s | %s" % (width, k, v))
    print(line)
    if rc != 0:
        print(report)
    for p in problems:
        print("PROBLEM: " + p)
    print("%s: %s" % ("PASS" if not problems else "FAIL",
                      "nothing oversold, nothing leaked, every 202 persisted, Redis = PostgreSQL, "
                      "audit passed" if not problems else "%d problems above" % len(problems)),
          flush=True)
    return 0 if not problems else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="logs/ and pids/ of the workers go here")
    ap.add_argument("--bin-dir", default=os.environ.get("BIN_DIR", os.path.join(fs.ROOT, "bin")),
                    help="where the worker binaries are (default bin, or $BIN_DIR)")
    ap.add_argument("--stock", type=int, default=1000, help="units on sale (1000)")
    ap.add_argument("--limit", type=int, default=1, help="units per user (1)")
    ap.add_argument("--pay-timeout", type=int, default=5, help="seconds to pay (5)")
    ap.add_argument("--orders", type=int, default=30000, help="orders in the burst (30000)")
    ap.add_argument("--users", type=int, default=20000, help="users placing them (20000)")
    ap.add_argument("--conns", type=int, default=500, help="connections of the burst (500)")
    ap.add_argument("--pay-fraction", type=float, default=0.6,
                    help="share of the buyers with a 202 who pay (0.6)")
    ap.add_argument("--producers", type=int, default=2, help="producers (2)")
    ap.add_argument("--consumers", type=int, default=2, help="consumers (2)")
    ap.add_argument("--reapers", type=int, default=1, help="reapers (1)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the random choices (users, who pays)")
    args = ap.parse_args()
    if args.users > args.orders:
        ap.error("--users must not exceed --orders")
    raise_nofile(args.conns * 2 + 1024)
    stack = Stack()
    interrupt_on_sigterm()  # demo.sh's trap: stop the workers on the way out
    try:
        rc = asyncio.run(run(args, stack, args.workdir))
    except Fail as e:
        print("\ndemo: FAILED: %s" % e, flush=True)
        rc = 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", flush=True)
        rc = 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
