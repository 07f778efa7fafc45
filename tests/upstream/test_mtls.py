"""upstream_tls: credproxy presents a client certificate (from the secret store) to an
upstream that requires one. The upstream is a real aiohttp HTTPS server with trustme
certificates and ``CERT_REQUIRED``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import ssl
import stat
import tempfile
import time

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.config import models as config_mod
from proxy.upstream.mtls import build_context, pem_path
from proxy.store.secret import Secret
from tests._signing_harness import CALLER, Running, assert_nowhere, json_logs, signing_proxy  # noqa: F401

API_TOKEN = "api-token-used-together-with-the-client-cert"
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class PKI:
    def __init__(self, tmp_path) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("127.0.0.1")
        self.ca_file = tmp_path / "upstream-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def client(self, name: str, days: int) -> tuple[str, str, dt.datetime]:
        not_after = NOW + dt.timedelta(days=days)
        leaf = self.ca.issue_cert(f"{name}.example", common_name=name, not_after=not_after)
        cert = "".join(b.bytes().decode() for b in leaf.cert_chain_pems)
        return cert, leaf.private_key_pem.bytes().decode(), not_after


def key_markers(key_pem: str) -> list[str]:
    """The random lines of a PEM key (the first line is mostly a fixed algorithm prefix)."""
    body = [line for line in key_pem.splitlines() if line and not line.startswith("-----")]
    return [line for line in body[1:] if len(line) >= 16]


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path)


@pytest.fixture
async def mtls_upstream(aiohttp_server, pki):
    """HTTPS upstream that refuses a handshake without a client certificate from the CA,
    and answers with the certificate's common name and whether the API token came along."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        cert = request.transport.get_extra_info("peercert")
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        seen.append(cn)
        return web.json_response({"client": cn, "token": request.headers.get("Authorization") == f"Bearer {API_TOKEN}"})

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(ctx)
    pki.ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=ctx)
    return server, seen


def credential(server, pki, *, with_cert: bool = True) -> dict:
    tls = {"ca_file": str(pki.ca_file)}
    if with_cert:
        tls.update(client_cert="tls/client#cert", client_key="tls/client#key")
    return {"upstream": f"https://127.0.0.1:{server.port}", "upstream_tls": tls,
            "auth": {"type": "header", "secret": "api/token#value"},
            "allow": [{"callers": [CALLER], "paths": ["/**"]}]}


