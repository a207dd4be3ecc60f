"""testkit.py - what every Python test driver needs: failures, reporting, ports, env files, logs,
processes, the stack.

Shared by tests/producer/integration_{api,faults,http_hostile}.py, by the sale driver
tests/e2e/flashsale.py (the demo and the chaos suite) and by tests/chaos/chaos.py. Standard
library only.

  Fail, expect(cond, detail)      a check that did not hold, or a step that could not be done
  Report()                        prints `ok - NAME` / `not ok - NAME: DETAIL` (and diagnostic
                                  lines), counts both; check(), skip(names, why),
                                  await run_check(name, fn, budget), keep_if_failed(dir, what),
                                  summary(note) -> exit status
  run_driver(run, needs, prefix, kept)
                                  the main() of a driver against the shared stack
  read_env_file(path) -> dict     the `export K=V` lines of a stack.env
  load_stack_env()                fills os.environ from var/stack.env when REDIS_URL is unset
  free_port(), port_free(port), pick_ports(n, avoid), private_ports(preferred)
  log_tail(path, n, prefix)       the last lines of a log, indented for a TAP diagnostic
  worker_binary(name)             $BIN_DIR/NAME (default bin/NAME), as an absolute path
  setup_missing(env, binary)      what a driver lacks to run: unset settings, or the binary
  raise_nofile(want), interrupt_on_sigterm()
  command(argv), redis_cli(port, *args)
                                  a short client command's output, or Fail (redis_cli: a server
                                  of a test's own)
  redis_cmd(url, *args), redis_cmd_lines(url, *args), redis_each_primary(url, *args),
  redis_info_sum(url, section), redis_primaries(url), redis_identity(url), epoch_keys(url),
  cluster_slot_map(url), redis_slot(key), parse_redis_url(url), parse_info(text)
                                  the data's Redis as REDIS_URL names it (redis://, sentinel://,
                                  redis-cluster://): a command about keys (in a cluster through
                                  `redis-cli -c`, which follows MOVED/ASK), a command on every
                                  primary, INFO summed over them, the reaper's idea of Redis's
                                  identity, a key's slot
  Procs(piddir)                   processes started, each recorded in PIDDIR/NAME.pid as
                                  "PID NEEDLE" (what kill_recorded of tests/lib/procs.sh reads);
                                  start, kill, stop (SIGTERM, wait, SIGKILL), stop_all;
                                  proc_matches(pid, needle)
  Worker(procs, name, binary, log_path)
                                  a worker binary on a loopback port of its own, with an http11
                                  Client: start(env), alive, kill, stop, readyz, wait_ready,
                                  metrics, log_tail
  redis_server(...), redis_sentinel(...), sentinel_conf(...)
                                  Redis servers and Sentinels of a test's own
  Stack(var, ports, log)          scripts/stack.sh on the shared stack or a private one
"""
import asyncio
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from http11 import HOST, Client, TransportError

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
STACK_SH = os.path.join(ROOT, "scripts", "stack.sh")
# The shared stack's ports (scripts/stack.sh's defaults), which a private stack must not take.
SHARED_PORTS = {"STACK_REDIS_PORT": 16379, "STACK_PG_PORT": 15432, "STACK_KAFKA_PORT": 19092,
                "STACK_KAFKA_CONTROLLER_PORT": 19093}


class Fail(Exception):
    """A check that did not hold, or a step that could not be done; the text says which."""


def expect(cond, detail):
    if not cond:
        raise Fail(detail)


