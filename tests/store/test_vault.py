"""VaultStore against a real OpenBao server (``bao server -dev``): logins, KV v2 reads
and versions, check-and-set writes (the same semantics as the file store), the
least-privilege policy in deploy/vault/policy.hcl, error mapping, TLS, namespaces."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pytest

from proxy.config.models import VaultConfig
from proxy.errors import ConflictError, SecretAccessDenied, SecretBackendError, SecretNotFound, StoreError
from proxy.store.secret import Secret, SecretRef
from proxy.store.file import FileStore, generate_key, decode_key
from proxy.store.vault import VaultStore
from proxy.errors import LoginRefused
from proxy.errors import VaultUnavailable
from tests.vault_fixture import OpenBao, bao, fresh_bao, raw_log  # noqa: F401 - fixtures
from tests.helpers import REPO

POLICY = (REPO / "deploy" / "vault" / "policy.hcl").read_text()


def forms(value: str) -> list[str]:
    return [value, base64.b64encode(value.encode()).decode(), urllib.parse.quote(value, safe="")]


def assert_absent(secret: str, *texts: str) -> None:
    for text in texts:
        for form in forms(secret):
            assert form not in text


def token_store(server: OpenBao, tmp_path: Path, token: str | None = None, **cfg) -> VaultStore:
    tf = tmp_path / "vault.token"
    tf.write_text((token or server.root_token) + "\n")
    return VaultStore(VaultConfig(address=server.address, auth={"method": "token", "token_file": str(tf)}, **cfg))


@pytest.fixture
async def root_store(bao, tmp_path):
    store = token_store(bao, tmp_path)
    await store.start()
    yield store
    await store.close()


# --- logins ---------------------------------------------------------------------------


async def test_token_file_login_reads_every_field_with_its_version(bao, root_store):
    bao.put("t1/api", {"token": "tok-1", "user": "svc"})
    bao.put("t1/api", {"token": "tok-2", "user": "svc", "port": 8443, "flags": ["a"]})
    entry = await root_store.get("t1/api")
    assert entry.version == 2
    assert entry.get(SecretRef.parse("t1/api#token")).reveal() == "tok-2"
    assert entry.fields["port"].reveal() == "8443"  # non-string JSON values are used as their JSON text
    assert entry.fields["flags"].reveal() == '["a"]'
    assert (await root_store.get("t1/api")).get(SecretRef.parse("t1/api#user")) == Secret("svc")
    assert await root_store.version("t1/api") == 2
    assert "tok-2" not in repr(entry)


async def test_vault_token_env_is_used_when_no_token_file(bao):
    bao.put("t2/api", {"token": "env-works"})
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "token"}),
                       env={"VAULT_TOKEN": bao.token(["root"])})
    await store.start()
    try:
        assert (await store.get("t2/api")).fields["token"].reveal() == "env-works"
    finally:
        await store.close()


async def test_no_token_anywhere_is_a_clear_startup_error(bao):
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "token"}), env={})
    with pytest.raises(LoginRefused, match=r"no vault token: set secrets.vault.auth.token_file or \$VAULT_TOKEN"):
        await store.start()


async def test_invalid_token_is_a_clear_startup_error_without_the_token(bao, tmp_path, raw_log):
    bogus = "s.bogusTokenValue1234567890"
    store = token_store(bao, tmp_path, token=bogus)
    with pytest.raises(LoginRefused) as info:
        await store.start()
    msg = str(info.value)
    assert "vault token login refused (HTTP 403)" in msg and bao.address in msg
    assert_absent(bogus, msg, raw_log.text)


async def test_approle_login_reads_and_wrong_secret_id_is_refused_without_the_secret(bao, tmp_path, raw_log):
    bao.put("credproxy/secrets/ar", {"token": "approle-works"})
    bao.policy("credproxy", POLICY)
    rf, sf, role_id, secret_id = bao.approle("cp-ar", ["credproxy"], tmp_path)
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "approle", "role_id_file": rf,
                                                              "secret_id_file": sf}))
    await store.start()
    try:
        assert (await store.get("credproxy/secrets/ar")).fields["token"].reveal() == "approle-works"
    finally:
        await store.close()

    wrong = "8c6f0c52-0000-4bad-9e1d-c4n4ry5ecre7"
    Path(sf).write_text(wrong + "\n")
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "approle", "role_id_file": rf,
                                                              "secret_id_file": sf}))
    with pytest.raises(StoreError) as info:
        await store.start()
    msg = str(info.value)
    assert msg == (f"cannot log in to vault at {bao.address}: vault approle login refused (HTTP 400): "
                   "check the role_id_file and secret_id_file, and that the secret_id has not expired")
    for value in (wrong, secret_id, role_id):
        assert_absent(value, msg, repr(info.value), raw_log.text)


async def test_unreadable_credential_file_names_the_file_not_its_content(bao, tmp_path):
    store = VaultStore(VaultConfig(address=bao.address, auth={
        "method": "approle", "role_id_file": str(tmp_path / "nope.role_id"), "secret_id_file": str(tmp_path / "x")}))
    with pytest.raises(LoginRefused, match=r"cannot read secrets.vault.auth.role_id_file .*nope.role_id \(No such file"):
        await store.start()


async def test_vault_down_at_start_is_not_fatal(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    tf = tmp_path / "t"
    tf.write_text("whatever")
    store = VaultStore(VaultConfig(address=f"http://127.0.0.1:{port}", timeout=1,
                                   auth={"method": "token", "token_file": str(tf)}))
    await store.start()  # returns: the keeper keeps trying in the background
    try:
        assert store.keeper.token is None
        with pytest.raises(VaultUnavailable, match="not logged in to vault"):
            await store.get("any/path")
    finally:
        await store.close()


# --- the deploy policy ------------------------------------------------------------------


async def test_deploy_policy_allows_exactly_what_credproxy_needs(bao, tmp_path):
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/secrets/pol", {"token": "readable"})
    bao.put("credproxy/rotating/pol", {"refresh_token": "rt-1", "client_id": "abc"})
    bao.put("credproxy/cluster/pol", {"token": "shared"})
    bao.put("other/pol", {"token": "not-for-credproxy"})
    bao.put("credproxy/elsewhere", {"token": "not-for-credproxy"})
    rf, sf, _, _ = bao.approle("cp-pol", ["credproxy"], tmp_path)
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "approle", "role_id_file": rf,
                                                              "secret_id_file": sf}))
    await store.start()
    try:
        assert (await store.get("credproxy/secrets/pol")).version == 1
        assert await store.version("credproxy/secrets/pol") == 1
        # rotated tokens: cas write-back keeps the other fields
        assert await store.put("credproxy/rotating/pol", "refresh_token", Secret("rt-2"), cas=1) == 2
        rotated = await store.get("credproxy/rotating/pol")
        assert rotated.fields["refresh_token"].reveal() == "rt-2" and rotated.fields["client_id"].reveal() == "abc"
        assert await store.put("credproxy/rotating/new", "refresh_token", Secret("rt-0"), cas=0) == 1
        # cluster stanza
        assert await store.put("credproxy/cluster/pol", "token", Secret("shared-2"), cas=1) == 2
        assert (await store.get("credproxy/elsewhere")).version == 1  # anything under credproxy/ reads
        # denied beyond it: nothing outside credproxy/, no writes outside rotating/ and cluster/
        with pytest.raises(SecretAccessDenied):
            await store.get("other/pol")
        with pytest.raises(SecretAccessDenied):
            await store.version("other/pol")
        for path, version in (("credproxy/secrets/pol", 1), ("credproxy/elsewhere", 1), ("credproxy/new", 0),
                              ("other/new", 0)):
            with pytest.raises(SecretAccessDenied):
                await store.put(path, "token", Secret("overwrite"), cas=version)
        assert store.keeper.token is not None  # denials did not make it think its own token is bad
    finally:
        await store.close()
    assert bao.root().secrets.kv.v2.read_secret_version(
        path="credproxy/secrets/pol", raise_on_deleted_version=True)["data"]["data"] == {"token": "readable"}


# --- reads: missing, deleted, errors --------------------------------------------------------


async def test_missing_path_field_and_deleted_version_are_not_found(bao, root_store):
    with pytest.raises(SecretNotFound):
        await root_store.get("t3/missing")
    with pytest.raises(SecretNotFound):
        await root_store.version("t3/missing")
    bao.put("t3/api", {"token": "x"})
    with pytest.raises(SecretNotFound, match="secret field missing: t3/api#nofield"):
        (await root_store.get("t3/api")).get(SecretRef.parse("t3/api#nofield"))
    bao.root().secrets.kv.v2.delete_latest_version_of_secret(path="t3/api")
    with pytest.raises(SecretNotFound):
        await root_store.get("t3/api")
    with pytest.raises(SecretNotFound):
        await root_store.version("t3/api")


async def test_vault_error_text_and_token_never_reach_exceptions_or_logs(bao, tmp_path, raw_log):
    token = bao.token(["default"])
    store = token_store(bao, tmp_path, token=token)
    await store.start()
    try:
        with pytest.raises(SecretAccessDenied) as denied:
            await store.get("t4/secret")
        with pytest.raises(SecretAccessDenied) as denied_write:
            await store.put("t4/secret", "f", Secret("v"), cas=0)
    finally:
        await store.close()
    for exc in (denied.value, denied_write.value):
        text = f"{exc} {exc!r} {exc.detail}"
        assert "permission denied" not in text and "/v1/" not in text  # Vault's own text and URL stay out
        assert exc.__cause__ is None and exc.__suppress_context__
        assert exc.status == 503 and exc.message == "credential unavailable"
    assert str(denied.value) == "vault read t4/secret: vault denied access to t4/secret"
    assert_absent(token, raw_log.text, str(denied.value))


async def test_sealed_vault_is_unavailable_not_denied_and_recovers(fresh_bao, tmp_path):
    fresh_bao.put("t5/api", {"token": "x"})
    store = token_store(fresh_bao, tmp_path)
    await store.start()
    try:
        fresh_bao.seal()
        with pytest.raises(SecretBackendError) as info:
            await store.get("t5/api")
        assert type(info.value) is VaultUnavailable
        assert str(info.value) == "vault read t5/api: vault answered 503"
        fresh_bao.unseal()
        assert (await store.get("t5/api")).version == 1
    finally:
        await store.close()


async def test_revoked_token_is_replaced_by_a_new_login_not_treated_as_denial(bao, tmp_path):
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/secrets/rv", {"token": "x"})
    rf, sf, _, _ = bao.approle("cp-rv", ["credproxy"], tmp_path)
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "approle", "role_id_file": rf,
                                                              "secret_id_file": sf}))
    await store.start()
    try:
        first = store.keeper.token
        bao.root().auth.token.revoke(first.reveal())
        with pytest.raises(SecretBackendError) as info:
            await store.get("credproxy/secrets/rv")
        assert type(info.value) is VaultUnavailable  # not SecretAccessDenied: the cache keeps the secret
        for _ in range(100):
            if store.keeper.token not in (None, first):
                break
            await asyncio.sleep(0.05)
        assert store.keeper.token not in (None, first)
        assert (await store.get("credproxy/secrets/rv")).version == 1
    finally:
        await store.close()


async def test_short_lived_token_is_renewed_and_replaced_while_vault_still_accepts_it(bao, tmp_path, raw_log):
    """AppRole tokens of 4 s TTL and 7 s max TTL. The keeper runs on the wall clock here so that
    its plan can be set against the expire_time OpenBao reports for the same token: whenever it is
    asked, through renewals, a renewal capped by the max TTL and the login that follows, the next
    renewal or login is due at least 2 s before Vault stops accepting the token, and reads
    keep working. (Before, two thirds of a capped 2 s TTL left 0.7 s, less on a busy machine.)"""
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/secrets/roll", {"token": "x"})
    rf, sf, _, _ = bao.approle("cp-roll", ["credproxy"], tmp_path, token_ttl="4s", token_max_ttl="7s")
    store = VaultStore(VaultConfig(address=bao.address, auth={"method": "approle", "role_id_file": rf,
                                                              "secret_id_file": sf}), clock=time.time)
    root = bao.root()
    await store.start()
    tokens: list[str] = []
    try:
        while len(tokens) < 2:  # the first token's whole life, up to the login that replaces it
            token, refresh_at = store.keeper.token, store.keeper.refresh_at  # one consistent snapshot
            assert token is not None
            if token.reveal() not in tokens:
                tokens.append(token.reveal())
            # A renewal after the snapshot only moves expire_time later.
            info = await asyncio.to_thread(root.auth.token.lookup, token.reveal())
            assert refresh_at <= _epoch(info["data"]["expire_time"]) - 2.0  # the README promises 2 s
            assert (await store.get("credproxy/secrets/roll")).version == 1
            await asyncio.sleep(0.2)
    finally:
        await store.close()
    assert "vault token near its max TTL; will log in again" in raw_log.text
    assert "vault token renewed" in raw_log.text
    assert "expired before it could be renewed" not in raw_log.text
    assert "vault no longer accepts" not in raw_log.text


def _epoch(rfc3339: str) -> float:
    """Vault's timestamps carry nanoseconds, more than datetime takes."""
    head, frac, zone = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(.*)", rfc3339).groups()
    return datetime.fromisoformat(head + zone).timestamp() + float(frac or 0)