async def get(running: Running, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(running.url + path, headers=running.caller_headers) as r:
            return r.status, json.loads(await r.text())


def files_containing(markers: list[str], since: float) -> list[str]:
    """Regular files in the temp directories, changed since ``since``, that hold any marker."""
    hits = []
    for base in {tempfile.gettempdir(), "/dev/shm"}:
        for root, dirs, files in os.walk(base):
            if root.count(os.sep) - base.count(os.sep) >= 5:
                dirs[:] = []
            for name in files:
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime < since or st.st_size > 1 << 20:
                        continue
                    with open(path, "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                if any(m.encode() in data for m in markers):
                    hits.append(path)
    return hits


async def test_upstream_accepts_credproxys_certificate_and_refuses_a_call_without(
        signing_proxy, mtls_upstream, pki, json_logs):
    server, seen = mtls_upstream
    cert, key, not_after = pki.client("billing-client", days=30)
    started = time.time() - 1
    running = await signing_proxy(
        {"mtls": credential(server, pki), "nocert": credential(server, pki, with_cert=False)},
        {"tls/client#cert": cert, "tls/client#key": key, "api/token#value": API_TOKEN},
    )
    status, body = await get(running, "/mtls/v1/ping")
    assert (status, body) == (200, {"client": "billing-client", "token": True})

    status, body = await get(running, "/nocert/v1/ping")
    assert (status, body["error"]) == (502, "upstream_error")
    assert seen == ["billing-client"]  # the refused call never reached the handler

    described = {c["name"]: c for c in json.loads(await running.admin_get("/v1/credentials"))["credentials"]}
    client_cert = described["mtls"]["upstream_tls"]["client_cert"]
    assert client_cert["subject"].startswith("CN=billing-client,")
    assert client_cert["not_after"] == not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    remaining = not_after.timestamp() - time.time()  # the certificate may have been issued minutes ago
    assert abs(client_cert["expires_in_s"] - remaining) < 120
    assert "upstream_tls" not in described["nocert"]

    metrics = await running.admin_get("/metrics")
    m = re.search(r'^credproxy_upstream_cert_expires_in_seconds\{credential="mtls"\} (\S+)$', metrics, re.M)
    assert m and abs(float(m.group(1)) - remaining) < 120
    assert 'credproxy_upstream_cert_expires_in_seconds{credential="nocert"}' not in metrics

    # No key material left in any file.
    assert files_containing(key_markers(key), started) == []
    for marker in key_markers(key):
        await assert_nowhere(running, marker, json_logs.getvalue(), json.dumps(body))


async def test_rotation_is_picked_up_and_a_half_rotated_pair_keeps_the_old_one(signing_proxy, mtls_upstream, pki):
    server, seen = mtls_upstream
    cert_a, key_a, _ = pki.client("client-a", days=10)
    cert_b, key_b, not_after_b = pki.client("client-b", days=90)
    running = await signing_proxy({"mtls": credential(server, pki)},
                                {"tls/client#cert": cert_a, "tls/client#key": key_a,
                                 "api/token#value": API_TOKEN})
    cache = running.proxy._cache
    assert (await get(running, "/mtls/x"))[1]["client"] == "client-a"

    # The operator writes the new certificate first: for a moment it does not match the stored key.
    running.store.put_sync("tls/client", "cert", Secret(cert_b))
    await cache.poll_once()  # what the background poller does every refresh_interval
    await asyncio.sleep(0.05)
    assert (await get(running, "/mtls/x"))[1]["client"] == "client-a"
    tls = json.loads(await running.admin_get("/v1/credentials"))["credentials"][0]["upstream_tls"]
    assert tls["last_error"] == "client_cert_invalid" and "CN=client-a" in tls["client_cert"]["subject"]

    running.store.put_sync("tls/client", "key", Secret(key_b))
    await cache.poll_once()
    await asyncio.sleep(0.05)
    tls = json.loads(await running.admin_get("/v1/credentials"))["credentials"][0]["upstream_tls"]
    assert tls["last_error"] is None
    assert tls["client_cert"]["not_after"] == not_after_b.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (await get(running, "/mtls/x"))[1]["client"] == "client-b"
    assert seen == ["client-a", "client-a", "client-b"]


async def test_unusable_or_missing_certificate_answers_503(signing_proxy, mtls_upstream, pki, json_logs):
    server, seen = mtls_upstream
    cert, key, _ = pki.client("other", days=5)
    _, wrong_key, _ = pki.client("someone-else", days=5)
    running = await signing_proxy(
        {"mismatch": {**credential(server, pki), "upstream_tls": {
            "ca_file": str(pki.ca_file), "client_cert": "tls/client#cert", "client_key": "tls/other#key"}},
         "garbage": {**credential(server, pki), "upstream_tls": {
             "ca_file": str(pki.ca_file), "client_cert": "tls/client#key", "client_key": "tls/client#key"}},
         "missing": {**credential(server, pki), "upstream_tls": {
             "ca_file": str(pki.ca_file), "client_cert": "tls/absent#cert", "client_key": "tls/absent#key"}}},
        {"tls/client#cert": cert, "tls/client#key": key, "tls/other#key": wrong_key,
         "api/token#value": API_TOKEN},
    )
    for name in ("mismatch", "garbage", "missing"):
        status, body = await get(running, f"/{name}/x")
        assert (status, body["error"], body["message"]) == (503, "credential_unavailable", "credential unavailable")
    assert seen == []
    async with aiohttp.ClientSession() as http:
        async with http.get(running.admin + "/readyz") as r:
            assert r.status == 503 and (await r.json())["waiting"] == ["missing"]
    described = {c["name"]: c for c in json.loads(await running.admin_get("/v1/credentials"))["credentials"]}
    assert described["mismatch"]["upstream_tls"] == {"client_cert": None, "last_error": "client_cert_invalid"}
    assert described["garbage"]["upstream_tls"]["last_error"] == "client_cert_invalid"
    assert described["missing"]["upstream_tls"]["last_error"] == "SecretNotFound"
    for marker in key_markers(key) + key_markers(wrong_key):
        await assert_nowhere(running, marker, json_logs.getvalue())


def test_client_cert_needs_its_key():
    doc = {"credentials": {"x": {"upstream": "https://api.example.com", "upstream_tls": {"client_cert": "tls/c#cert"},
                                 "auth": {"type": "header", "secret": "a#b"}}}}
    with pytest.raises(config_mod.ConfigInvalid) as err:
        config_mod.parse(json.dumps(doc))
    assert [(p.path, p.message) for p in err.value.problems] == [
        ("credentials.x.upstream_tls", "client_cert and client_key are set together")]


def test_fallback_file_is_private_and_removed(tmp_path):
    """Where memfd is unavailable: a 0600 file in a fresh 0700 directory, gone after loading."""
    base = tmp_path / "scratch"
    base.mkdir()
    with pem_path(b"-----BEGIN TEST-----\n", use_memfd=False, base_dir=str(base)) as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert open(path, "rb").read() == b"-----BEGIN TEST-----\n"
    assert list(base.iterdir()) == []
    with pem_path(b"x") as path:  # the default: an anonymous in-memory file with no name on disk
        assert path.startswith("/proc/self/fd/") and open(path, "rb").read() == b"x"


@pytest.mark.parametrize("use_memfd", [True, False])
async def test_both_loading_paths_give_a_working_context(mtls_upstream, pki, tmp_path, use_memfd):
    server, seen = mtls_upstream
    cert, key, _ = pki.client(f"direct-{use_memfd}", days=1)
    ctx = build_context(str(pki.ca_file), Secret(cert), Secret(key), use_memfd=use_memfd, base_dir=str(tmp_path))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{server.port}/", ssl=ctx) as r:
            assert (await r.json())["client"] == f"direct-{use_memfd}"
    assert [p.name for p in tmp_path.iterdir()] == ["upstream-ca.pem"]


async def test_the_client_key_in_a_log_record_or_exception_never_reaches_the_log(
        signing_proxy, mtls_upstream, pki, json_logs):
    import logging
    server, _seen = mtls_upstream
    cert, key, _ = pki.client("billing-client", days=30)
    running = await signing_proxy({"mtls": credential(server, pki)},
                                  {"tls/client#cert": cert, "tls/client#key": key, "api/token#value": API_TOKEN})
    assert (await get(running, "/mtls/v1/ping"))[0] == 200
    log = logging.getLogger("credproxy.test")
    for marker in key_markers(key):  # one line of the key: no shape rule knows it, only its registration
        try:
            raise ValueError(f"bad key line {marker}")
        except ValueError:
            log.exception("loading failed near %s", marker, extra={"detail": marker})
    log.error("whole key %r", key)
    out = json_logs.getvalue()
    assert "loading failed near" in out
    for marker in key_markers(key):
        assert marker not in out


async def test_reloads_that_recreate_an_mtls_credential_leave_no_change_callbacks_behind(
        tmp_path, mtls_upstream, pki, monkeypatch):
    import yaml

    from proxy.app import Proxy
    from tests._signing_harness import base_config, write_store

    monkeypatch.delenv("CREDPROXY_MASTER_KEY", raising=False)
    server, _seen = mtls_upstream
    cert, key, _ = pki.client("billing-client", days=30)
    write_store(tmp_path, {"tls/client#cert": cert, "tls/client#key": key, "api/token#value": API_TOKEN})
    path = tmp_path / "config.yaml"

    def write(version: int) -> None:
        cred = credential(server, pki)
        cred["upstream"] += f"/v{version}"  # a changed upstream: the reload builds the credential anew
        path.write_text(yaml.safe_dump(base_config(tmp_path, "http://127.0.0.1:9", credentials={"mtls": cred})))

    write(0)
    proxy = Proxy(config_mod.load(path), str(path), watch_interval=None)
    await proxy.start()
    try:
        cache = proxy._cache
        before = cache.listeners
        for version in range(1, 6):
            write(version)
            assert (await proxy.reload()).result == "ok"
            for _ in range(200):  # the old state closes once it has no request left
                if cache.listeners == before:
                    break
                await asyncio.sleep(0.01)
        assert cache.listeners == before
    finally:
        await proxy.stop()
