"""Every error path answers with the SPEC's JSON and fixed message, and the secret
(raw, base64, URL-encoded) appears in no response, log line, audit line or metric."""

import asyncio
import io
import logging

import aiohttp
import pytest
from aiohttp import web

from proxy.observe import log_setup as logs_mod
from tests.conftest import SECRET
from tests.helpers import assert_no_canary, auth, base_config, free_port


@pytest.fixture
def captured_logs():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs_mod.setup("DEBUG", stream)
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def call(url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers.copy(), await r.read()


def check_error(status, headers, body, expected_status, code):
    import json

    assert status == expected_status
    data = json.loads(body)
    assert data["error"] == code and set(data) == {"error", "message", "request_id"}
    assert data["request_id"] == headers["X-Request-Id"]


async def test_every_error_path_is_clean(proxy_factory, upstream, tmp_path, captured_logs):
    async def echo(request, body):
        # an upstream that echoes what it got, including the injected header
        return web.json_response({"headers": dict(request.headers)}, headers={"X-Echo": request.headers["Authorization"]})

    async def slow(request, body):
        await asyncio.sleep(3)
        return web.Response(text="late")

    upstream.routes["/v1/echo"] = echo
    upstream.routes["/v1/slow"] = slow
    cfg = base_config(tmp_path, upstream.url)
    cfg["server"]["read_timeout"] = "500ms"
    dead = free_port()
    cfg["credentials"]["down"] = {
        "upstream": f"http://127.0.0.1:{dead}", "allow_insecure_upstream": True,
        "auth": {"type": "header", "secret": "apis/example#token"},
        "allow": [{"callers": ["billing"], "paths": ["/**"]}]}
    cfg["credentials"]["missing"] = {
        "upstream": upstream.url, "allow_insecure_upstream": True,
        "auth": {"type": "header", "secret": "apis/nowhere#token"},
        "allow": [{"callers": ["billing"], "paths": ["/**"]}]}
    p = await proxy_factory(cfg)
    responses = []

    async def expect(path, status, code, **kw):
        st, headers, body = await call(p.url + path, **kw)
        check_error(st, headers, body, status, code)
        responses.append(str(headers) + body.decode())

    await expect("/example/v1/x", 401, "unauthenticated", headers={"Authorization": "Bearer " + SECRET})
    await expect("/example/v1/x", 401, "unauthenticated")
    await expect("/example/admin", 403, "forbidden", headers=auth())
    await expect("/unknown/v1/x", 403, "forbidden", headers=auth())
    await expect("/example/v1/%2F", 400, "bad_request", headers=auth())
    await expect("/down/v1/x", 502, "upstream_error", headers=auth())
    await expect("/example/v1/slow", 504, "upstream_timeout", headers=auth())
    await expect("/missing/v1/x", 503, "credential_unavailable", headers=auth())
    st, headers, body = await call(p.url + "/example/v1/echo?api_key=" + SECRET, headers=auth())
    assert st == 200 and b"[REDACTED]" in body and headers["X-Echo"] == "Bearer [REDACTED]"
    responses.append(str(headers) + body.decode())
    st, headers, body = await call(p.admin_url + "/metrics")
    responses.append(body.decode())
    st, headers, body = await call(p.admin_url + "/v1/credentials")
    responses.append(body.decode())
    await p.proxy.stop()  # flush everything

    for text in responses:
        assert_no_canary(text, SECRET, "a response")
    assert_no_canary((tmp_path / "audit.log").read_text(), SECRET, "the audit log")
    assert_no_canary(captured_logs.getvalue(), SECRET, "the logs")
    reasons = [line for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert len(reasons) == 9


async def test_upstream_timeout_before_answer_is_504(proxy_factory, upstream, tmp_path):
    async def slow(request, body):
        await asyncio.sleep(2)
        return web.Response(text="late")

    upstream.routes["/v1/slow"] = slow
    cfg = base_config(tmp_path, upstream.url)
    cfg["server"]["read_timeout"] = "300ms"
    p = await proxy_factory(cfg)
    st, headers, body = await call(p.url + "/example/v1/slow", headers=auth())
    check_error(st, headers, body, 504, "upstream_timeout")
    line = p.audit_lines(tmp_path)[-1]
    assert (line["status"], line["outcome"]) == (504, "error")


async def test_upstream_dying_mid_body_truncates_the_answer(proxy_factory, upstream, tmp_path):
    """The caller must not mistake a cut-off answer for a complete one (one over 1 MiB is streamed, so
    it can only be cut off; smaller ones become a 502: tests/upstream/test_relay_whole.py)."""

    async def dies(request):
        resp = web.StreamResponse(headers={"Content-Length": "2000000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        request.transport.close()
        return resp

    dies.streaming = True
    upstream.routes["/v1/dies"] = dies
    p = await proxy_factory(base_config(tmp_path, upstream.url))
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(p.url + "/example/v1/dies", headers=auth())


def test_config_errors_never_print_a_value(tmp_path, capsys):
    from proxy.cli.main import main

    path = tmp_path / "bad.yaml"
    path.write_text(f"""
credentials:
  example:
    upstream: https://user:{SECRET}@api.example.com
    auth:
      type: header
      secret: {SECRET}
""")
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr()
    assert_no_canary(out.out + out.err, SECRET, "check output")
    assert "credentials.example.auth.secret" in out.err