class Report:
    """Counts and prints the checks of one run; summary() prints `N passed, M failed` at the end."""

    def __init__(self):
        self.passed = self.failed = 0

    def ok(self, name, detail=None):
        self.passed += 1
        print("ok - %s%s" % (name, " (%s)" % detail if detail else ""), flush=True)

    def not_ok(self, name, detail, notes=()):
        """Prints `not ok - NAME: DETAIL` (white space folded to one line), then each line of
        `notes` (texts that may span lines) as a diagnostic, `#   LINE` (a line that already
        starts with # as it is)."""
        self.failed += 1
        print("not ok - %s: %s" % (name, " ".join(str(detail).split())), flush=True)
        for note in notes:
            for line in str(note).splitlines():
                print(line if line.startswith("#") else "#   " + line, flush=True)

    def check(self, name, cond, detail=""):
        if cond:
            self.ok(name, detail)
        else:
            self.not_ok(name, detail)

    def skip(self, names, why):
        """Each of `names` is not ok: `skipped: WHY` (a check that could not run counts as
        failed)."""
        for n in names:
            self.not_ok(n, "skipped: " + why)

    async def run_check(self, name, fn, budget):
        """Awaits fn() within `budget` seconds: ok with the detail it returns, else not ok with
        the Fail, the timeout or the error (a bug in one check must not hide the others nor skip
        the teardown). True when it passed."""
        try:
            detail = await asyncio.wait_for(fn(), budget)
            self.ok(name, detail)
            return True
        except Fail as e:
            self.not_ok(name, e)
        except asyncio.TimeoutError:
            self.not_ok(name, "did not finish within %.0f s" % budget)
        except TransportError as e:
            self.not_ok(name, "transport error: %s" % e)
        except Exception as e:
            self.not_ok(name, "%s: %s" % (type(e).__name__, e))
        return False

    def keep_if_failed(self, logdir, what):
        """After the run: removes logdir when every check passed, else keeps it and says so,
        `# WHAT kept in LOGDIR` (what: e.g. "the producer's log is")."""
        if self.failed:
            print("# %s kept in %s" % (what, logdir), flush=True)
        else:
            shutil.rmtree(logdir, ignore_errors=True)

    def summary(self, note=None):
        """Prints `N passed, M failed` (and ` (NOTE)`); the exit status of the run (0 when
        nothing failed)."""
        print("%d passed, %d failed%s" % (self.passed, self.failed,
                                          " (%s)" % note if note else ""), flush=True)
        return 0 if self.failed == 0 else 1


def run_driver(run, needs, prefix, kept, worker="producer"):
    """The main() of a driver that runs one worker binary against the shared stack: fills the
    stack env (load_stack_env), checks that the settings `needs` and $BIN_DIR/WORKER are there (a
    failed `setup` check otherwise), then asyncio.run(run(rep, binary, logdir)) with a new
    scratch directory named PREFIX..., kept only when a check failed (`# KEPT kept in DIR`).
    Prints the time it took and, last, `N passed, M failed`; returns the exit status."""
    load_stack_env()
    binary = worker_binary(worker)
    missing = setup_missing(needs, binary)
    rep = Report()
    if missing:
        rep.not_ok("setup", "missing %s" % missing)
    else:
        logdir = tempfile.mkdtemp(prefix=prefix)
        t = time.monotonic()
        asyncio.run(run(rep, binary, logdir))
        print("# %.1f s" % (time.monotonic() - t), flush=True)
        rep.keep_if_failed(logdir, kept)
    return rep.summary()


def read_env_file(path):
    """The `export K=V` lines of a shell env file (var/stack.env) as a dict."""
    env = {}
    with open(path) as f:
        for line in f:
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                k, _, v = words[1].partition("=")
                env[k] = v
    return env


def load_stack_env():
    """Fills what `. var/stack.env` would have set, for a run outside tests/run-all.sh."""
    path = os.path.join(ROOT, "var", "stack.env")
    if os.environ.get("REDIS_URL") or not os.path.exists(path):
        return
    for k, v in read_env_file(path).items():
        os.environ.setdefault(k, v)


def free_port():
    """A loopback port the kernel just handed out (ephemeral range)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_free(port):
    """Nothing listens on 127.0.0.1:port and we could bind it."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((HOST, port)) == 0:
            return False
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(n, avoid=()):
    """n free loopback ports below 32768 (out of Linux's ephemeral range), none in `avoid`."""
    out = []
    while len(out) < n:
        p = random.randrange(20000, 32000)
        if p not in avoid and p not in out and port_free(p):
            out.append(p)
    return out


def private_ports(preferred):
    """The ports of a private stack: `preferred` ({STACK_*_PORT: port}) when all of them are
    free, else as many picked by pick_ports, none of the shared stack's nor the preferred."""
    if all(port_free(p) for p in preferred.values()):
        return dict(preferred)
    return dict(zip(preferred, pick_ports(len(preferred), set(SHARED_PORTS.values())
                                          | set(preferred.values()))))


