"""The whole proxy with secrets in a real OpenBao: a real aiohttp upstream, a ``header``
credential whose secret lives in Vault, credproxy logging in with the policy in
deploy/vault/policy.hcl. Rotation, outages, denial, start-up errors, a slow Vault."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.vault_fixture import DelayRelay, OpenBao, bao, free_port, fresh_bao, raw_log  # noqa: F401 - fixtures
from tests.vault_harness import Running, assert_nowhere, eventually, running, vault_section
from tests.helpers import REPO

POLICY = (REPO / "deploy" / "vault" / "policy.hcl").read_text()


# --- harness ----------------------------------------------------------------------------


class Upstream:
    """A real HTTP API: records the Authorization header of every request; when ``valid`` is
    set, answers 401 to any other token (like an API whose key was rotated)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.valid: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        if self.valid and auth.removeprefix("Bearer ") not in self.valid:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True, "path": request.path})


@pytest.fixture
async def upstream(aiohttp_server):
    api = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    server = await aiohttp_server(app)
    api.url = f"http://127.0.0.1:{server.port}/base"
    return api


def header_credential(upstream: Upstream, ref: str) -> dict:
    return {"upstream": upstream.url, "allow_insecure_upstream": True,
            "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": ref},
            "allow": [{"paths": ["/**"]}]}


async def is_ready(run: Running) -> bool:
    return (await run.ready())[0] == 200


# --- the deploy policy, end to end ----------------------------------------------------------


async def test_proxy_serves_with_exactly_the_deploy_policy_and_is_denied_beyond_it(bao, upstream, tmp_path, raw_log):
    secret = "sk-live-CANARY-e2e-4f7a9b"
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/secrets/e2e", {"token": secret})
    bao.put("other/e2e", {"token": "sk-not-for-credproxy"})
    rf, sf, role_id, secret_id = bao.approle("cp-e2e", ["credproxy"], tmp_path)
    creds = {"api": header_credential(upstream, "credproxy/secrets/e2e#token"),
             "beyond": header_credential(upstream, "other/e2e#token")}
    async with running(tmp_path, vault_section(bao.address, {"method": "approle", "role_id_file": rf,
                                                             "secret_id_file": sf}), creds) as run:
        await eventually(lambda: run.proxy._cache.cached("credproxy/secrets/e2e"))
        status, body, headers = await run.get("/api/v1/things")
        assert status == 200 and body == {"ok": True, "path": "/base/v1/things"}
        assert upstream.seen == [f"Bearer {secret}"]
        status, body, headers = await run.get("/beyond/v1/things")
        assert status == 503 and body["error"] == "credential_unavailable" and "Retry-After" in headers
        assert body["message"] == "credential unavailable"
        assert len(upstream.seen) == 1  # nothing went upstream for the denied one
        status, ready = await run.ready()
        assert status == 503 and ready["waiting"] == ["beyond"]
        metrics = await run.metrics()
        vault_token = run.proxy._store.keeper.token.reveal()
    assert 'credproxy_secret_backend_errors_total{backend="vault"}' in metrics
    audit = run.audit.read_text()
    lines = [json.loads(line) for line in audit.splitlines()]
    assert [(line["credential"], line["status"], line["reason"]) for line in lines] == [
        ("api", 200, "allowed"), ("beyond", 503, "secret_unavailable")]
    assert_nowhere([secret, "sk-not-for-credproxy", secret_id, vault_token],
                   audit, metrics, raw_log.text, *run.bodies)


# --- rotation -------------------------------------------------------------------------------


async def test_rotated_secret_is_used_within_the_refresh_interval(bao, upstream, tmp_path):
    bao.put("credproxy/secrets/rot", {"token": "rot-v1"})
    vault = vault_section(bao.address, {"method": "token", "token_file": _token_file(bao, tmp_path)},
                          refresh_interval="300ms")
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/rot#token")}) as run:
        await eventually(lambda: is_ready(run))
        assert (await run.get("/api/x"))[0] == 200 and upstream.seen[-1] == "Bearer rot-v1"
        bao.put("credproxy/secrets/rot", {"token": "rot-v2"})
        rotated_at = time.monotonic()

        async def uses_new() -> bool:
            await run.get("/api/x")
            return upstream.seen[-1] == "Bearer rot-v2"

        await eventually(uses_new, interval=0.02)
        took = time.monotonic() - rotated_at
    print(f"rotation picked up {took:.2f}s after the write (refresh_interval 0.3s)")


