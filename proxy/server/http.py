"""The HTTP/1.1 side of credproxy's caller listeners: aiohttp's connection handler plus

- a deadline for each request head (``server.limits.header_timeout``): the
  head must be complete this long after its first byte (or after the
  connection opened). A client that trickles header bytes (slowloris) or
  connects and sends nothing is disconnected;
- the SPEC answers for requests aiohttp's parser refuses: ``431 too_large``
  for a header line or header count over the limits, ``400 bad_request`` for
  anything else malformed — JSON with a request ID, and an audit line through
  ``on_refused`` — instead of aiohttp's plain-text 400 (whose message quotes the
  offending bytes). An unexpected error in the handler answers
  ``500 internal_error``; its traceback goes only to the scrubbed log.
- a bounded keep-alive idle time (aiohttp's default is an hour);
- a cap on open caller connections per process (``server.limits.max_connections``,
  see ``proxy.server.connlimit``): one over it is answered ``503`` and closed before
  aiohttp sees it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy import errors
from proxy.server.connlimit import ConnectionLimit
from proxy.errors import BadRequest, HeadersTooLarge, ProxyError, UpstreamTimeout

log = logging.getLogger("credproxy.server")

KEEPALIVE_TIMEOUT = 75.0
OnRefused = Callable[[web.BaseRequest, ProxyError, str], None]


def parser_error(exc: BaseException | None) -> ProxyError:
    if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
        return HeadersTooLarge("request head over the limits", reason="headers_too_large")
    return BadRequest("request refused by the HTTP parser", reason="malformed_request")


class GuardedRequestHandler(RequestHandler):
    def __init__(self, manager: "GuardedServer", *, header_timeout: float, on_refused: OnRefused | None,
                 connections: ConnectionLimit | None = None, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._on_refused = on_refused
        self._connections = connections
        self._head_deadline: asyncio.TimerHandle | None = None
        self._busy = False  # a request's handler is running: bytes now are its body

    # --- head deadline ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        if self._connections is not None and not self._connections.admit(transport):
            return  # over max_connections: the transport now belongs to a connlimit.Refusal
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and not self._busy and not self._messages:
            self._arm()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._connections is not None:
            self._connections.release()  # only admitted connections get here: a refused one has a new protocol
        super().connection_lost(exc)

    def head_complete(self) -> None:
        self._busy = True
        self._disarm()

    def request_done(self) -> None:
        self._busy = False

    def _arm(self) -> None:
        if self._header_timeout > 0:
            self._head_deadline = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._busy or self._messages:
            return
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info("request head not complete in time; connection closed",
                 extra={"client": str(peer[0]) if isinstance(peer, tuple) else None,
                        "header_timeout_s": self._header_timeout})
        self.force_close()

    # --- errors ----------------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer with an error")
        request_id = uuid.uuid4().hex
        if isinstance(exc, HttpProcessingError):
            err = parser_error(exc)
            # The parser's message quotes the offending bytes: log only its kind.
            log.info("request refused by the HTTP parser", extra={"request_id": request_id, "status": err.status,
                                                                  "error": type(exc).__name__})
            if self._on_refused is not None:
                self._on_refused(request, err, request_id)
        elif status == 504:
            err = UpstreamTimeout("handler timed out")
        else:
            err = ProxyError("unhandled error")
            log.error("unhandled error in the request path", exc_info=exc, extra={"request_id": request_id})
        resp = errors.to_response(err, request_id)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """``web.Server`` whose connections are ``GuardedRequestHandler``s."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 header_timeout: float, on_refused: OnRefused | None = None,
                 connections: ConnectionLimit | None = None, **kwargs) -> None:
        async def entered(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            protocol.head_complete()
            try:
                return await handler(request)
            finally:
                protocol.request_done()

        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        super().__init__(entered, **kwargs)
        self._guard_kwargs = {"header_timeout": header_timeout, "on_refused": on_refused, "connections": connections}

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._guard_kwargs, **self._kwargs)