def log_tail(path, n=15, prefix="#   "):
    """The last n lines of the log at path, each cut to 300 characters and prefixed."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "%s(no log at %s)" % (prefix, path)
    return "\n".join(prefix + l[:300] for l in lines[-n:])


def worker_binary(name):
    """$BIN_DIR/NAME (BIN_DIR defaults to bin; a relative one that is not a directory here is taken
    from the repository root), as an absolute path."""
    bin_dir = os.environ.get("BIN_DIR", "bin")
    if not os.path.isabs(bin_dir) and not os.path.isdir(bin_dir):
        bin_dir = os.path.join(ROOT, bin_dir)
    return os.path.abspath(os.path.join(bin_dir, name))


def setup_missing(env, binary):
    """What a driver lacks to run: the names in env that are unset or empty, comma-separated, or
    else binary when it is not executable; None when nothing is missing."""
    missing = [v for v in env if not os.environ.get(v)]
    if missing:
        return ", ".join(missing)
    if not os.access(binary, os.X_OK):
        return binary
    return None


def sentinel_conf(port, workdir, master, master_port, quorum, failover_timeout_ms):
    """The sentinel.conf of a Sentinel on HOST:port (its directory workdir) that watches the
    primary HOST:master_port under the name master: down after 1 s without an answer, failed over
    with `quorum` Sentinels agreeing, one replica at a time."""
    return ("port %d\nbind %s\ndaemonize no\ndir %s\n"
            "sentinel monitor %s %s %d %d\n"
            "sentinel down-after-milliseconds %s 1000\n"
            "sentinel failover-timeout %s %d\n"
            "sentinel parallel-syncs %s 1\n"
            % (port, HOST, workdir, master, HOST, master_port, quorum, master, master,
               failover_timeout_ms, master))


def raise_nofile(want=8192):
    """Raises the soft limit of open files to `want` (at most the hard limit)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def interrupt_on_sigterm():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: the shell wrapper's trap (stop_helper)
    makes the driver stop what it started on the way out."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)


def command(argv, timeout=30, env=None, input_text=None, check=True):
    """Runs a short client command (psql, redis-cli, kcat, stack.sh); its stdout, or Fail."""
    try:
        p = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                           errors="replace", timeout=timeout, env=env,
                           stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Fail("%s did not finish within %d s" % (" ".join(argv[:4]), timeout))
    if check and p.returncode != 0:
        raise Fail("%s exited %d: %s" % (" ".join(argv[:4]), p.returncode,
                                         (p.stderr or p.stdout).strip()[-500:]))
    return p.stdout


def redis_cli(port, *args, host=HOST, db=None, timeout=10):
    """One redis-cli command on host:port (database db); its output, stripped, or Fail. For a
    server of a test's own; the stack's Redis, whatever REDIS_URL names, is redis_cmd's."""
    argv = ["redis-cli", "-h", host, "-p", str(port)]
    if db is not None:
        argv += ["-n", str(db)]
    return command(argv + [str(a) for a in args], timeout=timeout).strip()


# ---- the data's Redis as REDIS_URL names it: one server, Sentinel's primary, a Redis Cluster -----
#
# redis_cmd(url, *args)          a command about keys: on the server, Sentinel's primary, or in a
#                                cluster through `redis-cli -c` on a seed that answers (it follows
#                                MOVED/ASK to the node serving the key's slot)
# redis_each_primary(url, *args) a command about each server (SCRIPT FLUSH, FLUSHALL, CONFIG SET,
#                                INFO): on every primary, their outputs in redis_primaries' order
# redis_info_sum(url, section)   INFO SECTION of every primary, its numbers added up
# redis_identity(url)            (epoch, run_id, replid) as the reaper reads them
# redis_slot(key)                a key's cluster slot (CRC16/XMODEM of its hash tag)