async def test_rotated_secret_is_used_right_after_an_upstream_401_and_rereads_are_rate_limited(
        bao, upstream, tmp_path):
    bao.put("credproxy/secrets/r401", {"token": "key-v1"})
    upstream.valid = {"key-v1"}
    vault = vault_section(bao.address, {"method": "token", "token_file": _token_file(bao, tmp_path)},
                          refresh_interval="1h")  # the poller will not see it: only the 401 can
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/r401#token")}) as run:
        await eventually(lambda: is_ready(run))
        assert (await run.get("/api/x"))[0] == 200
        bao.put("credproxy/secrets/r401", {"token": "key-v2"})
        upstream.valid = {"key-v2"}
        status, body, _ = await run.get("/api/x")
        assert status == 200 and body["ok"]  # the caller never saw the 401
        assert upstream.seen[-2:] == ["Bearer key-v1", "Bearer key-v2"]  # rejected, re-read, replayed once
        # A second rotation within 30 s: no second re-read, the caller gets the upstream's answer.
        bao.put("credproxy/secrets/r401", {"token": "key-v3"})
        upstream.valid = {"key-v3"}
        status, body, _ = await run.get("/api/x")
        assert status == 401 and body == {"error": "invalid_token"}
        assert upstream.seen[-1] == "Bearer key-v2"
    lines = [json.loads(line) for line in run.audit.read_text().splitlines()]
    assert [(line["status"], line["token_refreshed"]) for line in lines] == [(200, False), (200, True), (401, True)]


async def test_401_replays_with_the_new_secret_even_when_the_poller_found_it_first(bao, aiohttp_server, tmp_path):
    """The rotation lands while a request is upstream, and the poller reads it before the 401
    comes back: the re-read then sees no *new* version, yet this request used the old one."""
    bao.put("credproxy/secrets/race", {"token": "race-v1"})
    seen: list[str] = []
    state: dict = {}

    async def api(request: web.Request) -> web.Response:
        auth = request.headers["Authorization"]
        seen.append(auth)
        if auth == "Bearer race-v1" and len(seen) > 1:
            bao.put("credproxy/secrets/race", {"token": "race-v2"})
            await state["cache"].poll_once()
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api)
    server = await aiohttp_server(app)
    cred = {"upstream": f"http://127.0.0.1:{server.port}", "allow_insecure_upstream": True,
            "auth": {"type": "header", "secret": "credproxy/secrets/race#token"}, "allow": [{"paths": ["/**"]}]}
    vault = vault_section(bao.address, {"method": "token", "token_file": _token_file(bao, tmp_path)},
                          refresh_interval="1h")
    async with running(tmp_path, vault, {"api": cred}) as run:
        state["cache"] = run.proxy._cache
        await eventually(lambda: is_ready(run))
        assert (await run.get("/api/x"))[0] == 200
        status, body, _ = await run.get("/api/x")
        assert status == 200 and body == {"ok": True}
    assert seen == ["Bearer race-v1", "Bearer race-v1", "Bearer race-v2"]


def _token_file(server: OpenBao, tmp_path: Path, token: str | None = None) -> str:
    path = tmp_path / "vault.token"
    path.write_text(token or server.root_token)
    return str(path)


# --- Vault outages ------------------------------------------------------------------------------


