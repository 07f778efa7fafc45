"""One caller connection: HTTP/1.1 on llhttp (``httptools``, strict — no lenient flags)
over an asyncio transport (uvloop's when installed), plain or TLS.

The interface (what a listener — main, dedicated, forward — gives and gets)::

    ctx = ConnectionContext.for_limits("main", handle, cfg.server.limits, route=route_prefixed,
                                       on_refused=..., connections=..., live=...)
    server = await loop.create_server(lambda: HTTPConnection(ctx), host, port, ssl=...)

    def handle(request: Request, response: ResponseWriter) -> Awaitable[None] | None: ...

- ``handler(request, response)`` is called once per request, in order (pipelined
  requests wait for the answer before theirs). It must answer through ``response``
  (``proxy.server.response``): ``start``/``write``/``end``, ``send``, ``send_now``,
  ``answer``, ``abort``. It returns an awaitable, which the connection runs in a
  task of the request's own, or None: the request goes on in callbacks and the
  handler calls ``response.complete()`` when its answer is done (or
  ``response.resume(awaitable)`` to go on in a task after all). The protocol
  decides nothing about a request: policy is the handler's.
- ``ctx.route`` (raw target -> ``Route``, main and dedicated listeners) or ``ctx.via``
  (the forward proxy's ``proxy.routing.Via``: the CONNECT target and the caller
  authenticated on it) reach the handler as ``request.context``; ``ctx.listener``
  names the listener for audit and metrics.
- Inside a tunnel (after ``loop.start_tls``), attach a connection to the existing
  transport with its own context (``connections=None``: it is not counted again under
  ``max_connections``; pass the outer connection's ``release``)::

      conn = HTTPConnection(tunnel_ctx)
      tls = await loop.start_tls(transport, conn, leaf_ctx, server_side=True)
      conn.attach(tls, release=release)

  where ``transport, leftover, release = request.take_over()`` was called by the
  CONNECT request's handler after its ``200`` (``leftover``: bytes the caller sent
  after the CONNECT head; for an opaque tunnel, the taker resumes reading).

What the protocol does on its own, per SPEC §2/§6 and ``server.limits``:

- a deadline for each request head (``header_timeout``), from its first byte (or from
  the connection's start); a bounded idle time between requests (``KEEPALIVE_TIMEOUT``);
- ``431 too_large`` for a header line ("name: value") over ``max_header_line`` or more than
  ``max_headers`` fields (trailers count too), ``400 bad_request`` for anything
  llhttp refuses — JSON with a request ID, reported through ``ctx.on_refused`` (the
  audit line), never echoing the offending bytes — then the connection is half-closed
  and its input dropped for ``LINGER`` so the answer is not lost to a reset;
- a head llhttp refuses after having reported it (a bad ``Transfer-Encoding``, say)
  never reaches the handler; a body that turns out malformed fails the body stream;
- flow control both ways: reading pauses while pipelined requests wait or a body's
  buffer is full (``proxy.server.request``); writes wait for the transport to drain,
  for at most ``write_timeout`` (``CallerStalled``);
- ``Expect: 100-continue``: ``100 Continue`` when the handler first waits for the body;
- after an answer whose request body was not wholly received, or that says
  ``Connection: close``, the connection closes; a handler's unexpected error answers
  ``500 internal_error`` (traceback to the scrubbed log only) or, once an answer has
  begun, cuts the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import chain

import httptools
from multidict import CIMultiDict

from proxy import errors
from proxy.deadline import Deadline
from proxy.errors import BadRequest, HeadersTooLarge, ProxyError
from proxy.observe.request_id import new_request_id
from proxy.server.connlimit import ConnectionLimit
from proxy.server.peer import transport_ip
from proxy.server.request import HIGH_WATER, BodyStream, Request
from proxy.server.request_shape import plain_head
from proxy.server.response import CallerStalled, ResponseWriter

log = logging.getLogger("credproxy.server")

KEEPALIVE_TIMEOUT = 75.0
LINGER = 2.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0), "0.9": (0, 9), "2.0": (2, 0)}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT")}
_new = object.__new__
_init_request = Request.__init__  # on _new(Request): see Request.__init__
_init_writer = ResponseWriter.__init__  # likewise

Handler = Callable[[Request, ResponseWriter], "Awaitable[None] | None"]
OnRefused = Callable[[object, ProxyError, str], None]  # (peer IP or None, the error, request ID)


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What every connection of one listener shares (built once per listener)."""

    listener: str  # "main", "dedicated", "forward": for audit lines and metrics
    handler: Handler
    max_header_line: int = 8192
    max_headers: int = 100
    header_timeout: float = 10.0
    write_timeout: float = 60.0
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    route: Callable[[str], object] | None = None  # raw target -> proxy.routing.Route
    via: object | None = None  # forward proxy: proxy.routing.Via (CONNECT target, caller authenticated on it)
    on_refused: OnRefused | None = None
    connections: ConnectionLimit | None = None  # counts and caps connections as they are made
    live: set | None = None  # the listener's open connections (for draining)

    @classmethod
    def for_limits(cls, listener: str, handler: Handler, limits, **kwargs) -> "ConnectionContext":
        """From ``server.limits`` (``proxy.config.models.Limits``)."""
        return cls(listener, handler, max_header_line=limits.max_header_line, max_headers=limits.max_headers,
                   header_timeout=limits.header_timeout, write_timeout=limits.write_timeout, **kwargs)


