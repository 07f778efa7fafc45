"""Canaries: access tokens, refresh tokens and client secrets obtained or used by the
token types appear in no response, log record, audit line, metric or admin answer —
raw, base64 or URL-encoded — also when the upstream echoes them, when the token
endpoint fails, and across a refresh."""

import json
import logging

import aiohttp

from tests.helpers import assert_no_canary
from tests.tokens_fixtures import (  # noqa: F401 - fixtures
    Client,
    api,
    ca_file,
    call,
    oauth,
    proxy_logs,
    rsa_key,
    run_proxy,
    tls_ca,
    token_cred,
)

CLIENT_SECRET = "cs-CANARY-6a1f0e2d"


async def test_no_token_anywhere_a_caller_or_operator_can_look(oauth, api, run_proxy, ca_file, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    api.echo_token = True
    auth_cfg = {"type": "oauth2_refresh_token", "token_url": oauth.token_url, "client_id": "app",
                "client_secret": "oauth/app#client_secret", "refresh_token": "oauth/app#refresh_token",
                "revocation_url": oauth.url + "/revoke"}
    p = await run_proxy({"api": token_cred(api.url, auth_cfg, ca_file, revoke_on_shutdown=True)},
                        {"oauth/app#client_secret": CLIENT_SECRET, "oauth/app#refresh_token": rt1})
    answers = []
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.get(p.url + f"/api/v1/echo/{i}", headers={"Authorization": "Bearer tok-billing-7f3a"}) as r:
                body = await r.read()
                assert r.status == 200 and json.loads(body)["you_sent"] == "Bearer [REDACTED]"
                answers.append(body + json.dumps(dict(r.headers)).encode())
        oauth.db.revoke_access(oauth.db.issued[0])  # refused upstream: refresh, rotate, replay
        async with s.get(p.url + "/api/v1/echo/after", headers={"Authorization": "Bearer tok-billing-7f3a"}) as r:
            assert r.status == 200
            answers.append(await r.read() + json.dumps(dict(r.headers)).encode())
        async with s.get(p.admin_url + "/v1/credentials") as r:
            answers.append(await r.read())
        async with s.get(p.admin_url + "/metrics") as r:
            answers.append(await r.read())
    await p.proxy.stop()
    p.stopped = True
    audit = (tmp_path / "audit.log").read_text()
    logs = proxy_logs(caplog)
    secrets = [CLIENT_SECRET, *oauth.db.by_access, *oauth.db.by_refresh]
    assert len(oauth.db.by_access) == 2 and len(oauth.db.by_refresh) == 3  # the canaries were really used
    assert oauth.db.revocations  # and shutdown revoked the live one
    for secret in secrets:
        assert_no_canary(logs, secret, "logs")
        assert_no_canary(audit, secret, "audit")
        for a in answers:
            assert_no_canary(a, secret, "responses")


async def test_token_endpoint_errors_do_not_leak_what_was_sent(oauth, api, run_proxy, ca_file, caplog, rsa_key):
    """A refused private_key_jwt assertion: neither the key nor the assertion is logged."""
    caplog.set_level(logging.DEBUG)
    pem, _ = rsa_key
    oauth.db.clients["svc"] = Client("svc", auth_method="private_key_jwt", public_key=None)  # no key registered
    auth_cfg = {"type": "oauth2_client_credentials", "token_url": oauth.token_url, "client_id": "svc",
                "client_auth": "private_key_jwt", "private_key": "oauth/svc#key", "key_id": "k1"}
    p = await run_proxy({"api": token_cred(api.url, auth_cfg, ca_file)}, {"oauth/svc#key": pem})
    status, _, body = await call(p, "/api/v1/x")
    assert status == 503
    logs = proxy_logs(caplog)
    key_body = "".join(pem.strip().splitlines()[1:-1])
    assert key_body[:40] not in logs and key_body[-40:] not in logs
    assert "client_assertion" not in logs and "eyJ" not in logs
    assert body.startswith(b'{"error": "credential_unavailable"')