async def test_vault_stopped_mid_run_cached_credentials_keep_serving_and_service_recovers(
        fresh_bao, upstream, tmp_path, raw_log):
    fresh_bao.put("credproxy/secrets/out", {"token": "outage-key"})
    vault = vault_section(fresh_bao.address, {"method": "token", "token_file": _token_file(fresh_bao, tmp_path)},
                          refresh_interval="200ms", max_staleness="3s", timeout="1s")
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/out#token")}) as run:
        await eventually(lambda: is_ready(run))
        fresh_bao.stop()
        # Vault is gone: the cached secret keeps serving, and readiness says so while it is fresh enough.
        for _ in range(5):
            assert (await run.get("/api/x"))[0] == 200
        assert upstream.seen[-1] == "Bearer outage-key"
        assert (await run.ready())[0] == 200
        # Past max_staleness: not ready, and requests get 503 credential_unavailable.
        await eventually(lambda: _not_ready(run))
        status, body, headers = await run.get("/api/x")
        assert status == 503 and body["error"] == "credential_unavailable" and "Retry-After" in headers
        served_before = len(upstream.seen)
        # Vault returns (dev mode starts empty: seed it again) and service recovers by itself.
        fresh_bao.start()
        fresh_bao.put("credproxy/secrets/out", {"token": "outage-key-after"})
        await eventually(lambda: is_ready(run))
        assert (await run.get("/api/x"))[0] == 200
        assert upstream.seen[served_before:] == ["Bearer outage-key-after"]
    assert_nowhere(["outage-key", fresh_bao.root_token], raw_log.text, run.audit.read_text(), *run.bodies)


async def _not_ready(run: Running) -> bool:
    status, body = await run.ready()
    return status == 503 and body["waiting"] == ["api"]


async def test_started_while_vault_is_down_not_ready_then_ready_when_it_returns(fresh_bao, upstream, tmp_path):
    fresh_bao.stop()
    role_id_file, secret_id_file = tmp_path / "role_id", tmp_path / "secret_id"
    role_id_file.write_text("not-yet")
    secret_id_file.write_text("not-yet")
    vault = vault_section(fresh_bao.address, {"method": "approle", "role_id_file": str(role_id_file),
                                              "secret_id_file": str(secret_id_file)},
                          refresh_interval="500ms", timeout="1s")
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/late#token")}) as run:
        status, body = await run.ready()
        assert status == 503 and body["waiting"] == ["api"]
        status, body, headers = await run.get("/api/x")
        assert status == 503 and body["error"] == "credential_unavailable" and "Retry-After" in headers
        fresh_bao.start()
        fresh_bao.policy("credproxy", POLICY)
        fresh_bao.put("credproxy/secrets/late", {"token": "late-key"})
        rf, sf, _, _ = fresh_bao.approle("cp-late", ["credproxy"], tmp_path / "ar")
        role_id_file.write_text(Path(rf).read_text())  # credentials are re-read at every login
        secret_id_file.write_text(Path(sf).read_text())
        await eventually(lambda: is_ready(run), timeout=20)
        assert (await run.get("/api/x"))[0] == 200 and upstream.seen == ["Bearer late-key"]


async def test_permission_denied_at_runtime_stops_serving_the_secret_at_once(bao, upstream, tmp_path):
    allow = 'path "secret/data/credproxy/secrets/den" { capabilities = ["read"] }\n' \
            'path "secret/metadata/credproxy/secrets/den" { capabilities = ["read"] }\n'
    bao.policy("cp-den", allow)
    bao.put("credproxy/secrets/den", {"token": "den-key"})
    vault = vault_section(bao.address, {"method": "token", "token_file": _token_file(bao, tmp_path, bao.token(["cp-den"]))},
                          refresh_interval="200ms", max_staleness="1h")
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/den#token")}) as run:
        await eventually(lambda: is_ready(run))
        assert (await run.get("/api/x"))[0] == 200
        bao.policy("cp-den", 'path "secret/data/elsewhere/*" { capabilities = ["read"] }\n')  # access revoked
        await eventually(lambda: _not_ready(run), timeout=5)  # long before max_staleness (1 h)
        status, body, _ = await run.get("/api/x")
        assert status == 503 and body["error"] == "credential_unavailable"
        assert upstream.seen == ["Bearer den-key"]


# --- start-up errors -------------------------------------------------------------------------------


def test_wrong_approle_credentials_stop_serve_with_a_clear_error_and_no_secret(bao, tmp_path):
    bao.policy("credproxy", POLICY)
    rf, sf, role_id, secret_id = bao.approle("cp-wrong", ["credproxy"], tmp_path)
    wrong = "0b7d2c6e-wrong-4e1a-CANARY-9f31c2d8a7e5"
    Path(sf).write_text(wrong)
    cfg = tmp_path / "credproxy.yaml"
    cfg.write_text(json.dumps({
        "server": {"listen": f"127.0.0.1:{free_port()}"}, "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "secrets": {"backend": "vault", "vault": {"address": bao.address, "auth": {
            "method": "approle", "role_id_file": rf, "secret_id_file": sf}}},
        "audit": {"path": str(tmp_path / "audit.log")}, "credentials": {}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 1
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(e["level"] == "error" and e["msg"] == (
        f"cannot start: cannot log in to vault at {bao.address}: vault approle login refused (HTTP 400): "
        "check the role_id_file and secret_id_file, and that the secret_id has not expired") for e in errors)
    assert_nowhere([wrong, role_id, secret_id], done.stdout, done.stderr)


