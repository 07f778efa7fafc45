"""Admin API: every endpoint and its failure answers, against a real proxy, store and upstream on loopback."""

from __future__ import annotations

import logging

import pytest
import yaml

from tests.ops_support import (ADMIN_TOKEN, CANARY, Admin, Upstream, upstream, assert_no_secret, audit_lines, base_config, call,
                         counting_factory, credential, free_port, make_store, metric, put_secret, running,
                         write_config)


@pytest.fixture
def secrets(tmp_path):
    return make_store(tmp_path, {"api/demo": {"token": CANARY}})


def _config(tmp_path, secrets, upstream, **kw):
    creds = kw.pop("credentials", None) or {"demo": credential(upstream.url)}
    return write_config(tmp_path / "config.yaml", base_config(tmp_path, secrets, creds, admin_token=True, **kw))


def _admin(proxy) -> Admin:
    return Admin(proxy.cfg.admin.listen, ADMIN_TOKEN)


async def test_health_and_readiness_are_open_everything_else_needs_the_token(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        admin = _admin(proxy)
        assert await admin.call("GET", "/healthz", token=None) == (200, {"status": "alive"}, '{"status": "alive"}')
        status, body, _ = await admin.call("GET", "/readyz", token=None)
        assert (status, body) == (200, {"ready": True, "waiting": []})
        for method, path in [("GET", "/metrics"), ("GET", "/v1/credentials"), ("POST", "/v1/reload"),
                             ("POST", "/v1/credentials/demo/disable")]:
            for token in (None, "wrong-token", "", ADMIN_TOKEN + "x"):
                status, body, _ = await admin.call(method, path, token=token)
                assert status == 401, (method, path, token)
                assert body == {"error": "unauthenticated", "message": "missing or invalid admin token"}
        status, body, _ = await admin.call("GET", "/v1/credentials")
        assert status == 200
        status, _ = await call(proxy, "/demo/v1/x")
        assert status == 200  # nothing above disabled the credential


async def test_wrong_scheme_and_empty_bearer_are_refused(tmp_path, secrets, upstream):
    import aiohttp

    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        async with aiohttp.ClientSession() as s:
            for header in (f"Basic {ADMIN_TOKEN}", "Bearer", "Bearer ", ADMIN_TOKEN):
                async with s.get(f"http://{proxy.cfg.admin.listen}/v1/credentials",
                                 headers={"Authorization": header}) as r:
                    assert r.status == 401, header


async def test_credentials_list_reports_state_and_counters_never_a_secret(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        for _ in range(2):
            assert (await call(proxy, "/demo/v1/items"))[0] == 200
        status, body, text = await _admin(proxy).call("GET", "/v1/credentials")
        assert status == 200
        [demo] = body["credentials"]
        assert {k: demo[k] for k in ("name", "upstream", "auth_type", "state", "expires_in_s", "requests")} == {
            "name": "demo", "upstream": upstream.url, "auth_type": "header", "state": "static",
            "expires_in_s": None, "requests": 2}
        assert demo["last_used"] is not None and demo["last_error"] is None and "last_refresh" in demo
        assert_no_secret(text)


async def test_disable_is_a_kill_switch_and_enable_restores(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        admin = _admin(proxy)
        status, body, _ = await admin.call("POST", "/v1/credentials/demo/disable")
        assert status == 200 and body["changed"] is True and body["credential"]["state"] == "disabled"
        seen = len(upstream.seen)
        status, text = await call(proxy, "/demo/v1/items")
        assert status == 503 and '"error": "credential_unavailable"' in text
        assert len(upstream.seen) == seen  # refused before any upstream call
        status, body, _ = await admin.call("POST", "/v1/credentials/demo/disable")
        assert status == 200 and body["changed"] is False  # idempotent
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_credential_disabled", credential="demo") == 1
        status, body, _ = await admin.call("POST", "/v1/credentials/demo/enable")
        assert status == 200 and body["changed"] is True and body["credential"]["state"] == "static"
        assert (await call(proxy, "/demo/v1/items"))[0] == 200
    reasons = [(line["caller"], line["reason"], line["status"]) for line in audit_lines(tmp_path / "audit.log")]
    assert ("admin", "admin_disable", 200) in reasons and ("admin", "admin_enable", 200) in reasons
    assert ("app", "disabled", 503) in reasons


@pytest.mark.parametrize("action", ["refresh", "revoke", "disable", "enable", "probe"])
async def test_unknown_credential_is_404(tmp_path, secrets, upstream, action):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        status, body, _ = await _admin(proxy).call("POST", f"/v1/credentials/nope/{action}")
        assert (status, body) == (404, {"error": "not_found", "message": "no such credential"})


async def test_unknown_endpoint_and_wrong_method_answer_json(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        admin = _admin(proxy)
        status, body, _ = await admin.call("POST", "/v1/credentials/demo/explode")
        assert status == 404 and body["error"] == "not_found"
        status, body, _ = await admin.call("GET", "/v1/credentials/demo/disable")
        assert status == 405 and body["error"] == "method_not_allowed"


async def test_refresh_rereads_a_rotated_secret_at_once(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        assert (await call(proxy, "/demo/v1/a"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}"
        put_secret(secrets, "api/demo", "token", CANARY + "-rotated")
        assert (await call(proxy, "/demo/v1/b"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}"  # still cached
        admin = _admin(proxy)
        status, body, text = await admin.call("POST", "/v1/credentials/demo/refresh")
        assert status == 200 and body["result"] == "ok" and body["credential"]["last_refresh"] is not None
        assert_no_secret(text)
        assert (await call(proxy, "/demo/v1/c"))[0] == 200
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}-rotated"
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_token_refresh_total", credential="demo", result="ok") == 1
        assert metric(metrics, "credproxy_token_refresh_duration_seconds_count", credential="demo") == 1


async def test_refresh_failure_answers_503_and_is_visible(tmp_path, secrets, upstream):
    creds = {"demo": credential(upstream.url), "broken": credential(upstream.url, secret="api/missing#token")}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds)) as proxy:
        admin = _admin(proxy)
        status, body, _ = await admin.call("POST", "/v1/credentials/broken/refresh")
        assert status == 503
        assert body["error"] == "credential_unavailable" and body["message"] == "credential unavailable"
        assert body["credential"]["last_error"] == "SecretNotFound"
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_token_refresh_total", credential="broken", result="secret_unavailable") == 1
        assert metric(metrics, "credproxy_secret_backend_errors_total", backend="file") >= 1
        status, body, _ = await admin.call("GET", "/readyz", token=None)
        assert status == 503 and body == {"ready": False, "waiting": ["broken"]}
    assert ("admin", "admin_refresh_failed", 503) in [(a["caller"], a["reason"], a["status"])
                                                      for a in audit_lines(tmp_path / "audit.log")]


async def test_revoke_drops_the_token_and_the_next_call_fetches_a_new_one(tmp_path, secrets, upstream):
    fetches: dict = {}
    creds = {"tok": credential(upstream.url)}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds),
                       source_factory=counting_factory(fetches)) as proxy:
        assert (await call(proxy, "/tok/v1/a"))[0] == 200
        assert (await call(proxy, "/tok/v1/b"))[0] == 200
        assert fetches == {"tok": 1}
        status, body, text = await _admin(proxy).call("POST", "/v1/credentials/tok/revoke")
        assert status == 200 and body["credential"]["state"] == "expired"
        assert_no_secret(text)
        assert (await call(proxy, "/tok/v1/c"))[0] == 200
        assert fetches == {"tok": 2}
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}-tok-2"


async def test_probe_calls_upstream_through_the_injection_path(tmp_path, secrets, upstream):
    creds = {"demo": credential(upstream.url, probe={"method": "GET", "path": "/health?deep=1", "expect_status": 200})}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds)) as proxy:
        admin = _admin(proxy)
        status, body, text = await admin.call("POST", "/v1/credentials/demo/probe")
        assert status == 200
        assert body["ok"] is True and body["error"] is None
        assert body["call"]["status"] == 200 and body["call"]["expect_status"] == 200
        assert body["call"]["path"] == "/health" and body["call"]["latency_ms"] >= 0
        assert body["token"]["state"] == "static"
        assert upstream.seen[-1] == {"method": "GET", "path": "/api/health?deep=1",
                                     "authorization": f"Bearer {CANARY}", "host": upstream.seen[-1]["host"]}
        assert_no_secret(text)
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_requests_total", credential="demo", caller="admin-probe", code="200") == 1
        assert metric(metrics, "credproxy_upstream_duration_seconds_count", credential="demo") == 1
    [line] = [a for a in audit_lines(tmp_path / "audit.log") if a["caller"] == "admin-probe"]
    assert (line["credential"], line["method"], line["path"], line["status"], line["outcome"]) == (
        "demo", "GET", "/health?deep", 200, "allowed")
    assert line["request_id"] == body["request_id"]


