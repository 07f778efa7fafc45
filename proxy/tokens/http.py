"""The token HTTP client: its own aiohttp session, never the injecting upstream path.

Environment proxies are ignored, TLS is verified (plus ``upstream_tls.ca_file``),
redirects are not followed, cookies are not kept, answers are capped at 1 MiB and
every call is bounded by a total timeout. Transport failures become ``TokenFailure``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from proxy.upstream.address_policy import AddressPolicy
from proxy.errors import TokenFailure
from proxy.upstream.client import ssl_context

MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes = field(repr=False)


class TokenHttp:
    def __init__(self, *, ca_file: str | None = None, connect_timeout: float = 10.0, total_timeout: float = 30.0,
                 ssl_ctx: ssl.SSLContext | None = None, address_policy: AddressPolicy | None = None) -> None:
        self._ssl = ssl_ctx or ssl_context(ca_file)
        # Token endpoints get the always-refused ranges too (metadata, link-local): a login
        # answer may name the next URL.
        self._addresses = address_policy or AddressPolicy()
        self._timeout = aiohttp.ClientTimeout(total=total_timeout, connect=connect_timeout,
                                              sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16, socket_factory=self._addresses.socket_factory),
                timeout=self._timeout, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True,
            )
        return self._session

    async def send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None) -> Answer:
        try:
            async with self.session.request(method, url, headers=dict(headers), data=body,
                                            allow_redirects=False) as resp:
                data = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise TokenFailure("too_large", f"answer over {MAX_ANSWER} bytes (HTTP {resp.status})")
                return Answer(resp.status, resp.headers.get("Content-Type", "").lower(), bytes(data))
        except TokenFailure:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise TokenFailure("timeout", "no answer within the token request timeout") from None
        except aiohttp.ClientConnectorCertificateError:
            raise TokenFailure("tls", "certificate verification failed") from None
        except aiohttp.ClientSSLError:
            raise TokenFailure("tls", "TLS handshake failed") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise TokenFailure("unreachable", type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
