"""An ``h2c`` upgrade offer (what ``curl --http2`` sends on ``http://``) is ignored, not refused (SPEC §11):
the offer's headers are stripped and the request is served over HTTP/1.1 on a connection that stays in sync."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from .harness import CALLER_TOKEN, raw_exchange, read_response

AUTH = f"Authorization: Bearer {CALLER_TOKEN}"
OFFER = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__")


def req(path: str, *headers: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: credproxy\r\n{AUTH}\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode()


async def test_h2c_offer_is_served_over_http11_without_the_offer_forwarded(proxy, upstream):
    resp = await raw_exchange(proxy.port, req("/demo/anything/a", *OFFER))
    assert resp.status == 200, resp.raw[:300]
    assert resp.raw.startswith(b"HTTP/1.1 200")
    [seen] = upstream.seen
    names = {k.lower() for k, _ in seen.headers}
    assert not names & {"upgrade", "http2-settings"}
    assert "upgrade" not in (seen.header("Connection") or "").lower()


async def test_connection_stays_http11_after_an_h2c_offer(proxy, upstream):
    """The next request on the same connection (sent, as curl does, once the answer is in) is HTTP/1.1 too."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(req("/demo/anything/first", *OFFER))
        first = await asyncio.wait_for(read_response(reader), 5)
        writer.write(req("/demo/anything/second", "Connection: close"))
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert first.raw.startswith(b"HTTP/1.1 200") and second.raw.startswith(b"HTTP/1.1 200"), (first.raw, second.raw)
    assert [s.path for s in upstream.seen] == ["/anything/first", "/anything/second"]


async def test_http2_settings_alone_is_ignored(proxy, upstream):
    resp = await raw_exchange(proxy.port, req("/demo/anything/a", "HTTP2-Settings: AAMAAABkAAQAAP__"))
    assert resp.status == 200
    assert "http2-settings" not in {k.lower() for k, _ in upstream.seen[0].headers}


async def test_websocket_upgrade_is_still_refused(proxy, upstream):
    resp = await raw_exchange(proxy.port, req("/demo/anything/a", "Connection: Upgrade", "Upgrade: websocket",
                                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                              "Sec-WebSocket-Version: 13"))
    assert resp.status == 400 and resp.json()["error"] == "bad_request"
    assert upstream.seen == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_http2_through_the_proxy(proxy, upstream):
    proc = await asyncio.create_subprocess_exec(
        "curl", "--http2", "-sS", "-o", "-", "-w", "\\n%{http_code} %{http_version}",
        "-H", AUTH, f"http://127.0.0.1:{proxy.port}/demo/anything/curl",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert out.decode().rsplit("\n", 1)[1] == "200 1.1"
    [seen] = upstream.seen
    assert seen.path == "/anything/curl"
    assert not {k.lower() for k, _ in seen.headers} & {"upgrade", "http2-settings"}