async def test_probe_reports_an_unexpected_status(tmp_path, secrets, upstream):
    creds = {"demo": credential(upstream.url, probe={"path": "/status/500"})}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds)) as proxy:
        status, body, _ = await _admin(proxy).call("POST", "/v1/credentials/demo/probe")
        assert status == 200 and body["ok"] is False
        assert body["call"]["status"] == 500 and body["call"]["expect_status"] == 200
    [line] = [a for a in audit_lines(tmp_path / "audit.log") if a["caller"] == "admin-probe"]
    assert (line["status"], line["outcome"], line["reason"]) == (500, "error", "probe_unexpected_status")


async def test_probe_without_a_probe_call_only_obtains_the_token(tmp_path, secrets, upstream):
    fetches: dict = {}
    creds = {"tok": credential(upstream.url)}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds),
                       source_factory=counting_factory(fetches)) as proxy:
        status, body, text = await _admin(proxy).call("POST", "/v1/credentials/tok/probe")
        assert status == 200 and body["ok"] is True and body["call"] is None
        assert body["token"]["state"] == "fresh" and body["token"]["expires_in_s"] == 3600.0
        assert fetches == {"tok": 1} and upstream.seen == []
        assert_no_secret(text)


async def test_probe_failures_name_the_stage(tmp_path, secrets, upstream):
    creds = {"broken": credential(upstream.url, secret="api/missing#token", probe={"path": "/x"}),
             "down": credential(f"http://127.0.0.1:{free_port()}/api", probe={"path": "/x"})}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds)) as proxy:
        admin = _admin(proxy)
        status, body, _ = await admin.call("POST", "/v1/credentials/broken/probe")
        assert status == 200 and body["ok"] is False
        assert body["error"] == {"stage": "token", "code": "credential_unavailable", "message": "credential unavailable"}
        status, body, _ = await admin.call("POST", "/v1/credentials/down/probe")
        assert status == 200 and body["ok"] is False
        assert body["error"] == {"stage": "upstream", "code": "upstream_error", "message": "upstream request failed"}
        assert body["token"]["state"] == "static"