async def test_a_vault_that_drips_its_answer_is_cut_off_at_the_deadline(tmp_path):
    """A fake Vault that sends its answer one byte every 50 ms, forever (a real Vault cannot be
    made to do that): requests' own read timeout never fires, the store's deadline does."""
    async def drip(reader, writer):
        await reader.read(65536)
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    tf = tmp_path / "t"
    tf.write_text("some-token")
    store = VaultStore(VaultConfig(address=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                                   timeout="300ms", auth={"method": "token", "token_file": str(tf)}))
    try:
        await store.start()  # the first login runs into the deadline: not fatal
        assert store.keeper.token is None
        with pytest.raises(VaultUnavailable, match="no answer from vault within 0.3s"):
            await store.keeper.first_login()
    finally:
        await store.close()
        server.close()


# --- compare-and-set writes: the same semantics as the file store ------------------------------


@pytest.fixture(params=["file", "vault"])
async def any_store(request, bao, tmp_path):
    if request.param == "file":
        store = FileStore(tmp_path / "secrets.enc", decode_key(generate_key(), "test"))
        store.init()
        yield store, "cas/path"
        return
    store = token_store(bao, tmp_path)
    await store.start()
    yield store, f"cas/{os.urandom(4).hex()}"
    await store.close()


async def test_put_semantics_are_the_file_stores(any_store):
    store, path = any_store
    assert await store.put(path, "refresh_token", Secret("rt-1"), cas=0) == 1
    with pytest.raises(ConflictError, match=f"{path} is at version 1, expected 0"):
        await store.put(path, "refresh_token", Secret("rt-x"), cas=0)
    assert await store.put(path, "client_id", Secret("cid"), cas=1) == 2
    with pytest.raises(ConflictError, match=f"{path} is at version 2, expected 1"):
        await store.put(path, "refresh_token", Secret("rt-stale"), cas=1)
    assert await store.put(path, "refresh_token", Secret("rt-3")) == 3  # no cas: unconditional
    entry = await store.get(path)
    assert entry.version == 3 == await store.version(path)
    assert {k: v.reveal() for k, v in entry.fields.items()} == {"refresh_token": "rt-3", "client_id": "cid"}


