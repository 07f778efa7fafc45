"""Slow request bodies (``server.limits.body_timeout``): a caller that stops sending its
body is answered 400 and cut off, whether the body is being buffered or streamed
upstream; one that sends slowly but steadily is served. Raw sockets on loopback;
the tests wait for an effect (an answer, a closed connection, an audit line)
within generous bounds and never measure time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from aiohttp import web

from .harness import CALLER_TOKEN, read_response

TIMEOUT = {"server": {"limits": {"body_timeout": "300ms"}}}


def post_head(path: str, framing: str) -> bytes:
    return (f"POST /demo{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\n{framing}\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def audit_line(proxy, limit: float = 10.0) -> dict:
    """The first audit line, once it is written."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        lines = proxy.audit()
        if lines:
            return lines[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no audit line written")


async def drip(writer: asyncio.StreamWriter, pieces, interval: float) -> None:
    """Send ``pieces`` one at a time, ``interval`` apart; stop quietly when the proxy has closed."""
    try:
        for piece in pieces:
            await asyncio.sleep(interval)
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass


async def closed_by_server(reader: asyncio.StreamReader, limit: float = 10.0) -> bool:
    """True when the proxy closes (or resets) the connection within ``limit``; what comes before is read."""
    async def until_eof() -> None:
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(until_eof(), limit)
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


# --- a buffered body (up to session.replay_max_body): nothing goes upstream -----------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_stalled_buffered_upload_gets_400_and_is_audited(upstream, make_proxy, framing):
    proxy = await make_proxy(upstream.url, TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    if framing == "content-length":
        head, first, later = post_head("/anything/up", "Content-Length: 1000\r\n"), b"x" * 10, [b"x"] * 20
    else:
        head, first, later = post_head("/anything/up", "Transfer-Encoding: chunked\r\n"), chunk(b"x" * 10), \
            [chunk(b"x")] * 20
    writer.write(head + first)
    dribbler = asyncio.ensure_future(drip(writer, later, 2.0))  # one byte every 2 s: slower than body_timeout
    try:
        resp = await asyncio.wait_for(read_response(reader), 10)
        assert resp.status == 400
        body = resp.json()
        assert (body["error"], body["message"]) == ("bad_request", "malformed request")
        assert resp.headers["x-request-id"] == body["request_id"]
        assert await closed_by_server(reader)
    finally:
        dribbler.cancel()
        writer.close()
    line = await audit_line(proxy)
    assert (line["status"], line["outcome"], line["reason"]) == (400, "error", "caller_body_timeout")
    assert (line["caller"], line["credential"], line["request_id"]) == ("billing", "demo", body["request_id"])
    assert upstream.seen == []


# --- a streamed body (over session.replay_max_body): the upstream request is abandoned --------------------


@dataclass
class Upload:
    received: int
    complete: bool


class UploadSink:
    """A real aiohttp upstream that reads each request body chunk by chunk and records how it ended:
    complete, or broken off by the client (connection closed mid-body)."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.ended = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "UploadSink":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        received, complete = 0, False
        try:
            async for data in request.content.iter_any():
                received += len(data)
            complete = True
        except Exception:  # noqa: BLE001 - whatever aiohttp raises for a body cut short is "not complete"
            pass
        finally:
            self.uploads.append(Upload(received, complete))
            self.ended.set()
        return web.json_response({"received": received})


@pytest.fixture
async def sink():
    s = await UploadSink().start()
    yield s
    await s.close()


STREAMED = {"server": {"limits": {"body_timeout": "300ms"}},
            "credentials": {"demo": {"session": {"replay_max_body": "1KiB"}}}}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_stalled_streamed_upload_is_cut_off_upstream_and_answered_400(sink, make_proxy, framing):
    proxy = await make_proxy(sink.url, STREAMED)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    first = b"s" * 4096  # over replay_max_body: this part goes upstream before the stall
    if framing == "content-length":
        writer.write(post_head("/v1/upload", "Content-Length: 60000\r\n") + first)
    else:
        writer.write(post_head("/v1/upload", "Transfer-Encoding: chunked\r\n") + chunk(first))
    try:
        resp = await asyncio.wait_for(read_response(reader), 10)  # and then nothing more is sent
        assert resp.status == 400 and resp.json()["error"] == "bad_request"
        assert await closed_by_server(reader)
    finally:
        writer.close()
    await asyncio.wait_for(sink.ended.wait(), 10)
    assert len(sink.uploads) == 1
    upload = sink.uploads[0]
    assert not upload.complete, "the upstream must see an aborted request, not a complete one"
    assert 0 < upload.received <= len(first)
    line = await audit_line(proxy)
    assert (line["status"], line["outcome"], line["reason"]) == (400, "error", "caller_body_timeout")


# --- slow but steady -----------------------------------------------------------------------------------

STEADY = {"server": {"limits": {"body_timeout": "500ms"}},
          "credentials": {"demo": {"session": {"replay_max_body": "1KiB"}}}}


@pytest.mark.parametrize("size", [200, 3000], ids=["buffered", "streamed"])
async def test_slow_but_steady_upload_passes(sink, make_proxy, size):
    """Twenty pieces 50 ms apart: the whole upload takes about twice body_timeout, but bytes never stop
    for anywhere near that long."""
    proxy = await make_proxy(sink.url, STEADY)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    piece = size // 20
    writer.write(post_head("/v1/upload", f"Content-Length: {size}\r\nConnection: close\r\n"))
    try:
        await drip(writer, [b"p" * piece] * 20, 0.05)
        resp = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert resp.status == 200
    assert resp.json() == {"received": size}
    assert [(u.received, u.complete) for u in sink.uploads] == [(size, True)]
    line = await audit_line(proxy)
    assert (line["status"], line["outcome"]) == (200, "allowed")


def test_body_timeout_must_be_positive():
    from proxy.config.models import Limits

    assert Limits().body_timeout == 60.0
    with pytest.raises(ValueError):
        Limits(body_timeout="0s")


class EarlyAnswer(UploadSink):
    """Answers at once and then echoes the body as it arrives (an upstream that streams while it reads)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"started\n")
        received, complete = 0, False
        try:
            async for data in request.content.iter_any():
                received += len(data)
                await resp.write(data)
            complete = True
        except Exception:  # noqa: BLE001 - a body cut short, whatever aiohttp calls it
            pass
        finally:
            self.uploads.append(Upload(received, complete))
            self.ended.set()
        return resp


@pytest.mark.parametrize("fault", ["caller_body_timeout", "too_large"])
async def test_upload_broken_off_after_the_answer_started_aborts_the_caller_and_is_audited_as_such(make_proxy,
                                                                                                    fault):
    """Nothing can be answered any more: the caller sees the answer break off, the upstream an aborted
    request; the audit says why. (A body over max_body is the same case, found while streaming.)"""
    early = await EarlyAnswer().start()
    try:
        proxy = await make_proxy(early.url, STREAMED)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        if fault == "too_large":
            writer.write(post_head("/v1/upload", "Transfer-Encoding: chunked\r\n") + chunk(b"s" * 4096))
        else:
            writer.write(post_head("/v1/upload", "Content-Length: 60000\r\n") + b"s" * 4096)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            if fault == "too_large":  # over the harness's max_body of 64 KiB, after the answer has begun
                writer.write(chunk(b"s" * 70000))
            assert await closed_by_server(reader)
        finally:
            writer.close()
        await asyncio.wait_for(early.ended.wait(), 10)
        assert [u.complete for u in early.uploads] == [False]
        line = await audit_line(proxy)
        assert (line["status"], line["outcome"], line["reason"]) == (200, "error", fault)
    finally:
        await early.close()