def parse_redis_url(url):
    """REDIS_URL as the workers read it (sp_redis_parse_url, common/redis_store.c):
    {"kind": "redis" | "sentinel" | "cluster", "hosts": [(host, port)], "master": Sentinel's
    master name or None, "db": n, "password": str or None}; Fail on what they would refuse."""
    m = re.match(r"(redis|sentinel|redis-cluster)://(?:[^:@/]*:([^@]*)@)?([^/]*)(?:/(.*))?$",
                 url or "")
    expect(m is not None, "REDIS_URL must start with redis://, sentinel:// or redis-cluster:// "
           "(got %r)" % (url or "")[:40])
    kind = {"redis": "redis", "sentinel": "sentinel", "redis-cluster": "cluster"}[m.group(1)]
    hosts = []
    for hp in m.group(3).split(","):
        h, colon, p = hp.rpartition(":")
        if not colon:
            h, p = hp, "26379" if kind == "sentinel" else "6379"
        expect(h and p.isdigit() and 0 < int(p) < 65536, "REDIS_URL has a bad host %r" % hp)
        hosts.append((h, int(p)))
    expect(kind != "redis" or len(hosts) == 1, "REDIS_URL redis:// takes one host")
    rest = m.group(4) or ""
    master = None
    if kind == "sentinel":
        master, _, rest = rest.partition("/")
        expect(master, "REDIS_URL sentinel:// needs /master_name after the hosts")
    expect(rest == "" or (rest.isdigit() and int(rest) <= 15),
           "REDIS_URL database must be 0..15 (got %r)" % rest)
    db = int(rest or 0)
    expect(kind != "cluster" or db == 0, "REDIS_URL redis-cluster:// has only database 0")
    return {"kind": kind, "hosts": hosts, "master": master, "db": db,
            "password": m.group(2) or None}


def _crc16_table():
    table = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        table.append(c & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def redis_slot(key):
    """The cluster slot of key (str or bytes): CRC16/XMODEM of its hash tag (the part between
    the first { and the next }, when not empty) or of the whole key, mod 16384."""
    k = key.encode() if isinstance(key, str) else bytes(key)
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    crc = 0
    for b in k:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc % 16384


def _redis_run(target, host, port, args, timeout, follow=False, db=0):
    """redis-cli on host:port (-c with follow, -n db when not 0): (returncode, stdout, stderr)."""
    argv = ["redis-cli", "-h", host, "-p", str(port)]
    if follow:
        argv.append("-c")
    if db:
        argv += ["-n", str(db)]
    env = None
    if target["password"]:
        env = dict(os.environ, REDISCLI_AUTH=target["password"])
    try:
        p = subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True,
                           errors="replace", timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Fail("redis-cli -p %d %s did not finish within %d s" % (port, " ".join(
            str(a) for a in args[:3]), timeout))
    return p.returncode, p.stdout, p.stderr


def _redis_ok(host, port, args, rc, out, err):
    """The output of a redis-cli run, stripped; Fail when it could not run the command or the
    cluster could not route it (CLUSTERDOWN, TRYAGAIN, a MOVED left over)."""
    if rc != 0:
        raise Fail("redis-cli -h %s -p %d %s exited %d: %s" % (host, port, " ".join(
            str(a) for a in args[:3]), rc, (err or out).strip()[-300:]))
    text = out.strip()
    if re.match(r"(CLUSTERDOWN|TRYAGAIN|MOVED|ASK) ", text):
        raise Fail("redis-cli -h %s -p %d %s: %s" % (host, port, " ".join(
            str(a) for a in args[:3]), text[:300]))
    return text


def _sentinel_primary(target, timeout):
    """(host, port) of the primary the first Sentinel that knows names."""
    last = None
    for h, p in target["hosts"]:
        rc, out, err = _redis_run({"password": None}, h, p, ["SENTINEL",
                                  "GET-MASTER-ADDR-BY-NAME", target["master"]], min(timeout, 5))
        words = out.split()
        if rc == 0 and len(words) == 2 and words[1].isdigit():
            return words[0], int(words[1])
        last = (err or out).strip()
    raise Fail("no Sentinel of %s names the primary %s (%s)" % (
        ",".join("%s:%d" % hp for hp in target["hosts"]), target["master"], last))


def _cluster_seed_run(target, args, timeout, follow):
    """args on the first seed of a cluster that answers (a seed down is skipped): (host, port,
    rc, out, err)."""
    last = None
    for h, p in target["hosts"]:
        rc, out, err = _redis_run(target, h, p, args, timeout, follow=follow)
        if rc == 0 or "Could not connect" not in (err + out):
            return h, p, rc, out, err
        last = (err or out).strip()
    raise Fail("no seed of the cluster answers (%s): %s" % (
        ",".join("%s:%d" % hp for hp in target["hosts"]), last))


def cluster_slot_map(url, timeout=10):
    """A cluster's slot map as its seed sees it (CLUSTER NODES of the first seed that answers):
    a list of 16384 entries, the (host, port) of the primary serving each slot or None. Only for
    redis-cluster://."""
    t = parse_redis_url(url)
    expect(t["kind"] == "cluster", "not a redis-cluster:// URL: %s" % url)
    h, p, rc, out, err = _cluster_seed_run(t, ["CLUSTER", "NODES"], timeout, False)
    text = _redis_ok(h, p, ["CLUSTER", "NODES"], rc, out, err)
    owner = [None] * 16384
    for line in text.splitlines():
        f = line.split()
        flags = f[2].split(",") if len(f) > 2 else []
        if len(f) < 8 or "master" not in flags or "fail" in flags:
            continue
        ah, _, ap = f[1].split("@")[0].split(",")[0].rpartition(":")
        if not ah or not ap.isdigit():
            continue
        for r in f[8:]:  # "0-5460", "5461"; "[slot->-id]" (a migration under way) skipped
            m = re.match(r"(\d+)(?:-(\d+))?$", r)
            if m:
                for slot in range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1):
                    owner[slot] = (ah, int(ap))
    return owner