async def test_concurrent_cas_writes_exactly_one_wins(bao, root_store):
    assert await root_store.put("cas/race", "refresh_token", Secret("rt-1"), cas=0) == 1
    results = await asyncio.gather(*(root_store.put("cas/race", "refresh_token", Secret(f"rt-{i}"), cas=1)
                                     for i in range(6)), return_exceptions=True)
    assert sorted(r for r in results if isinstance(r, int)) == [2]
    assert sum(isinstance(r, ConflictError) for r in results) == 5
    winner = results.index(2)
    assert (await root_store.get("cas/race")).fields["refresh_token"].reveal() == f"rt-{winner}"


async def test_cas_conflict_detected_by_vault_itself(bao, root_store):
    """Another writer gets in between our read and our write: Vault's cas check refuses ours."""
    bao.put("cas/between", {"refresh_token": "rt-1"})
    real_current = root_store._current

    async def read_then_other_writer(path):
        result = await real_current(path)
        bao.put(path, {"refresh_token": "written-by-another-replica"})
        return result

    root_store._current = read_then_other_writer
    with pytest.raises(ConflictError, match="cas/between changed since version 1"):
        await root_store.put("cas/between", "refresh_token", Secret("rt-2"), cas=1)
    root_store._current = real_current
    assert (await root_store.get("cas/between")).fields["refresh_token"].reveal() == "written-by-another-replica"


