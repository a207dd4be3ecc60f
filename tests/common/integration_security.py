#!/usr/bin/env python3
"""integration_security.py - the workers against a Kafka that wants SASL_SSL and a PostgreSQL that
wants TLS and a password, and no secret in anything they print.

Run by integration_security.sh (which makes the work directory and, on exit, tears down the
private stack and every process recorded there). Two parts, run side by side:

  leaks     No server needed. bin/producer, bin/consumer and bin/reaper ($BIN_DIR) with every
            secret set to a value holding SECRET_MARK: `--help`; a start refused for a bad value
            (KAFKA_SASL_MECHANISM=GSSAPI), for a PG_DSN libpq cannot parse, for another worker's
            secret flag, for a wrong key passphrase; a start that logs its settings and stays
            unready (every server unreachable; PG_DSN as a postgresql:// URI with the password in
            it, REDIS_URL with one). Each must name the setting at fault and show no secret.
  stack     A private stack (scripts/stack.sh, STACK_VAR under the work directory, ports of its
            own) with a CA and certificates made here by openssl: the broker gets a SASL_SSL
            listener (PLAIN and SCRAM-SHA-512, client certificates required) beside the
            PLAINTEXT one stack.sh itself uses (STACK_KAFKA_EXTRA_CONFIG); PostgreSQL gets
            ssl=on and an hba_file that lets the test's role in only over TLS with its password
            (STACK_PG_EXTRA_CONFIG). A producer, a consumer and a reaper that know only the
            SASL_SSL listener (KAFKA_SECURITY_PROTOCOL=sasl_ssl, the CA, a client certificate
            with an encrypted key) and PG_DSN with sslmode=verify-full: they get ready, a sale
            opened and an order placed over HTTP reach PostgreSQL, and pg_stat_ssl shows every
            worker's session on TLS. Then reapers with a wrong Kafka password, a CA that did not
            sign the broker, no client certificate, a wrong PostgreSQL password, a PostgreSQL
            CA that did not sign the server: /readyz answers 503 naming Kafka or PostgreSQL and
            why. SCRAM-SHA-512: librdkafka before 2.6.1 cannot log in to a Kafka 4 broker with
            SCRAM (librdkafka#4895; Debian 12 has 2.0.2), so with such a librdkafka the check is
            that the worker warns at start and /readyz names the refused login; with a newer one,
            that the worker gets ready.

Everything the workers print (logs, /readyz, /metrics) is searched for SECRET_MARK, which every
secret and every wrong password holds. Prints `ok - NAME` / `not ok - NAME: DETAIL` per check
and, last, `N passed, M failed`. Standard library only (openssl, psql and java as commands).
"""
import argparse
import asyncio
import ctypes
import os
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from http11 import TransportError  # noqa: E402
from testkit import (ROOT, Fail, Procs, Report, Stack, Worker, command, expect,  # noqa: E402
                     interrupt_on_sigterm, log_tail, pick_ports, port_free, private_ports,
                     worker_binary)

SECRET_MARK = "s3cr3t"
KAFKA_PASSWORD = "s3cr3t-kafka-XYZ"
KEY_PASSPHRASE = "s3cr3t-key-XYZ"
PG_PASSWORD = "s3cr3t-pg-XYZ"
ADMIN = "s3cr3t-admin-XYZ"
PAYMENT = "s3cr3t-pay-XYZ"
REDIS_PASSWORD = "s3cr3t-redis-XYZ"
KAFKA_USER = "stockpipe-sec"
PG_ROLE = "sp_secure"
# The brief's ports; others are picked when one of these is taken.
PRIVATE_PORTS = {"STACK_REDIS_PORT": 44379, "STACK_PG_PORT": 44432, "STACK_KAFKA_PORT": 44092,
                 "STACK_KAFKA_CONTROLLER_PORT": 44093}
WORKERS = ("producer", "consumer", "reaper")
READY_S = 30       # a worker on a good configuration is ready within this
UNREADY_S = 20     # a worker on a bad one says why in /readyz within this


