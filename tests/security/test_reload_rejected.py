"""A rejected reload changes nothing that runs (SPEC §11): not the upstream address rules, the rules,
the rate limits, the alert thresholds, the listeners or the credentials — whichever way it is rejected.

Each new config below loosens everything it can (private upstreams allowed, alerts on the first
denial, a fuller rate limit, POST-only rules, another secret, moved and added listeners) and carries
one poison that gets it rejected. Before the reload was a transaction, a config rejected for a
listener that could not bind (or accepted despite a missing secret) had already switched the
address policy and the alert settings of the running proxy.
"""

from __future__ import annotations

import asyncio
import copy
import socket

import aiohttp
import pytest

from tests.ops_support import (ADMIN_TOKEN, CANARY, Admin, audit_lines, base_config, call, credential, free_port,
                               make_store, running, upstream, write_config)  # noqa: F401 - upstream is a fixture

PRIVATE_UPSTREAM = "http://10.255.255.1:9"  # never reached: the running config refuses private addresses


@pytest.fixture
def secrets(tmp_path):
    return make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": CANARY + "-second"}})


def running_config(tmp_path, secrets, upstream, listen_port: int) -> dict:
    data = base_config(tmp_path, secrets, {
        "demo": credential(upstream.url, listen=f"127.0.0.1:{listen_port}",
                           allow=[{"callers": ["app"], "methods": ["GET"], "paths": ["/**"]}]),
        "limited": credential(upstream.url, rate_limit={"rps": 0.001, "burst": 2}),
        "inside": credential(PRIVATE_UPSTREAM),
    }, admin_token=True)
    data["server"].update({"deny_private_upstreams": True, "connect_timeout": "300ms"})
    data["alerts"] = {"denied_threshold": 10, "denied_window": "10m"}
    return data


def loosened(data: dict, upstream, new_port: int) -> dict:
    new = copy.deepcopy(data)
    new["server"]["deny_private_upstreams"] = False
    new["alerts"]["denied_threshold"] = 1
    demo = new["credentials"]["demo"]
    demo["listen"] = f"127.0.0.1:{new_port}"
    demo["auth"]["secret"] = "api/second#token"
    demo["allow"][0]["methods"] = ["POST"]
    new["credentials"]["limited"]["rate_limit"] = {"rps": 100, "burst": 100}
    new["credentials"]["added"] = credential(upstream.url, secret="api/second#token")
    return new


def poison_invalid(new: dict, upstream, busy_port: int) -> None:
    new["credentials"]["broken"] = {"upstream": "https://example.com"}  # no auth


def poison_listener(new: dict, upstream, busy_port: int) -> None:
    new["credentials"]["second"] = credential(upstream.url, secret="api/second#token",
                                              listen=f"127.0.0.1:{busy_port}")


def poison_secret(new: dict, upstream, busy_port: int) -> None:
    new["credentials"]["later"] = credential(upstream.url, secret="api/missing#token")