# --- namespace and TLS ----------------------------------------------------------------------


async def test_namespace_is_sent_with_every_call(bao, tmp_path):
    bao.root().sys.create_namespace("team-a")
    ns = bao.root("team-a")
    ns.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    bao.put("ns/api", {"token": "in-namespace"}, namespace="team-a")
    bao.policy("credproxy", POLICY, namespace="team-a")
    rf, sf, _, _ = bao.approle("cp-ns", ["credproxy"], tmp_path, namespace="team-a")
    bao.put("credproxy/secrets/ns", {"token": "in-namespace-too"}, namespace="team-a")
    store = VaultStore(VaultConfig(address=bao.address, namespace="team-a",
                                   auth={"method": "approle", "role_id_file": rf, "secret_id_file": sf}))
    await store.start()
    try:
        assert (await store.get("credproxy/secrets/ns")).fields["token"].reveal() == "in-namespace-too"
    finally:
        await store.close()
    root_level = token_store(bao, tmp_path)
    await root_level.start()
    try:
        with pytest.raises(SecretNotFound):
            await root_level.get("ns/api")  # not visible outside the namespace
    finally:
        await root_level.close()


@pytest.fixture
def tls_bao(tmp_path):
    server = OpenBao(tmp_path / "tlsbao", tls=True)
    server.start()
    yield server
    server.close()


