"""A credential at run time: where it goes, how material is obtained and injected,
what "expired" looks like, and its counters for the admin API.

Material comes from an ``AuthSource``: ``StaticSource`` here (secrets read from the
store through the cache); token types plug in their own source (``proxy.tokens``).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from yarl import URL

from proxy.upstream.mtls import ClientTLS
from proxy.config.models import CredentialConfig, ExpiredWhen, ServerConfig
from proxy.errors import CredentialUnavailable, SecretBackendError
from proxy.inject import Injector, injector_for
from proxy.redact.leak_guard import LeakGuard
from proxy.observe.metrics import Metrics
from proxy.upstream.address_policy import AddressPolicy
from proxy.redact.scrubber import SCRUBBER
from proxy.store.secret import Secret, SecretRef
from proxy.store.cache import SecretCache
from proxy.upstream.client import UpstreamClient, ssl_context


@dataclass(eq=False)
class Grant:
    """What one request injects: values by field name (or ``PATH#FIELD``), and, for
    flows whose login answer names the server, the upstream to use instead."""

    values: Mapping[str, Secret] = field(repr=False)
    upstream: URL | None = None

    @cached_property
    def guard(self) -> LeakGuard:
        return LeakGuard(s.reveal() for s in self.values.values())


class AuthSource(abc.ABC):
    kind = "static"

    @abc.abstractmethod
    async def grant(self, principal: str) -> Grant:
        """Material for ``principal`` (a caller name with its own per_caller entry, or "")."""

    @abc.abstractmethod
    async def expired(self, principal: str, used: Grant) -> bool:
        """The upstream said ``used`` is no longer valid. Get fresh material once;
        True when a replay with new material makes sense."""

    def refs(self) -> set[SecretRef]:
        """Every secret reference this source reads (readiness checks them)."""
        return set()

    def state(self) -> dict:
        return {"state": "static", "expires_in_s": None, "last_refresh": None, "last_error": None}

    async def refresh(self) -> None:
        """Admin: obtain fresh material now."""

    async def revoke(self) -> None:
        """Admin: drop cached material (and revoke it at the provider where supported)."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class StaticSource(AuthSource):
    """``header``, ``query``, ``basic``, ``aws_sigv4``, ``hmac``: the values are the stored secrets themselves."""

    def __init__(self, auth, cache: SecretCache, *, name: str = "", metrics=None) -> None:
        self._cache = cache
        self._name = name
        self._metrics = metrics
        self.last_refresh: float | None = None
        self._own = auth.ref_fields()
        self._template_refs = auth.template_refs()
        self._per_caller = auth.per_caller
        self._grants: dict[str, tuple[tuple[int, ...], Grant]] = {}
        self._refs: dict[str, dict[str, SecretRef]] = {}
        self.last_error: str | None = None

    def refs_for(self, principal: str) -> dict[str, SecretRef]:
        """The references ``principal`` reads (computed once per principal: they come from config; do not modify)."""
        refs = self._refs.get(principal)
        if refs is None:
            refs = self._refs[principal] = self._refs_from_config(principal)
        return refs

    def _refs_from_config(self, principal: str) -> dict[str, SecretRef]:
        refs = dict(self._own)
        refs.update(self._per_caller.get(principal, {}))
        for ref in self._template_refs:
            refs[str(ref)] = ref
        return refs

    def refs(self) -> set[SecretRef]:
        out = set(self.refs_for("").values())
        for principal in self._per_caller:
            out |= set(self.refs_for(principal).values())
        return out

    async def grant(self, principal: str) -> Grant:
        values: dict[str, Secret] = {}
        try:
            for name, ref in self.refs_for(principal).items():
                values[name] = await self._cache.read(ref)
        except SecretBackendError as exc:
            self.last_error = type(exc).__name__
            raise CredentialUnavailable(str(exc), reason="secret_unavailable", retry_after=5) from None
        key = tuple(id(v) for v in values.values())
        cached = self._grants.get(principal)
        if cached is not None and cached[0] == key:
            return cached[1]
        for name, ref in self.refs_for(principal).items():  # a rotated secret replaces its old value
            SCRUBBER.hold(("secret", str(ref)), values[name].reveal())
        g = Grant(values)
        self._grants[principal] = (key, g)
        return g

    async def expired(self, principal: str, used: Grant) -> bool:
        refs = self.refs_for(principal)
        for ref in set(refs.values()):
            await self._cache.reread(ref.path)
        # Replay when what is current now differs from what this request sent, whether the
        # re-read above or the background poller found the new version.
        try:
            for name, ref in refs.items():
                if await self._cache.read(ref) != used.values.get(name):
                    return True
        except SecretBackendError:
            pass
        return False

    async def revoke(self) -> None:
        self._grants.clear()

    async def refresh(self) -> None:
        """Re-read every secret from the backend now, e.g. right after an operator rotated one."""
        started = time.monotonic()
        try:
            entries = {path: await self._cache.refetch(path) for path in sorted({r.path for r in self.refs()})}
            for ref in self.refs():
                entries[ref.path].get(ref)  # a field missing at the new version fails the refresh too
        except SecretBackendError as exc:
            self.last_error = type(exc).__name__
            if self._metrics is not None:
                self._metrics.record_refresh(self._name, "secret_unavailable", time.monotonic() - started)
            raise CredentialUnavailable(str(exc), reason="secret_unavailable", retry_after=5) from None
        self.last_refresh = time.time()
        if self._metrics is not None:
            self._metrics.record_refresh(self._name, "ok", time.monotonic() - started)

    def state(self) -> dict:
        return dict(super().state(), last_refresh=self.last_refresh, last_error=self.last_error)


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
        self._expired_statuses = frozenset(m.status for m in self.expired_when)  # checked on every answer
        self.per_caller = cfg.auth.principals()  # callers with a principal of their own
        self.disabled = False
        self.stats = Stats()
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

    def expired_status(self, status: int) -> bool:
        return status in self._expired_statuses

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


def build_source(cfg: CredentialConfig, cache: SecretCache, **deps) -> AuthSource:
    """The one place that maps an auth type to its runtime source."""
    if cfg.auth.type in ("header", "query", "basic", "aws_sigv4", "hmac"):
        return StaticSource(cfg.auth, cache, name=deps.get("name", ""), metrics=deps.get("metrics"))
    from proxy.tokens import token_source  # token types live in their own package

    return token_source(cfg, cache, **deps)