def redis_primaries(url, timeout=10):
    """(host, port) of every primary of the data REDIS_URL names: the server (redis://), the
    primary Sentinel names now (sentinel://), or a cluster's primaries in the order of their
    addresses, host then port (the order of the reaper's sp_redis_primaries, whose identity lists
    them so)."""
    t = parse_redis_url(url)
    if t["kind"] == "redis":
        return list(t["hosts"])
    if t["kind"] == "sentinel":
        return [_sentinel_primary(t, timeout)]
    out = []
    for addr in cluster_slot_map(url, timeout):
        if addr is not None and addr not in out:
            out.append(addr)
    expect(out, "the cluster of %s serves no slot" % url)
    return sorted(out, key=lambda a: (a[0].encode(), int(a[1])))


def redis_cmd(url, *args, timeout=10):
    """One command about keys on the data REDIS_URL names; its output (stripped) or Fail.
    redis://: that server and database; sentinel://: the primary a Sentinel names now;
    redis-cluster://: `redis-cli -c` on the first seed that answers, which follows MOVED and ASK
    to the node serving the (first) key's slot - a keyless command runs on that seed alone: one
    about each server (SCRIPT FLUSH, FLUSHALL, INFO, CONFIG SET) is redis_each_primary's."""
    t = parse_redis_url(url)
    if t["kind"] == "cluster":
        h, p, rc, out, err = _cluster_seed_run(t, args, timeout, True)
        return _redis_ok(h, p, args, rc, out, err)
    h, p = t["hosts"][0] if t["kind"] == "redis" else _sentinel_primary(t, timeout)
    rc, out, err = _redis_run(t, h, p, args, timeout, db=t["db"])
    return _redis_ok(h, p, args, rc, out, err)


def redis_cmd_lines(url, *args, timeout=10):
    """redis_cmd's output as a list of lines (an empty reply: [])."""
    out = redis_cmd(url, *args, timeout=timeout)
    return out.split("\n") if out else []


def redis_each_primary(url, *args, timeout=10):
    """The command on every primary of the data REDIS_URL names (redis_primaries: one for a
    server or Sentinel's primary, each of a cluster's), nothing redirected; their outputs,
    stripped, in that order. Fail when one did not run it."""
    t = parse_redis_url(url)
    out = []
    for h, p in redis_primaries(url, timeout):
        rc, o, err = _redis_run(t, h, p, args, timeout, db=t["db"])
        out.append(_redis_ok(h, p, args, rc, o, err))
    return out


def parse_info(text):
    """An INFO text as {field: value} (strings; `#` lines skipped)."""
    return dict(l.strip().split(":", 1) for l in text.splitlines()
                if ":" in l and not l.startswith("#"))


