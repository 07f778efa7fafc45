"""What no running config references is let go after a reload: the secret cache forgets it (it is no
longer polled) and the log scrubber releases its value (after the grace period). A rejected reload
leaves the cache as it was; a committed one that removes a credential stops polling its secrets."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from proxy.config import models as config_mod
from proxy.redact.scrubber import SCRUBBER
from proxy.store.cache import SecretCache
from proxy.store.file import FileStore
from proxy.store.secret import SecretRef
from tests.ops_support import (ADMIN_TOKEN, CANARY, Admin, base_config, call, credential, make_store, put_secret,
                               running, upstream, write_config)

__all__ = ["upstream"]

SECOND = CANARY + "-unreferenced"  # not a value other test modules hold in the shared scrubber


@pytest.fixture
def secrets(tmp_path):
    return make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": SECOND}})


def _reload(proxy):
    return Admin(proxy.cfg.admin.listen, ADMIN_TOKEN).call("POST", "/v1/reload")


async def _retired(proxy) -> None:
    """Until the reload's old State has been retired (it has no request left, so this is prompt)."""
    for _ in range(500):
        if not proxy.reloader._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the old config was not retired")


def _rotations(caplog, path: str) -> list:
    return [r for r in caplog.records if r.getMessage() == "secret rotated" and getattr(r, "secret_path", "") == path]


async def test_a_rejected_reload_leaves_the_secret_cache_as_it_was(tmp_path, secrets, upstream, caplog):
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        async with running(path) as proxy:
            assert (await call(proxy, "/demo/v1/x"))[0] == 200
            data["credentials"]["second"] = credential(upstream.url, secret="api/second#token",
                                                       listen="127.0.0.1:%d" % busy.getsockname()[1])
            write_config(path, data)
            status, body, _ = await _reload(proxy)
            assert status == 422, body  # api/second was read (it is readable), then the listener failed

            cache = proxy.holder.current.cache
            assert not cache.cached("api/second")
            assert cache.cached("api/demo")
            # The poller does not keep reading it: a rotation of it goes unnoticed.
            put_secret(secrets, "api/second", "token", SECOND + "-rotated")
            put_secret(secrets, "api/demo", "token", CANARY + "-rotated")
            caplog.set_level(logging.INFO, logger="credproxy.secrets")
            await cache.poll_once()
            assert _rotations(caplog, "api/second") == []
            assert len(_rotations(caplog, "api/demo")) == 1


async def test_a_removed_credential_is_no_longer_polled_nor_held_by_the_scrubber(tmp_path, secrets, upstream,
                                                                                 monkeypatch, caplog):
    monkeypatch.setattr(SCRUBBER, "grace", 0.0)  # released values leave at once (the default keeps them 300 s)
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url),
                                           "second": credential(upstream.url, secret="api/second#token")},
                       admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path) as proxy:
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        assert (await call(proxy, "/second/v1/x"))[0] == 200
        assert SECOND in SCRUBBER.values
        del data["credentials"]["second"]
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["credentials"]["removed"] == ["second"], body
        await _retired(proxy)

        cache = proxy.holder.current.cache
        assert not cache.cached("api/second")
        assert cache.cached("api/demo")
        assert SECOND not in SCRUBBER.values
        assert CANARY in SCRUBBER.values  # still referenced: still scrubbed
        put_secret(secrets, "api/second", "token", SECOND + "-rotated")
        caplog.set_level(logging.INFO, logger="credproxy.secrets")
        await cache.poll_once()
        assert _rotations(caplog, "api/second") == []


async def test_a_released_value_is_still_scrubbed_for_the_grace_period(tmp_path, secrets, upstream):
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url),
                                           "second": credential(upstream.url, secret="api/second#token")},
                       admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path) as proxy:
        assert (await call(proxy, "/second/v1/x"))[0] == 200
        del data["credentials"]["second"]
        write_config(path, data)
        assert (await _reload(proxy))[0] == 200
        await _retired(proxy)
        assert SECOND in SCRUBBER.values  # a log line about a request that used it is still clean
        assert SECOND not in SCRUBBER.scrub(f"late line {SECOND}")


class SlowStore:
    """Fault-injecting fake around a real file store: ``get`` waits until ``release`` is set (a Vault
    that answers after the reload that asked gave up)."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.release = asyncio.Event()

    async def get(self, path: str):
        await self.release.wait()
        return await self.store.get(path)

    async def stamp(self, path: str):
        return await self.store.stamp(path)


async def test_a_read_in_flight_when_its_path_is_forgotten_is_not_kept(secrets):
    store = SlowStore(FileStore.from_config(config_mod.FileStoreConfig(**secrets["file"])))
    cache = SecretCache(store, refresh_interval=0)
    ref = SecretRef.parse("api/second#token")
    read = asyncio.ensure_future(cache.read(ref))
    await asyncio.sleep(0)
    cache.forget({"api/second"})
    store.release.set()
    assert (await read).reveal() == SECOND  # the reader still gets its answer
    assert not cache.cached("api/second")
    await cache.read(ref)  # a later read is kept again
    assert cache.cached("api/second")
