"""What every token kind implements, and the secrets of one principal a provider reads.

A provider speaks one protocol: it builds the request (plain functions in its
module), sends it through the token HTTP client, and validates the answer. It
keeps no token; ``lifecycle`` owns that.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yarl import URL

from proxy.errors import SecretBackendError
from proxy.redact.scrubber import SCRUBBER, secret_owner
from proxy.store.secret import Secret, SecretRef
from proxy.store.cache import SecretCache
from proxy.store.base import SecretStore
from proxy.tokens.answer import TokenAnswer, upstream_from
from proxy.errors import TokenFailure
from proxy.tokens.http import Answer, TokenHttp


@dataclass
class PrincipalSecrets:
    """The secret references of one principal (own fields, per-caller overrides, template
    placeholders by ``PATH#FIELD``) and where to read them."""

    principal: str
    refs: Mapping[str, SecretRef]
    cache: SecretCache
    store: SecretStore | None = field(default=None, repr=False)

    def has(self, name: str) -> bool:
        return name in self.refs

    async def read(self, name: str) -> Secret:
        try:
            value = await self.cache.read(self.refs[name])
        except SecretBackendError as exc:
            raise TokenFailure("secret_unavailable", f"{type(exc).__name__} for {self.refs[name].path}") from None
        SCRUBBER.hold(secret_owner(self.refs[name]), value.reveal())
        return value

    async def maybe(self, name: str) -> Secret | None:
        return await self.read(name) if name in self.refs else None


class Provider(abc.ABC):
    """One token protocol. ``wall`` (epoch seconds, for JWT claims) and ``new_id`` are injectable."""

    def __init__(self, http: TokenHttp, *, wall: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.http = http
        self.wall = wall
        self.new_id = new_id

    @abc.abstractmethod
    async def fetch(self, secrets: PrincipalSecrets) -> TokenAnswer:
        """Obtain a new token; raise ``TokenFailure`` with a fixed reason otherwise."""

    @property
    def revocable(self) -> bool:
        return False

    # Set by providers whose answers name the server that becomes the upstream (instance_url, serverUrl).
    base: URL | None = None
    insecure_ok: bool = False

    @property
    def takes_upstream(self) -> bool:
        return False

    def shared_upstream(self, upstream: URL | None) -> URL | None:
        """The server a token shared by another replica names (``cluster.backend: vault``), checked as this
        provider checks the answers it gets itself: a record read from Vault is not trusted further."""
        if not self.takes_upstream:
            if upstream is not None:
                raise TokenFailure("bad_instance_url", "the shared token names a server this credential takes none from")
            return None
        return upstream_from(str(upstream) if upstream is not None else None, self.base, self.insecure_ok)

    async def revoke(self, token: Secret, secrets: PrincipalSecrets) -> None:
        """Tell the provider the token is no longer used (RFC 7009) where configured."""

    async def post(self, req) -> Answer:
        return await self.http.send("POST", req.url, headers={
            "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json", **req.headers,
        }, body=req.encoded())
