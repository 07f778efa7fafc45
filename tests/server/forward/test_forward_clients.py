"""Unmodified clients through the forward proxy, each a real process whose only configuration is its
environment (proxy URL with the caller's name and token, credproxy's CA): curl, requests, httpx,
aiohttp (trust_env), boto3 and the Stripe SDK. The hosts they call are names that resolve nowhere
(``*.invalid``) — or, for Stripe, its real API host — and every request reaches a loopback TLS
upstream because credproxy sends it to the credential's configured upstream, never to what DNS says."""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap

import pytest
from aiohttp import web

from tests.server.forward.support import HOST, SECRET, client_env, forward_config, tls_upstream
from tests.helpers import Recorder, assert_no_canary, start_proxy

AKID = "AKIACREDPROXYCANARY1"
AWS_SECRET = "aws-secret-canary-9f8e7d6c5b4a39281706"


async def run(env: dict, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    return proc.returncode, out.decode(), err.decode()


async def python(env: dict, code: str) -> tuple[int, str, str]:
    return await run(env, sys.executable, "-c", textwrap.dedent(code))


async def s3_listing(request, body):
    return web.Response(content_type="application/xml", text=(
        '<?xml version="1.0" encoding="UTF-8"?><ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        "<Owner><ID>o</ID><DisplayName>o</DisplayName></Owner><Buckets><Bucket><Name>through-credproxy</Name>"
        "<CreationDate>2026-01-01T00:00:00.000Z</CreationDate></Bucket></Buckets></ListAllMyBucketsResult>"))


async def stripe_customers(request, body):
    return web.json_response({"object": "list", "data": [{"id": "cus_via_credproxy", "object": "customer"}],
                              "has_more": False, "url": "/v1/customers"})


@pytest.fixture
async def env(tmp_path):
    recorder = Recorder()
    recorder.routes["/"] = s3_listing
    recorder.routes["/v1/customers"] = stripe_customers
    up = await tls_upstream(tmp_path, recorder)
    extra = {
        "aws": {"upstream": up.url, "hosts": ["s3.store.invalid"], "upstream_tls": {"ca_file": str(up.ca_file)},
                "auth": {"type": "aws_sigv4", "access_key_id": "apis/aws#akid", "secret_access_key": "apis/aws#secret",
                         "region": "eu-west-1", "service": "s3"},
                "allow": [{"callers": ["billing"], "methods": ["GET"], "paths": ["/"]}]},
        "stripe": {"upstream": up.url, "hosts": ["api.stripe.com"], "upstream_tls": {"ca_file": str(up.ca_file)},
                   "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                            "secret": "apis/pay#token"},
                   "allow": [{"callers": ["billing"], "methods": ["GET"], "paths": ["/v1/**"]}]},
    }
    cfg = forward_config(tmp_path, up, extra_credentials=extra)
    from proxy.store.secret import Secret
    from proxy.store.file import FileStore, load_key
    from proxy.config import models as config_mod

    store = FileStore(tmp_path / "secrets.enc", load_key(config_mod.FileStoreConfig(
        path=str(tmp_path / "secrets.enc"), key_file=str(tmp_path / "master.key"))))
    store.put_sync("apis/aws", "akid", Secret(AKID))
    store.put_sync("apis/aws", "secret", Secret(AWS_SECRET))
    running = await start_proxy(cfg)
    yield running, recorder, client_env(running, tmp_path), tmp_path
    await running.proxy.stop()
    await up.close()


def assert_injected(recorder: Recorder, path: str = "/v1/hello") -> None:
    seen = [s for s in recorder.seen if s.path_qs.startswith(path)]
    assert seen, f"nothing reached the upstream at {path}"
    assert seen[-1].headers.getall("Authorization") == [f"Bearer {SECRET}"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_with_https_proxy_and_cacert(env):
    running, recorder, environ, tmp = env
    code, out, err = await run({k: v for k, v in environ.items() if k != "CURL_CA_BUNDLE"},
                               "curl", "-sS", "--fail-with-body", "--cacert", str(tmp / "ca.pem"),
                               "-H", "Authorization: Bearer sk-placeholder", f"https://{HOST}/v1/hello?a=1")
    assert code == 0, err
    assert '"ok": true' in out
    assert_injected(recorder)
    assert_no_canary(out + err, SECRET, "curl output")
    line = [entry for entry in running.audit_lines(tmp) if entry["method"] == "GET"][-1]
    assert line["listener"] == "forward" and line["connect_host"] == f"{HOST}:443" and line["path"] == "/v1/hello?a"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_without_the_ca_refuses_the_minted_certificate(env):
    running, recorder, environ, tmp = env
    environ = dict(environ, CURL_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")
    code, out, err = await run(environ, "curl", "-sS", f"https://{HOST}/v1/hello")
    assert code != 0 and not recorder.seen


async def test_requests_with_proxies_from_the_environment(env):
    running, recorder, environ, _ = env
    code, out, err = await python(environ, f"""
        import requests
        r = requests.get("https://{HOST}/v1/hello", headers={{"Authorization": "Bearer sk-placeholder"}})
        print(r.status_code, r.json()["path"])
    """)
    assert code == 0, err
    assert out.split() == ["200", "/v1/hello"]
    assert_injected(recorder)


async def test_httpx_with_proxies_from_the_environment(env):
    running, recorder, environ, _ = env
    code, out, err = await python(environ, f"""
        import httpx
        r = httpx.get("https://{HOST}/v1/hello", headers={{"Authorization": "Bearer sk-placeholder"}})
        print(r.status_code, r.json()["path"])
    """)
    assert code == 0, err
    assert out.split() == ["200", "/v1/hello"]
    assert_injected(recorder)


async def test_aiohttp_with_trust_env(env):
    running, recorder, environ, _ = env
    code, out, err = await python(environ, f"""
        import asyncio, aiohttp
        async def main():
            async with aiohttp.ClientSession(trust_env=True) as s:
                async with s.get("https://{HOST}/v1/hello") as r:
                    print(r.status, (await r.json())["path"])
        asyncio.run(main())
    """)
    assert code == 0, err
    assert out.split() == ["200", "/v1/hello"]
    assert_injected(recorder)


async def test_wrong_caller_token_in_the_proxy_url_is_refused_to_the_client(env):
    running, recorder, environ, _ = env
    bad = environ["HTTPS_PROXY"].replace("tok-billing", "tok-forged")
    environ = dict(environ, HTTPS_PROXY=bad, https_proxy=bad)
    code, out, err = await python(environ, f"""
        import requests
        try:
            requests.get("https://{HOST}/v1/hello")
        except requests.exceptions.ProxyError as exc:
            print("proxy error", "407" in str(exc))
    """)
    assert code == 0, err
    assert out.split() == ["proxy", "error", "True"] and not recorder.seen


async def test_boto3_unmodified_is_signed_by_credproxy(env):
    running, recorder, environ, _ = env
    environ = dict(environ, AWS_ACCESS_KEY_ID="placeholder", AWS_SECRET_ACCESS_KEY="placeholder",
                   AWS_DEFAULT_REGION="eu-west-1", AWS_ENDPOINT_URL="https://s3.store.invalid",
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    code, out, err = await python(environ, """
        import boto3
        print([b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]])
    """)
    assert code == 0, err
    assert "through-credproxy" in out
    auth = recorder.seen[-1].headers["Authorization"]
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={AKID}/") and "placeholder" not in auth
    assert_no_canary(out + err, AWS_SECRET, "boto3 output")


async def test_stripe_sdk_with_a_placeholder_key(env):
    running, recorder, environ, _ = env
    environ = dict(environ, STRIPE_API_KEY="sk-placeholder")
    # The one line that is not environment: the SDK pins its own CA bundle and reads no variable for it.
    code, out, err = await python(environ, """
        import os, stripe
        stripe.ca_bundle_path = os.environ["SSL_CERT_FILE"]
        client = stripe.StripeClient(os.environ["STRIPE_API_KEY"])
        print([c.id for c in client.v1.customers.list().data])
    """)
    assert code == 0, err
    assert "cus_via_credproxy" in out
    assert_injected(recorder, "/v1/customers")
    assert "sk-placeholder" not in str(recorder.seen[-1].header_items)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_credproxy_serve_process_with_curl_then_sigterm(tmp_path):
    """The real command (uvloop when installed), not the in-process Proxy: CA read from the store at start."""
    import os
    import signal

    import yaml

    from tests.helpers import free_port

    up = await tls_upstream(tmp_path)
    cfg = forward_config(tmp_path, up)
    port = free_port()
    cfg["forward_proxy"]["listen"] = f"127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "serve", "-c", str(config),
                                                stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        environ = dict(os.environ, HTTPS_PROXY=f"http://billing:tok-billing-7f3a@127.0.0.1:{port}", NO_PROXY="",
                       no_proxy="", CURL_CA_BUNDLE=str(tmp_path / "ca.pem"))
        code, out, err = await run(environ, "curl", "-sS", f"https://{HOST}/v1/served")
        assert code == 0, err
        assert '"path": "/v1/served"' in out
        assert up.recorder.seen[-1].headers["Authorization"] == f"Bearer {SECRET}"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        await up.close()
    assert proc.returncode == 0
    assert_no_canary(stderr, SECRET, "serve log")
    assert b"PRIVATE KEY" not in stderr


async def test_serve_without_the_ca_says_to_run_ca_init(tmp_path):
    import os

    import yaml

    up = await tls_upstream(tmp_path)
    cfg = forward_config(tmp_path, up)
    (tmp_path / "ca.pem").unlink()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, out, err = await run(dict(os.environ), sys.executable, "-m", "proxy", "serve", "-c", str(config))
    await up.close()
    assert code == 1 and "credproxy ca init" in err