def test_probe_settings_are_checked_with_the_config(tmp_path):
    from proxy.config.models import ConfigInvalid, parse

    for probe, field, message in [({"path": "health"}, "path", "must start with /"),
                                  ({"method": "GE T"}, "method", "must be an HTTP method name"),
                                  ({"expect_status": 700}, "expect_status", "less than or equal to 599")]:
        doc = {"callers": {"app": {"token_sha256": "0" * 64}},
               "credentials": {"x": credential("https://api.example.com", probe=probe)}}
        with pytest.raises(ConfigInvalid) as err:
            parse(yaml.safe_dump(doc), "c.yaml")
        [problem] = err.value.problems  # check reports every problem: the doc has exactly this one
        assert problem.path == f"credentials.x.probe.{field}" and message in problem.message


async def test_probe_works_while_disabled_so_a_rotation_can_be_checked_first(tmp_path, secrets, upstream):
    creds = {"demo": credential(upstream.url, probe={"path": "/health"})}
    async with running(_config(tmp_path, secrets, upstream, credentials=creds)) as proxy:
        admin = _admin(proxy)
        await admin.call("POST", "/v1/credentials/demo/disable")
        status, body, _ = await admin.call("POST", "/v1/credentials/demo/probe")
        assert status == 200 and body["ok"] is True and body["disabled"] is True
        assert (await call(proxy, "/demo/v1/x"))[0] == 503  # callers still refused


