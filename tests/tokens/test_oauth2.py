"""The three OAuth2 grants against a real authorization server (authlib's server
components over TLS on loopback), through a real proxy in front of a resource server
that accepts only tokens that server issued."""

import asyncio
import json
import logging

import pytest

from proxy.errors import CredentialUnavailable
from proxy.store.secret import Secret
from tests.helpers import assert_no_canary
from tests.tokens_fixtures import (  # noqa: F401 - fixtures
    Client,
    api,
    ca_file,
    call,
    ec_key,
    oauth,
    proxy_logs,
    rsa_key,
    run_proxy,
    tls_ca,
    token_cred,
)

CLIENT_SECRET = "cs-CANARY-5b0c1e9d77f2"


def client_credentials_auth(oauth, client_auth="basic", **extra):
    a = {"type": "oauth2_client_credentials", "token_url": oauth.token_url, "client_id": "svc",
         "client_auth": client_auth, "scope": "read write", **extra}
    if client_auth in ("basic", "post"):
        a["client_secret"] = "oauth/svc#client_secret"
    else:
        a["private_key"] = "oauth/svc#private_key"
    return a


@pytest.mark.parametrize("client_auth,method,key", [
    ("basic", "client_secret_basic", None),
    ("post", "client_secret_post", None),
    ("private_key_jwt", "private_key_jwt", "rsa"),
    ("private_key_jwt", "private_key_jwt", "ec"),
])
async def test_client_credentials_each_client_auth_method(oauth, api, run_proxy, ca_file, rsa_key, ec_key,
                                                          client_auth, method, key):
    pem, public = {"rsa": rsa_key, "ec": ec_key, None: (None, None)}[key]
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET if not key else None, auth_method=method,
                                     public_key=public, scope="read write")
    secrets = {"oauth/svc#client_secret": CLIENT_SECRET} if not key else {"oauth/svc#private_key": pem}
    p = await run_proxy({"api": token_cred(api.url, client_credentials_auth(oauth, client_auth), ca_file)}, secrets)

    for _ in range(3):
        status, _, body = await call(p, "/api/v1/things")
        assert status == 200, body
        assert json.loads(body)["path"] == "/v1/things"
    # The server accepted exactly this client-auth method (the client allows no other), once.
    assert [(r["grant_type"], r["auth"], r["status"], r["scope"]) for r in oauth.db.token_requests] == [
        ("client_credentials", method, 200, "read write")]
    issued = oauth.db.issued
    assert len(issued) == 1 and {s.token for s in api.seen} == {issued[0]}
    # The token request went out on its own client, not the injecting path: no caller or
    # proxy headers, no bearer token, nothing but the client's own authentication.
    sent = oauth.db.token_requests[0]["headers"]
    assert "X-Request-Id" not in sent and "Proxy-Authorization" not in sent
    assert sent.get("Authorization", "").split(" ")[0] == ("Basic" if method == "client_secret_basic" else "")


