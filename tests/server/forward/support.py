"""Forward-proxy test parts: a loopback HTTPS upstream (trustme certificate), a proxy whose
credentials claim host names that resolve nowhere (``*.invalid``, RFC 6761), credproxy's CA made
with ``generate_ca`` and stored like ``credproxy ca init`` stores it, and the environment an
unmodified client needs."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aiohttp import web

from proxy.server.forward.ca import generate_ca
from proxy.store.file import FileStore, load_key
from proxy.config import models as config_mod
from tests.helpers import CALLER_TOKENS, Recorder, base_config, start_proxy, write_store

SECRET = "sk_live_canary_4b1d9e7f0a2c"  # the credential's secret: never seen by a caller
HOST = "api.pay.invalid"
SHARED_HOST = "api.shared.invalid"
TUNNEL_HOST = "tunnel.localhost"


@dataclass
class Upstream:
    recorder: Recorder
    url: str
    ca_file: Path
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def tls_upstream(tmp: Path, recorder: Recorder | None = None) -> Upstream:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    recorder = recorder or Recorder()
    runner = web.AppRunner(recorder.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    return Upstream(recorder, f"https://localhost:{port}", ca_file, runner)


def forward_config(tmp: Path, upstream: Upstream, *, extra_credentials: dict | None = None,
                   tunnel_hosts: list[str] | None = None, **overrides) -> dict:
    write_store(tmp, {"apis/pay#token": SECRET, "apis/other#token": "sk_other_canary_77aa31"})
    cert_pem, key = generate_ca()
    (tmp / "ca.pem").write_bytes(cert_pem)
    cfg = base_config(tmp, upstream.url)
    store = FileStore(tmp / "secrets.enc", load_key(config_mod.FileStoreConfig(
        path=str(tmp / "secrets.enc"), key_file=str(tmp / "master.key"))))
    store.put_sync("credproxy/ca", "key", key, cas=0)
    cfg["forward_proxy"] = {"listen": "127.0.0.1:0", "ca": {"cert_file": str(tmp / "ca.pem"), "key": "credproxy/ca#key"},
                            "tunnel_hosts": tunnel_hosts or []}
    cfg["credentials"] = {
        "pay": {
            "upstream": upstream.url,
            "hosts": [HOST],
            "upstream_tls": {"ca_file": str(upstream.ca_file)},
            "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                     "secret": "apis/pay#token"},
            "allow": [{"callers": ["billing"], "methods": ["GET", "POST"], "paths": ["/v1/**"]}],
        },
        **(extra_credentials or {}),
    }
    cfg.update(overrides)
    return cfg


def proxy_url(running, caller: str = "billing", token: str | None = None) -> str:
    token = CALLER_TOKENS[caller] if token is None else token
    return f"http://{caller}:{token}@{running.proxy.bound['forward']}"


def client_env(running, tmp: Path, caller: str = "billing") -> dict[str, str]:
    """What a caller's environment holds: the proxy (with its caller name and token) and credproxy's CA.
    This machine exports CA bundle variables of its own; they are replaced, not added to."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")}
    url = proxy_url(running, caller)
    ca = str(tmp / "ca.pem")
    env.update(HTTPS_PROXY=url, HTTP_PROXY=url, https_proxy=url, http_proxy=url, NO_PROXY="", no_proxy="",
               SSL_CERT_FILE=ca, REQUESTS_CA_BUNDLE=ca, CURL_CA_BUNDLE=ca, AWS_CA_BUNDLE=ca,
               NODE_EXTRA_CA_CERTS=ca)
    return env


async def start(tmp: Path, upstream: Upstream, **kw):
    return await start_proxy(forward_config(tmp, upstream, **kw))
