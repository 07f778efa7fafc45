"""Caller connections per process (``server.limits.max_connections``), shared by the
main and dedicated listeners (not admin).

A connection is counted from the moment it is established (after the TLS
handshake on TLS listeners) until it closes, however it closes. One that arrives
while the count is at the limit never reaches the HTTP parser: it is answered at once
with a fixed ``503 overloaded`` JSON answer (``Connection: close``,
``Retry-After: 1``), without reading its request, so an overloaded process spends
no parsing on it. Callers get a status they can act on (back off, try another
replica) rather than a bare reset that looks like a network fault.

Closing a socket with unread input resets the connection, which can destroy the
answer before the client reads it. So after the answer a refused connection is
half-closed (where the transport allows) and its input read and dropped until the
client closes — it has its answer — or ``LINGER`` passes, when it is aborted.

Each refusal is counted (``credproxy_connections_refused_total``) and audited
(status 503, reason ``too_many_connections``, the client address); the first
refusal after a period of admitting is also logged, once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable

from proxy import errors
from proxy.observe.audit import AuditEvent

log = logging.getLogger("credproxy.server")

LINGER = 2.0
RETRY_AFTER = 1
REASON = "too_many_connections"
OnRefused = Callable[[str | None, str], None]  # (client address, request ID)


class ConnectionLimit:
    def __init__(self, limit: int, *, on_refused: OnRefused | None = None, linger: float = LINGER) -> None:
        self.limit = limit
        self.open = 0
        self._on_refused = on_refused
        self._linger = linger
        self._refusing = False
        self._refusals: set[Refusal] = set()

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection, or hand its transport to a ``Refusal`` and return False."""
        if self.open < self.limit:
            self.open += 1
            self._refusing = False
            return True
        request_id = secrets.token_hex(16)
        answer = errors.to_bytes(errors.Overloaded(reason=REASON, retry_after=RETRY_AFTER), request_id)
        self._refusals.add(Refusal(transport, answer, self._linger, self._refusals.discard))
        client = client_address(transport)
        if not self._refusing:
            self._refusing = True
            log.warning("max_connections reached: refusing new caller connections",
                        extra={"max_connections": self.limit, "client": client})
        if self._on_refused is not None:
            self._on_refused(client, request_id)
        return False

    def release(self) -> None:
        self.open -= 1

    def close(self) -> None:
        """Abort refused connections still lingering (at shutdown)."""
        for refusal in list(self._refusals):
            refusal.abort()


class Refusal(asyncio.Protocol):
    """Takes over a refused connection: writes the answer, then drops input until the client closes."""

    def __init__(self, transport: asyncio.Transport, answer: bytes, linger: float,
                 done: Callable[["Refusal"], None]) -> None:
        self._transport = transport
        self._done = done
        transport.set_protocol(self)
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(linger, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        self._done(self)

    def abort(self) -> None:
        self._transport.abort()


def record_refusal(state, client: str | None, request_id: str) -> None:
    """Audit and count one refused connection (``state``: the current ``proxy.lifecycle.state.State``)."""
    state.audit.write(AuditEvent.refused(request_id, client, errors.Overloaded.status, REASON))
    state.metrics.connections_refused.inc()


def client_address(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    if not peer or not isinstance(peer, tuple):
        return None  # unix socket
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)
