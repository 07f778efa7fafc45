"""The forward-proxy listener (SPEC §10): ``CONNECT`` and absolute-form ``http://`` requests.

One ``ForwardConnection`` per caller connection reads the first request line:

- ``CONNECT host:port``: the caller is authenticated on it (``Proxy-Authorization``; 407 without a
  valid one) and its ``allow_ips`` lock applied; then, by ``HostMap.decide``:
  - a host some credential claims: ``200``, TLS with a leaf certificate minted for the host, and
    the connection handed to the HTTP protocol (``inner``) with a ``Via`` naming the CONNECT target
    and the caller; each request inside then runs the pipeline like any other;
  - a host in ``tunnel_hosts``: ``200`` and an opaque byte relay to that host (the address policy
    applies to what its name resolves to), audited with its byte counts when it ends; one that carries
    no byte either way for ``tunnel_idle_timeout`` is closed (it holds a place under
    ``max_connections`` and a socket to the host);
  - anything else (unlisted, IP literal, another port): ``403``.
- anything else: an absolute-form request; the connection goes to ``inner`` as it is, with a
  ``Via`` that has no CONNECT target (each request authenticates itself).

Every CONNECT gets one audit line (``listener: forward``, ``connect_host``). ``inner`` is the one
point where the HTTP protocol is plugged in (``proxy.server.connection.HTTPConnection``, see ``proxy.app``);
the sockets and shutdown are a ``proxy.server.listener.CallerListener``'s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy import errors
from proxy.deadline import Deadline
from proxy.errors import AddressDenied, BadRequest, Forbidden, HeadersTooLarge, ProxyAuthRequired, ProxyError, UpstreamError
from proxy.observe.audit import ForwardEvent
from proxy.routing import Via
from proxy.server.connlimit import ConnectionLimit, client_address
from proxy.server.forward.connect import MAX_HEAD, first_line, is_connect, parse_connect
from proxy.host_map import target
from proxy.upstream.dial import Resolver, dial, resolve

if TYPE_CHECKING:  # the CA module (cryptography's X.509) is loaded by the app only with a forward proxy configured
    from proxy.server.forward.ca import LeafContexts

log = logging.getLogger("credproxy.forward")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
TUNNEL_HIGH_WATER = 256 * 1024
# An opaque tunnel silent both ways this long is closed: Squid's read_timeout for CONNECT tunnels (a forward
# proxy's usual bound); long enough for a client's idle keep-alive connection or a quiet stream with pings.
TUNNEL_IDLE_TIMEOUT = 15 * 60.0


@dataclass(eq=False)
class ForwardContext:
    """What every forward connection shares (one per listener)."""

    holder: object  # proxy.lifecycle.state.StateHolder
    leaves: LeafContexts
    inner: Callable[[Via], object]  # proxy.server.connection.HTTPConnection for requests (in a tunnel or absolute-form)
    connections: ConnectionLimit | None = None
    open: set = field(default_factory=set)  # connections not (yet) handed to ``inner``: closed at shutdown
    resolver: Resolver = resolve  # how tunnel hosts are resolved (tests put a fault-injecting one here)
    tunnel_idle_timeout: float = TUNNEL_IDLE_TIMEOUT  # seconds; 0: none


class ForwardConnection(asyncio.Protocol):
    def __init__(self, ctx: ForwardContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._deadline: asyncio.TimerHandle | None = None
        self._admitted = False
        self._released = False
        self._task: asyncio.Task | None = None
        self._tunnel: _TunnelUpstream | None = None
        self._audit: _ConnectAudit | None = None  # an opaque tunnel's line, written when it closes
        self._idle: Deadline | None = None  # an opaque tunnel's: moved on by every byte either way
        self.bytes_up = 0
        self.bytes_down = 0

    # --- connection -------------------------------------------------------------

    def connection_made(self, transport) -> None:
        connections = self.ctx.connections
        if connections is not None and not connections.admit(transport):
            return  # over max_connections: the transport now belongs to a connlimit.Refusal
        self._admitted = True
        self.transport = transport
        self.ctx.open.add(self)
        timeout = self.ctx.holder.current.config.server.limits.header_timeout
        if timeout > 0:
            self._deadline = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._idle is not None:
            self._idle.stop()
        self.ctx.open.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._tunnel is not None:
            self._tunnel.close()
        self.release()

    def release(self) -> None:
        if self._admitted and not self._released:
            self._released = True
            if self.ctx.connections is not None:
                self.ctx.connections.release()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        log.info("forward-proxy request head not complete in time; connection closed",
                 extra={"client": client_address(self.transport)})
        self.transport.close()

    # --- first request ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self.bytes_up += len(data)
            self._active()
            self._tunnel.write(data)
            return
        if self._task is not None:  # bytes before our answer to the CONNECT: nothing a client may send yet
            self._buffer += data
            return
        self._buffer += data
        line = first_line(self._buffer)
        if line is None:
            if len(self._buffer) > MAX_HEAD:
                self._refuse(HeadersTooLarge("request line too long", reason="headers_too_large"))
            return
        if not is_connect(line):
            self._hand_over(Via(None), bytes(self._buffer))
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._refuse(HeadersTooLarge("CONNECT head too large", reason="headers_too_large"))
            return
        self._disarm()
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4:])
        self._buffer = bytearray(rest)
        self.transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._connect(head))

    def _hand_over(self, via: Via, pending: bytes, transport=None) -> None:
        """From here on ``inner(via)`` (an ``HTTPConnection`` whose context carries ``via`` and counts no
        connections) owns the connection (``transport``: the TLS one, after a CONNECT); it gives this
        connection's place under ``max_connections`` back when the transport closes."""
        self._disarm()
        self.ctx.open.discard(self)
        conn = self.ctx.inner(via)
        transport = transport or self.transport
        transport.set_protocol(conn)
        conn.attach(transport, release=self.release)
        if pending:
            conn.data_received(pending)

    async def _connect(self, head: bytes) -> None:
        started = time.monotonic()
        state = self.ctx.holder.current
        client = client_address(self.transport)
        ip = ipaddress.ip_address(client) if client else None
        audit = _ConnectAudit(secrets.token_hex(16), started, str(ip) if ip else None)
        try:
            state.audit.admit()  # SPEC §11: nothing is served while its audit line cannot be written
            parsed = parse_connect(head)
            audit.connect_host = parsed.authority[:300]
            try:
                caller = state.authenticator.authenticate_proxy(parsed.one("proxy-authorization"))
            except errors.Unauthenticated as exc:
                raise ProxyAuthRequired(exc.detail, reason=exc.reason) from None
            audit.caller = caller.name
            state.authenticator.check_source(caller, ip)
            hp = target(parsed.authority, default_port=None)
            decision = state.forward_hosts.decide(hp)
            if decision == "refuse":
                raise Forbidden("CONNECT target not listed", reason="host_not_listed")
            audit.connect_host = f"{hp[0]}:{hp[1]}"
            if self._buffer:
                raise BadRequest("bytes sent before the CONNECT was answered", reason="malformed_request")
            if decision == "tunnel":
                await self._open_tunnel(state, hp, audit)
                return
            ctx = await self.ctx.leaves.context(hp[0])
            audit.finish(state, 200, "allowed", "intercepted")
            state.metrics.forward_connects.labels("intercepted").inc()
            self.transport.write(ESTABLISHED)
            loop = asyncio.get_running_loop()
            limits = state.config.server.limits
            try:
                tls = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                           ssl_handshake_timeout=limits.header_timeout or None)
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                log.info("TLS with the caller failed inside the CONNECT (does it trust credproxy's CA?)",
                         extra={"request_id": audit.request_id, "connect_host": audit.connect_host,
                                "error": type(exc).__name__})
                self.abort()
                return
            if tls is None:  # the caller went away during the handshake
                return
            self._hand_over(Via(hp, caller), bytes(self._buffer), tls)  # plaintext that came with the handshake
        except ProxyError as exc:
            outcome = "denied" if exc.status in (403, 407) else "error"
            audit.finish(state, exc.status, outcome, exc.reason)
            state.metrics.forward_connects.labels("unauthenticated" if exc.status == 407 else "refused").inc()
            log.info("CONNECT refused", extra={"request_id": audit.request_id, "status": exc.status,
                                               "reason": exc.reason, "detail": exc.detail})
            self._answer(exc, audit.request_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error answering a CONNECT", extra={"request_id": audit.request_id})
            audit.finish(state, 500, "error", "internal_error")
            self._answer(ProxyError("unhandled"), audit.request_id)

    def _refuse(self, exc: ProxyError) -> None:
        self._disarm()
        request_id = secrets.token_hex(16)
        state = self.ctx.holder.current
        _ConnectAudit(request_id, time.monotonic(), client_address(self.transport)).finish(
            state, exc.status, "error", exc.reason)
        self._answer(exc, request_id)

    def _answer(self, exc: ProxyError, request_id: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(errors.to_bytes(exc, request_id))
            self.transport.close()

    # --- opaque tunnels (tunnel_hosts) --------------------------------------------

    async def _open_tunnel(self, state, hp: tuple[str, int], audit: "_ConnectAudit") -> None:
        # The upstream client's dialer: one refused address refuses the name, and the socket connects to an
        # address that was checked, never to the name again.
        try:
            _, upstream = await dial(lambda: _TunnelUpstream(self), hp[0], hp[1], ssl_ctx=None,
                                     policy=state.addresses, timeout=state.config.server.connect_timeout,
                                     resolver=self.ctx.resolver)
        except AddressDenied as exc:
            raise UpstreamError(f"tunnel host resolves to a refused address ({exc.why})",
                                reason="address_refused") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"tunnel connect failed: {type(exc).__name__}", reason="tunnel_connect") from None
        self._tunnel = upstream
        state.metrics.forward_connects.labels("tunnelled").inc()
        audit.tunnel = True
        self._audit = audit
        if self.ctx.tunnel_idle_timeout > 0:
            self._idle = Deadline(asyncio.get_running_loop(), self._tunnel_idle)
            self._active()
        self.transport.write(ESTABLISHED)
        if self._buffer:  # reading was paused; nothing should be here, but never drop a byte of a tunnel
            self.data_received(bytes(self._buffer))
            self._buffer.clear()
        self.transport.resume_reading()

    def eof_received(self):
        """A tunnel's caller finished sending: pass the half-close on; the tunnel ends when both sides have."""
        if self._tunnel is None:
            return None  # before or instead of a tunnel: close
        self._tunnel.half_closed_by_caller()
        return True

    def tunnel_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._active()
        self.transport.write(data)

    def _active(self) -> None:
        if self._idle is not None:
            self._idle.set(self.ctx.tunnel_idle_timeout)  # only recorded: the timer re-arms when it fires early

    def _tunnel_idle(self) -> None:
        audit = self._audit
        log.info("opaque tunnel idle; closed", extra={
            "request_id": audit.request_id if audit else None, "connect_host": audit.connect_host if audit else None,
            "idle_timeout_s": self.ctx.tunnel_idle_timeout})
        if self._tunnel is not None:
            self._tunnel.close()  # closes both sides and writes the tunnel's audit line

    def tunnel_closed(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        audit = self._audit
        if audit is not None and not audit.done:
            state = self.ctx.holder.current
            state.metrics.forward_tunnel_bytes.labels("up").inc(self.bytes_up)
            state.metrics.forward_tunnel_bytes.labels("down").inc(self.bytes_down)
            audit.finish(state, 200, "allowed", "tunnel", bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    def pause_writing(self) -> None:  # the caller reads slower than the tunnel host sends
        if self._tunnel is not None:
            self._tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.resume_reading()


class _TunnelUpstream(asyncio.Protocol):
    def __init__(self, caller: ForwardConnection) -> None:
        self.caller = caller
        self.transport: asyncio.Transport | None = None
        self._caller_eof = self._upstream_eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.caller.tunnel_data(data)

    def eof_received(self):
        self._upstream_eof = True
        caller = self.caller.transport
        if self._caller_eof or not caller.can_write_eof():
            self.close()
            return None
        caller.write_eof()
        return True

    def half_closed_by_caller(self) -> None:
        self._caller_eof = True
        if self._upstream_eof or self.transport is None or not self.transport.can_write_eof():
            self.close()
        else:
            self.transport.write_eof()

    def connection_lost(self, exc) -> None:
        self.caller.tunnel_closed()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:  # the tunnel host reads slower than the caller sends
        self.caller.transport.pause_reading()

    def resume_writing(self) -> None:
        self.caller.transport.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.caller.tunnel_closed()


@dataclass(eq=False)
class _ConnectAudit:
    request_id: str
    started: float
    client_ip: str | None
    caller: str | None = None
    connect_host: str | None = None
    tunnel: bool = False
    done: bool = False

    def finish(self, state, status: int, outcome: str, reason: str, **counts: int) -> None:
        self.done = True
        event = ForwardEvent(request_id=self.request_id, caller=self.caller, client_ip=self.client_ip,
                             credential=None, method="CONNECT", path="-", status=status, outcome=outcome,
                             reason=reason, duration_ms=round((time.monotonic() - self.started) * 1000, 3),
                             connect_host=self.connect_host, **counts)
        state.audit.write(event)
        if state.alerts is not None:
            state.alerts.observe(event)
