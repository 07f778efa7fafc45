"""Compressed answers with the leak guard on (proxy/redact/encoding.py): an upstream that ignores
``Accept-Encoding: identity`` and compresses anyway has its answer decoded for the scan and sent decoded,
or refused with 502 — never passed on unscanned. A real aiohttp upstream echoes the injected secret back."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import aiohttp
import pytest
from aiohttp import web

from proxy.redact import encoding
from tests.conftest import SECRET
from tests.helpers import assert_no_canary, auth, base_config


async def get(url, **kw):
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers, await r.read()


def echo_of(request) -> bytes:
    return json.dumps({"you_sent": request.headers.get("Authorization"), "note": "x" * 200}).encode()


def compressed(coding: str, data: bytes) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    raise AssertionError(coding)


def route(upstream, path: str, body_of, headers: dict, *, stream: bool = False) -> None:
    async def answer(request, body):
        data = body_of(request)
        if not stream:
            return web.Response(body=data, headers=headers)
        resp = web.StreamResponse(headers=headers)  # chunked, no Content-Length
        await resp.prepare(request)
        for i in range(0, len(data), 1000):
            await resp.write(data[i:i + 1000])
        await resp.write_eof()
        return resp

    upstream.routes[path] = answer


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["length", "chunked"])
async def test_a_compressed_echo_is_decoded_redacted_and_sent_uncompressed(proxy, upstream, tmp_path, coding, stream):
    route(upstream, "/v1/echo", lambda r: compressed(coding, echo_of(r)),
          {"Content-Encoding": coding, "Content-Type": "application/json"}, stream=stream)
    status, headers, body = await get(proxy.url + "/example/v1/echo", headers=auth())
    assert status == 200
    assert "Content-Encoding" not in headers and headers["Content-Length"] == str(len(body))
    assert_no_canary(body, SECRET, "decoded answer")
    assert json.loads(body)["you_sent"] == "Bearer [REDACTED]"
    assert upstream.seen[0].headers["Authorization"] == f"Bearer {SECRET}"  # it did go upstream


async def test_gzip_members_one_after_another_are_all_decoded(proxy, upstream):
    route(upstream, "/v1/members", lambda r: gzip.compress(b"first " + SECRET.encode()) + gzip.compress(b" second"),
          {"Content-Encoding": "gzip"})
    status, _, body = await get(proxy.url + "/example/v1/members", headers=auth())
    assert (status, body) == (200, b"first [REDACTED] second")


async def test_block_mode_scans_the_decoded_answer(proxy_factory, upstream, tmp_path):
    route(upstream, "/v1/echo", lambda r: gzip.compress(echo_of(r)), {"Content-Encoding": "gzip"})
    route(upstream, "/v1/clean", lambda r: gzip.compress(b'{"ok": true}'), {"Content-Encoding": "gzip"})
    p = await proxy_factory(base_config(tmp_path, upstream.url, leak_guard="block"))
    status, _, body = await get(p.url + "/example/v1/echo", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert_no_canary(body, SECRET, "blocked answer")
    assert p.audit_lines(tmp_path)[-1]["reason"] == "leak_blocked"
    status, headers, body = await get(p.url + "/example/v1/clean", headers=auth())
    assert (status, body) == (200, b'{"ok": true}') and "Content-Encoding" not in headers


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "zstd"}, {"Content-Encoding": "compress"}, {"Content-Encoding": "gzip, gzip"},
    {"Content-Encoding": "gzip, br"}, {"Content-Encoding": "x-unknown"},
], ids=lambda h: h["Content-Encoding"])
async def test_unknown_or_stacked_codings_are_refused(proxy, upstream, tmp_path, headers):
    route(upstream, "/v1/odd", lambda r: gzip.compress(gzip.compress(echo_of(r))), headers)
    status, _, body = await get(proxy.url + "/example/v1/odd", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert_no_canary(body, SECRET, "refused answer")
    assert proxy.audit_lines(tmp_path)[-1]["reason"] == "upstream_encoding"


async def test_two_content_encoding_headers_are_refused(proxy, upstream, tmp_path):
    async def answer(request, body):
        resp = web.Response(body=gzip.compress(gzip.compress(echo_of(request))))
        resp.headers.add("Content-Encoding", "gzip")
        resp.headers.add("Content-Encoding", "gzip")
        return resp

    upstream.routes["/v1/twice"] = answer
    status, _, _ = await get(proxy.url + "/example/v1/twice", headers=auth())
    assert status == 502


@pytest.mark.skipif(encoding.brotli is not None, reason="brotli is installed: br is decoded")
async def test_br_without_the_brotli_package_is_refused(proxy, upstream, tmp_path):
    route(upstream, "/v1/br", lambda r: b"\x8b\x02\x80" + echo_of(r) + b"\x03", {"Content-Encoding": "br"})
    status, _, body = await get(proxy.url + "/example/v1/br", headers=auth())
    assert status == 502
    assert_no_canary(body, SECRET, "refused answer")


@pytest.mark.skipif(encoding.brotli is None, reason="the optional brotli package is not installed")
async def test_br_is_decoded_when_brotli_is_installed(proxy, upstream):
    route(upstream, "/v1/br", lambda r: encoding.brotli.compress(echo_of(r)), {"Content-Encoding": "br"})
    status, headers, body = await get(proxy.url + "/example/v1/br", headers=auth())
    assert status == 200 and "Content-Encoding" not in headers
    assert json.loads(body)["you_sent"] == "Bearer [REDACTED]"


async def test_a_gzip_bomb_is_refused_not_expanded(proxy, upstream, tmp_path):
    bomb = gzip.compress(b"\0" * (encoding.DECODED_MAX * 4), compresslevel=9)  # 32 MiB from ~32 KiB
    assert len(bomb) < 64 * 1024
    route(upstream, "/v1/bomb", lambda r: bomb, {"Content-Encoding": "gzip"})
    status, _, body = await get(proxy.url + "/example/v1/bomb", headers=auth())
    assert status == 502 and json.loads(body)["error"] == "upstream_error"
    assert proxy.audit_lines(tmp_path)[-1]["reason"] == "upstream_encoding"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "trailing-garbage", "raw-deflate"])
async def test_a_damaged_stream_is_refused(proxy, upstream, damage):
    def body_of(request):
        whole = gzip.compress(echo_of(request) + os.urandom(300))
        if damage == "truncated":
            return whole[: len(whole) // 2]
        if damage == "corrupt":
            return whole[:20] + bytes(b ^ 0xFF for b in whole[20:40]) + whole[40:]
        if damage == "trailing-garbage":
            return whole + b"garbage!"
        return zlib.compress(echo_of(request))[2:-4]  # deflate without its zlib wrapper

    route(upstream, "/v1/damaged", body_of, {"Content-Encoding": "deflate" if damage == "raw-deflate" else "gzip"})
    status, _, body = await get(proxy.url + "/example/v1/damaged", headers=auth())
    assert status == 502
    assert_no_canary(body, SECRET, "refused answer")


async def test_with_the_guard_off_a_compressed_answer_passes_byte_for_byte(proxy_factory, upstream, tmp_path):
    data = gzip.compress(b'{"ok": true}')
    route(upstream, "/v1/gz", lambda r: data, {"Content-Encoding": "gzip"})
    p = await proxy_factory(base_config(tmp_path, upstream.url, leak_guard="off"))
    status, headers, body = await get(p.url + "/example/v1/gz", headers=auth())
    assert (status, body, headers["Content-Encoding"]) == (200, data, "gzip")


def test_decoding_stops_at_the_limit_instead_of_expanding_the_bomb():
    from multidict import CIMultiDict

    from proxy.errors import UpstreamError

    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB from ~64 KiB
    decoder = encoding.decoder_for(CIMultiDict({"Content-Encoding": "gzip"}), limit=1 << 20)
    with pytest.raises(UpstreamError) as refused:
        for i in range(0, len(bomb), 16384):
            decoder.feed(bomb[i:i + 16384])
        decoder.finish()
    assert refused.value.reason == "upstream_encoding"
    assert len(decoder.out) <= 1 << 20  # never more than the limit held
