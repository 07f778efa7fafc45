"""Reload: validate first, swap atomically, keep token caches, let in-flight requests finish on the old config."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket

import aiohttp
import pytest

from tests.ops_support import (ADMIN_TOKEN, CANARY, Admin, Upstream, upstream, assert_no_secret, base_config, call, counting_factory,
                         credential, free_port, make_store, metric, running, write_config)


@pytest.fixture
def secrets(tmp_path):
    return make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": CANARY + "-second"}})


@pytest.fixture
def setup(tmp_path, secrets, upstream):
    """(config dict, path): one credential ``demo``; tests edit the dict and write it again."""
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    return data, path


def _admin(proxy) -> Admin:
    return Admin(proxy.cfg.admin.listen, ADMIN_TOKEN)


async def _reload(proxy):
    return await _admin(proxy).call("POST", "/v1/reload")


async def test_a_broken_file_is_rejected_and_the_old_config_keeps_serving(setup, caplog):
    data, path = setup
    async with running(path) as proxy:
        broken = copy.deepcopy(data)
        broken["credentials"]["other"] = {"upstream": "https://example.com"}  # no auth
        write_config(path, broken)
        status, body, _ = await _reload(proxy)
        assert status == 422 and body["error"] == "invalid_config"
        [problem] = body["problems"]
        assert problem["path"] == "credentials.other.auth" and problem["message"] == "is required"
        assert problem["file"] == str(path) and problem["line"] is not None
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        broken = copy.deepcopy(data)
        broken["credentials"]["demo"]["upstream"] = "ftp://example.com"
        write_config(path, broken)
        status, body, _ = await _reload(proxy)
        assert status == 422
        assert [(p["path"], p["message"]) for p in body["problems"]] == [
            ("credentials.demo.upstream", "must be an absolute https:// URL")]
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        path.write_text("credentials: [unclosed\n")
        status, body, _ = await _reload(proxy)
        assert status == 422 and body["problems"][0]["message"] == "is not valid YAML"
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        _, metrics, _ = await _admin(proxy).call("GET", "/metrics")
        assert metric(metrics, "credproxy_config_reloads_total", result="invalid") == 3
        assert metric(metrics, "credproxy_config_last_reload_successful") == 0
    assert any(r.levelno == logging.ERROR and "reload rejected" in r.getMessage() for r in caplog.records)


async def test_a_reload_that_adds_a_credential_makes_it_usable(setup, upstream):
    data, path = setup
    async with running(path) as proxy:
        assert (await call(proxy, "/second/v1/x"))[0] == 403
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        write_config(path, data)
        status, body, text = await _reload(proxy)
        assert status == 200 and body["result"] == "ok" and body["trigger"] == "api"
        assert body["credentials"] == {"added": ["second"], "removed": [], "updated": [], "sessions_reset": []}
        assert body["restart_required"] == [] and body["changed"] is True
        assert_no_secret(text)
        assert (await call(proxy, "/second/v1/x"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}-second"
        _, metrics, _ = await _admin(proxy).call("GET", "/metrics")
        assert metric(metrics, "credproxy_config_reloads_total", result="ok") == 1
        assert metric(metrics, "credproxy_config_last_reload_successful") == 1


async def test_a_new_credential_whose_secret_is_missing_rejects_the_reload(setup, upstream):
    data, path = setup
    async with running(path) as proxy:
        data["credentials"]["later"] = credential(upstream.url, secret="api/later#token")
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 422 and body["error"] == "invalid_config"
        assert [(p["path"], p["message"]) for p in body["problems"]] == [
            ("credentials.later.auth.secret", "api/later#token is not in the secret store; add it with: "
                                              f"credproxy secrets put -c {path} api/later token")]
        status, ready, _ = await _admin(proxy).call("GET", "/readyz", token=None)
        assert status == 200 and ready["waiting"] == []  # the running config is untouched
        assert (await call(proxy, "/later/v1/x"))[0] == 403


async def test_a_reload_that_removes_a_credential_refuses_it_afterwards(setup, upstream):
    data, path = setup
    async with running(path) as proxy:
        data["credentials"] = {"second": credential(upstream.url, secret="api/second#token")}
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["credentials"]["removed"] == ["demo"]
        assert (await call(proxy, "/demo/v1/x"))[0] == 403
        status, listing, _ = await _admin(proxy).call("GET", "/v1/credentials")
        assert [c["name"] for c in listing["credentials"]] == ["second"]


async def test_token_caches_survive_an_unrelated_reload(tmp_path, secrets, upstream):
    fetches: dict = {}
    data = base_config(tmp_path, secrets, {"tok": credential(upstream.url), "tok2": credential(upstream.url)},
                       admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path, source_factory=counting_factory(fetches)) as proxy:
        for name in ("tok", "tok2"):
            assert (await call(proxy, f"/{name}/v1/x"))[0] == 200
        assert fetches == {"tok": 1, "tok2": 1}
        # Unrelated changes: a new credential, tok2's rules, and the upstream timeouts.
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        data["credentials"]["tok2"]["allow"][0]["paths"] = ["/v1/**"]
        data["server"]["read_timeout"] = "30s"
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["credentials"]["updated"] == ["tok2"]
        assert body["credentials"]["sessions_reset"] == []
        for name in ("tok", "tok2"):
            assert (await call(proxy, f"/{name}/v1/x"))[0] == 200
        assert fetches == {"tok": 1, "tok2": 1}  # no new token fetched
        # Changing how tok2 authenticates does drop its token; tok keeps its own.
        data["credentials"]["tok2"]["auth"]["header"] = "X-Api-Key"
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["credentials"]["sessions_reset"] == ["tok2"]
        for name in ("tok", "tok2"):
            assert (await call(proxy, f"/{name}/v1/x"))[0] == 200
        assert fetches == {"tok": 1, "tok2": 2}


async def test_in_flight_requests_finish_on_the_config_they_started_with(setup, upstream):
    data, path = setup
    async with running(path) as proxy:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{proxy.cfg.server.listen}/demo/v1/slow",
                             headers={"Authorization": "Bearer caller-token-for-app"}) as r:
                assert r.status == 200
                await asyncio.wait_for(upstream.slow_started.wait(), 5)
                old_demo = proxy.holder.current.credentials["demo"]
                data["credentials"] = {"second": credential(upstream.url, secret="api/second#token")}
                write_config(path, data)
                status, body, _ = await _reload(proxy)
                assert status == 200 and body["credentials"]["removed"] == ["demo"]
                assert (await call(proxy, "/demo/v1/x"))[0] == 403  # new requests see the new config
                await asyncio.sleep(0.05)
                assert not old_demo.client.closed  # not closed under the running request
                upstream.release.set()
                assert await r.read() == b"first part;second part"
        for _ in range(100):  # the retired credential is closed once its last request is done
            if old_demo.client.closed:
                break
            await asyncio.sleep(0.02)
        assert old_demo.client.closed


async def test_the_kill_switch_survives_a_reload(setup, upstream):
    data, path = setup
    async with running(path) as proxy:
        await _admin(proxy).call("POST", "/v1/credentials/demo/disable")
        data["credentials"]["demo"]["allow"][0]["methods"] = ["GET"]
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["credentials"]["updated"] == ["demo"]
        assert (await call(proxy, "/demo/v1/x"))[0] == 503
        status, listing, _ = await _admin(proxy).call("GET", "/v1/credentials")
        assert listing["credentials"][0]["state"] == "disabled"


async def test_the_config_file_watcher_reloads_a_changed_file(setup, upstream):
    data, path = setup
    async with running(path, watch_interval=0.05) as proxy:
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        write_config(path, data)
        for _ in range(200):
            if "second" in proxy.holder.current.credentials:
                break
            await asyncio.sleep(0.02)
        assert (await call(proxy, "/second/v1/x"))[0] == 200
        path.write_text("server: [broken\n")
        for _ in range(200):
            _, metrics, _ = await _admin(proxy).call("GET", "/metrics")
            if metric(metrics, "credproxy_config_reloads_total", result="invalid"):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more polls: a rejected file is not retried
        _, metrics, _ = await _admin(proxy).call("GET", "/metrics")
        assert metric(metrics, "credproxy_config_reloads_total", result="invalid") == 1
        assert (await call(proxy, "/second/v1/x"))[0] == 200


async def test_dedicated_listeners_start_and_stop_with_the_config(setup, upstream):
    data, path = setup
    port = free_port()
    async with running(path) as proxy:
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token", listen=f"127.0.0.1:{port}")
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["listeners"] == {"started": [f"second 127.0.0.1:{port}"], "stopped": []}
        status, _ = await call(proxy, "/v1/x", base=f"http://127.0.0.1:{port}")
        assert status == 200 and upstream.seen[-1]["path"] == "/api/v1/x"
        del data["credentials"]["second"]
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["listeners"] == {"started": [], "stopped": [f"second 127.0.0.1:{port}"]}
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(proxy, "/v1/x", base=f"http://127.0.0.1:{port}")


async def test_a_removed_listeners_address_can_be_taken_over_in_one_reload(setup, upstream):
    data, path = setup
    port = free_port()
    data["credentials"]["demo"]["listen"] = f"127.0.0.1:{port}"
    write_config(path, data)
    async with running(path) as proxy:
        assert (await call(proxy, "/v1/x", base=f"http://127.0.0.1:{port}"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}"
        del data["credentials"]["demo"]["listen"]
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token", listen=f"127.0.0.1:{port}")
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["listeners"] == {"started": [f"second 127.0.0.1:{port}"],
                                                       "stopped": [f"demo 127.0.0.1:{port}"]}
        assert (await call(proxy, "/v1/x", base=f"http://127.0.0.1:{port}"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}-second"


async def test_a_listener_that_cannot_bind_rejects_the_whole_reload(setup, upstream):
    data, path = setup
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with running(path) as proxy:
            data["credentials"]["second"] = credential(upstream.url, secret="api/second#token",
                                                       listen=f"127.0.0.1:{port}")
            data["credentials"]["demo"]["allow"][0]["methods"] = ["POST"]
            write_config(path, data)
            status, body, _ = await _reload(proxy)
            assert status == 422 and body["error"] == "invalid_config"
            assert [(p["path"], p["message"]) for p in body["problems"]] == [
                ("credentials.second.listen", "cannot listen (Address already in use)")]
            assert (await call(proxy, "/demo/v1/x"))[0] == 200  # the GET rule still applies: nothing was applied
            assert (await call(proxy, "/second/v1/x"))[0] == 403


async def test_a_listener_whose_certificate_cannot_be_loaded_rejects_the_reload(setup, upstream, tmp_path):
    data, path = setup
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    port = free_port()
    data["credentials"]["second"] = credential(upstream.url, secret="api/second#token", listen=f"127.0.0.1:{port}",
                                               tls={"cert_file": str(tmp_path / "bad.pem"),
                                                    "key_file": str(tmp_path / "bad.pem")})
    async with running(path) as proxy:
        write_config(path, data)
        status, body, _ = await _reload(proxy)
        assert status == 422
        assert [(p["path"], p["message"]) for p in body["problems"]] == [
            ("credentials.second.tls", "cannot load the certificate (not a valid PEM certificate and key)")]
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(proxy, "/v1/x", base=f"http://127.0.0.1:{port}")
        assert (await call(proxy, "/demo/v1/x"))[0] == 200


async def test_main_and_admin_listener_changes_need_a_restart(setup, upstream, caplog):
    data, path = setup
    async with running(path) as proxy:
        old_main = str(proxy.cfg.server.listen)
        data["server"]["listen"] = f"127.0.0.1:{free_port()}"
        data["admin"]["listen"] = f"127.0.0.1:{free_port()}"
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        write_config(path, data)
        status, body, _ = await Admin(proxy.holder.current.config.admin.listen, ADMIN_TOKEN).call("POST", "/v1/reload")
        assert status == 200 and body["restart_required"] == ["server.listen", "admin.listen"]
        assert body["credentials"]["added"] == ["second"]
        assert (await call(proxy, "/second/v1/x", base=f"http://{old_main}"))[0] == 200  # still on the old port
    assert any("needs a restart" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_the_admin_token_rotates_on_reload_and_a_bad_token_file_is_rejected(setup, tmp_path):
    data, path = setup
    async with running(path) as proxy:
        listen = proxy.cfg.admin.listen
        (tmp_path / "admin.token").write_text("the-new-admin-token\n")
        status, body, _ = await _reload(proxy)
        assert status == 200 and body["changed"] is True and body["admin_token_replaced"] is True
        assert (await Admin(listen, ADMIN_TOKEN).call("GET", "/v1/credentials"))[0] == 401
        assert (await Admin(listen, "the-new-admin-token").call("GET", "/v1/credentials"))[0] == 200
        data["admin"]["token_file"] = str(tmp_path / "missing.token")
        write_config(path, data)
        status, body, _ = await Admin(listen, "the-new-admin-token").call("POST", "/v1/reload")
        assert status == 422
        assert [(p["path"], p["message"]) for p in body["problems"]] == [
            ("admin.token_file", "cannot be read (No such file or directory)")]
        (tmp_path / "empty.token").write_text("\n")
        data["admin"]["token_file"] = str(tmp_path / "empty.token")
        write_config(path, data)
        status, body, _ = await Admin(listen, "the-new-admin-token").call("POST", "/v1/reload")
        assert status == 422 and body["problems"][0]["message"] == "is empty"
        assert (await Admin(listen, "the-new-admin-token").call("GET", "/v1/credentials"))[0] == 200


async def test_reload_is_refused_while_draining(setup):
    data, path = setup
    async with running(path) as proxy:
        proxy.holder.draining = True
        status, body, _ = await _reload(proxy)
        assert status == 503 and body["error"] == "draining"
        proxy.holder.draining = False