def librdkafka_version():
    """(number, text) of the librdkafka the workers link (the system's), e.g. (0x020002ff,
    "2.0.2")."""
    lib = ctypes.CDLL("librdkafka.so.1")
    lib.rd_kafka_version.restype = ctypes.c_int
    lib.rd_kafka_version_str.restype = ctypes.c_char_p
    return lib.rd_kafka_version(), lib.rd_kafka_version_str().decode()


class Outputs:
    """Every text the workers printed or answered, by label, to search for secrets."""

    def __init__(self):
        self.texts = []

    def add(self, label, text):
        self.texts.append((label, text))
        return text

    def leaks(self, texts=None):
        """The labels of the texts (all, or the (label, text) pairs given) that hold
        SECRET_MARK, each with the line around it."""
        out = []
        for label, text in (self.texts if texts is None else texts):
            i = text.find(SECRET_MARK)
            if i >= 0:
                start = text.rfind("\n", 0, i) + 1
                end = text.find("\n", i)
                out.append("%s: %s" % (label, text[start:end if end >= 0 else None][:300]))
        return out


# ---- certificates -------------------------------------------------------------------------------

def openssl(*args):
    command(["openssl"] + list(args), timeout=60)


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate whose key is
    encrypted with KEY_PASSPHRASE, and a second CA that signed nothing here. Paths by name."""
    p = {n: os.path.join(d, n) for n in (
        "ca.pem", "ca.key", "other-ca.pem", "other-ca.key", "server.crt", "server.key",
        "server.csr", "server.ext", "client.crt", "client.key", "client.csr", "client.ext",
        "broker-keystore.pem", "pg-server.key")}
    for ca, key, cn in (("ca.pem", "ca.key", "stockpipe test CA"),
                        ("other-ca.pem", "other-ca.key", "another CA")):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p[key], "-out", p[ca],
                "-days", "2", "-subj", "/CN=" + cn,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(p["server.ext"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p["server.key"], "-out",
            p["server.csr"], "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", p["server.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["server.crt"], "-days", "2", "-extfile", p["server.ext"])
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-aes-256-cbc",
            "-pass", "pass:" + KEY_PASSPHRASE, "-out", p["client.key"])
    with open(p["client.ext"], "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    openssl("req", "-new", "-key", p["client.key"], "-passin", "pass:" + KEY_PASSPHRASE, "-out",
            p["client.csr"], "-subj", "/CN=stockpipe-client")
    openssl("x509", "-req", "-in", p["client.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["client.crt"], "-days", "2", "-extfile", p["client.ext"])
    # The broker's PEM keystore: its key (PKCS#8, not encrypted) and certificate in one file.
    with open(p["broker-keystore.pem"], "w") as out:
        for n in ("server.key", "server.crt"):
            with open(p[n]) as f:
                out.write(f.read())
    # PostgreSQL wants its key owned by the user it runs as (postgres, when we are root), 0600.
    shutil.copyfile(p["server.key"], p["pg-server.key"])
    os.chmod(p["pg-server.key"], 0o600)
    if os.geteuid() == 0:
        shutil.chown(p["pg-server.key"], "postgres", "postgres")
    for n in ("ca.pem", "other-ca.pem", "server.crt", "client.crt"):
        os.chmod(p[n], 0o644)
    return p


# ---- the private stack ----------------------------------------------------------------------------

class SecureStack(Stack):
    """testkit.Stack on WORKDIR/stack with ports of its own, a SASL_SSL listener on sasl_port and
    PostgreSQL on TLS; boots in the background."""

    def __init__(self, workdir, certs):
        ports = private_ports(PRIVATE_PORTS)
        self.sasl_port = 44094 if 44094 not in ports.values() and port_free(44094) \
            else pick_ports(1, set(ports.values()))[0]
        kafka_conf = os.path.join(workdir, "kafka-extra.properties")
        pg_conf = os.path.join(workdir, "pg-extra.conf")
        hba = os.path.join(workdir, "pg_hba.conf")
        p, cp, sp = ports["STACK_KAFKA_PORT"], ports["STACK_KAFKA_CONTROLLER_PORT"], self.sasl_port
        with open(kafka_conf, "w") as f:
            f.write(
                "# integration_security.py: a SASL_SSL listener beside stack.sh's PLAINTEXT one\n"
                "listeners=PLAINTEXT://127.0.0.1:%d,CONTROLLER://127.0.0.1:%d,"
                "SASL_SSL://127.0.0.1:%d\n"
                "advertised.listeners=PLAINTEXT://127.0.0.1:%d,SASL_SSL://127.0.0.1:%d\n"
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                "SASL_SSL:SASL_SSL\n"
                "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN\n"
                "listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN\n"
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
                "listener.name.sasl_ssl.plain.sasl.jaas.config="
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                "user_%s=\"%s\";\n"
                "ssl.keystore.type=PEM\nssl.keystore.location=%s\n"
                "ssl.truststore.type=PEM\nssl.truststore.location=%s\n"
                "listener.name.sasl_ssl.ssl.client.auth=required\n"
                % (p, cp, sp, p, sp, KAFKA_USER, KAFKA_PASSWORD, certs["broker-keystore.pem"],
                   certs["ca.pem"]))
        with open(hba, "w") as f:
            f.write("# integration_security.py: the test's role only over TLS, with its password\n"
                    "hostssl all %s 127.0.0.1/32 scram-sha-256\n"
                    "host    all %s 127.0.0.1/32 reject\n"
                    "host    all all 127.0.0.1/32 trust\n" % (PG_ROLE, PG_ROLE))
        with open(pg_conf, "w") as f:
            f.write("ssl = on\nssl_cert_file = '%s'\nssl_key_file = '%s'\nhba_file = '%s'\n"
                    % (certs["server.crt"], certs["pg-server.key"], hba))
        for path in (kafka_conf, pg_conf, hba):
            os.chmod(path, 0o644)
        super().__init__(os.path.join(workdir, "stack"), ports,
                         log=os.path.join(workdir, "logs", "stack.log"))
        self.env["STACK_KAFKA_EXTRA_CONFIG"] = kafka_conf
        self.env["STACK_PG_EXTRA_CONFIG"] = pg_conf
        self.booting = None

    def start_boot(self):
        with open(self.log, "ab") as log:
            self.booting = subprocess.Popen([os.path.join(ROOT, "scripts", "stack.sh"), "up"],
                                            env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)

    async def wait_boot(self, timeout=120):
        end = time.monotonic() + timeout
        while self.booting.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.2)
        if self.booting.poll() is None:
            self.booting.kill()
            self.booting.wait()
            raise Fail("the private stack did not come up within %d s:\n%s"
                       % (timeout, log_tail(self.log)))
        expect(self.booting.returncode == 0, "scripts/stack.sh up failed (%d):\n%s"
               % (self.booting.returncode, log_tail(self.log)))

    def down(self):
        if self.booting is not None and self.booting.poll() is None:
            self.booting.kill()
            self.booting.wait()
        if os.path.isdir(self.var):
            try:
                self.sh("down", "--purge", timeout=120)
            except Fail as e:
                print("# stack down: %s" % e, flush=True)


def pg_admin_dsn(st):
    """The private stack's PostgreSQL as its superuser (trust, from 127.0.0.1)."""
    return re.sub(r"\buser=\S+", "user=postgres", st["PG_DSN"])