async def refused_connection(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@pytest.mark.parametrize("poison, where", [
    (poison_invalid, "credentials.broken.auth"),
    (poison_listener, "credentials.second.listen"),
    (poison_secret, "credentials.later.auth.secret"),
], ids=["invalid-config", "listener-cannot-bind", "secret-cannot-be-read"])
async def test_a_rejected_reload_leaves_the_running_gate_as_it_was(tmp_path, secrets, upstream, poison, where):
    demo_port, new_port = free_port(), free_port()
    data = running_config(tmp_path, secrets, upstream, demo_port)
    path = write_config(tmp_path / "config.yaml", data)
    demo = f"http://127.0.0.1:{demo_port}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        async with running(path) as proxy:
            admin = Admin(proxy.cfg.admin.listen, ADMIN_TOKEN)
            assert (await call(proxy, "/inside/x"))[0] == 502
            assert [await call(proxy, "/limited/x") for _ in range(2)] == [(200, '{"ok": true, "path": "/api/x"}')] * 2

            new = loosened(data, upstream, new_port)
            poison(new, upstream, busy_port)
            write_config(path, new)
            status, body, _ = await admin.call("POST", "/v1/reload")
            assert status == 422 and body["error"] == "invalid_config"
            assert where in [p["path"] for p in body["problems"]]

            # address policy: the private upstream is still refused before any connect
            assert (await call(proxy, "/inside/x"))[0] == 502
            # rate limit: the bucket is still empty (neither refilled nor replaced by the looser limit)
            assert (await call(proxy, "/limited/x"))[0] == 429
            # rules and credentials: GET still allowed, with the old secret, on the old dedicated listener
            assert (await call(proxy, "/x", base=demo))[0] == 200
            assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}"
            assert (await call(proxy, "/x", base=demo, method="POST"))[0] == 403
            assert (await call(proxy, "/added/x"))[0] == 403
            # listeners: none of the new config's was started, and the running one still serves
            assert await refused_connection(new_port)
            # alerts: a few denied requests are not yet a burst under the running threshold of 10
            assert (await call(proxy, "/demo/x", token="not-a-caller-token"))[0] == 401
            proxy.holder.current.audit.flush()
            lines = audit_lines(tmp_path / "audit.log")
            assert [x["reason"] for x in lines if x["outcome"] == "alert"] == []
            inside = [x for x in lines if x["credential"] == "inside"]
            assert [x["reason"] for x in inside] == ["upstream_address_denied"] * 2
            _, listing, _ = await admin.call("GET", "/v1/credentials")
            assert sorted(c["name"] for c in listing["credentials"]) == ["demo", "inside", "limited"]
            status, ready, _ = await admin.call("GET", "/readyz", token=None)
            assert status == 200

            # the same file without its poison is applied: each of those changes now takes effect
            write_config(path, loosened(data, upstream, new_port))
            status, body, _ = await admin.call("POST", "/v1/reload")
            assert status == 200, body
            assert (await call(proxy, "/limited/x"))[0] == 200  # a changed limit starts full
            assert (await call(proxy, "/x", base=f"http://127.0.0.1:{new_port}", method="POST"))[0] == 200
            assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}-second"
            assert await refused_connection(demo_port)
            await call(proxy, "/inside/x")  # now tried (and not reached: nothing answers there)
            proxy.holder.current.audit.flush()
            assert _last_reason(tmp_path, "inside") != "upstream_address_denied"


def _last_reason(tmp_path, credential: str) -> str:
    return [x for x in audit_lines(tmp_path / "audit.log") if x["credential"] == credential][-1]["reason"]


async def test_a_committed_tightening_applies_to_pooled_connections_too(tmp_path, secrets, upstream):
    """Connections opened under looser rules are not reused after a reload denies their address."""
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path) as proxy:
        admin = Admin(proxy.cfg.admin.listen, ADMIN_TOKEN)
        assert (await call(proxy, "/demo/x"))[0] == 200  # a keep-alive connection to 127.0.0.1 is now pooled
        data["server"]["deny_upstream_networks"] = ["127.0.0.0/8"]
        write_config(path, data)
        status, body, _ = await admin.call("POST", "/v1/reload")
        assert status == 200
        seen = len(upstream.seen)
        assert (await call(proxy, "/demo/x"))[0] == 502
        assert len(upstream.seen) == seen
        proxy.holder.current.audit.flush()
        assert _last_reason(tmp_path, "demo") == "upstream_address_denied"


async def test_rate_limit_buckets_keep_their_level_across_a_reload(tmp_path, secrets, upstream):
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url, rate_limit={"rps": 0.001, "burst": 2}),
                                           "other": credential(upstream.url)}, admin_token=True)
    data["callers"]["app"]["rate_limit"] = {"rps": 0.001, "burst": 3}
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path) as proxy:
        admin = Admin(proxy.cfg.admin.listen, ADMIN_TOKEN)
        assert [(await call(proxy, "/demo/x"))[0] for _ in range(3)] == [200, 200, 429]
        data["credentials"]["demo"]["allow"][0]["methods"] = ["GET", "PUT"]  # the credential changes, its limit not
        data["credentials"]["added"] = credential(upstream.url)
        write_config(path, data)
        status, body, _ = await admin.call("POST", "/v1/reload")
        assert status == 200 and body["credentials"]["updated"] == ["demo"]
        assert (await call(proxy, "/demo/x"))[0] == 429  # not refilled by the reload
        assert (await call(proxy, "/other/x"))[0] == 200  # the caller's own bucket: its 3rd token, kept too
        assert (await call(proxy, "/added/x"))[0] == 429  # caller bucket now empty, across the reload
        data["callers"]["app"]["rate_limit"] = {"rps": 0.001, "burst": 5}  # a changed limit starts full
        write_config(path, data)
        assert (await admin.call("POST", "/v1/reload"))[0] == 200
        assert (await call(proxy, "/added/x"))[0] == 200
        assert (await call(proxy, "/demo/x"))[0] == 429  # demo's own limit did not change