async def test_metric_values_move_as_traffic_flows(tmp_path, secrets, upstream):
    async with running(_config(tmp_path, secrets, upstream)) as proxy:
        admin = _admin(proxy)
        _, before, _ = await admin.call("GET", "/metrics")
        assert metric(before, "credproxy_requests_total", credential="demo", caller="app", code="200") is None
        for _ in range(3):
            assert (await call(proxy, "/demo/v1/items"))[0] == 200
        assert (await call(proxy, "/demo/v1/items", token="not-a-caller"))[0] == 401
        status, text = await call(proxy, "/demo/v1/echo")
        assert status == 200 and "[REDACTED]" in text
        _, after, _ = await admin.call("GET", "/metrics")
        assert metric(after, "credproxy_requests_total", credential="demo", caller="app", code="200") == 4
        assert metric(after, "credproxy_requests_total", credential="demo", caller="-", code="401") == 1
        assert metric(after, "credproxy_upstream_duration_seconds_count", credential="demo") == 4
        assert metric(after, "credproxy_request_duration_seconds_count", credential="demo") == 5
        assert metric(after, "credproxy_leaks_redacted_total", credential="demo") >= 1
        assert metric(after, "credproxy_requests_in_flight") == 0
        assert metric(after, "credproxy_config_last_reload_successful") == 1
        assert_no_secret(after)


async def test_token_gauges_follow_the_credentials_and_go_with_them(tmp_path, secrets, upstream):
    fetches: dict = {}
    data = base_config(tmp_path, secrets, {"tok": credential(upstream.url), "demo": credential(upstream.url)},
                       admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path, source_factory=counting_factory(fetches)) as proxy:
        admin = _admin(proxy)
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_token_expires_in_seconds", credential="tok") is None  # no token yet
        assert (await call(proxy, "/tok/v1/x"))[0] == 200
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_token_expires_in_seconds", credential="tok") == 3600.0
        assert metric(metrics, "credproxy_token_expires_in_seconds", credential="demo") is None  # static: no expiry
        assert metric(metrics, "credproxy_credential_disabled", credential="tok") == 0
        del data["credentials"]["tok"]
        write_config(path, data)
        assert (await admin.call("POST", "/v1/reload"))[0] == 200
        _, metrics, _ = await admin.call("GET", "/metrics")
        assert metric(metrics, "credproxy_token_expires_in_seconds", credential="tok") is None
        assert metric(metrics, "credproxy_credential_disabled", credential="tok") is None
        assert metric(metrics, "credproxy_credential_disabled", credential="demo") == 0


async def test_no_secret_in_any_admin_answer_log_or_audit_line(tmp_path, secrets, upstream, caplog):
    """Canary: the secret value and tokens go upstream and nowhere else."""
    caplog.set_level(logging.DEBUG)
    fetches: dict = {}
    creds = {"demo": credential(upstream.url, probe={"path": "/echo"}), "tok": credential(upstream.url),
             "broken": credential(upstream.url, secret="api/missing#token")}
    cfg_path = _config(tmp_path, secrets, upstream, credentials=creds)
    texts = []
    async with running(cfg_path, source_factory=counting_factory(fetches)) as proxy:
        admin = _admin(proxy)
        for path in ("/demo/v1/echo", "/tok/v1/echo", "/broken/v1/x"):
            texts.append((await call(proxy, path))[1])
        for method, path in [("GET", "/v1/credentials"), ("GET", "/metrics"), ("GET", "/readyz"),
                             ("POST", "/v1/credentials/demo/probe"), ("POST", "/v1/credentials/tok/probe"),
                             ("POST", "/v1/credentials/broken/probe"), ("POST", "/v1/credentials/demo/refresh"),
                             ("POST", "/v1/credentials/tok/refresh"), ("POST", "/v1/credentials/broken/refresh"),
                             ("POST", "/v1/credentials/tok/revoke"), ("POST", "/v1/reload")]:
            texts.append((await admin.call(method, path))[2])
    assert upstream.seen and any(CANARY in (s["authorization"] or "") for s in upstream.seen)  # it did go upstream
    for text in texts + [(tmp_path / "audit.log").read_text(), caplog.text]:
        assert_no_secret(text)


async def test_admin_listener_on_a_unix_socket(tmp_path, secrets, upstream):
    sock = tmp_path / "admin.sock"
    async with running(_config(tmp_path, secrets, upstream, admin_listen=f"unix:{sock}")) as proxy:
        admin = _admin(proxy)
        status, body, _ = await admin.call("GET", "/v1/credentials")
        assert status == 200 and [c["name"] for c in body["credentials"]] == ["demo"]
        assert (await admin.call("GET", "/v1/credentials", token="wrong"))[0] == 401