def dbname(st):
    m = re.search(r"\bdbname=(\S+)", st["PG_DSN"])
    return m.group(1) if m else "stockpipe"


def psql(dsn, sql, *params):
    args = ["psql", dsn, "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1"]
    for i, v in enumerate(params, 1):
        args += ["-v", "p%d=%s" % (i, v)]
    return command(args, input_text=sql, timeout=20).strip()


def kafka_tool(*args):
    """A Kafka command-line tool from the broker's jars (as scripts/stack.sh runs them)."""
    return command(["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx256m",
                    "-XX:-UsePerfData",
                    "-Dlog4j2.configurationFile=file:%s" % os.path.join(
                        ROOT, "deploy", "kafka-local", "log4j2.properties"),
                    "-cp", os.path.join(ROOT, "var", "kafka-libs", "*")] + list(args), timeout=60)


# ---- the workers' settings ----------------------------------------------------------------------

# The settings these tests choose, over whatever the caller's environment (the shared stack's env)
# holds: the servers, the topics (their defaults), and the security settings, which are not set
# unless a test sets them ("" is not set).
BLANK = dict({k: "" for k in (
    "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CA_LOCATION", "KAFKA_SSL_CERTIFICATE_LOCATION",
    "KAFKA_SSL_KEY_LOCATION", "KAFKA_SSL_KEY_PASSWORD", "ADMIN_TOKEN", "PAYMENT_TOKEN")},
    KAFKA_TOPIC="stockpipe.events", KAFKA_DLQ_TOPIC="stockpipe.events.dlq",
    KAFKA_GROUP="stockpipe-consumer")


