"""Rotated refresh tokens written back to a real OpenBao: an ``oauth2_refresh_token``
credential against a real OAuth2 server (authlib components), credproxy logged in with
AppRole and exactly the policy in deploy/vault/policy.hcl."""

from __future__ import annotations

import json

import pytest

from proxy.errors import ConflictError
from proxy.store.secret import Secret
from tests.tokens_fixtures import Client, api, ca_file, oauth, tls_ca, token_cred  # noqa: F401 - fixtures
from tests.vault_fixture import bao, raw_log  # noqa: F401 - fixtures
from tests.vault_harness import assert_nowhere, eventually, running, vault_section
from tests.helpers import REPO

POLICY = (REPO / "deploy" / "vault" / "policy.hcl").read_text()
CLIENT_SECRET = "cs-CANARY-vault-0d4c1f"


def refresh_auth(oauth, refresh_ref: str) -> dict:
    return {"type": "oauth2_refresh_token", "token_url": oauth.token_url, "client_id": "app",
            "client_secret": "credproxy/oauth/app#client_secret", "refresh_token": refresh_ref}


async def call(run, path: str) -> int:
    async with run.http.get(run.base + path) as r:
        run.bodies.append(await r.text() + json.dumps(dict(r.headers)))
        return r.status


async def test_rotated_refresh_token_is_written_back_with_cas_under_rotating(bao, oauth, api, ca_file, tmp_path,
                                                                            raw_log):
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/oauth/app", {"client_secret": CLIENT_SECRET})
    bao.put("credproxy/rotating/app", {"refresh_token": rt1, "note": "kept"})
    rf, sf, _, secret_id = bao.approle("cp-wb", ["credproxy"], tmp_path)
    vault = vault_section(bao.address, {"method": "approle", "role_id_file": rf, "secret_id_file": sf})
    creds = {"api": token_cred(api.url, refresh_auth(oauth, "credproxy/rotating/app#refresh_token"), ca_file)}
    creds["api"]["allow"] = [{"paths": ["/**"]}]
    async with running(tmp_path, vault, creds) as run:
        await eventually(lambda: run.proxy._cache.cached("credproxy/oauth/app"))  # logged in, secrets read
        assert await call(run, "/api/v1/a") == 200
        stored = bao.root().secrets.kv.v2.read_secret_version(path="credproxy/rotating/app",
                                                             raise_on_deleted_version=True)["data"]
        rt2 = stored["data"]["refresh_token"]
        assert rt2 != rt1 and rt2 in oauth.db.by_refresh and stored["metadata"]["version"] == 2
        assert stored["data"]["note"] == "kept"  # the other fields of the path stay
        # A replica that still holds version 1 loses the compare-and-set against OpenBao:
        store = run.proxy._store
        with pytest.raises(ConflictError, match="credproxy/rotating/app is at version 2, expected 1"):
            await store.put("credproxy/rotating/app", "refresh_token", Secret("stale-replica"), cas=1)
        vault_token = store.keeper.token.reveal()
    # A restarted proxy (no in-memory state) must use the stored rt2: the test server accepts
    # each refresh token once, so a proxy still holding rt1 would fail here.
    async with running(tmp_path, vault, creds) as again:
        await eventually(lambda: again.proxy._cache.cached("credproxy/oauth/app"))
        assert await call(again, "/api/v1/b") == 200
        stored = bao.root().secrets.kv.v2.read_secret_version(path="credproxy/rotating/app",
                                                             raise_on_deleted_version=True)["data"]
        rt3 = stored["data"]["refresh_token"]
        assert rt3 not in (rt1, rt2) and stored["metadata"]["version"] == 3
        vault_token2 = again.proxy._store.keeper.token.reveal()
    assert_nowhere([rt1, rt2, rt3, CLIENT_SECRET, secret_id, vault_token, vault_token2], raw_log.text,
                   run.audit.read_text(), *run.bodies, *again.bodies)


async def test_rotated_refresh_token_outside_the_writable_prefix_is_refused_by_the_policy(
        bao, oauth, api, ca_file, tmp_path, raw_log):
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET, grant_types=("refresh_token",))
    rt1 = oauth.db.seed_refresh_token("app")
    bao.policy("credproxy", POLICY)
    seeded = bao.put("credproxy/oauth/app", {"client_secret": CLIENT_SECRET, "refresh_token": rt1})
    rf, sf, _, _ = bao.approle("cp-wb2", ["credproxy"], tmp_path)
    vault = vault_section(bao.address, {"method": "approle", "role_id_file": rf, "secret_id_file": sf})
    creds = {"api": token_cred(api.url, refresh_auth(oauth, "credproxy/oauth/app#refresh_token"), ca_file)}
    creds["api"]["allow"] = [{"paths": ["/**"]}]
    async with running(tmp_path, vault, creds) as run:
        await eventually(lambda: run.proxy._cache.cached("credproxy/oauth/app"))
        status = await call(run, "/api/v1/a")
        stored = bao.root().secrets.kv.v2.read_secret_version(path="credproxy/oauth/app",
                                                             raise_on_deleted_version=True)["data"]
    # The provider rotated the token, but the policy does not let credproxy store it there:
    # the new access token is not used (the rotated token would be lost on restart).
    assert status == 503
    assert stored["data"]["refresh_token"] == rt1 and stored["metadata"]["version"] == seeded
    assert "rotated refresh token could not be stored" in raw_log.text
    assert_nowhere([rt1, CLIENT_SECRET], raw_log.text, run.audit.read_text(), *run.bodies)
