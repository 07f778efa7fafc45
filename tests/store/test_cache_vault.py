"""The secret cache in front of the real Vault store: what the poller notices."""

from __future__ import annotations

import pytest

from proxy.config.models import VaultConfig
from proxy.store.secret import SecretRef
from proxy.store.cache import SecretCache
from proxy.store.vault import VaultStore
from tests.vault_fixture import bao  # noqa: F401 - fixture


@pytest.fixture
async def cache(bao, tmp_path):
    tf = tmp_path / "t"
    tf.write_text(bao.root_token)
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "token", "token_file": str(tf)}))
    await store.start()
    cache = SecretCache(store, refresh_interval=0,  # polled by hand below
                        on_backend_error=lambda exc: cache.failed.append(type(exc).__name__))
    cache.failed = []
    yield cache
    await cache.close()
    await store.close()


async def test_poll_picks_up_a_new_version_and_tells_listeners(bao, cache):
    ref = SecretRef.parse("cache/rot#token")
    bao.put("cache/rot", {"token": "v1"})
    changed = []
    cache.on_change(changed.append)
    assert (await cache.read(ref)).reveal() == "v1"
    await cache.poll_once()
    assert changed == [] and (await cache.read(ref)).reveal() == "v1"
    bao.put("cache/rot", {"token": "v2"})
    await cache.poll_once()
    assert changed == ["cache/rot"] and (await cache.read(ref)).reveal() == "v2"
    assert cache.failed == []


async def test_a_path_deleted_and_written_anew_is_noticed_even_at_the_same_version(bao, cache):
    ref = SecretRef.parse("cache/recreated#token")
    bao.put("cache/recreated", {"token": "before"})
    assert (await cache.read(ref)).reveal() == "before"
    bao.root().secrets.kv.v2.delete_metadata_and_all_versions(path="cache/recreated")
    assert bao.put("cache/recreated", {"token": "after"}) == 1  # the same version number as before
    await cache.poll_once()
    assert (await cache.read(ref)).reveal() == "after"


async def test_a_deleted_secret_is_dropped_and_counted(bao, cache):
    ref = SecretRef.parse("cache/gone#token")
    bao.put("cache/gone", {"token": "x"})
    await cache.read(ref)
    bao.root().secrets.kv.v2.delete_latest_version_of_secret(path="cache/gone")
    await cache.poll_once()
    assert not cache.cached("cache/gone") and cache.failed == ["SecretNotFound"]