def kafka_security(certs, mechanism="PLAIN", **over):
    env = dict(KAFKA_SECURITY_PROTOCOL="sasl_ssl", KAFKA_SASL_MECHANISM=mechanism,
               KAFKA_SASL_USERNAME=KAFKA_USER, KAFKA_SASL_PASSWORD=KAFKA_PASSWORD,
               KAFKA_SSL_CA_LOCATION=certs["ca.pem"],
               KAFKA_SSL_CERTIFICATE_LOCATION=certs["client.crt"],
               KAFKA_SSL_KEY_LOCATION=certs["client.key"], KAFKA_SSL_KEY_PASSWORD=KEY_PASSPHRASE,
               ADMIN_TOKEN=ADMIN, PAYMENT_TOKEN=PAYMENT)
    env.update(over)
    return env


def pg_conninfo(port, db, certs, password=PG_PASSWORD, ca=None):
    return ("host=localhost port=%d dbname=%s user=%s password=%s sslmode=verify-full "
            "sslrootcert=%s connect_timeout=5" % (port, db, PG_ROLE, password, ca or certs["ca.pem"]))


def pg_uri(port, db, certs):
    return ("postgresql://%s:%s@localhost:%d/%s?sslmode=verify-full&sslrootcert=%s"
            "&connect_timeout=5" % (PG_ROLE, PG_PASSWORD, port, db, certs["ca.pem"]))


# ---- part 1: no server --------------------------------------------------------------------------

async def run_briefly(argv, env, timeout=10):
    """(exit status, stdout + stderr) of argv with our environment and env on top; killed after
    timeout s (status None)."""
    full = dict(os.environ)
    full.update(env)
    p = await asyncio.create_subprocess_exec(*argv, env=full, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), timeout)
        return p.returncode, out.decode("utf-8", "replace")
    except asyncio.TimeoutError:
        p.kill()
        out, _ = await p.communicate()
        return None, out.decode("utf-8", "replace")


def expect_unleaked(outs, label, text):
    outs.add(label, text)
    leaks = outs.leaks([(label, text)])
    expect(not leaks, "a secret is shown: %s" % "; ".join(leaks))