async def test_wrong_client_secret_is_503_with_retry_after_and_no_secret_in_logs(oauth, api, run_proxy, ca_file,
                                                                                  caplog):
    caplog.set_level(logging.DEBUG)
    oauth.db.clients["svc"] = Client("svc", secret="the-right-one")
    p = await run_proxy({"api": token_cred(api.url, client_credentials_auth(oauth), ca_file)},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    status, headers, body = await call(p, "/api/v1/things")
    assert status == 503
    assert json.loads(body)["error"] == "credential_unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert api.seen == []
    failures = [r for r in caplog.records if r.getMessage() == "token refresh failed"]
    assert len(failures) == 1 and failures[0].reason == "rejected"
    assert "error=invalid_client" in failures[0].detail
    # Backing off: the next request does not hit the token endpoint again.
    status, _, _ = await call(p, "/api/v1/things")
    assert status == 503 and oauth.db.requests == 1
    assert_no_canary(proxy_logs(caplog), CLIENT_SECRET, "logs")
    assert_no_canary(body, CLIENT_SECRET, "response")


async def test_tls_is_verified_for_the_token_endpoint(oauth, api, run_proxy):
    """Without upstream_tls.ca_file the authorization server's certificate is not trusted."""
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET)
    p = await run_proxy({"api": token_cred(api.url, client_credentials_auth(oauth), None)},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    status, _, _ = await call(p, "/api/v1/things")
    assert status == 503
    assert oauth.db.requests == 0
    assert p.proxy.holder.current.credentials["api"].describe()["last_error"] == "tls"


def refresh_auth(oauth, **extra):
    return {"type": "oauth2_refresh_token", "token_url": oauth.token_url, "client_id": "app",
            "client_secret": "oauth/app#client_secret", "refresh_token": "oauth/app#refresh_token", **extra}


async def _stored(p_or_store, ref="oauth/app"):
    from proxy.store.file import FileStore

    store = p_or_store if isinstance(p_or_store, FileStore) else p_or_store.proxy.holder.current.cache.store
    entry = await store.get(ref)
    return entry.fields["refresh_token"].reveal(), entry.version


async def test_rotated_refresh_token_is_stored_and_survives_a_restart(oauth, api, run_proxy, ca_file, caplog):
    caplog.set_level(logging.DEBUG)
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    creds = {"api": token_cred(api.url, refresh_auth(oauth), ca_file)}
    p = await run_proxy(creds, {"oauth/app#client_secret": CLIENT_SECRET, "oauth/app#refresh_token": rt1})
    _, version0 = await _stored(p)

    status, _, _ = await call(p, "/api/v1/a")
    assert status == 200
    rt2, version1 = await _stored(p)
    assert rt2 != rt1 and rt2 in oauth.db.by_refresh and version1 == version0 + 1
    assert oauth.db.by_refresh[rt1].refresh_revoked  # single use: only rt2 works from now on

    await p.proxy.stop()
    p.stopped = True
    p2 = await run_proxy(creds)  # same store, fresh process state
    status, _, _ = await call(p2, "/api/v1/b")
    assert status == 200
    rt3, version2 = await _stored(p2)
    assert rt3 not in (rt1, rt2) and version2 == version1 + 1
    assert [r["status"] for r in oauth.db.token_requests] == [200, 200]
    for rt in (rt1, rt2, rt3):
        assert_no_canary(proxy_logs(caplog), rt, "logs")


async def test_refresh_without_rotation_keeps_the_stored_token(oauth, api, run_proxy, ca_file):
    oauth.db.rotate_refresh_tokens = False
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    p = await run_proxy({"api": token_cred(api.url, refresh_auth(oauth), ca_file)},
                        {"oauth/app#client_secret": CLIENT_SECRET, "oauth/app#refresh_token": rt1})
    _, version0 = await _stored(p)
    assert (await call(p, "/api/v1/a"))[0] == 200
    await p.proxy.holder.current.credentials["api"].source.refresh()
    assert (await call(p, "/api/v1/a"))[0] == 200
    assert await _stored(p) == (rt1, version0)
    assert len(oauth.db.token_requests) == 2


async def test_rotation_write_back_loses_a_race_and_uses_the_winner_next(oauth, api, run_proxy, ca_file):
    """Someone else stores a newer refresh token while ours is in flight: compare-and-set
    refuses our write, our answer is discarded, and the next attempt uses the stored one."""
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    winner = oauth.db.seed_refresh_token("app")
    p = await run_proxy({"api": token_cred(api.url, refresh_auth(oauth), ca_file)},
                        {"oauth/app#client_secret": CLIENT_SECRET, "oauth/app#refresh_token": rt1})
    store = p.proxy.holder.current.cache.store
    oauth.db.hold = asyncio.Event()
    source = p.proxy.holder.current.credentials["api"].source
    pending = asyncio.ensure_future(source.grant(""))
    while oauth.db.arrived == 0:
        await asyncio.sleep(0.005)
    await store.put("oauth/app", "refresh_token", Secret(winner))
    oauth.db.hold.set()
    with pytest.raises(CredentialUnavailable) as err:
        await pending
    assert err.value.reason == "token_rotation_conflict"
    assert (await _stored(p))[0] == winner
    source.slot("").not_before = float("-inf")  # skip the backoff for the test
    oauth.db.hold = None
    assert (await call(p, "/api/v1/a"))[0] == 200
    assert oauth.db.by_refresh[winner].refresh_revoked  # the second attempt used the winner


def jwt_auth(oauth, key_ref="oauth/jwt#private_key", **extra):
    return {"type": "oauth2_jwt_bearer", "token_url": oauth.token_url, "client_id": "connected-app",
            "subject": "integration@example.com", "audience": oauth.db.jwt_audience, "private_key": key_ref,
            "key_id": "k1", **extra}


@pytest.mark.parametrize("key", ["rsa", "ec"])
async def test_jwt_bearer_grant_with_instance_url(oauth, api, run_proxy, ca_file, rsa_key, ec_key, key):
    pem, public = rsa_key if key == "rsa" else ec_key
    oauth.db.clients["connected-app"] = Client("connected-app", grant_types=(
        "urn:ietf:params:oauth:grant-type:jwt-bearer",), public_key=public)
    oauth.db.instance_url = api.url  # the "my-domain" host that serves the API
    # The configured upstream is a placeholder nobody listens on: the token answer names the real one.
    cred = token_cred("http://127.0.0.1:9/prefix", jwt_auth(oauth, use_instance_url=True), ca_file)
    p = await run_proxy({"sf": cred}, {"oauth/jwt#private_key": pem})
    status, _, body = await call(p, "/sf/services/data/v59.0/sobjects")
    assert status == 200, body
    assert api.seen[-1].path == "/prefix/services/data/v59.0/sobjects"
    assert [r["grant_type"] for r in oauth.db.token_requests] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]