def _too_large() -> HeadersTooLarge:
    return HeadersTooLarge("request head over the limits", reason="headers_too_large")


class HTTPConnection(asyncio.Protocol):
    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: bytes | None = None  # received before attach() (a just-started TLS session)
        self._release: Callable[[], None] | None = None
        self._peer_ip = None
        self._peercert = None
        # parsing
        self._in_head = False
        self._url = b""
        self._last_url = b""  # the last request's target, as bytes and decoded
        self._last_target = ""
        self._raw: list[tuple[bytes, bytes]] = []
        self._plain_raw: list[tuple[bytes, bytes]] | None = None  # the last plain head's fields (a copy) ...
        self._plain_fields: list[str] = []  # ... decoded,
        self._plain_first: dict[str, str] | None = None  # ... and looked up by name
        self._head_bytes = 0
        self._trailers = 0
        self._oversize = False
        self._parsing: Request | None = None  # the request whose body is being parsed
        self._unconfirmed: Request | None = None  # head reported, not yet known to be accepted by llhttp
        self._stopped = False  # no more parsing: an error, an upgrade, or closing
        self._leftover = b""
        self._last_method = ""
        # serving
        self._queue: deque[Request | ProxyError] = deque()
        self._active: Request | None = None
        self._task: asyncio.Task | None = None  # the request's own task, when its handler needed one
        self._writer: ResponseWriter | None = None
        self._starting = False
        # One timer serves the head deadline and the idle limit: moving a deadline later only records it (the
        # timer, when it fires early, re-arms itself), so a busy keep-alive connection costs no timer per request.
        self._deadline: Deadline | None = None  # made with the loop, in _attach
        self._timing_head = False
        self._linger: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self.closing = False  # close after the answer in progress (draining; the caller sent EOF)
        self._dead = False

    # --- transport events --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self.ctx.connections
        if connections is not None:
            if not connections.admit(transport):
                self._dead = True
                return  # over max_connections: the transport now belongs to a connlimit.Refusal
            self._release = connections.release
        self._attach(transport)

    def attach(self, transport: asyncio.BaseTransport, release: Callable[[], None] | None = None) -> None:
        """Serve an existing transport (after ``loop.start_tls``) without counting it again."""
        self._release = release
        self._attach(transport)

    def _attach(self, transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._deadline = Deadline(self._loop, self._expired)
        self._peer_ip = transport_ip(transport)
        self._peercert = transport.get_extra_info("peercert")
        if self.ctx.live is not None:
            self.ctx.live.add(self)
        self._arm(self.ctx.header_timeout, True)
        if self._early is not None:
            data, self._early = self._early, None
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._stopped or self._dead:
            return  # dropped: after an error or an upgrade, or while lingering before a close
        if self._transport is None:
            self._early = data if self._early is None else self._early + data
            return
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._unconfirmed = None  # the head was accepted
                offset = exc.args[0] if exc.args else len(data)
                if self._last_method == "CONNECT":  # a tunnel follows: what comes next is not HTTP
                    self._stopped = True
                    self._leftover = data[offset:]
                    self._pause()
                    break
                # Any other Upgrade is not honoured here (the handler refuses it or ignores an h2c offer):
                # the connection stays HTTP/1.1, parsed on by a fresh parser after the request's message.
                self._parser = httptools.HttpRequestParser(self)
                data = data[offset:]
                if data:
                    continue
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
            else:
                self._unconfirmed = None
                if self._in_head:
                    self._head_bytes += len(data)
                    if self._head_bytes > self.ctx.max_header_line * (self.ctx.max_headers + 2):
                        self._oversize = True
                        self._parse_failed(None)
                    elif not self._timing_head and self._active is None and not self._queue:
                        # A head begun, not finished, on an idle connection: it must now be quick. (Armed here
                        # rather than at its first byte: a head that arrives whole needs no timer.)
                        self._arm(self.ctx.header_timeout, True)
            break
        queue = self._queue
        if self._active is None and len(queue) == 1 and self._parsing is None and not self._read_paused:
            self._start()  # the usual: one whole request in, served now (_flow would change nothing)
        else:
            self._flow()
            if queue and self._active is None:
                self._start()

    def eof_received(self) -> bool:
        body = self._parsing.body if self._parsing is not None else None
        if body is not None:
            body.set_exception(ConnectionResetError("caller closed mid-body"))
        if self.idle:
            return False  # idle: close
        self.closing = True  # answer what was asked, then close
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._dead = True
        self._cancel_timer()
        if self._release is not None:
            self._release, release = None, self._release
            release()
        if self.ctx.live is not None:
            self.ctx.live.discard(self)
        gone = ConnectionResetError("caller went away")
        for req in (self._active, self._parsing, *self._queue):
            if isinstance(req, Request) and req.body is not None:
                req.body.set_exception(gone)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._raw = []
        self._head_bytes = 0
        self._trailers = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.ctx.max_header_line:
            self._oversize = True
            raise _too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        ctx = self.ctx
        if len(name) + len(value) + 2 > ctx.max_header_line:  # the whole field line, "name: value"
            self._oversize = True
            raise _too_large()
        if not self._in_head:  # a trailer of a chunked body: within the limits, then dropped
            self._trailers += 1
            if self._trailers > ctx.max_headers:
                self._oversize = True
                raise _too_large()
            return
        if len(self._raw) >= ctx.max_headers:
            self._oversize = True
            raise _too_large()
        self._raw.append((name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        # The head is in. Its deadline is left as it stands, not cleared: while a request is queued or served the
        # connection is busy, which the deadline, should it fall due, finds (_expired); once the answer is done it
        # is set anew (handled).
        self._timing_head = False
        parser = self._parser
        raw = self._raw
        if raw == self._plain_raw:
            # The same header fields, byte for byte, as this connection's last plain head (a keep-alive client
            # sends the same ones again): its decoding and its verdict are this one's, as both are functions of
            # these bytes alone. The fields are shared (read only: a request makes its own multidict from them);
            # each request has its own ``first``, so no change to one request's can reach the next.
            fields, first, headers, plain = self._plain_fields, self._plain_first.copy(), None, True
        else:
            fields, first, headers, plain = self._decode(raw)
        version = _VERSIONS.get(parser.get_http_version(), (0, 0))
        if plain:  # neither Content-Length nor Transfer-Encoding
            content_length, chunked = None, False
        else:
            length = headers.get("Content-Length")
            content_length = int(length) if length is not None else None  # llhttp checked: digits, and only one
            chunked = "Transfer-Encoding" in headers
        method = parser.get_method()
        method = self._last_method = _METHODS.get(method) or method.decode("ascii")
        url = self._url
        if url != self._last_url:  # (a keep-alive client often asks for the same target again: decoded once)
            self._last_url, self._last_target = url, url.decode("utf-8", "surrogateescape")
        req = _new(Request)
        _init_request(req, method, self._last_target, version, raw, headers, self._peer_ip,
                      self._peercert, self.ctx, self, content_length, chunked, parser.should_keep_alive(),
                      method == "CONNECT", fields, first, plain)
        if chunked or content_length:
            expect = version >= (1, 1) and headers.get("Expect", "").lower() == "100-continue"
            req.expect_continue = expect
            req.body = BodyStream(self._flow, (lambda: self._continue(req)) if expect else None)
        self._queue.append(req)
        self._parsing = self._unconfirmed = req

    def _decode(self, raw: list[tuple[bytes, bytes]]) -> tuple[list[str], dict | None, CIMultiDict | None, bool]:
        """A head's fields as ``str`` — ``(fields, first, headers, plain)``: names and values alternating, the
        first value of each lower-case name and no multidict for a plain head (``request_shape.plain_head``),
        the multidict otherwise. A plain one is kept for the connection's next head (on_headers_complete)."""
        # One decode of the whole head, NUL-joined (llhttp accepts no NUL in a field), instead of two per field;
        # the same bytes tell request_shape whether its header checks can be skipped.
        joined = b"\x00".join(chain.from_iterable(raw))
        text = joined.decode("utf-8", "surrogateescape")
        fields = text.split("\x00") if raw else []
        if len(fields) != 2 * len(raw):  # a NUL inside a field after all: decoded field by field (and refused)
            return fields, None, CIMultiDict([(n.decode("utf-8", "surrogateescape"),
                                               v.decode("utf-8", "surrogateescape")) for n, v in raw]), False
        lowered = text.lower().split("\x00") if raw else []  # names lower-cased (and values: not used)
        names = lowered[0::2]
        if not plain_head(joined, len(fields), names):
            return fields, None, CIMultiDict(zip(fields[0::2], fields[1::2])), False
        # The multidict is made only if something asks for it; lookups go to ``first``.
        values = fields[1::2]
        first = dict(zip(reversed(names), reversed(values))) if len(raw) > 1 else dict(zip(names, values))
        self._plain_raw, self._plain_fields, self._plain_first = raw[:], fields, first.copy()
        return fields, first, None, True

    def on_body(self, body: bytes) -> None:
        self._unconfirmed = None
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed(body)

    def on_message_complete(self) -> None:
        self._unconfirmed = None
        req, self._parsing = self._parsing, None
        if req is not None and req.body is not None:
            req.body.feed_eof()

    # --- parse failures ----------------------------------------------------------------

    def _parse_failed(self, exc: BaseException | None) -> None:
        self._stopped = True
        self._pause()
        err = _too_large() if self._oversize else \
            BadRequest("request refused by the HTTP parser", reason="malformed_request")
        log.info("request refused by the HTTP parser",  # the parser's message may quote bytes: only its kind
                 extra={"status": err.status, "error": type(exc).__name__ if exc is not None else "HeadTooLarge"})
        req = self._unconfirmed
        if req is not None:  # llhttp reported the head, then refused it: it never reaches the handler
            self._unconfirmed = self._parsing = None
            if self._queue and self._queue[-1] is req:
                self._queue.pop()
        elif self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.set_exception(BadRequest("malformed request body", reason="malformed_request"))
            self.closing = True
            return  # the handler reading the body answers 400; the connection closes after it
        self._queue.append(err)

    def _refuse(self, err: ProxyError) -> None:
        request_id = new_request_id()
        if self.ctx.on_refused is not None:
            self.ctx.on_refused(self._peer_ip, err, request_id)
        self._transport.write(errors.to_bytes(err, request_id))
        self._close(linger=True)

    # --- serving -----------------------------------------------------------------------

    def _start(self) -> None:
        """Serve the queued requests in order, one at a time. The handler returns None for a request it answers
        in callbacks (it calls ``ResponseWriter.complete``, which comes back here through ``handled``), or an
        awaitable, which gets a task; so the usual request costs no task, and one that waits for I/O of its own
        (a body, a token, a slow answer) costs one."""
        self._starting = True
        try:
            while self._queue and self._active is None and not self._dead and self._transport is not None:
                item = self._queue.popleft()
                if isinstance(item, ProxyError):
                    self._refuse(item)
                    return
                self._active = item
                if self._read_paused:  # paused for this request's turn (reading pauses only in _flow)
                    self._flow()
                writer = self._writer = _new(ResponseWriter)
                _init_writer(writer, self, item.method, item.version, item.keep_alive and not self.closing)
                try:
                    run = self.ctx.handler(item, writer)
                except Exception as exc:  # noqa: BLE001 - see _failed
                    run = self._failed(exc, writer)
                if run is not None:
                    self._task = self._loop.create_task(self._run(writer, run))
                    return
        finally:
            self._starting = False

    async def _run(self, writer: ResponseWriter, run: Awaitable[None]) -> None:
        try:
            await run
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - see _failed
            await self._failed(exc, writer)
        finally:
            self._task = None
        self.handled(writer)

    def adopt(self, writer: ResponseWriter, run: Awaitable[None]) -> None:
        """``ResponseWriter.resume``: the request answered in callbacks continues in a task."""
        item = self._active
        if item is None or writer is not self._writer or self._task is not None:
            raise RuntimeError("no request of this connection is being answered in callbacks")
        self._task = self._loop.create_task(self._run(writer, run))

    def handled(self, writer: ResponseWriter) -> None:
        """The handler is done with the request being served (``ResponseWriter.complete``: it was answered in
        callbacks; or its task ended): close, or go on to the next request."""
        if writer is not self._writer:
            return  # not this connection's request in progress (it ended already)
        item = self._active  # (_writer is set only while _active is)
        self._active = self._writer = None
        if self._dead or self._transport is None:
            return
        if not writer.finished:
            if not writer.started:
                log.error("request handler returned without answering")
            self.abort()  # an answer left unfinished must never look whole
        body = item.body
        incomplete = body is not None and not body.complete
        if writer.close or self.closing or incomplete or item.upgrade:
            self._close(linger=incomplete or item.upgrade)
        elif self._queue:
            if not self._starting:  # else the loop in _start, which this was called from, goes on
                self._start()
        elif not self._stopped:
            # Idle: reading resumes if it waited for this turn (nothing else is waiting to be read: the queue is
            # empty, and no body is being parsed, or it would be incomplete), and the timer is the head's (one
            # begun) or the idle one's.
            if self._read_paused:
                self._flow()
            head = self._in_head
            self._arm(self.ctx.header_timeout if head else self.ctx.keepalive_timeout, head)

    async def _failed(self, exc: Exception, writer: ResponseWriter) -> None:
        """The handler raised: the caller went away or stalled (cut), or a bug (``500``, or cut once answering)."""
        if isinstance(exc, (ConnectionError, CallerStalled)):
            self.abort()
            return
        # the handler's own errors are answered by it; this is a bug
        request_id = new_request_id()
        log.error("unhandled error in the request path", exc_info=exc, extra={"request_id": request_id})
        if writer.started:
            self.abort()
            return
        try:
            await writer.answer(errors.to_response(ProxyError("unhandled error"), request_id))
        except (ConnectionError, CallerStalled):
            self.abort()

    def _continue(self, req: Request) -> None:
        writer = self._writer
        if req is self._active and writer is not None and not writer.started and not self._dead:
            self._transport.write(CONTINUE)

    # --- used by ResponseWriter ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        transport = self._transport
        if self._dead or transport.is_closing():
            raise ConnectionResetError("caller went away")
        transport.write(data)

    def send_parts(self, parts) -> None:
        transport = self._transport
        if self._dead or transport.is_closing():
            raise ConnectionResetError("caller went away")
        transport.writelines(parts)

    @property
    def must_drain(self) -> bool:
        """Whether ``drain()`` would do anything (wait, or raise): a caller that keeps up skips the coroutine."""
        return self._dead or self._write_paused

    async def drain(self) -> None:
        if self._dead:
            raise ConnectionResetError("caller went away")
        if not self._write_paused:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        timeout = self.ctx.write_timeout
        try:
            if timeout > 0:
                async with asyncio.timeout(timeout):
                    await waiter
            else:
                await waiter
        except TimeoutError:
            raise CallerStalled() from None

    def abort(self) -> None:
        self._stopped = True
        if self._transport is not None:
            self._transport.abort()

    # --- the listener's side -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._active is None and not self._queue

    def shutdown(self) -> None:
        """Stop serving: an idle connection closes now, a busy one after the answer in progress."""
        self.closing = True
        if self.idle and not self._dead and self._transport is not None:
            self._close(linger=False)

    def take_over(self):
        if self._transport is None or self._dead:
            raise ConnectionResetError("caller went away")
        self._cancel_timer()
        self._dead = self._stopped = True
        release, self._release = self._release, None
        if self.ctx.live is not None:
            self.ctx.live.discard(self)
        return self._transport, self._leftover, release

    # --- flow control, timers, closing ---------------------------------------------------

    def _flow(self) -> None:
        if self._dead or self._stopped or self._transport is None:
            return
        waiting = len(self._queue) - (0 if self._active is not None else 1)
        body = self._parsing.body if self._parsing is not None else None
        if waiting > 0 or (body is not None and body.size > HIGH_WATER):
            self._pause()
        elif self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()

    def _pause(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _close(self, *, linger: bool) -> None:
        """Close after the answer. With ``linger``, unread input may be waiting: half-close, drop what
        arrives until the caller closes or ``LINGER`` passes (a close with unread input resets the
        connection, which can destroy the answer before the caller reads it)."""
        self._stopped = True
        self._queue.clear()  # pipelined requests behind this answer are not served
        self._cancel_timer()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._linger = self._loop.call_later(LINGER, transport.abort)
        else:
            transport.close()

    def _arm(self, delay: float, head: bool) -> None:
        if delay > 0:
            self._deadline.set(delay)
            self._timing_head = head
        else:
            self._deadline.clear()
            self._timing_head = False

    def _cancel_timer(self) -> None:
        if self._deadline is not None:
            self._deadline.stop()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._timing_head = False

    def _expired(self) -> None:
        head, self._timing_head = self._timing_head, False
        if self._active is not None or self._queue or self._dead:
            return  # busy: the deadline was for an idle connection
        if head:
            log.info("request head not complete in time; connection closed",
                     extra={"client": str(self._peer_ip) if self._peer_ip else None,
                            "header_timeout_s": self.ctx.header_timeout})
        self._close(linger=False)
