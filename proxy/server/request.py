"""A caller's request as the connection protocol hands it to the pipeline: plain data
plus a body stream with backpressure.

``Request`` carries what llhttp parsed — method, raw target, version, headers (a
``CIMultiDict`` built once from the parsed fields, values stripped of surrounding
whitespace) — and what the connection knows: the peer address, the verified
client certificate, the listener context. Nothing here decides anything.

``BodyStream`` is the request body as it arrives: the protocol ``feed``s it and
ends it; the pipeline reads it (``read_nowait``, ``read``, ``readany``). Past
``HIGH_WATER`` buffered bytes the connection stops reading from the socket, and
resumes once the reader has taken it below ``LOW_WATER``, so a caller uploading
faster than the upstream takes it holds memory flat. A read that has to wait on
a request with ``Expect: 100-continue`` first sends ``100 Continue`` (once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from multidict import CIMultiDict

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class BodyStream:
    __slots__ = ("_chunks", "size", "_eof", "_exc", "_waiter", "_on_drained", "_on_first_wait", "received")

    def __init__(self, on_drained: Callable[[], None], on_first_wait: Callable[[], None] | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self.size = 0  # bytes buffered, not yet read
        self.received = 0  # bytes fed in all
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._on_drained = on_drained  # the connection resumes reading if it paused for this body
        self._on_first_wait = on_first_wait  # Expect: 100-continue

    # --- the protocol's side ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)
        self.received += len(data)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """The body cannot complete (the caller went away, a malformed chunk, a stall): readers get ``exc``."""
        if self._exc is None and not self._eof:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- the reader's side -------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every body byte has been received (read or not)."""
        return self._eof

    def is_eof(self) -> bool:
        """Everything has been received and read."""
        return self._eof and not self._chunks

    def exception(self) -> BaseException | None:
        return self._exc

    def read_nowait(self, n: int = -1) -> bytes:
        """What has arrived, up to ``n`` bytes (all of it when -1); ``b""`` when nothing has."""
        if self._exc is not None and not self._chunks:
            raise self._exc
        chunks = self._chunks
        if not chunks:
            return b""
        if n < 0 or (len(chunks) == 1 and len(chunks[0]) <= n):
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            if chunks:
                chunks.clear()
        else:
            parts, got = [], 0
            while chunks and got < n:
                chunk = chunks.popleft()
                if got + len(chunk) > n:
                    cut = n - got
                    chunks.appendleft(chunk[cut:])
                    chunk = chunk[:cut]
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        self.size -= len(data)
        if self.size < LOW_WATER:
            self._on_drained()
        return data

    async def readany(self) -> bytes:
        """The next bytes that arrive; ``b""`` at the end of the body."""
        return await self.read(-1)

    async def read(self, n: int = -1) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            if self._on_first_wait is not None:
                self._on_first_wait, send = None, self._on_first_wait
                send()
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self.read_nowait(n)


class Request:
    """One parsed request. ``target`` is the raw request target; header names and values are
    ``str`` decoded as UTF-8 with surrogate escapes (bytes that are not UTF-8 survive a round trip)."""

    __slots__ = ("method", "target", "version", "_headers", "_fields", "first", "raw_headers", "peer_ip", "peercert",
                 "content_length", "chunked", "body", "keep_alive", "expect_continue", "upgrade", "context",
                 "_connection", "plain_head")

    def __init__(self, method: str, target: str, version: tuple[int, int], raw_headers: list[tuple[bytes, bytes]],
                 headers: CIMultiDict[str] | None, peer_ip, peercert: dict | None, context, connection,
                 content_length: int | None, chunked: bool, keep_alive: bool, upgrade: bool,
                 fields: list[str] | None = None, first: dict[str, str] | None = None, plain_head: bool = False) -> None:
        # Positional: the connection runs this on ``object.__new__(Request)`` for each request (a call of the class
        # goes through its type's call and init slots, and keywords through a dict: twice the cost).
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers  # (name, value) bytes as parsed, for byte-level checks
        self._headers = headers
        self._fields = fields  # without ``headers``: names and values, alternating, to make them from
        # Lower-case name -> its first value, when the connection made it (plain heads): what the request path
        # looks up without the multidict (``lookup``).
        self.first = first
        self.peer_ip = peer_ip  # ipaddress object (IPv4-mapped IPv6 unwrapped), or None on a unix socket
        self.peercert = peercert  # the verified client certificate (ssl's dict), or None
        self.context = context  # the listener's ConnectionContext (proxy.server.connection)
        self._connection = connection
        self.content_length = content_length
        self.chunked = chunked
        self.body: BodyStream | None = None  # None: the request frames no body (no or zero Content-Length)
        self.keep_alive = keep_alive
        self.expect_continue = False
        self.upgrade = upgrade  # CONNECT: parsing stopped after its head (a tunnel may follow)
        # True when request_shape.plain_head vouched for the head (the connection asked): its header checks are
        # skipped.
        self.plain_head = plain_head

    @property
    def headers(self) -> CIMultiDict[str]:
        """All header fields (made when first asked for, when the connection gave ``fields``)."""
        if self._headers is None:
            fields = self._fields or ()
            self._headers = CIMultiDict(zip(fields[0::2], fields[1::2]))
        return self._headers

    @property
    def lookup(self):
        """Something to ``.get(lower-case name)`` the first value of a header from: ``first`` when there is one,
        else ``headers``."""
        return self.first if self.first is not None else self.headers

    def take_over(self):
        """For an upgrade request (CONNECT) whose answer has been sent: the connection gives up its transport.
        Returns ``(transport, leftover bytes, release)`` — ``release`` (or None) must be called when the
        tunnel ends, as it gives back the connection's place under ``max_connections``."""
        return self._connection.take_over()

