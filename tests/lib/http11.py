"""http11.py - a small HTTP/1.1 keep-alive client over asyncio streams, for the tests.

Shared by tests/producer/integration_api.py (and through it integration_faults.py),
integration_http_hostile.py, tests/lib/testkit.py (its Worker's client) and the sale driver
tests/e2e/flashsale.py (the demo and the chaos suite). Standard library only.

  Client(port).request(method, path, body=None, headers=None, timeout=REQ_TIMEOUT) -> Response
      from a pool of keep-alive connections to 127.0.0.1:port; raises TransportError when there
      is no answer (a GET is replayed once on a kept-alive connection the server had closed).
  Conn(port).exchange(method, path, body=None, headers=None) -> Response
      one connection, for callers that manage their own; raises OSError and friends.
  Conn(port).request(method, path, body=None, headers=None, timeout=REQ_TIMEOUT) -> Response
      the same within a timeout; on any failure the connection is closed and the error raised.
  Conn(port).exchange_prepared(prepare(method, path, ...), timeout) -> Response
      a request encoded once, with a minimal parser: for bursts.
  Conn(port).exchange_raw(data) -> Response
      bytes sent as they are (malformed, partial, or none when the server speaks first), then
      one response read with the parser of exchange().
A body that is not bytes or str is sent as JSON.
"""
import asyncio
import json
import time

HOST = "127.0.0.1"
REQ_TIMEOUT = 10.0    # per request
IDLE_MAX = 5.0        # reuse a keep-alive connection only if idle for less (the server closes at 10 s)


class TransportError(Exception):
    pass


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error(self):
        j = self.json()
        return j.get("error") if isinstance(j, dict) else None

    def __repr__(self):
        return "%d %s" % (self.status, self.body[:120].decode("utf-8", "replace"))


def encode_body(body):
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body, separators=(",", ":")).encode()


def prepare(method, path, body=None, headers=None, port=0):
    """A request encoded once, for Conn.exchange_prepared() and Conn.exchange_raw(). A header
    given as None is left out (Host, Content-Type)."""
    data = encode_body(body)
    hdrs = {"Host": "%s:%d" % (HOST, port)}
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    for k, v in (headers or {}).items():
        if v is None:
            hdrs.pop(k, None)
        else:
            hdrs[k] = v
    if data is not None or method in ("POST", "PUT"):
        hdrs["Content-Length"] = str(len(data or b""))
    head = "%s %s HTTP/1.1\r\n%s\r\n" % (method, path,
                                          "".join("%s: %s\r\n" % kv for kv in hdrs.items()))
    return head.encode("latin-1") + (data or b"")


class Conn:
    """One keep-alive connection; connects lazily, closes itself when the server says so."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None
        self.last = 0.0
        self.got_bytes = False  # did the current exchange receive anything?

    def usable(self):
        return (self.writer is not None and not self.writer.is_closing()
                and not self.reader.at_eof() and time.monotonic() - self.last < IDLE_MAX)

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.last = time.monotonic()

    async def ensure_connected(self):
        """Closes a connection no longer usable (see usable()), connects when there is none."""
        if self.writer is not None and not self.usable():
            self.close()
        if self.writer is None:
            await self.connect()

    async def exchange_prepared(self, data, timeout):
        """Sends one request already encoded (see prepare()) and reads the response with a
        minimal parser: the status line, Content-Length and Connection: close (the workers
        always send a length). For bursts, where the client's own CPU bounds the rate: about
        half the cost of exchange() under asyncio.wait_for. No answer within `timeout` s aborts
        the connection and raises TimeoutError; otherwise raises like exchange()."""
        await self.ensure_connected()
        self.got_bytes = False
        transport = self.writer.transport
        timer = asyncio.get_running_loop().call_later(timeout, transport.abort)
        try:
            self.writer.write(data)
            head = await self.reader.readuntil(b"\r\n\r\n")
            self.got_bytes = True
            status = int(head[9:12])
            low = head.lower()
            k = low.find(b"\r\ncontent-length:")
            if k < 0:
                raise ValueError("no Content-Length in %r" % head[:200])
            body = await self.reader.readexactly(int(head[k + 17:head.index(b"\r\n", k + 2)]))
        except (OSError, asyncio.IncompleteReadError) as e:
            if timer.when() <= asyncio.get_running_loop().time():
                raise TimeoutError("no answer within %g s" % timeout) from e
            raise
        finally:
            timer.cancel()
        if b"\r\nconnection: close" in low or not head.startswith(b"HTTP/1.1"):
            self.close()
        else:
            self.last = time.monotonic()
        return Response(status, {}, body)

    async def exchange(self, method, path, body=None, headers=None):
        """Sends one request and reads its response; raises OSError/IncompleteReadError."""
        return await self.exchange_raw(prepare(method, path, body, headers, self.port), method)

    async def request(self, method, path, body=None, headers=None, timeout=REQ_TIMEOUT):
        """exchange() within `timeout` s; on any failure (the timeout too) the connection is
        closed, the next request makes a new one, and the error is raised."""
        try:
            return await asyncio.wait_for(self.exchange(method, path, body, headers), timeout)
        except BaseException:
            self.close()
            raise

    async def exchange_raw(self, data, method="GET"):
        """Sends `data` as it is - a request prepare() made, or bytes no client would send
        (malformed, partial; b"" sends nothing, for an answer the server gives unasked) - and
        reads one response (to `method`, which decides whether it has a body) with the parser
        of exchange(). Raises OSError/IncompleteReadError when the server closes instead."""
        await self.ensure_connected()
        self.got_bytes = False
        if data:
            self.writer.write(data)
            await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        self.got_bytes = True
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest.split(" ", 1)[0])
        rh = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                rh[k.strip().lower()] = v.strip()
        keep = version == "HTTP/1.1"
        conn_hdr = rh.get("connection", "").lower()
        if "close" in conn_hdr or (version == "HTTP/1.0" and "keep-alive" not in conn_hdr):
            keep = False
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            resp_body = b""
        elif "chunked" in rh.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            resp_body = b"".join(parts)
        elif "content-length" in rh:
            resp_body = await self.reader.readexactly(int(rh["content-length"]))
        else:
            resp_body = await self.reader.read()  # delimited by the close
            keep = False
        if status == 413:
            keep = False  # the server did not read the body: the connection cannot go on
        if keep:
            self.last = time.monotonic()
        else:
            self.close()
        return Response(status, rh, resp_body)


class Client:
    """A pool of keep-alive connections to one producer."""

    def __init__(self, port):
        self.port = port
        self.idle = []

    async def request(self, method, path, body=None, headers=None, timeout=REQ_TIMEOUT):
        for attempt in (0, 1):
            conn = None
            while self.idle and conn is None:
                c = self.idle.pop()
                if c.usable():
                    conn = c
                else:
                    c.close()
            reused = conn is not None
            conn = conn or Conn(self.port)
            try:
                resp = await asyncio.wait_for(conn.exchange(method, path, body, headers), timeout)
            except asyncio.TimeoutError:
                conn.close()
                raise TransportError("%s %s: no answer within %gs" % (method, path, timeout))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as e:
                conn.close()
                # A kept-alive connection the server closed before reading the request: replay
                # once, but only requests that are safe to repeat.
                if reused and not conn.got_bytes and method in ("GET", "HEAD") and attempt == 0:
                    continue
                raise TransportError("%s %s: %s: %s" % (method, path, type(e).__name__, e))
            if conn.writer is not None:
                self.idle.append(conn)
            return resp

    def close(self):
        for c in self.idle:
            c.close()
        self.idle = []