async def test_tls_is_verified_with_ca_file_and_ambient_ca_variables_are_ignored(tls_bao, tmp_path, monkeypatch):
    tls_bao.put("tls/api", {"token": "over-tls"})
    tf = tmp_path / "t"
    tf.write_text(tls_bao.root_token)
    auth = {"method": "token", "token_file": str(tf)}
    store = VaultStore(VaultConfig(address=tls_bao.address, ca_file=tls_bao.ca_file, auth=auth))
    await store.start()
    try:
        assert (await store.get("tls/api")).fields["token"].reveal() == "over-tls"
    finally:
        await store.close()
    # Without ca_file the server's certificate is not trusted -- even when the environment points
    # requests at its CA: only secrets.vault.ca_file decides.
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(var, tls_bao.ca_file)
    store = VaultStore(VaultConfig(address=tls_bao.address, auth=auth, timeout=2))
    await store.start()  # not fatal: a certificate can be fixed while credproxy waits
    try:
        assert store.keeper.token is None
        with pytest.raises(VaultUnavailable, match="TLS handshake with vault failed"):
            await store.keeper.first_login()
    finally:
        await store.close()


async def test_a_redirect_is_not_followed_so_the_token_stays_with_vault(tmp_path, aiohttp_server):
    """A standby node without request forwarding answers 307 to the active node. A fake here:
    dev-mode OpenBao is never a standby. The token must not travel to the redirect target."""
    from aiohttp import web

    got_token: list[str | None] = []

    async def elsewhere(request):
        got_token.append(request.headers.get("X-Vault-Token"))
        return web.json_response({"data": {"ttl": 0}})

    other_app = web.Application()
    other_app.router.add_route("*", "/{tail:.*}", elsewhere)
    other = await aiohttp_server(other_app)

    async def standby(request):
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other.port}{request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", standby)
    vault = await aiohttp_server(app)
    tf = tmp_path / "t"
    tf.write_text("token-that-must-stay-home")
    store = VaultStore(VaultConfig(address=f"http://127.0.0.1:{vault.port}", auth={"method": "token", "token_file": str(tf)}))
    await store.start()
    try:
        assert store.keeper.token is None
        with pytest.raises(VaultUnavailable, match=r"unexpected answer from vault \(HTTP 307\)"):
            await store.keeper.first_login()
    finally:
        await store.close()
    assert got_token == []


def test_config_requires_the_files_each_auth_method_needs():
    from proxy.config import models as config

    text = "secrets:\n  backend: vault\n  vault:\n    address: https://vault.internal:8200\n    auth:\n      method: approle\n      role_id_file: /etc/credproxy/role_id\n"
    with pytest.raises(config.ConfigInvalid) as info:
        config.parse(text, "c.yaml")
    assert [str(p) for p in info.value.problems] == [
        "c.yaml:5: secrets.vault.auth: auth method approle needs secret_id_file"]
    text = text.replace("approle", "kubernetes").replace("      role_id_file: /etc/credproxy/role_id\n", "")
    with pytest.raises(config.ConfigInvalid) as info:
        config.parse(text, "c.yaml")
    assert [p.message for p in info.value.problems] == ["auth method kubernetes needs role"]
    ok = text.replace("method: kubernetes", "method: kubernetes\n      role: credproxy")
    assert config.parse(ok).secrets.vault.auth.jwt_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
