"""Open a connection to an upstream: resolve, check every address, connect to a checked one, TLS.

The name is resolved once, every address it resolves to is checked with the
``AddressPolicy`` (one refused address refuses the name: a name that mixes a
public address with a metadata or internal one is not trusted with either), and
the socket is connected to an address that was checked — never to the name
again, so a DNS answer that changes between the check and the connect (DNS
rebinding) cannot steer it. TLS verifies the certificate against the name (SNI
and host name check) with the credential's context, which carries its CA and
client certificate. The whole connect, TLS handshake included, is bounded by the
connect timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable

from proxy.errors import AddressDenied
from proxy.upstream.address_policy import AddressPolicy

Address = tuple[int, tuple]  # (family, sockaddr)
Resolver = Callable[[str, int], Awaitable[list[Address]]]


async def resolve(host: str, port: int) -> list[Address]:
    """The system resolver's addresses for ``host`` (an IP literal is its own answer)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _canon, sockaddr in infos]


async def dial(factory: Callable[[], asyncio.Protocol], host: str, port: int, *, ssl_ctx: ssl.SSLContext | None,
               policy: AddressPolicy, timeout: float, resolver: Resolver = resolve):
    """``(transport, protocol)`` for a new connection. Raises ``AddressDenied``, ``TimeoutError`` or another
    ``OSError`` (``ssl.SSLError`` for a failed handshake)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        addresses = await resolver(host, port)
        if not addresses:
            raise OSError(f"no address for {host}")
        for _family, sockaddr in addresses:
            why = policy.refusal(sockaddr[0], sockaddr[1])
            if why is not None:
                raise AddressDenied(why)
        failure: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            try:
                return await loop.create_connection(factory, sock=sock, ssl=ssl_ctx,
                                                    server_hostname=host if ssl_ctx is not None else None,
                                                    ssl_handshake_timeout=timeout if ssl_ctx is not None else None)
            except BaseException:
                sock.close()
                raise
        raise failure or OSError(f"cannot connect to {host}")
