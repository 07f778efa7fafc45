"""A caller listener: the sockets one kind of connection is served on, and its open connections.

``start`` binds and serves (TCP or unix, TLS when given an ``ssl.SSLContext``); ``serve``
serves a socket bound beforehand (``proxy.server.binding``: a reload binds first and
serves once it commits); ``stop_sites`` closes the sockets only; ``stop_accepting``
also shuts the HTTP connections down (idle ones at once, busy ones after the answer in
progress); ``cleanup`` waits ``grace`` for them to finish writing, then aborts what is
left, and the ``pending`` connections too (the forward listener's CONNECTs not yet
handed to HTTP).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable

from proxy.config.fields import Listen
from proxy.server.binding import LISTEN_BACKLOG
from proxy.server.connection import ConnectionContext, HTTPConnection


class CallerListener:
    def __init__(self, factory: Callable[[], asyncio.Protocol], *, live: set, pending: set | None = None,
                 grace: float = 1.0, handshake_timeout: float = 0.0) -> None:
        self._factory = factory
        self.live = live  # HTTPConnections (their context's ``live``)
        self.pending = pending if pending is not None else set()
        self.grace = grace
        self._handshake = {"ssl_handshake_timeout": handshake_timeout} if handshake_timeout > 0 else {}
        self.sites: list[asyncio.AbstractServer] = []

    @classmethod
    def http(cls, ctx_factory: Callable[[set], ConnectionContext], *, grace: float = 1.0) -> "CallerListener":
        """A listener of ``HTTPConnection``s; ``ctx_factory(live)`` builds their context around its set."""
        live: set = set()
        ctx = ctx_factory(live)
        return cls(lambda: HTTPConnection(ctx), live=live, grace=grace, handshake_timeout=ctx.header_timeout)

    async def start(self, listen: Listen, ssl_ctx: ssl.SSLContext | None, *, reuse_port: bool = False,
                    backlog: int = LISTEN_BACKLOG) -> list[tuple]:
        """Bind and serve; returns the bound socket addresses (empty for a unix socket)."""
        loop = asyncio.get_running_loop()
        tls = self._handshake if ssl_ctx is not None else {}
        if listen.unix:
            server = await loop.create_unix_server(self._factory, listen.unix, ssl=ssl_ctx, backlog=backlog, **tls)
            self.sites.append(server)
            return []
        server = await loop.create_server(self._factory, listen.host, listen.port, ssl=ssl_ctx, backlog=backlog,
                                          reuse_address=True, reuse_port=reuse_port or None, **tls)
        self.sites.append(server)
        return [s.getsockname() for s in server.sockets]

    async def serve(self, sock: socket.socket, ssl_ctx: ssl.SSLContext | None, *,
                    backlog: int = LISTEN_BACKLOG) -> None:
        """Serve a socket bound and listening already."""
        loop = asyncio.get_running_loop()
        tls = self._handshake if ssl_ctx is not None else {}
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock, ssl=ssl_ctx, backlog=backlog, **tls)
        else:
            server = await loop.create_server(self._factory, sock=sock, ssl=ssl_ctx, backlog=backlog, **tls)
        self.sites.append(server)

    async def stop_sites(self) -> None:
        """Close the listening sockets only (connections carry on)."""
        sites, self.sites = self.sites, []
        for server in sites:
            server.close()  # the sockets close at once; not wait_closed(): from 3.12 it waits for connections

    async def stop_accepting(self) -> None:
        await self.stop_sites()
        for conn in list(self.live):
            conn.shutdown()

    async def cleanup(self) -> None:
        await self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.02)  # shutdown only: answers still being written get their grace
        for conn in [*self.live, *self.pending]:
            conn.abort()
        self.live.clear()
