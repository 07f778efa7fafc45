"""Canary: drive every error path with a recognisable secret injected, then search every
place a secret could surface — responses, log records (through a stdlib formatter and
through our JSON formatter), the audit file, metrics and admin answers — for it, raw,
percent-encoded, JSON-escaped and base64-encoded. Once in-process, once against a real
``credproxy serve`` process logging at DEBUG."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.observe import log_setup as logs

from .harness import (CALLER_TOKEN, CANARY, EchoingBadUpstream, Harness, SilentUpstream, assert_clean, free_port,
                      raw_exchange)

ROOT = Path(__file__).resolve().parents[2]
RULE = [{"callers": ["billing"], "paths": ["/**"]}]
AUTH_LINE = f"Authorization: Bearer {CALLER_TOKEN}"


def credential(upstream: str, **more) -> dict:
    return {"upstream": upstream, "allow_insecure_upstream": True, "allow": RULE,
            "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": "apis/demo#token"},
            **more}


def canary_config(upstream, bad, silent) -> dict:
    return {
        "server": {"read_timeout": "300ms", "limits": {"header_timeout": "2s", "write_timeout": "300ms",
                                                          "body_timeout": "300ms"}},
        "alerts": {"denied_threshold": 3},
        "credentials": {
            "demo": credential(upstream.url),
            "down": credential(f"http://127.0.0.1:{free_port()}"),
            "slow": credential(silent.url),
            "badframe": credential(bad.url),
            "blocked": credential(upstream.url, leak_guard="block"),
            "limited": credential(upstream.url, rate_limit={"rps": 0.01, "burst": 1}),
            "metadata": credential("http://169.254.169.254"),
            "self": credential("{proxy}"),
            "missing": {**credential(upstream.url), "auth": {"type": "query", "param": "key", "secret": "apis/none#x"}},
            "basic": {**credential(upstream.url), "auth": {"type": "basic", "username": "apis/demo#token",
                                                            "password": "apis/demo#token"}},
            "inquery": {**credential(upstream.url), "auth": {"type": "query", "param": "api_key",
                                                              "secret": "apis/demo#token"}},
        },
    }


def request(line: str, *headers: str, auth: bool = True, body: bytes = b"") -> bytes:
    hs = ["Host: credproxy", *([AUTH_LINE] if auth else []), *headers, "Connection: close"]
    return (line + " HTTP/1.1\r\n" + "".join(h + "\r\n" for h in hs) + "\r\n").encode() + body


ERROR_PATHS = [
    (request("GET /demo/anything/x"), 200),  # the echo itself, redacted
    (request("GET /inquery/anything/x"), 200),
    (request("GET /basic/anything/x"), 200),
    (request("GET /demo/redirect"), 302),
    (request("GET /demo/reason"), 200),
    (request("GET /demo/forms"), 200),
    (request("GET /demo/anything/x", auth=False), 401),
    (request("GET /demo/anything/x", "Authorization: Bearer wrong-token", auth=False), 401),
    (request("GET /demo/anything/x", "Proxy-Authorization: Bearer wrong-token", auth=False), 401),
    (request("GET /nosuch/x"), 403),
    (request("GET /demo/a%2Fb"), 400),
    (request("TRACE /demo/anything/x"), 400),
    (request("CONNECT demo:443"), 400),
    (request("GET /demo/anything/x", "Upgrade: h2c", "Connection: Upgrade"), 200),  # an h2c offer is ignored
    (request("GET /demo/anything/x", "Upgrade: websocket", "Connection: Upgrade"), 400),
    (request("POST /demo/anything/x", "X-HTTP-Method-Override: DELETE", "Content-Length: 0"), 400),
    (request("GET /demo/anything/x", "X-A: " + "a" * 9000), 431),
    (request("GET /demo/anything/x", "X-A: a\x00b"), 400),
    # aiohttp's own parse errors quote the offending bytes: here they hold the caller token
    (request("GET /demo/anything/x", f"X-Note: {CALLER_TOKEN}\x00", auth=False), 400),
    (request("GET /demo/anything/x", f"X-Note: {CALLER_TOKEN}" + "a" * 9000, auth=False), 431),
    (request("POST /demo/anything/x", "Content-Length: 999999999"), 413),
    (request("POST /demo/anything/x", "Content-Length: 100", body=b"stalls"), 400),  # body_timeout
    (request("GET /down/x"), 502),
    (request("GET /slow/x"), 504),
    (request("GET /badframe/x"), 502),
    (request("GET /blocked/anything/x"), 502),
    (request("GET /limited/x"), 200),
    (request("GET /limited/x"), 429),
    (request("GET /metadata/latest/meta-data"), 502),
    (request("GET /self/demo/anything/x"), 502),
    (request("GET /missing/x"), 503),
]


@pytest.fixture
async def odd_upstreams():
    bad = await EchoingBadUpstream(b"").start()
    silent = await SilentUpstream().start()
    yield bad, silent
    await bad.close()
    await silent.close()


async def test_no_secret_on_any_error_path(upstream, odd_upstreams, tmp_path, caplog):
    bad, silent = odd_upstreams
    caplog.set_level(logging.DEBUG)
    json_out = io.StringIO()
    json_handler = logging.StreamHandler(json_out)
    json_handler.setFormatter(logs.JsonFormatter())
    logging.getLogger().addHandler(json_handler)
    proxy = Harness(tmp_path, upstream.url, canary_config(upstream, bad, silent))
    await proxy.start()
    try:
        responses = []
        for raw, status in ERROR_PATHS:
            resp = await raw_exchange(proxy.port, raw)
            assert resp.status == status, (raw[:60], resp.raw[:200])
            responses.append(resp.raw)
        # a caller that stops reading, and one that never finishes its head
        slow_reader = await asyncio.open_connection("127.0.0.1", proxy.port)
        slow_reader[1].write(request("GET /demo/big?n=33554432"))
        partial = await asyncio.open_connection("127.0.0.1", proxy.port)
        partial[1].write(b"GET /demo/anything/x HTTP/1.1\r\n" + AUTH_LINE.encode())
        await asyncio.sleep(0.8)
        for _, w in (slow_reader, partial):
            w.close()
        async with aiohttp.ClientSession() as s:
            admin = []
            for path in ("/metrics", "/v1/credentials", "/readyz", "/healthz"):
                async with s.get(proxy.admin_url + path) as r:
                    admin.append(await r.read())
        audit = proxy.audit_text()
    finally:
        await proxy.stop()
        logging.getLogger().removeHandler(json_handler)
    assert any(upstream_seen.header("Authorization") == f"Bearer {CANARY}" for upstream_seen in upstream.seen)
    for n, raw in enumerate(responses):
        assert_clean(raw, where=f"response {n}")
    for body in admin:
        assert_clean(body, where="admin answer")
    assert_clean(audit, where="audit log")
    assert '"outcome":"alert"' in audit  # the denials above made a burst
    records = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.stack_info or ''} {vars(r)}" for r in caplog.records)
    assert records
    assert_clean(records, where="log records")
    assert_clean(caplog.text, where="caplog")
    assert_clean(json_out.getvalue(), where="JSON log")
    for where, text in (("audit", audit), ("log records", records), ("JSON log", json_out.getvalue()),
                        ("responses", b"".join(responses))):
        assert_clean(text, secret=CALLER_TOKEN, where=f"{where} (caller token)")


@pytest.mark.slow
async def test_no_secret_in_a_real_process_stderr(upstream, odd_upstreams, tmp_path):
    bad, silent = odd_upstreams
    h = Harness(tmp_path, upstream.url, canary_config(upstream, bad, silent))  # files and config only
    cfg_path = tmp_path / "credproxy.yaml"
    cfg = json.loads(json.dumps(h.config_dict))
    cfg["credentials"]["self"]["upstream"] = h.url
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONASYNCIODEBUG="1")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(cfg_path), "--log-level", "DEBUG"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(h.admin_url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("credproxy serve did not come up")
        bodies = [(await raw_exchange(h.port, raw)).raw for raw, _ in ERROR_PATHS]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert b'"level": "debug"' in err or b'"level": "info"' in err
    for raw in bodies:
        assert_clean(raw, where="response")
        assert_clean(raw, secret=CALLER_TOKEN, where="response (caller token)")
    assert_clean(err, where="stderr")
    assert_clean(err, secret=CALLER_TOKEN, where="stderr (caller token)")
    assert_clean(out, where="stdout")
    assert_clean((tmp_path / "audit.log").read_bytes(), where="audit")
