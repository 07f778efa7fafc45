"""Token endpoint faults through a real proxy.

The token endpoint here is a fault-injecting aiohttp server on loopback: a real
authorization server does not answer HTML, broken JSON, a zero lifetime or a reset
connection on demand. Each fault must give callers 503 ``credential_unavailable``
with Retry-After, one log line naming a fixed reason and never the answer body, an
audit line, a metric, and the reason in the admin view.
"""

import asyncio
import json
import logging
import time

import pytest
from aiohttp import web

from proxy.auth_types import build_source
from proxy.tokens.http import TokenHttp
from proxy.errors import TokenUnavailable
from tests.helpers import assert_no_canary
from tests.tokens_fixtures import call, proxy_logs, run_proxy, token_cred  # noqa: F401 - fixtures

BODY_CANARY = "BODY-CANARY-e4d1a9"
CLIENT_SECRET = "cs-CANARY-0f8a2b6c"


class FaultyTokenEndpoint:
    def __init__(self) -> None:
        self.fault = None  # None: a good token; else a key of FAULTS
        self.requests = 0
        self.valid: set[str] = set()
        self.lifetime: object = 3600
        self.runner = None

    async def token(self, request: web.Request) -> web.StreamResponse:
        await request.post()
        self.requests += 1
        if self.fault is None:
            tok = f"good-token-{self.requests}-{BODY_CANARY[:4]}"
            self.valid.add(tok)
            body = {"access_token": tok, "token_type": "Bearer"}
            if self.lifetime is not None:
                body["expires_in"] = self.lifetime
            return web.json_response(body)
        return await FAULTS[self.fault](request)

    async def api(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"ok": True}) if token in self.valid else web.json_response({}, status=401)

    async def start(self):
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self):
        await self.runner.cleanup()


async def _reset(request):
    request.transport.abort()
    return web.Response()


async def _slow(request):
    await asyncio.sleep(30)  # cancelled when the test server stops
    return web.json_response({"access_token": "late"})


def _answer(status, body, content_type="application/json"):
    async def handler(request):
        return web.Response(status=status, body=body if isinstance(body, bytes) else body.encode(),
                            content_type=content_type)
    return handler


FAULTS = {
    "html": _answer(200, f"<!DOCTYPE html><html><body>Sign in {BODY_CANARY}</body></html>", "text/html"),
    "invalid_json": _answer(200, '{"access_token": "' + BODY_CANARY),
    "no_access_token": _answer(200, json.dumps({"token_type": "Bearer", "expires_in": 3600, "x": BODY_CANARY})),
    "zero_expires_in": _answer(200, json.dumps({"access_token": BODY_CANARY, "expires_in": 0})),
    "negative_expires_in": _answer(200, json.dumps({"access_token": BODY_CANARY, "expires_in": -60})),
    "server_error": _answer(500, json.dumps({"error": "server_error", "error_description": BODY_CANARY})),
    "invalid_client": _answer(401, json.dumps({"error": "invalid_client", "error_description": BODY_CANARY})),
    "huge_body": _answer(200, b'{"access_token": "' + BODY_CANARY.encode() * 100_000 + b'"}'),
    "reset": _reset,
    "slow": _slow,
}
EXPECTED = {"html": "html", "invalid_json": "invalid_json", "no_access_token": "no_access_token",
            "zero_expires_in": "bad_expires_in", "negative_expires_in": "bad_expires_in",
            "server_error": "http_error", "invalid_client": "rejected", "huge_body": "too_large",
            "reset": "unreachable"}


@pytest.fixture
async def endpoint():
    e = await FaultyTokenEndpoint().start()
    yield e
    await e.stop()


def cc_auth(endpoint):
    return {"type": "oauth2_client_credentials", "token_url": endpoint.url + "/token", "client_id": "svc",
            "client_secret": "oauth/svc#client_secret", "client_auth": "post"}


def metric(p, name: str, **labels) -> float:
    state = p.proxy.holder.current  # as GET /metrics does: the credential gauges are set at scrape time
    state.metrics.observe_credentials([c.describe() for c in state.credentials.values()])
    text = state.metrics.render().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("fault", sorted(EXPECTED))
