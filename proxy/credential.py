"""A credential at run time: where it goes, how material is obtained and injected,
what "expired" looks like, and its counters for the admin API.

Material comes from an ``AuthSource`` (``proxy.grant``), built for the credential's
auth type by ``proxy.auth_types``, which also names its injector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from yarl import URL

from proxy.auth_types import injector_for
from proxy.config.models import CredentialConfig, ExpiredWhen, ServerConfig
from proxy.grant import AuthSource
from proxy.inject import Injector
from proxy.observe.metrics import CredentialMetrics, Metrics
from proxy.store.cache import SecretCache
from proxy.store.secret import SecretRef
from proxy.upstream.address_policy import AddressPolicy
from proxy.upstream.client import UpstreamClient, ssl_context
from proxy.upstream.mtls import ClientTLS


@dataclass
class Stats:
    requests: int = 0
    last_used: float | None = None


class Credential:
    def __init__(self, name: str, cfg: CredentialConfig, server: ServerConfig, source: AuthSource,
                 leak_guard: str, *, cache: SecretCache | None = None, metrics: Metrics | None = None,
                 address_policy: AddressPolicy | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.base = URL(cfg.upstream)
        self.source = source
        self.injector: Injector = injector_for(cfg.auth)
        self.leak_guard = leak_guard
        self.expired_when: tuple[ExpiredWhen, ...] = tuple(cfg.session.expired_when)
        self.needs_body_peek = any(m.body_contains for m in self.expired_when)
        self.expired_statuses = frozenset(m.status for m in self.expired_when)  # checked on every answer
        self.per_caller = cfg.auth.principals()  # callers with a principal of their own
        self.disabled = False
        self.stats = Stats()
        self.metrics = CredentialMetrics(metrics, name) if metrics is not None else None
        ca = cfg.upstream_tls.ca_file if cfg.upstream_tls else None
        self.tls: ClientTLS | None = None
        if cfg.upstream_tls is not None and cfg.upstream_tls.client_cert is not None:
            if cache is None:
                raise TypeError("a credential with a client certificate needs the secret cache")
            self.tls = ClientTLS(name, cfg.upstream_tls, cache,
                                 expiry_gauge=metrics.upstream_cert_expires if metrics else None)
        self.client = UpstreamClient(connect_timeout=server.connect_timeout, read_timeout=server.read_timeout,
                                     ssl_ctx=ssl_context(ca), ssl_provider=self.tls.context if self.tls else None,
                                     address_policy=address_policy)

    def principal(self, caller: str) -> str:
        return caller if caller in self.per_caller else ""

    def is_expired(self, status: int, body_head: bytes) -> bool:
        for m in self.expired_when:
            if m.status == status and (m.body_contains is None or m.body_contains.encode() in body_head):
                return True
        return False

    def refs(self) -> set[SecretRef]:
        """Every secret reference this credential reads (readiness and warm-up check them)."""
        return self.source.refs() | (self.tls.refs() if self.tls else set())

    def touch(self) -> None:
        self.stats.requests += 1
        self.stats.last_used = time.time()

    def describe(self) -> dict:
        st = self.source.state()
        if self.disabled:
            st = dict(st, state="disabled")
        tls = {"upstream_tls": self.tls.describe()} if self.tls else {}
        return {"name": self.name, "upstream": self.cfg.upstream, "auth_type": self.cfg.auth.type, **st,
                "last_used": self.stats.last_used, "requests": self.stats.requests, **tls}

    async def start(self) -> None:
        await self.source.start()
        if self.tls:
            await self.tls.start()

    async def close(self) -> None:
        await self.source.close()
        if self.tls:
            await self.tls.close()
        await self.client.close()