async def part_leaks(rep, outs, certs, logdir, procs):
    closed = pick_ports(3)  # nothing listens there
    env = dict(BLANK)
    env.update(kafka_security(certs), KAFKA_BROKERS="127.0.0.1:%d" % closed[0],
               REDIS_URL="redis://:%s@127.0.0.1:%d/0" % (REDIS_PASSWORD, closed[1]),
               PG_DSN=pg_conninfo(closed[2], "stockpipe", certs))

    async def help_text():
        for w in WORKERS:
            rc, out = await run_briefly([worker_binary(w), "--help"], env)
            expect_unleaked(outs, "%s --help" % w, out)
            expect(rc == 0 and "KAFKA_SASL_PASSWORD" in out and "KAFKA_SSL_KEY_PASSWORD" in out,
                   "%s --help exited %s without the security settings:\n%s" % (w, rc, out[-300:]))
        return "each lists the settings, no value"
    await rep.run_check("--help of every worker shows no secret", help_text, 30)

    async def refused(label, want, over, args=(), workers=WORKERS):
        e = dict(env)
        e.update(over)
        for w in workers:
            rc, out = await run_briefly([worker_binary(w)] + list(args), e)
            expect_unleaked(outs, "%s %s" % (w, label), out)
            expect(rc not in (0, None), "%s started (exit %s) with %s:\n%s"
                   % (w, rc, label, out[-400:]))
            expect(any(x in out for x in want), "%s's error does not name %s:\n%s"
                   % (w, " or ".join(want), out[-400:]))
        return "exit 2, names %s" % want[0]

    await rep.run_check(
        "a bad KAFKA_SASL_MECHANISM stops every worker, named, no secret shown",
        lambda: refused("KAFKA_SASL_MECHANISM=GSSAPI", [r'KAFKA_SASL_MECHANISM is \"GSSAPI\"'],
                        {"KAFKA_SASL_MECHANISM": "GSSAPI"}), 30)
    await rep.run_check(
        "a PG_DSN libpq cannot parse stops every worker without quoting its password",
        lambda: refused("PG_DSN unparsable", ["PG_DSN is not a libpq conninfo"],
                        {"PG_DSN": "host=db password=%s oops" % PG_PASSWORD}), 30)
    await rep.run_check(
        "another worker's secret flag is refused without its value",
        lambda: refused("--admin-token", ["--admin-token is not a setting"], {},
                        ["--admin-token=" + ADMIN], ("consumer", "reaper")), 30)
    await rep.run_check(
        "a misspelt flag holding a DSN is refused without its value",
        lambda: refused("--pg-dns=URI", ['argument \\"--pg-dns\\"', 'command \\"--pg-dns\\"'], {},
                        ["--pg-dns=postgresql://%s:%s@h/db" % (PG_ROLE, PG_PASSWORD)],
                        ("consumer", "reaper")), 30)
    await rep.run_check(
        "a URI PG_DSN whose password holds a '/' is refused (libpq would quote it)",
        lambda: refused("PG_DSN URI with '/'", ["libpq would not read as such"],
                        {"PG_DSN": "postgresql://%s:a/%s@127.0.0.1:%d/db"
                         % (PG_ROLE, PG_PASSWORD, closed[2])}), 30)
    await rep.run_check(
        "a wrong key passphrase stops every worker, naming the key, no secret shown",
        lambda: refused("wrong KAFKA_SSL_KEY_PASSWORD", ["KAFKA_SSL_KEY", "ssl.key.location"],
                        {"KAFKA_SSL_KEY_PASSWORD": "wr0ng-" + KEY_PASSPHRASE}), 30)

    async def unready_start():
        details = []
        ws = []
        for i, w in enumerate(WORKERS):
            e = dict(env, WORKER_ID="sec-leak-%d-%s" % (os.getpid(), w))
            if w == "producer":  # the URI form, with the password in it and in a parameter
                e["PG_DSN"] = ("postgresql://%s:%s@127.0.0.1:%d/x?sslmode=verify-full&"
                               "sslrootcert=%s&sslpassword=%s" % (PG_ROLE, PG_PASSWORD, closed[2],
                                                                   certs["ca.pem"], KEY_PASSPHRASE))
            wk = Worker(procs, "leak-" + w, worker_binary(w), os.path.join(logdir, "leak-%s.log" % w))
            wk.start(e)
            ws.append(wk)
        await asyncio.sleep(3)
        for wk in ws:
            status, body = await wk.readyz()
            outs.add("%s /readyz" % wk.name, body)
            try:
                m = await wk.client.request("GET", "/metrics", timeout=5)
                outs.add("%s /metrics" % wk.name, m.body.decode("utf-8", "replace"))
            except TransportError:
                pass
            code = await wk.stop(10)
            with open(wk.log_path, encoding="utf-8", errors="replace") as f:
                log = f.read()
            expect_unleaked(outs, wk.name + " log", log)
            expect("config KAFKA_SASL_PASSWORD=(set)" in log and "config PG_DSN=" in log,
                   "%s did not log its settings:\n%s" % (wk.name, log[-400:]))
            shown = re.search(r"config PG_DSN=([^\"]*)", log).group(1)
            expect("***" in shown, "%s logged PG_DSN without hiding its password: %s"
                   % (wk.name, shown))
            details.append("%s /readyz %s, exit %s" % (wk.name.split("-")[1], status, code))
        return "; ".join(details)
    await rep.run_check("a start against unreachable servers logs its settings, no secret shown",
                        unready_start, 40)


