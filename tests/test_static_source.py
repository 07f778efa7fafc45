"""The static source hands out one grant per secret version: the same object while the cached entry is
current, a new one (with the new value) from the first request after a rotation, and none without the
backend once the entry is too stale to serve."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config.auth import HeaderAuth
from proxy.errors import CredentialUnavailable, SecretBackendError, SecretNotFound
from proxy.static_source import StaticSource
from proxy.store.base import SecretEntry, SecretStore
from proxy.store.cache import SecretCache
from proxy.store.secret import Secret


class _Store(SecretStore):
    def __init__(self) -> None:
        self.value, self.at, self.failing, self.reads = "sk_static_source_v1", 1, False, 0

    async def get(self, path: str) -> SecretEntry:
        self.reads += 1
        if self.failing:
            raise SecretBackendError("backend down")
        if path != "apis/x":
            raise SecretNotFound(path)
        return SecretEntry({"token": Secret(self.value)}, self.at)

    async def put(self, path, field, value, *, cas=None) -> int:  # pragma: no cover - not used here
        raise NotImplementedError


def _source(max_staleness: float = 60.0):
    now = [0.0]
    store = _Store()
    cache = SecretCache(store, refresh_interval=0, max_staleness=max_staleness, clock=lambda: now[0])
    auth = HeaderAuth(type="header", header="X-Key", secret="apis/x#token")
    return StaticSource(auth, cache, name="x"), store, cache, now


def test_one_grant_per_version_and_a_new_one_after_rotation():
    async def run():
        source, store, cache, _ = _source()
        assert source.ready("") is None  # nothing read yet: the request path awaits grant()
        first = await source.grant("")
        assert source.ready("") is first and await source.grant("") is first and store.reads == 1
        store.value, store.at = "sk_static_source_v2", 2
        await cache.poll_once()  # the poller sees the new version and re-reads it
        assert source.ready("") is None
        second = await source.grant("")
        assert second is not first and second.values["secret"].reveal() == "sk_static_source_v2"
        assert source.ready("") is second

    asyncio.run(run())


def test_a_stale_entry_is_not_served_without_the_backend():
    async def run():
        source, store, _, now = _source(max_staleness=10.0)
        await source.grant("")
        now[0] = 11.0
        store.failing = True
        assert source.ready("") is None
        with pytest.raises(CredentialUnavailable):
            await source.grant("")

    asyncio.run(run())
