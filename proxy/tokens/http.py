"""The token HTTP client: its own aiohttp session, never the injecting upstream path.

Environment proxies are ignored, TLS is verified (plus ``upstream_tls.ca_file``),
redirects are not followed, cookies are not kept, answers are capped at 1 MiB and
every call is bounded by a total timeout. Transport failures become ``TokenFailure``.

Every connection is checked by the address policy in force (``address_policy``: the
committed State's, read at each call — a token source outlives the State it was built
for when a reload keeps it, and a rejected reload never commits its rules), the way
``proxy.upstream.dial`` checks upstreams: the name is resolved once and one refused
address refuses the name; the socket factory checks the address connected to again
(IP literals do not go through the resolver). Pooled
connections belong to the policy they were opened under: when the rules change, the
next call opens new ones and the old pool closes once its calls are done.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver

from proxy.errors import AddressDenied, TokenFailure
from proxy.upstream.address_policy import AddressPolicy
from proxy.upstream.dial import Resolver, resolve
from proxy.upstream.client import ssl_context

MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes = field(repr=False)


class _CheckedResolver(AbstractResolver):
    """aiohttp's resolver for token calls: every address a name resolves to is checked first."""

    def __init__(self, rules: AddressPolicy, resolver: Resolver) -> None:
        self._rules = rules
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[dict]:
        addresses = await self._resolver(host, port)
        if not addresses:
            raise OSError(f"no address for {host}")
        for _family, sockaddr in addresses:
            why = self._rules.refusal(sockaddr[0], sockaddr[1])
            if why is not None:
                raise AddressDenied(why)
        return [{"hostname": host, "host": sockaddr[0], "port": sockaddr[1], "family": fam, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for fam, sockaddr in addresses]

    async def close(self) -> None:
        pass


class TokenHttp:
    def __init__(self, *, ca_file: str | None = None, connect_timeout: float = 10.0, total_timeout: float = 30.0,
                 ssl_ctx: ssl.SSLContext | None = None,
                 address_policy: AddressPolicy | Callable[[], AddressPolicy] | None = None,
                 resolver: Resolver = resolve) -> None:
        self._ssl = ssl_ctx or ssl_context(ca_file)
        # Without a config: the always-refused ranges (metadata, link-local) still apply.
        policy = address_policy or AddressPolicy()
        self._rules: Callable[[], AddressPolicy] = policy if callable(policy) else (lambda: policy)
        self._resolver = resolver
        self._timeout = aiohttp.ClientTimeout(total=total_timeout, connect=connect_timeout,
                                              sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._session_rules: AddressPolicy | None = None
        self._calls: dict[aiohttp.ClientSession, int] = {}  # calls in flight per session (old pools close after)

    @property
    def addresses(self) -> AddressPolicy:
        """The address policy the next call is checked by."""
        return self._rules()

    def _session_for(self, rules: AddressPolicy) -> aiohttp.ClientSession:
        if self._session is None or self._session_rules != rules:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16, socket_factory=rules.socket_factory,
                                               resolver=_CheckedResolver(rules, self._resolver)),
                timeout=self._timeout, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True,
            )
            self._session_rules = rules
        return self._session

    async def send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None) -> Answer:
        old = self._session
        session = self._session_for(self._rules())
        if old is not None and old is not session and not self._calls.get(old):
            await old.close()  # opened under rules no longer in force, and idle
        self._calls[session] = self._calls.get(session, 0) + 1
        try:
            async with session.request(method, url, headers=dict(headers), data=body,
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
        finally:
            left = self._calls[session] = self._calls[session] - 1
            if not left:
                del self._calls[session]
                if session is not self._session:  # the rules changed while this call ran
                    await session.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