# ---- part 2: the secure stack -------------------------------------------------------------------

async def order_reaches_pg(producer, admin_dsn):
    sku = random.randint(10**9, 2**53 - 1)
    r = await producer.client.request("POST", "/v1/skus", {
        "sku_id": sku, "stock": 5, "per_user_limit": 1, "pay_timeout_s": 600},
        {"Authorization": "Bearer " + ADMIN}, timeout=15)
    expect(r.status == 201, "opening SKU %d answered %r" % (sku, r))
    r = await producer.client.request("POST", "/v1/orders", {"user_id": 42, "sku_id": sku,
                                                             "qty": 1}, timeout=15)
    j = r.json()
    expect(r.status == 202 and isinstance(j, dict) and j.get("order_id"),
           "the order answered %r" % r)
    order_id = j["order_id"]
    end = time.monotonic() + 20
    while True:
        got = await asyncio.to_thread(
            psql, admin_dsn, "SELECT status FROM orders WHERE order_id = :'p1'", order_id)
        if got == "pending":
            return "order %s of SKU %d is pending in PostgreSQL" % (order_id, sku)
        expect(time.monotonic() < end, "order %s is not in PostgreSQL after 20 s (%r)"
               % (order_id, got))
        await asyncio.sleep(0.2)


async def sessions_on_tls(admin_dsn, worker_ids):
    rows = await asyncio.to_thread(
        psql, admin_dsn,
        "SELECT a.application_name, s.ssl, coalesce(s.version, '') FROM pg_stat_activity a "
        "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = :'p1' ORDER BY 1", PG_ROLE)
    sessions = [r.split("|") for r in rows.splitlines() if r]
    expect(sessions, "no session of %s in pg_stat_activity" % PG_ROLE)
    plain = [s for s in sessions if s[1] != "t"]
    expect(not plain, "sessions without TLS: %s" % plain)
    apps = {s[0] for s in sessions}
    missing = [w for w in worker_ids if w not in apps]
    expect(not missing, "no session of %s (sessions: %s)" % (missing, sorted(apps)))
    return "%d sessions of %s, all TLS (%s)" % (len(sessions), PG_ROLE,
                                                ", ".join(sorted({s[2] for s in sessions})))


async def unready_reason(wk, backend, words, outs):
    """Waits until wk's /readyz answers 503 naming backend and one of words; the reason."""
    end = time.monotonic() + UNREADY_S
    last = (0, "")
    while time.monotonic() < end:
        if not wk.alive():
            break
        last = await wk.readyz()
        outs.add(wk.name + " /readyz", last[1])
        if last[0] == 503 and backend in last[1] and any(w in last[1] for w in words):
            return last[1]
        await asyncio.sleep(0.25)
    raise Fail("%s: /readyz answered %s %s, wanted 503 naming %s and %s\n%s"
               % (wk.name, last[0], last[1][:300], backend, " or ".join(words), wk.log_tail()))