# --- a slow Vault -----------------------------------------------------------------------------------


async def test_slow_vault_does_not_delay_requests_for_cached_secrets(bao, upstream, tmp_path):
    bao.put("credproxy/secrets/slow", {"token": "slow-key"})
    relay = DelayRelay(bao.port)
    await relay.start()
    vault = vault_section(relay.address, {"method": "token", "token_file": _token_file(bao, tmp_path)},
                          refresh_interval="200ms", timeout="10s")
    try:
        async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/slow#token")}) as run:
            await eventually(lambda: is_ready(run))
            relay.delay = 4.0  # every byte to Vault now waits 4 s
            await eventually(lambda: relay.pending > 0)  # the poller's call is stuck in the slow Vault
            durations = []
            for _ in range(20):
                started = time.monotonic()
                status, _, _ = await run.get("/api/x")
                durations.append(time.monotonic() - started)
                assert status == 200
            assert relay.pending > 0  # all 20 were served while Vault was still being waited on
            assert upstream.seen[-20:] == ["Bearer slow-key"] * 20
            relay.delay = 0
    finally:
        await relay.close()
    durations.sort()
    print(f"20 requests during a 4 s Vault stall: median {durations[10] * 1000:.1f} ms, max {durations[-1] * 1000:.1f} ms")


# --- the proxy's own token: short TTL over a long run --------------------------------------------------


@pytest.mark.slow
async def test_approle_token_with_5s_ttl_still_serving_after_30s(bao, upstream, tmp_path, raw_log):
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/secrets/ttl", {"token": "ttl-key-1"})
    rf, sf, _, secret_id = bao.approle("cp-ttl", ["credproxy"], tmp_path, token_ttl="5s", token_max_ttl="12s")
    vault = vault_section(bao.address, {"method": "approle", "role_id_file": rf, "secret_id_file": sf},
                          refresh_interval="1s")
    async with running(tmp_path, vault, {"api": header_credential(upstream, "credproxy/secrets/ttl#token")}) as run:
        await eventually(lambda: is_ready(run))
        keeper = run.proxy._store.keeper
        tokens = {keeper.token.reveal()}
        started = time.monotonic()
        rotated = False
        while time.monotonic() - started < 30:
            status, _, _ = await run.get("/api/x")
            assert status == 200
            assert (await run.ready())[0] == 200
            token = keeper.token
            assert token is not None  # never a moment without a valid Vault token, also while it rolls over
            tokens.add(token.reveal())
            await run.proxy._store.version("credproxy/secrets/ttl")  # so Vault reads keep working throughout
            if not rotated and time.monotonic() - started > 20:
                bao.put("credproxy/secrets/ttl", {"token": "ttl-key-2"})
                rotated = True
            await asyncio.sleep(0.5)
        # Still a working token after 30 s, i.e. well past the 12 s max TTL of the first one:
        assert (await run.proxy._store.get("credproxy/secrets/ttl")).version == 2
        assert upstream.seen[-1] == "Bearer ttl-key-2"  # and the poller kept working with it
    logins = raw_log.text.count("logged in to vault")
    renewals = raw_log.text.count("vault token renewed")
    assert logins >= 3 and len(tokens) >= 3  # max TTL 12 s: a fresh login 2 s before it, about every 10 s
    assert renewals >= 4  # and renewals 2 s before the 5 s TTL ends in between
    print(f"30 s on 5 s-TTL tokens: {logins} logins, {renewals} renewals, {len(upstream.seen)} requests, all 200")
    assert "vault token near its max TTL; will log in again" in raw_log.text
    assert_nowhere([secret_id, *tokens, "ttl-key-1", "ttl-key-2"], raw_log.text, run.audit.read_text(), *run.bodies)
