"""The pooled upstream client: one aiohttp session per credential.

Redirects are passed through, never followed; bodies are not decompressed; the
environment's proxy settings are ignored; hop-by-hop headers are dropped both
ways; every address is checked by the ``netguard.AddressPolicy`` as it is
connected to. Transport failures become ``UpstreamError`` / ``UpstreamTimeout``.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.address_policy import AddressDenied, AddressPolicy
from proxy.upstream.outbound import Outbound

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    "Proxy-Authenticate", "Proxy-Authorization", "HTTP2-Settings",
))


def strip_hop_by_hop(headers: CIMultiDict[str] | CIMultiDictProxy[str],
                     drop: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """A copy without the lower-case names in ``drop`` (a superset of ``HOP_BY_HOP``, prepared once) and those
    named in ``Connection``."""
    if "Connection" in headers:
        drop = drop | {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    # One pass over the few headers a request has, rather than a removal per name that might be there (~50).
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])


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


class UpstreamClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float, ssl_ctx: ssl.SSLContext | None = None,
                 limit: int = 256, ssl_provider: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
                 address_policy: AddressPolicy | None = None) -> None:
        self._ssl = ssl_ctx or ssl_context()
        # Asked before each request (client certificates rotate); pools are kept per context.
        self._ssl_provider = ssl_provider
        self._addresses = address_policy or AddressPolicy()
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl, enable_cleanup_closed=True,
                                             socket_factory=self._addresses.socket_factory)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        return self._session

    async def send(self, out: Outbound) -> aiohttp.ClientResponse:
        ssl_ctx = await self._ssl_provider() if self._ssl_provider else self._ssl
        try:
            return await self.session.request(
                out.method, out.url, headers=out.headers, data=out.body, allow_redirects=False,
                compress=None, chunked=None, ssl=ssl_ctx,
            )
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressDenied):
                raise UpstreamError(exc.os_error.why, reason="upstream_address_denied") from None
            raise UpstreamError(f"connect failed: {type(exc).__name__}", reason="upstream_connect") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamError(f"upstream request failed: {type(exc).__name__}", reason="upstream_failed") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
