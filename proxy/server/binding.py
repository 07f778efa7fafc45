"""Listening sockets and TLS contexts for caller listeners, made before anything serves on them.

Binding is separate from serving so a reload can take every address it needs
(and fail on one that is taken) while the running listeners go on as they are;
the bound sockets only start accepting when the new config is committed.
Until then the kernel queues connections in the backlog.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat

from proxy.config.fields import Listen
from proxy.config.models import TLSConfig

# aiohttp's default of 128 pending connections drops SYNs when thousands of callers connect at once (they
# retry after 1 s, 3 s, ...); the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def server_ssl(tls: TLSConfig | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # callers may use a token instead; a cert presented is verified
    return ctx


def bind_sockets(listen: Listen, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening, non-blocking sockets for ``listen`` (a host name may give one per address family),
    as ``loop.create_server`` would bind them; raises ``OSError`` with nothing left open."""
    if listen.unix:
        return [_bind_unix(listen.unix)]
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_unix(path: str) -> socket.socket:
    try:  # a socket file left behind by an earlier run (asyncio's create_unix_server does the same)
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def address_of(sock: socket.socket) -> tuple[str, int] | None:
    """(host, port) of a bound TCP socket; None for a unix socket."""
    if sock.family == socket.AF_UNIX:
        return None
    host, port = sock.getsockname()[:2]
    return host, port