async def test_jwt_bearer_unknown_subject_is_refused(oauth, api, run_proxy, ca_file, rsa_key):
    pem, public = rsa_key
    oauth.db.clients["connected-app"] = Client("connected-app", grant_types=(
        "urn:ietf:params:oauth:grant-type:jwt-bearer",), public_key=public)
    cred = token_cred(api.url, jwt_auth(oauth, subject="nobody@example.com"), ca_file)
    p = await run_proxy({"sf": cred}, {"oauth/jwt#private_key": pem})
    status, headers, _ = await call(p, "/sf/x")
    assert status == 503 and "Retry-After" in headers
    assert p.proxy.holder.current.credentials["sf"].describe()["last_error"] == "rejected"


async def test_jwt_bearer_per_caller_subject_gives_each_caller_its_own_user(oauth, api, run_proxy, ca_file, rsa_key):
    """Salesforce per-user JWT logins: one connected app's key, each calling service its own ``sub``; a
    caller without an entry acts as ``subject``. Each principal has its own token."""
    pem, public = rsa_key
    oauth.db.clients["connected-app"] = Client("connected-app", grant_types=(
        "urn:ietf:params:oauth:grant-type:jwt-bearer",), public_key=public)
    oauth.db.users.add("reports-bot@example.com")
    cred = token_cred(api.url, jwt_auth(oauth, per_caller_subject={"reports": "reports-bot@example.com"}), ca_file)
    p = await run_proxy({"sf": cred}, {"oauth/jwt#private_key": pem})
    subjects = {}
    for caller in ("reports", "billing", "reports"):
        status, _, body = await call(p, "/sf/x", caller=caller)
        assert status == 200, body
        subjects.setdefault(caller, set()).add(oauth.db.by_access[api.seen[-1].token].subject)
    assert subjects == {"reports": {"reports-bot@example.com"}, "billing": {"integration@example.com"}}
    assert len(oauth.db.token_requests) == 2  # one token per principal, reused by the second "reports" call


def test_per_caller_subject_must_name_a_defined_caller(tmp_path):
    from proxy.config import models as config_mod

    cfg = {"callers": {"billing": {"token_sha256": "ab" * 32}},
           "credentials": {"sf": token_cred("https://api.example.com", {
               "type": "oauth2_jwt_bearer", "token_url": "https://login.example.com/token", "client_id": "app",
               "subject": "a@example.com", "private_key": "k/jwt#pem",
               "per_caller_subject": {"ghost": "g@example.com"}})}}
    cfg["credentials"]["sf"]["allow"] = [{"paths": ["/**"]}]
    import yaml

    with pytest.raises(config_mod.ConfigInvalid) as exc:
        config_mod.parse(yaml.safe_dump(cfg), "c.yaml")
    assert any("credentials.sf.auth.per_caller_subject.ghost" in str(p) and "not defined under callers" in str(p)
               for p in exc.value.problems), exc.value.problems