async def part_stack(rep, outs, certs, stack, logdir, procs):
    names = ["secure workers ready over SASL_SSL and PostgreSQL verify-full",
             "an order placed over HTTP reaches PostgreSQL",
             "the workers' PostgreSQL sessions use TLS (pg_stat_ssl)"]
    bad_names = ["a wrong Kafka password: /readyz 503 naming Kafka's refused login",
                 "a CA that did not sign the broker: /readyz 503 naming Kafka's certificate",
                 "no client certificate: /readyz 503 naming Kafka's TLS",
                 "a wrong PostgreSQL password: /readyz 503 naming PostgreSQL",
                 "a CA that did not sign PostgreSQL: /readyz 503 naming its certificate",
                 "SCRAM-SHA-512 over SASL_SSL"]
    t0 = time.monotonic()
    try:
        await stack.wait_boot()
        st = stack.stack_env()
        admin_dsn = pg_admin_dsn(st)
        await asyncio.to_thread(
            kafka_tool, "kafka.admin.ConfigCommand", "--bootstrap-server", st["KAFKA_BROKERS"],
            "--alter", "--add-config", "SCRAM-SHA-512=[iterations=4096,password=%s]"
            % KAFKA_PASSWORD, "--entity-type", "users", "--entity-name", KAFKA_USER)
        await asyncio.to_thread(psql, admin_dsn,
                                "CREATE ROLE %s LOGIN SUPERUSER PASSWORD :'p1'" % PG_ROLE,
                                PG_PASSWORD)
        rep.ok("the private stack with a SASL_SSL listener and PostgreSQL on TLS is up",
               "%.0f s; SASL_SSL on 127.0.0.1:%d" % (time.monotonic() - t0, stack.sasl_port))
    except Fail as e:
        rep.not_ok("the private stack with a SASL_SSL listener and PostgreSQL on TLS is up", e)
        rep.skip(names + bad_names + ["every worker exits 0 on SIGTERM"], "no stack")
        return

    pg_port = int(st["STACK_PG_PORT"])
    db = dbname(st)
    base = dict(BLANK)
    base.update(REDIS_URL=st["REDIS_URL"], KAFKA_TOPIC=st["KAFKA_TOPIC"],
                KAFKA_DLQ_TOPIC=st["KAFKA_DLQ_TOPIC"],
                KAFKA_BROKERS="127.0.0.1:%d" % stack.sasl_port)  # the SASL_SSL listener only
    good = dict(base, **kafka_security(certs), PG_DSN=pg_conninfo(pg_port, db, certs))
    workers = {}
    for w in WORKERS:
        e = dict(good, WORKER_ID="sec-%d-%s" % (os.getpid(), w))
        if w == "producer":
            e["PG_DSN"] = pg_uri(pg_port, db, certs)
        wk = Worker(procs, w, worker_binary(w), os.path.join(logdir, "%s.log" % w))
        wk.start(e)
        workers[w] = (wk, e["WORKER_ID"])

    # The reapers on a bad configuration start now, and are asked once the good ones are ready.
    bad_env = [
        ("kafka", ["SASL authentication"], {"KAFKA_SASL_PASSWORD": "wr0ng-" + KAFKA_PASSWORD}),
        ("kafka", ["certificate verify failed"], {"KAFKA_SSL_CA_LOCATION": certs["other-ca.pem"]}),
        # TLS 1.3: the broker's alert may come after the client's handshake ended, as a cut.
        ("kafka", ["SSL", "certificate", "Disconnected"], {"KAFKA_SSL_CERTIFICATE_LOCATION": "",
                                           "KAFKA_SSL_KEY_LOCATION": "",
                                           "KAFKA_SSL_KEY_PASSWORD": ""}),
        ("postgresql", ["password authentication failed"],
         {"PG_DSN": pg_conninfo(pg_port, db, certs, password="wr0ng-" + PG_PASSWORD)}),
        ("postgresql", ["certificate verify failed"],
         {"PG_DSN": pg_conninfo(pg_port, db, certs, ca=certs["other-ca.pem"])}),
    ]
    bad = []
    for i, (backend, words, over) in enumerate(bad_env):
        wk = Worker(procs, "bad-%d" % i, worker_binary("reaper"),
                    os.path.join(logdir, "bad-%d.log" % i))
        wk.start(dict(good, WORKER_ID="sec-bad-%d-%d" % (os.getpid(), i), **over))
        bad.append((wk, backend, words))
    number, version = librdkafka_version()
    scram = Worker(procs, "scram", worker_binary("reaper"), os.path.join(logdir, "scram.log"))
    scram.start(dict(good, WORKER_ID="sec-scram-%d" % os.getpid(),
                     **kafka_security(certs, "SCRAM-SHA-512")))

    async def all_ready():
        waits = await asyncio.gather(*(wk.wait_ready(timeout=READY_S, with_log=True)
                                       for wk, _ in workers.values()))
        return ", ".join("%s %.1f s" % (w, s) for w, s in zip(workers, waits))
    ready = await rep.run_check(names[0], all_ready, READY_S + 5)
    if ready:
        await rep.run_check(names[1], lambda: order_reaches_pg(workers["producer"][0], admin_dsn),
                            30)
        await rep.run_check(names[2], lambda: sessions_on_tls(
            admin_dsn, [wid for _, wid in workers.values()]), 20)
    else:
        rep.skip(names[1:], "the workers did not get ready")

    for name, (wk, backend, words) in zip(bad_names, bad):
        await rep.run_check(name, lambda wk=wk, b=backend, ws=words: unready_reason(
            wk, b + " unreachable", ws, outs), UNREADY_S + 5)

    async def scram_check():
        if number >= 0x020601ff:
            s = await scram.wait_ready(timeout=READY_S, with_log=True)
            return "ready in %.1f s (librdkafka %s)" % (s, version)
        reason = await unready_reason(scram, "kafka unreachable", ["SASL authentication"], outs)
        with open(scram.log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
        expect("librdkafka#4895" in log, "no warning about librdkafka %s and SCRAM in the log:\n%s"
               % (version, scram.log_tail()))
        print("# NOTE: librdkafka %s cannot log in to Kafka 4 with SCRAM (librdkafka#4895, fixed "
              "in 2.6.1): the worker warns at start and /readyz says: %s" % (version, reason[:200]),
              flush=True)
        return "librdkafka %s: refused as known, warned at start" % version
    await rep.run_check(bad_names[5], scram_check, READY_S + 5)

    async def all_stop():
        codes = {}
        for w, (wk, _) in workers.items():
            codes[w] = await wk.stop(20)
        for wk, _, _ in bad:
            await wk.stop(20)
        await scram.stop(20)
        expect(all(c == 0 for c in codes.values()), "exit statuses %s" % codes)
        return ", ".join("%s %s" % kv for kv in codes.items())
    await rep.run_check("every worker exits 0 on SIGTERM", all_stop, 90)

    for wk in [wk for wk, _ in workers.values()] + [wk for wk, _, _ in bad] + [scram]:
        with open(wk.log_path, encoding="utf-8", errors="replace") as f:
            outs.add(wk.name + " log", f.read())


# ---- main ---------------------------------------------------------------------------------------

async def main_async(rep, workdir):
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    procs = Procs(os.path.join(workdir, "pids"))
    outs = Outputs()
    certdir = os.path.join(workdir, "certs")
    os.makedirs(certdir)
    os.chmod(certdir, 0o755)
    stack = None
    try:
        certs = await asyncio.to_thread(make_certs, certdir)
        stack = SecureStack(workdir, certs)
        stack.start_boot()  # the JVM boots while the part without servers runs
        await part_leaks(rep, outs, certs, logdir, procs)
        await part_stack(rep, outs, certs, stack, logdir, procs)
        leaks = outs.leaks()
        rep.check("no secret in anything the workers printed or answered", not leaks,
                  "%d texts searched" % len(outs.texts) if not leaks else "; ".join(leaks[:5]))
    except Fail as e:
        rep.not_ok("setup", e)
    finally:
        procs.stop_all()
        if stack is not None:
            await asyncio.to_thread(stack.down)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True,
                    help="where everything goes (made by integration_security.sh)")
    args = ap.parse_args()
    interrupt_on_sigterm()
    rep = Report()
    missing = [w for w in WORKERS if not os.access(worker_binary(w), os.X_OK)]
    missing += [c for c in ("openssl", "psql", "java") if shutil.which(c) is None]
    if missing:
        rep.not_ok("setup", "missing %s" % ", ".join(missing))
        return rep.summary()
    os.chmod(args.workdir, 0o755)  # as root, PostgreSQL runs as `postgres` and reads files here
    t0 = time.monotonic()
    try:
        asyncio.run(main_async(rep, args.workdir))
    except KeyboardInterrupt:
        rep.not_ok("run", "interrupted")
    print("# %.0f s%s" % (time.monotonic() - t0, "; logs kept in %s" % args.workdir
                          if rep.failed else ""), flush=True)
    return rep.summary()


if __name__ == "__main__":
    sys.exit(main())
