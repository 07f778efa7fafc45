"""Fixtures for the token tests: a TLS CA, the authlib authorization server, the resource
server it protects, signing keys, and a proxy started on a token credential.

Test modules import what they use: ``from tests.tokens_fixtures import *``.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.helpers import auth, base_config, start_proxy, write_store
from tests.tokens_oauth_server import Client, OAuthServer, ResourceServer

__all__ = [
    "Client",
    "api",
    "ca_file",
    "call",
    "ec_key",
    "oauth",
    "pem_pair",
    "proxy_logs",
    "rsa_key",
    "run_proxy",
    "tls_ca",
    "token_cred",
]


def pem_pair(key) -> tuple[str, bytes]:
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture(scope="session")
def tls_ca():
    return trustme.CA()


@pytest.fixture(scope="session")
def rsa_key():
    return pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def ec_key():
    return pem_pair(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def ca_file(tmp_path, tls_ca):
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def oauth(tls_ca):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server = await OAuthServer(ctx).start()
    yield server
    await server.stop()


@pytest.fixture
async def api(oauth):
    server = await ResourceServer(oauth.db).start()
    yield server
    await server.stop()


def token_cred(upstream: str, auth_cfg: dict, ca_file: str | None = None, **session) -> dict:
    cred = {"upstream": upstream, "allow_insecure_upstream": True, "auth": auth_cfg,
            "allow": [{"callers": ["billing", "reports"], "paths": ["/**"]}]}
    if ca_file:
        cred["upstream_tls"] = {"ca_file": ca_file}
    if session:
        cred["session"] = session
    return cred


@pytest.fixture
async def run_proxy(tmp_path):
    """``await run_proxy({name: credential}, {"path#field": value})`` -> RunningProxy; stopped at teardown.
    Call again with ``secrets=None`` to restart on the same store."""
    running = []

    async def make(credentials: dict, secrets: dict | None = None, **overrides):
        if secrets is not None:
            write_store(tmp_path, secrets)
        cfg = base_config(tmp_path, "http://127.0.0.1:9", **overrides)
        cfg["credentials"] = credentials
        p = await start_proxy(cfg)
        running.append(p)
        return p

    yield make
    for p in running:
        if p.proxy.holder is not None and not getattr(p, "stopped", False):
            await p.proxy.stop()


async def call(p, path: str, *, caller: str = "billing", method: str = "GET", data=None, session=None,
               headers: dict | None = None):
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.request(method, p.url + path, headers={**auth(caller), **(headers or {})},
                                   data=data) as r:
            return r.status, r.headers, await r.read()
    finally:
        if own:
            await session.close()


def proxy_logs(caplog) -> str:
    """Every record credproxy (and aiohttp under it) logged, with all extra fields and
    exception text, *before* the scrubber: what a log line could carry. The test
    authorization server's own (authlib) debug lines are left out."""
    import logging as _logging

    out = []
    fmt = _logging.Formatter()
    for r in caplog.records:
        if r.name.startswith("authlib"):
            continue
        fields = {k: str(v) for k, v in vars(r).items() if k not in ("args", "exc_info")}
        fields["message"] = r.getMessage()
        if r.exc_info:
            fields["exc"] = fmt.formatException(r.exc_info)
        out.append(json.dumps(fields))
    return "\n".join(out)
