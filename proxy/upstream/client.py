"""The upstream client: a keep-alive connection pool per credential, on llhttp (``httptools``).

One ``UpstreamClient`` per credential keeps idle connections per (scheme, host,
port, SSL context): client certificates rotate, and a new context simply starts
a new pool while the old one's connections age out. Redirects are passed
through, never followed; bodies are not decompressed; no proxy settings from the
environment; hop-by-hop headers are dropped both ways (``strip_hop_by_hop``);
every address is checked by the ``AddressPolicy`` as it is connected to
(``dial``). Transport failures become ``UpstreamError`` / ``UpstreamTimeout``
with the audit reasons ``upstream_connect``, ``upstream_address_denied``,
``upstream_bad_framing`` and ``upstream_failed``.

A pooled connection the upstream closed while it sat idle is retried once on a
new one — only when not a byte of the answer arrived, the body is replayable
and the method idempotent (RFC 9110 §9.2.2: the upstream may have acted on
the request before it closed).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from proxy.errors import AddressDenied, BadAnswer, HeadTimeout, UpstreamError, UpstreamTimeout
from proxy.upstream.address_policy import AddressPolicy
from proxy.upstream.answer import UpstreamResponse
from proxy.upstream.connection import Connection
from proxy.upstream.dial import Resolver, dial, resolve
from proxy.upstream.hop_by_hop import HOP_BY_HOP, strip_hop_by_hop  # noqa: F401 - imported from here too
from proxy.upstream.outbound import Outbound

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
KEEPALIVE_S = 15.0  # an idle connection older than this is closed rather than reused (aiohttp's default)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when there is no body
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})
_TOKENS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\n[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    if not ca_file:
        return _system_context()
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=ca_file)
    return ctx


@functools.cache
def _system_context() -> ssl.SSLContext:
    # Loading the system CAs takes ~0.1 s; credentials without their own CA share one context.
    return ssl.create_default_context()


# Method and header names already found to be tokens: a set lookup per name instead of the regex (whether a text
# is a token never changes, so this cannot go stale). Bounded, since callers choose their header names.
_TOKEN_NAMES: set[str] = set()
_TOKEN_NAMES_MAX = 4096


def _all_tokens(method: str, headers: CIMultiDict[str]) -> bool:
    names = [method, *headers.keys()]
    if not _TOKENS.fullmatch("\n".join(names)):
        return False
    if len(_TOKEN_NAMES) < _TOKEN_NAMES_MAX:
        _TOKEN_NAMES.update(names)
    return True


def request_head(out: Outbound, host: str) -> tuple[bytes, int | None]:
    """The request line and headers as bytes, and the body's length (``None``: chunked). Refuses (``ValueError``)
    a header name that is not a token, and CR, LF or NUL anywhere, so no value can start another header."""
    body = out.body
    if body is None:
        length = 0 if out.method in _BODY_METHODS else None
    elif isinstance(body, (bytes, bytearray, memoryview)):
        length = len(body)
    else:
        declared = out.headers.get("Content-Length")
        length = int(declared) if declared is not None and declared.isdigit() else None
    target = out.base.raw_path.rstrip("/") + out.path + ("?" + out.query if out.query else "")
    headers = out.headers
    if "Host" in headers or "Content-Length" in headers or "Transfer-Encoding" in headers:  # set by a signer
        fields = [(k, v) for k, v in headers.items() if k.lower() not in _FRAMING]
    else:
        fields = headers.items()  # usually: nothing to leave out, so no list is built
    lines = len(fields) + 3  # request line, Host, the fields, the blank line
    framing = ""
    if length is not None:
        if length or out.method in _BODY_METHODS or body is not None:
            framing = f"Content-Length: {length}\r\n"
            lines += 1
    elif body is not None:
        framing = "Transfer-Encoding: chunked\r\n"
        lines += 1
    # ": ".join per (name, value) pair and one "\r\n".join, both in C: no Python-level step per header
    text = "\r\n".join(map(": ".join, fields))
    text = (f"{out.method} {target} HTTP/1.1\r\nHost: {headers.get('Host', host)}\r\n"
            + (text + "\r\n" if text else "") + framing + "\r\n")
    if (text.count("\n") != lines or text.count("\r") != lines or "\x00" in text
            or " " in target
            or not (out.method in _TOKEN_NAMES and _TOKEN_NAMES.issuperset(headers.keys())
                    or _all_tokens(out.method, headers))):
        raise ValueError("request head would not survive the wire")
    return text.encode("utf-8", "surrogateescape"), length


def head_failure(exc: BadAnswer | HeadTimeout) -> UpstreamError:
    """What the caller is told when the answer's head never came: 504 after the read timeout, else 502."""
    if isinstance(exc, HeadTimeout):
        return UpstreamTimeout("upstream sent no answer within the read timeout")
    return UpstreamError(exc.why, reason=exc.reason)