async def test_revoke_calls_rfc7009_and_the_next_request_gets_a_new_token(oauth, api, run_proxy, ca_file):
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET)
    auth_cfg = client_credentials_auth(oauth, revocation_url=oauth.url + "/revoke")
    p = await run_proxy({"api": token_cred(api.url, auth_cfg, ca_file)}, {"oauth/svc#client_secret": CLIENT_SECRET})
    assert (await call(p, "/api/v1/a"))[0] == 200
    first = oauth.db.issued[0]
    await p.proxy.holder.current.credentials["api"].source.revoke()
    assert oauth.db.revocations == [first]
    assert (await call(p, "/api/v1/a"))[0] == 200
    assert len(oauth.db.issued) == 2 and api.seen[-1].token == oauth.db.issued[1]


async def test_revoke_on_shutdown(oauth, api, run_proxy, ca_file):
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET)
    auth_cfg = client_credentials_auth(oauth, revocation_url=oauth.url + "/revoke")
    creds = {"api": token_cred(api.url, auth_cfg, ca_file, revoke_on_shutdown=True),
             "quiet": token_cred(api.url, {**auth_cfg}, ca_file)}
    p = await run_proxy(creds, {"oauth/svc#client_secret": CLIENT_SECRET})
    assert (await call(p, "/api/v1/a"))[0] == 200
    assert (await call(p, "/quiet/v1/a"))[0] == 200
    api_token = api.seen[0].token
    await p.proxy.stop()
    p.stopped = True
    assert oauth.db.revocations == [api_token]  # only the credential that asked for it


async def test_prefetch_obtains_the_token_at_start(oauth, api, run_proxy, ca_file):
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET)
    p = await run_proxy({"api": token_cred(api.url, client_credentials_auth(oauth), ca_file, prefetch=True)},
                        {"oauth/svc#client_secret": CLIENT_SECRET})
    for _ in range(200):
        if oauth.db.issued:
            break
        await asyncio.sleep(0.01)
    assert len(oauth.db.issued) == 1 and api.seen == []
    assert p.proxy.holder.current.credentials["api"].describe()["state"] == "fresh"
    assert (await call(p, "/api/v1/a"))[0] == 200
    assert oauth.db.requests == 1


async def test_each_per_caller_principal_has_its_own_token_and_rotation(oauth, api, run_proxy, ca_file):
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt_own, rt_reports = oauth.db.seed_refresh_token("app"), oauth.db.seed_refresh_token("app")
    auth_cfg = refresh_auth(oauth, per_caller={"reports": {"refresh_token": "oauth/app-reports#refresh_token"}})
    p = await run_proxy({"api": token_cred(api.url, auth_cfg, ca_file)},
                        {"oauth/app#client_secret": CLIENT_SECRET, "oauth/app#refresh_token": rt_own,
                         "oauth/app-reports#refresh_token": rt_reports})
    for caller in ("billing", "reports", "billing", "reports"):
        assert (await call(p, "/api/v1/me", caller=caller))[0] == 200
    assert len(oauth.db.token_requests) == 2
    own_token, reports_token = api.seen[0].token, api.seen[1].token
    assert own_token != reports_token
    assert [s.token for s in api.seen] == [own_token, reports_token, own_token, reports_token]
    store = p.proxy.holder.current.cache.store
    assert (await store.get("oauth/app")).fields["refresh_token"].reveal() not in (rt_own, rt_reports)
    assert (await store.get("oauth/app-reports")).fields["refresh_token"].reveal() not in (rt_own, rt_reports)
    assert oauth.db.by_refresh[rt_own].refresh_revoked and oauth.db.by_refresh[rt_reports].refresh_revoked