async def test_each_fault_is_a_503_with_a_fixed_reason_and_no_body_in_logs(endpoint, run_proxy, tmp_path, caplog,
                                                                           fault):
    caplog.set_level(logging.DEBUG)
    endpoint.fault = fault
    p = await run_proxy({"api": token_cred(endpoint.url + "/api", cc_auth(endpoint))},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    status, headers, body = await call(p, "/api/v1/x")
    reason = EXPECTED[fault]
    assert status == 503
    assert json.loads(body)["error"] == "credential_unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert endpoint.requests == 1
    failures = [r for r in caplog.records if r.getMessage() == "token refresh failed"]
    assert [f.reason for f in failures] == [reason]
    assert p.proxy.holder.current.credentials["api"].describe()["last_error"] == reason
    assert p.proxy.holder.current.credentials["api"].describe()["state"] == "failing"
    assert metric(p, "credproxy_token_refresh_total", credential="api", result=reason) == 1.0
    audit = p.audit_lines(tmp_path)[-1]
    assert (audit["status"], audit["outcome"], audit["reason"]) == (503, "error", f"token_{reason}")
    logs = proxy_logs(caplog)
    assert BODY_CANARY not in logs and BODY_CANARY not in body.decode()
    assert_no_canary(logs, CLIENT_SECRET, "logs")


async def test_after_a_fault_the_next_attempt_waits_for_the_backoff_then_recovers(endpoint, run_proxy):
    endpoint.fault = "server_error"
    p = await run_proxy({"api": token_cred(endpoint.url + "/api", cc_auth(endpoint))},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    assert (await call(p, "/api/v1/x"))[0] == 503
    assert (await call(p, "/api/v1/x"))[0] == 503
    assert endpoint.requests == 1  # backing off: not asked again
    endpoint.fault = None
    slot = p.proxy.holder.current.credentials["api"].source.slot("")
    slot.settings.clock = lambda: time.monotonic() + 2.0  # the (at most 1.25 s) backoff has passed
    assert (await call(p, "/api/v1/x"))[0] == 200
    assert endpoint.requests == 2


@pytest.mark.parametrize("lifetime,session,expected", [
    (10**9, {}, 86400.0),  # huge: capped at a day
    ("120", {}, 120.0),  # a numeric string is read as a number
    ("soon", {"ttl": "15m"}, 900.0),  # unusable: session.ttl
    (None, {"ttl": "15m"}, 900.0),  # missing: session.ttl
])
async def test_expiry_forms_that_still_give_a_token(endpoint, run_proxy, lifetime, session, expected):
    endpoint.lifetime = lifetime
    p = await run_proxy({"api": token_cred(endpoint.url + "/api", cc_auth(endpoint), **session)},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    assert (await call(p, "/api/v1/x"))[0] == 200
    state = p.proxy.holder.current.credentials["api"].describe()
    assert state["state"] == "fresh"
    assert expected - 5 < state["expires_in_s"] <= expected
    assert 0 < metric(p, "credproxy_token_expires_in_seconds", credential="api") <= expected


async def test_a_slow_endpoint_times_out(endpoint, tmp_path):
    """The token request timeout (30 s in production) shortened through the injectable client."""
    from proxy.config.models import CredentialConfig
    from proxy.store.cache import SecretCache
    from proxy.store.file import FileStore
    from tests.helpers import write_store

    endpoint.fault = "slow"
    store_path, key_file = write_store(tmp_path, {"oauth/svc#client_secret": CLIENT_SECRET})
    import base64

    store = FileStore(store_path, base64.b64decode(key_file.read_text()))
    cfg = CredentialConfig.model_validate(token_cred(endpoint.url + "/api", cc_auth(endpoint)))
    source = build_source(cfg, SecretCache(store), name="api", store=store,
                          http=TokenHttp(total_timeout=0.3))
    with pytest.raises(TokenUnavailable) as err:
        await source.grant("")
    assert err.value.reason == "token_timeout" and err.value.retry_after >= 1
    assert source.state()["state"] == "failing" and source.state()["last_error"] == "timeout"
    await source.close()


async def test_a_valid_token_keeps_serving_while_background_refreshes_fail(endpoint, run_proxy):
    p = await run_proxy({"api": token_cred(endpoint.url + "/api", cc_auth(endpoint))},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    source = p.proxy.holder.current.credentials["api"].source
    offset = [0.0]
    source.settings.clock = lambda: time.monotonic() + offset[0]
    assert (await call(p, "/api/v1/x"))[0] == 200
    endpoint.fault = "server_error"
    offset[0] = 3500.0  # inside the refresh window
    for _ in range(5):
        assert (await call(p, "/api/v1/x"))[0] == 200
        await asyncio.sleep(0.02)
        offset[0] += 2.0
    assert endpoint.requests >= 2
    assert source.state()["state"] == "failing" and source.state()["last_error"] == "http_error"
    offset[0] = 3600.0  # expired, and the endpoint still fails
    source.slot("").not_before = float("-inf")
    status, headers, _ = await call(p, "/api/v1/x")
    assert status == 503 and int(headers["Retry-After"]) >= 1