class _Pool:
    """Idle connections per key, and the count of open ones, bounded by ``limit`` across keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.idle: dict[tuple, deque[Connection]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self, key: tuple, now: float) -> Connection | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been dropped by the upstream
            # Not lost, not closing (aborted, or closed by the transport, before connection_lost took it out of
            # the pool), not idle too long. An idle connection has a transport: it carried an answer.
            if not conn.lost and not conn.transport.is_closing() and now - conn.idle_since < KEEPALIVE_S:
                conn.reused = True
                return conn
            conn.abort()
        return None

    def put(self, conn: Connection) -> None:
        conn.idle_since = conn.loop.time()
        idle = self.idle.get(conn.key)
        if idle is None:  # not setdefault: that would build a deque per request to throw away
            idle = self.idle[conn.key] = deque()
        idle.append(conn)
        if self._waiters:
            self._wake()

    def lost(self, conn: Connection) -> None:
        idle = self.idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self.open -= 1
        self._wake()

    def close_one_idle(self) -> None:
        """Make room under the limit by closing the longest-idle connection of any key."""
        oldest = min((q[0] for q in self.idle.values() if q), key=lambda c: c.idle_since, default=None)
        if oldest is not None:
            self.idle[oldest.key].popleft()
            oldest.abort()

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in list(idle):
                conn.abort()
        self.idle.clear()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request to one upstream base goes, worked out once per base: the pool key, the ``Host`` value and
    the path prefix (``request_head`` derives the same from an ``Outbound``)."""

    key: tuple
    host: str
    prefix: str
    host_line: bytes  # b"Host: <host>\r\n"


class UpstreamClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float, ssl_ctx: ssl.SSLContext | None = None,
                 limit: int = 256, ssl_provider: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
                 address_policy: AddressPolicy | None = None, resolver: Resolver = resolve) -> None:
        self._ssl = ssl_ctx or ssl_context()
        # Asked before each request (client certificates rotate); pools are kept per context.
        self._ssl_provider = ssl_provider
        self._addresses = address_policy or AddressPolicy()
        self._resolver = resolver
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool = _Pool(limit)
        self._targets: dict[URL, Target] = {}
        self._last_base: URL | None = None  # the base last asked for, and its target
        self._last: Target | None = None
        self.closed = False

    def target(self, base: URL) -> Target | None:
        """The fixed ``Target`` of ``base``; None while the SSL context is asked for per request (a client
        certificate that rotates)."""
        if base is self._last_base:
            return self._last  # nearly always the credential's own base: no URL hashed for the lookup
        found = self._targets.get(base)
        if found is None:
            if self._ssl_provider is not None:
                return None
            tls = base.scheme == "https"
            host = base.host or ""
            host_header = base.host_port_subcomponent or host
            found = Target((tls, host, base.port or (443 if tls else 80), self._ssl if tls else None),
                           host_header, base.raw_path.rstrip("/"), f"Host: {host_header}\r\n".encode())
            if len(self._targets) < 64:  # a token's own instance URL is a base too: bounded
                self._targets[base] = found
        self._last_base, self._last = base, found
        return found

    def send_now(self, target: Target, method: str, head: bytes,
                 on_head: Callable[[UpstreamResponse], None]) -> UpstreamResponse | None:
        """Send a body-less request on an idle pooled connection, without a coroutine: ``on_head`` is called
        back with the answer once its head is in, or has failed (``UpstreamResponse.failure``). None when no
        idle connection is at hand (``send`` makes one)."""
        if self.closed:
            return None
        conn = self._pool.take(target.key, asyncio.get_running_loop().time())
        if conn is None:
            return None
        answer = UpstreamResponse(conn, method, self._read_timeout, on_head, conn.reader)
        conn.send_head(answer, head)
        return answer

    async def send(self, out: Outbound, *, stale_retry: bool = True) -> UpstreamResponse:
        base = out.base
        tls = base.scheme == "https"
        ssl_ctx = (await self._ssl_provider() if self._ssl_provider else self._ssl) if tls else None
        host, port = base.host or "", base.port or (443 if tls else 80)
        try:
            head, length = request_head(out, base.host_port_subcomponent or host)
        except (ValueError, UnicodeError):
            raise UpstreamError("request head refused", reason="upstream_failed") from None
        key = (tls, host, port, ssl_ctx)
        retry = stale_retry and out.method in IDEMPOTENT and out.replayable
        while True:
            # An idle pooled connection (the usual case) is taken here, without awaiting a coroutine for it.
            conn = None if self.closed else self._pool.take(key, asyncio.get_running_loop().time())
            if conn is None:
                conn = await self._connection(key, host, port, ssl_ctx)
            answer = UpstreamResponse(conn, out.method, self._read_timeout, None, conn.reader)
            try:
                conn.send(answer, head, out.body, length, self._read_timeout)
                await answer.wait_head()
                return answer
            except BadAnswer as exc:
                if exc.stale and conn.reused and retry:
                    retry = False  # once: a second stale connection is the upstream's answer
                    continue
                raise head_failure(exc) from None
            except HeadTimeout as exc:
                raise head_failure(exc) from None
            except BaseException:
                conn.abort()
                raise

    async def _connection(self, key: tuple, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> Connection:
        if self.closed:
            raise UpstreamError("client closed (credential reloaded)", reason="upstream_failed")
        pool = self._pool
        loop = asyncio.get_running_loop()
        while True:
            conn = pool.take(key, loop.time())
            if conn is not None:
                return conn
            if pool.open < pool.limit:
                break
            pool.close_one_idle()  # another key's idle connection, if any: its close wakes us
            await pool.wait()
        pool.open += 1
        try:
            _, conn = await dial(lambda: Connection(loop, pool.put, pool.lost), host, port, ssl_ctx=ssl_ctx,
                                 policy=self._addresses, timeout=self._connect_timeout, resolver=self._resolver)
        except AddressDenied as exc:
            pool.open -= 1
            raise UpstreamError(exc.why, reason="upstream_address_denied") from None
        except TimeoutError:
            pool.open -= 1
            raise UpstreamTimeout("upstream connect timed out") from None
        except OSError as exc:
            pool.open -= 1
            raise UpstreamError(f"connect failed: {type(exc).__name__}", reason="upstream_connect") from None
        except BaseException:
            pool.open -= 1
            raise
        conn.key = key
        return conn

    async def close(self) -> None:
        self.closed = True
        self._pool.close()
