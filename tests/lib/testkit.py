"""testkit.py - what every Python test driver needs: failures, reporting, ports, env files, logs.

Shared by tests/producer/integration_{api,faults,http_hostile}.py and by the sale driver
tests/e2e/flashsale.py (the demo and the chaos suite). Standard library only.

  Fail, expect(cond, detail)      a check that did not hold, or a step that could not be done
  Report()                        prints `ok - NAME` / `not ok - NAME: DETAIL`, counts both;
                                  keep_if_failed(dir, what), summary() -> exit status
  read_env_file(path) -> dict     the `export K=V` lines of a stack.env
  load_stack_env()                fills os.environ from var/stack.env when REDIS_URL is unset
  free_port(), port_free(port), pick_ports(n, avoid)
  log_tail(path, n, prefix)       the last lines of a log, indented for a TAP diagnostic
  worker_binary(name)             $BIN_DIR/NAME (default bin/NAME), as an absolute path
  setup_missing(env, binary)      what a driver lacks to run: unset settings, or the binary
  sentinel_conf(...)              the sentinel.conf of a Sentinel watching one primary
"""
import os
import random
import shlex
import shutil
import socket

from http11 import HOST

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


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

    def not_ok(self, name, detail):
        self.failed += 1
        print("not ok - %s: %s" % (name, " ".join(str(detail).split())), flush=True)

    def check(self, name, cond, detail=""):
        if cond:
            self.ok(name, detail)
        else:
            self.not_ok(name, detail)

    def keep_if_failed(self, logdir, what):
        """After the run: removes logdir when every check passed, else keeps it and says so,
        `# WHAT kept in LOGDIR` (what: e.g. "the producer's log is")."""
        if self.failed:
            print("# %s kept in %s" % (what, logdir), flush=True)
        else:
            shutil.rmtree(logdir, ignore_errors=True)

    def summary(self):
        """Prints `N passed, M failed`; the exit status of the run (0 when nothing failed)."""
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return 0 if self.failed == 0 else 1


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