def redis_info_sum(url, section):
    """INFO SECTION of every primary, its numbers added up: {field: number}. A field of
    `a=1,b=2` values (commandstats' cmdstat_eval:calls=3,usec=...) counts as FIELD.a, FIELD.b;
    what is not a number is left out."""
    total = {}
    def add(k, v):
        try:
            n = float(v)
        except ValueError:
            return
        total[k] = total.get(k, 0) + n
    for text in redis_each_primary(url, "INFO", section):
        for k, v in parse_info(text).items():
            if "=" in v:
                for part in v.split(","):
                    pk, _, pv = part.partition("=")
                    add("%s.%s" % (k, pk), pv)
            else:
                add(k, v)
    return total


EPOCH_KEY = "stockpipe:reaper:epoch"
REBUILT_KEY = "stockpipe:reaper:rebuilt"  # common/stock.h SP_STOCK_REBUILT_KEY


def primary_keys(url, base, timeout=10):
    """[(primary, key)]: the key each primary keeps one of stockpipe's own keys under
    (common/redis_store.c sp_redis_key_on: the reaper's epoch and rebuilt keys), in
    redis_primaries' order: on one server base; in a cluster base:{N} with the smallest N >= 0
    whose slot that primary serves."""
    if parse_redis_url(url)["kind"] != "cluster":
        return [(redis_primaries(url, timeout)[0], base)]
    owner = cluster_slot_map(url, timeout)
    prims = []
    for addr in owner:
        if addr is not None and addr not in prims:
            prims.append(addr)
    prims.sort(key=lambda a: (a[0].encode(), int(a[1])))  # redis_primaries' order
    out = []
    for addr in prims:
        n = 0
        while owner[redis_slot("%s:{%d}" % (base, n))] != addr:
            n += 1
            expect(n < 1000000, "no %s key lands on primary %s:%d" % ((base,) + addr))
        out.append((addr, "%s:{%d}" % (base, n)))
    return out


def epoch_keys(url, timeout=10):
    """[(primary, key)]: the key each primary keeps the reaper's epoch under (primary_keys)."""
    return primary_keys(url, EPOCH_KEY, timeout)


def mark_rebuilt(url, value, timeout=10):
    """Writes the reaper's rebuilt key on every primary unless it is there (SET NX), as a
    reaper does once Redis holds every sale PostgreSQL has: a sale missing from Redis then
    answers 404 unknown_sku, not 503 recovering. For suites that run no reaper."""
    t = parse_redis_url(url)
    for (h, p), key in primary_keys(url, REBUILT_KEY, timeout):
        args = ("SET", key, value, "NX")
        rc, out, err = _redis_run(t, h, p, args, timeout, db=t["db"])
        _redis_ok(h, p, args, rc, out, err)


def redis_identity(url, timeout=10):
    """(epoch, run_id, replid) of the data REDIS_URL names, as the reaper reads them
    (reaper/reconcile.c, read_identity) and records them in reaper_state: per primary (in
    redis_primaries' order) INFO server's run_id and INFO replication's master_replid, joined by
    ','; the epoch is the value of the primaries' epoch keys when all hold the same, else ''
    (a missing one counts as '')."""
    t = parse_redis_url(url)
    run_ids, replids, epochs = [], [], []
    for (h, p), key in epoch_keys(url, timeout):
        got = []
        for args in (("INFO", "server"), ("INFO", "replication"), ("GET", key)):
            rc, out, err = _redis_run(t, h, p, args, timeout, db=t["db"])
            got.append(_redis_ok(h, p, args, rc, out, err))
        run_ids.append(parse_info(got[0]).get("run_id", ""))
        replids.append(parse_info(got[1]).get("master_replid", ""))
        epochs.append(got[2])
    epoch = epochs[0] if epochs and all(e == epochs[0] for e in epochs) else ""
    return epoch, ",".join(run_ids), ",".join(replids)


# ---- processes ----------------------------------------------------------------------------------

