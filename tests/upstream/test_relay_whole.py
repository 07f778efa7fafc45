"""Answers of known length up to 1 MiB are read whole, scanned once and sent with their length
(those over 64 KiB while the process's answer budget has room); what a caller notices: a
correct Content-Length, redaction, and a clean error (not a cut-off body) when the upstream
fails half way through such an answer."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json

import aiohttp
from aiohttp import web

import pytest

from proxy.upstream.relay import WHOLE_ANSWER_MAX, WHOLE_BODY_MAX
from tests.conftest import SECRET
from tests.helpers import assert_no_canary, auth, base_config


async def get(url, **kw):
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers, await r.read()


async def test_small_clean_answer_keeps_its_bytes_and_length(proxy, upstream):
    payload = json.dumps({"id": "cus_1", "note": "nothing secret here"}).encode()

    async def small(request, body):
        return web.Response(body=payload, content_type="application/json")

    upstream.routes["/v1/small"] = small
    status, headers, body = await get(proxy.url + "/example/v1/small", headers=auth())
    assert status == 200 and body == payload
    assert headers["Content-Length"] == str(len(payload))
    assert "Transfer-Encoding" not in headers
    assert headers["Content-Type"] == "application/json"


async def test_small_answer_echoing_the_secret_is_redacted_with_the_new_length(proxy, upstream, tmp_path):
    async def echo(request, body):
        return web.json_response({"raw": SECRET, "b64": base64.b64encode(SECRET.encode()).decode()})

    upstream.routes["/v1/echo"] = echo
    status, headers, body = await get(proxy.url + "/example/v1/echo", headers=auth())
    assert status == 200
    assert_no_canary(body, SECRET, "small redacted body")
    assert json.loads(body) == {"raw": "[REDACTED]", "b64": "[REDACTED]"}
    assert headers["Content-Length"] == str(len(body))
    metrics = (await get(proxy.admin_url + "/metrics"))[2].decode()
    assert 'credproxy_leaks_redacted_total{credential="example"} 2.0' in metrics


def _with_secret(size: int) -> bytes:
    filler = b"x" * size
    return filler[:1000] + SECRET.encode() + filler[1000:]


async def test_answer_over_64k_is_sent_whole_with_its_new_length_while_the_budget_has_room(proxy, upstream):
    payload = _with_secret(WHOLE_BODY_MAX + 10)

    async def big(request, body):
        return web.Response(body=payload)

    upstream.routes["/v1/big"] = big
    status, headers, body = await get(proxy.url + "/example/v1/big", headers=auth())
    assert status == 200
    assert "Transfer-Encoding" not in headers and headers["Content-Length"] == str(len(body))
    assert body == payload.replace(SECRET.encode(), b"[REDACTED]")
    assert proxy.proxy._answer_budget.held == 0  # given back once the answer was handed on


@pytest.mark.parametrize("why", ["over 1 MiB", "budget spent"])
async def test_answer_that_cannot_be_held_whole_is_streamed_and_still_redacted(proxy, upstream, why):
    payload = _with_secret(WHOLE_ANSWER_MAX + 10 if why == "over 1 MiB" else WHOLE_BODY_MAX + 10)
    if why == "budget spent":
        proxy.proxy._answer_budget.limit = WHOLE_BODY_MAX  # as if many large answers were in flight

    async def big(request, body):
        return web.Response(body=payload)

    upstream.routes["/v1/big"] = big
    status, headers, body = await get(proxy.url + "/example/v1/big", headers=auth())
    assert status == 200
    assert headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in headers
    assert body == payload.replace(SECRET.encode(), b"[REDACTED]")


async def test_block_mode_refuses_a_small_leaking_answer_before_sending_anything(proxy_factory, upstream, tmp_path):
    async def echo(request, body):
        return web.json_response({"token": SECRET})

    upstream.routes["/v1/echo"] = echo
    p = await proxy_factory(base_config(tmp_path, upstream.url, leak_guard="block"))
    status, _, body = await get(p.url + "/example/v1/echo", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert_no_canary(body, SECRET, "blocked answer")
    line = p.audit_lines(tmp_path)[-1]
    assert (line["status"], line["outcome"]) == (502, "error")


async def test_block_mode_decodes_a_small_compressed_answer_to_scan_it(proxy_factory, upstream, tmp_path):
    async def gz(request, body):
        return web.Response(body=gzip.compress(b'{"ok": true}'), headers={"Content-Encoding": "gzip"})

    upstream.routes["/v1/gz"] = gz
    p = await proxy_factory(base_config(tmp_path, upstream.url, leak_guard="block"))
    status, headers, body = await get(p.url + "/example/v1/gz", headers=auth())
    assert (status, body) == (200, b'{"ok": true}') and "Content-Encoding" not in headers


@pytest.mark.parametrize("promised", [1000, WHOLE_ANSWER_MAX])
async def test_answer_cut_short_by_the_upstream_is_a_clean_502(proxy, upstream, tmp_path, promised):
    """The upstream promises up to 1 MiB, sends 10 bytes and hangs up: the caller gets a JSON 502,
    never a truncated body that looks complete."""

    async def dies(request):
        resp = web.StreamResponse(headers={"Content-Length": str(promised)})
        await resp.prepare(request)
        await resp.write(b"0123456789")
        request.transport.close()
        return resp

    dies.streaming = True
    upstream.routes["/v1/dies"] = dies
    status, headers, body = await get(proxy.url + "/example/v1/dies", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert headers["Content-Length"] == str(len(body))
    line = proxy.audit_lines(tmp_path)[-1]
    assert (line["status"], line["outcome"], line["reason"]) == (502, "error", "upstream_body_failed")
    assert proxy.proxy._answer_budget.held == 0


async def test_small_answer_stalled_by_the_upstream_is_a_504(proxy_factory, upstream, tmp_path):
    async def stalls(request):
        resp = web.StreamResponse(headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"partial")
        await asyncio.sleep(3)
        return resp

    stalls.streaming = True
    upstream.routes["/v1/stalls"] = stalls
    cfg = base_config(tmp_path, upstream.url)
    cfg["server"]["read_timeout"] = "300ms"
    p = await proxy_factory(cfg)
    status, _, body = await get(p.url + "/example/v1/stalls", headers=auth())
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"


async def test_head_and_204_answers_carry_no_body(proxy_factory, upstream, tmp_path):
    async def empty(request, body):
        return web.Response(status=204)

    upstream.routes["/v1/empty"] = empty
    cfg = base_config(tmp_path, upstream.url)
    cfg["credentials"]["example"]["allow"][0]["methods"].append("HEAD")
    p = await proxy_factory(cfg)
    status, headers, body = await get(p.url + "/example/v1/empty", headers=auth())
    assert (status, body) == (204, b"")
    status, headers, body = await get(p.url + "/example/v1/customers", method="HEAD", headers=auth())
    assert status == 200 and body == b""
    assert upstream.seen[-1].method == "HEAD"


async def test_caller_gone_before_a_held_answer_is_sent_is_audited_as_disconnected(proxy, upstream, tmp_path):
    """The caller hangs up while the proxy is still reading a 200 KiB answer: the audit line says so,
    and the answer budget is given back."""
    arrived = asyncio.Event()

    async def slow(request, body):
        arrived.set()
        await asyncio.sleep(0.3)
        return web.Response(body=b"y" * 200_000)

    upstream.routes["/v1/slow"] = slow
    host, port = proxy.proxy.bound["main"].rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    token = auth()["Authorization"]
    writer.write(f"GET /example/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n".encode())
    await writer.drain()
    await arrived.wait()
    writer.close()
    for _ in range(100):
        lines = proxy.audit_lines(tmp_path)
        if lines:
            break
        await asyncio.sleep(0.05)
    assert (lines[-1]["outcome"], lines[-1]["reason"]) == ("error", "caller_disconnected")
    assert proxy.proxy._answer_budget.held == 0


async def test_block_mode_refuses_a_held_answer_leaking_near_its_end(proxy_factory, upstream, tmp_path):
    """A 300 KiB answer is held whole, so under ``block`` a secret in its last bytes is still a clean 502."""
    payload = b"z" * 300_000 + SECRET.encode()

    async def late(request, body):
        return web.Response(body=payload)

    upstream.routes["/v1/late"] = late
    p = await proxy_factory(base_config(tmp_path, upstream.url, leak_guard="block"))
    status, _, body = await get(p.url + "/example/v1/late", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert_no_canary(body, SECRET, "blocked answer")
    assert p.audit_lines(tmp_path)[-1]["reason"] == "leak_blocked"
    assert p.proxy._answer_budget.held == 0
