"""``StaticSource``: the ``AuthSource`` of ``header``, ``query``, ``basic``, ``aws_sigv4`` and
``hmac``, whose injected values are the stored secrets themselves, read through the cache."""

from __future__ import annotations

import time

from proxy.errors import CredentialUnavailable, SecretBackendError
from proxy.grant import AuthSource, Grant
from proxy.redact.scrubber import SCRUBBER, secret_owner
from proxy.store.base import SecretEntry
from proxy.store.cache import SecretCache
from proxy.store.secret import SecretRef


class StaticSource(AuthSource):
    """``header``, ``query``, ``basic``, ``aws_sigv4``, ``hmac``: the values are the stored secrets themselves."""

    def __init__(self, auth, cache: SecretCache, *, name: str = "", metrics=None) -> None:
        self._cache = cache
        self._name = name
        self._metrics = metrics
        self.last_refresh: float | None = None
        self._auth = auth
        # principal -> ((path, the cache entry its values came from), ...), and the grant built from them
        self._grants: dict[str, tuple[tuple[tuple[str, SecretEntry], ...], Grant]] = {}
        self._refs: dict[str, dict[str, SecretRef]] = {}
        self.last_error: str | None = None

    def _refs_of(self, principal: str) -> dict[str, SecretRef]:
        """``auth.refs_for(principal)``, computed once per principal (they come from config; do not modify)."""
        refs = self._refs.get(principal)
        if refs is None:
            refs = self._refs[principal] = self._auth.refs_for(principal)
        return refs

    def refs(self) -> set[SecretRef]:
        return self._auth.all_refs()

    def ready(self, principal: str) -> Grant | None:
        """The grant built from the cache entries that are still current (same version, read, fresh enough):
        one object per secret version, so the injector's rendered header and the leak guard are built once
        per version. None when an entry rotated, was dropped or went stale: ``grant`` then reads again."""
        held = self._grants.get(principal)
        if held is None:
            return None
        entries, grant = held
        current = self._cache.current
        for path, entry in entries:
            if current(path) is not entry:
                return None
        return grant

    async def grant(self, principal: str) -> Grant:
        found = self.ready(principal)
        if found is not None:
            return found
        refs = self._refs_of(principal)
        entries: dict[str, SecretEntry] = {}
        try:
            for ref in refs.values():
                if ref.path not in entries:
                    entries[ref.path] = await self._cache.entry(ref.path)
            values = {name: entries[ref.path].get(ref) for name, ref in refs.items()}
        except SecretBackendError as exc:
            self.last_error = type(exc).__name__
            raise CredentialUnavailable(str(exc), reason="secret_unavailable", retry_after=5) from None
        for name, ref in refs.items():  # a rotated secret replaces its old value
            SCRUBBER.hold(secret_owner(ref), values[name].reveal())
        g = Grant(values)
        self._grants[principal] = (tuple(entries.items()), g)
        return g

    async def expired(self, principal: str, used: Grant) -> bool:
        refs = self._refs_of(principal)
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