def proc_matches(pid, needle):
    """The process pid runs (not a zombie) and its command line contains needle."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        with open("/proc/%d/status" % pid) as f:
            state = [l for l in f if l.startswith("State:")][0].split()[1]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and needle in cmd


class Procs:
    """The processes a driver started, by name. Each is recorded in PIDDIR/NAME.pid as
    "PID NEEDLE", the format kill_recorded of tests/lib/procs.sh reads, so that the driver's
    shell wrapper kills it (only while its command line still contains NEEDLE) even when the
    driver died; the file goes when the process is stopped or killed here. piddir None records
    nothing (a driver without such a wrapper)."""

    def __init__(self, piddir=None):
        self.dir = piddir
        if piddir:
            os.makedirs(piddir, exist_ok=True)
        self.procs = {}

    def start(self, name, argv, log_path, needle=None, env=None, append=True, banner=None):
        """Starts argv (env: the whole environment, None for ours) with stdout and stderr to
        log_path (appended to, or a new file with append=False; `banner` bytes written first)
        and records it with needle (default argv[0]); the Popen."""
        with open(log_path, "ab" if append else "wb") as log:
            if banner:
                log.write(banner)
                log.flush()
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
        if self.dir:
            with open(os.path.join(self.dir, name + ".pid"), "w") as f:
                f.write("%d %s\n" % (p.pid, needle or argv[0]))
        self.procs[name] = p
        return p

    def get(self, name):
        return self.procs.get(name)

    def forget(self, name):
        self.procs.pop(name, None)
        if self.dir:
            try:
                os.unlink(os.path.join(self.dir, name + ".pid"))
            except OSError:
                pass

    def kill(self, name):
        """SIGKILL (if it still runs), waits for it (10 s at most) and forgets it."""
        p = self.procs.get(name)
        if p is not None:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.forget(name)

    async def stop(self, name, timeout):
        """SIGTERM, then waits up to `timeout` s; SIGKILL if it is still there. Forgets it;
        returns its exit status, None when it did not exit in time (0 for none started)."""
        p = self.procs.get(name)
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.05)
        code = p.poll()
        self.kill(name)
        return code

    def stop_all(self, prefix=""):
        """kill() of every process whose name starts with prefix."""
        for name in [n for n in self.procs if n.startswith(prefix)]:
            self.kill(name)


class Worker:
    """A worker binary (producer, consumer, reaper) serving HTTP on 127.0.0.1:port (a free port
    unless given, kept across restarts like a Service in front of a pod), started through procs
    under `name`, with an http11.Client to it. Its messages call it `label` (`KIND NAME` unless
    the name starts with the binary's name)."""

    def __init__(self, procs, name, binary, log_path, port=None):
        self.procs, self.name, self.binary, self.log_path = procs, name, binary, log_path
        kind = os.path.basename(binary)
        self.label = name if name.startswith(kind) else "%s %s" % (kind, name)
        # Out of the ephemeral range: a port the kernel just handed out for a bind may be given
        # again as the source port of an outgoing connection (a worker started before this one
        # connecting to Kafka) before this worker listens on it ("cannot listen ... in use").
        self.port = port or pick_ports(1)[0]
        self.proc = None
        self.client = None
        self.starts = 0

    def start(self, env, banner=None):
        """Starts it with our environment, `env` on top, and HTTP_ADDR/HTTP_PORT; the log is
        new at the first start and appended to at a restart (banner bytes written first)."""
        full = dict(os.environ)
        full.update(env)
        full.update(HTTP_ADDR=HOST, HTTP_PORT=str(self.port))
        self.proc = self.procs.start(self.name, [self.binary], self.log_path, env=full,
                                     append=self.starts > 0, banner=banner)
        self.client = Client(self.port)
        self.starts += 1

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL; waits for it."""
        if self.client:
            self.client.close()
        self.procs.kill(self.name)

    async def stop(self, timeout=30.0):
        """SIGTERM; the exit status, or None if it did not exit within timeout (then killed)."""
        if self.client:
            self.client.close()
        if self.proc is None:
            return 0
        if self.procs.get(self.name) is not self.proc:  # killed (and not started again) already
            return self.proc.wait()
        return await self.procs.stop(self.name, timeout)

    def log_tail(self, n=12):
        return log_tail(self.log_path, n, "#   %s: " % self.name)

    async def readyz(self, timeout=5):
        """(status, body) of GET /readyz; (0, what went wrong) without an answer."""
        try:
            r = await self.client.request("GET", "/readyz", timeout=timeout)
            return r.status, r.body.decode("utf-8", "replace").strip()
        except TransportError as e:
            return 0, str(e)

    async def wait_ready(self, want=200, timeout=60, contains=None, with_log=False):
        """Polls /readyz until it answers `want` (with `contains` in its body); the seconds it
        took. Fail when the process exits or after `timeout` s, with the last answer (and the
        log's last lines with with_log)."""
        t0 = time.monotonic()
        while True:
            if not self.alive():
                raise Fail("%s exited with status %s%s" % (
                    self.label, self.proc.returncode, "\n" + self.log_tail() if with_log else ""))
            last = await self.readyz()
            if last[0] == want and (contains is None or contains in last[1]):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise Fail("%s: /readyz still answers %s %s after %.0f s, wanted %d%s%s" % (
                    self.label, last[0], last[1][:200], timeout, want,
                    " mentioning %r" % contains if contains else "",
                    "\n" + self.log_tail() if with_log else ""))
            await asyncio.sleep(0.1)

    async def metrics(self):
        """Its /metrics as {series: value}."""
        r = await self.client.request("GET", "/metrics", timeout=5)
        return parse_metrics(r.body)


def parse_metrics(body):
    """Prometheus text (bytes) as {series: value}, a series with its labels as written."""
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


# ---- Redis servers and Sentinels of a test's own -----------------------------------------------

def redis_server(procs, name, port, datadir, log_path, extra=()):
    """redis-server on HOST:port, its files in datadir (made), no persistence, replication
    without waiting; recorded in procs as name. The Popen."""
    os.makedirs(datadir, exist_ok=True)
    return procs.start(name, ["redis-server", "--port", str(port), "--bind", HOST, "--dir",
                              datadir, "--save", "", "--appendonly", "no", "--daemonize", "no",
                              "--repl-diskless-sync-delay", "0"] + list(extra),
                       log_path, "redis-server %s:%d" % (HOST, port))


def redis_sentinel(procs, name, port, conf, log_path):
    """redis-sentinel with the conf file (sentinel_conf) of one listening on HOST:port."""
    return procs.start(name, ["redis-sentinel", conf], log_path,
                       "redis-sentinel %s:%d" % (HOST, port))


# ---- the stack ---------------------------------------------------------------------------------

class Stack:
    """scripts/stack.sh with a fixed environment. var=None is the stack the caller's environment
    names (STACK_VAR, STACK_*_PORT, or the shared one under var/); var=DIR with ports={...} is a
    private one. log: a file for stack.sh's output, or None for ours."""

    def __init__(self, var=None, ports=None, log=None):
        self.env = dict(os.environ)
        if var is not None:
            self.env["STACK_VAR"] = var
        for k, v in (ports or {}).items():
            self.env[k] = str(v)
        self.var = self.env.get("STACK_VAR") or os.path.join(ROOT, "var")
        self.log = log

    def sh(self, *args, timeout=300):
        if self.log:
            with open(self.log, "ab") as out:
                p = subprocess.run([STACK_SH] + list(args), env=self.env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   timeout=timeout)
            expect(p.returncode == 0, "scripts/stack.sh %s failed (%d):\n%s"
                   % (" ".join(args), p.returncode, log_tail(self.log)))
        else:
            p = subprocess.run([STACK_SH] + list(args), env=self.env, stdin=subprocess.DEVNULL,
                               timeout=timeout)
            expect(p.returncode == 0, "scripts/stack.sh %s failed (%d)" % (" ".join(args),
                                                                         p.returncode))

    async def ash(self, *args, timeout=300):
        await asyncio.to_thread(self.sh, *args, timeout=timeout)

    def running(self):
        return subprocess.run([STACK_SH, "status"], env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60).returncode == 0

    def stack_env(self):
        """What `up` wrote to the env file: REDIS_URL, KAFKA_BROKERS, PG_DSN, ports."""
        path = os.path.join(self.var, "stack.env")
        expect(os.path.exists(path), "no %s: is the stack up? (scripts/stack.sh up)" % path)
        return read_env_file(path)

    def pid_of(self, server):
        try:
            with open(os.path.join(self.var, "run", server + ".pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
