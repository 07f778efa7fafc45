"""The caller-side HTTP/1.1 protocol as a client sees it: pipelining, keep-alive,
``Expect: 100-continue``, HTTP/1.0, a failing request handler."""

from __future__ import annotations

import asyncio
import json

from proxy.server.connection import ConnectionContext
from proxy.server.listener import CallerListener
from proxy.config.fields import Listen

from .harness import CALLER_TOKEN, read_response

AUTH = f"Authorization: Bearer {CALLER_TOKEN}"


def req(path: str, *headers: str, method: str = "GET", body: bytes = b"", version: str = "1.1") -> bytes:
    return (f"{method} {path} HTTP/{version}\r\nHost: credproxy\r\n{AUTH}\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"".join(req(f"/demo/anything/{i}") for i in range(5)))
        answers = [await asyncio.wait_for(read_response(reader), 5) for _ in range(5)]
    finally:
        writer.close()
    assert [a.status for a in answers] == [200] * 5
    assert [json.loads(a.body)["url"] for a in answers] == [f"/anything/{i}" for i in range(5)]


async def test_expect_100_continue_gets_continue_before_the_body_is_sent(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(req("/demo/anything/up", "Content-Length: 5", "Expect: 100-continue", method="POST"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        answer = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert answer.status == 200
    assert [(s.method, s.body) for s in upstream.seen] == [("POST", b"hello")]
    assert "expect" not in {k.lower() for k, _ in upstream.seen[0].headers}


async def test_a_denied_expect_100_gets_its_answer_and_no_continue(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /demo/anything/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        answer = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert answer.status == 401
    assert upstream.seen == []


async def test_http10_caller_gets_an_answer_and_the_connection_closes(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(req("/demo/anything/old", version="1.0"))
        data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" not in data.lower()
    assert json.loads(data.partition(b"\r\n\r\n")[2])["url"] == "/anything/old"


async def test_keep_alive_serves_many_requests_on_one_connection(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for i in range(20):
            writer.write(req(f"/demo/anything/{i}", "Content-Length: 3", method="POST", body=b"abc"))
            answer = await asyncio.wait_for(read_response(reader), 5)
            assert answer.status == 200
    finally:
        writer.close()
    assert len(upstream.seen) == 20


async def test_an_unexpected_handler_error_answers_500_json_and_nothing_else():
    """A request handler that fails (a fault-injecting one: the pipeline maps its own errors) gets the
    fixed 500 JSON; the error's text stays out of the answer."""
    async def failing(request, response):
        raise RuntimeError("internal detail that must not leak")

    listener = CallerListener.http(lambda live: ConnectionContext("test", failing, live=live))
    [address] = await listener.start(Listen.parse("127.0.0.1:0"), None)
    try:
        reader, writer = await asyncio.open_connection(*address[:2])
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
    finally:
        await listener.cleanup()
    assert answer.status == 500
    body = answer.json()
    assert body["error"] == "internal_error" and body["request_id"] == answer.headers["x-request-id"]
    assert b"internal detail" not in answer.raw


async def test_a_slow_head_after_a_served_request_is_cut_off_too(upstream, make_proxy):
    """The head deadline holds for every request of a keep-alive connection, not only the first."""
    proxy = await make_proxy(upstream.url, {"server": {"limits": {"header_timeout": "300ms"}}})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

    async def trickle():
        for i in range(200):  # would take 20 s to finish the head
            await asyncio.sleep(0.1)
            writer.write(f"X-{i}: a\r\n".encode())
            await writer.drain()

    dribbler = None
    try:
        writer.write(req("/demo/anything/first"))
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        await asyncio.sleep(0.5)  # idle longer than the head deadline: allowed between requests
        writer.write(f"GET /demo/anything/second HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
        dribbler = asyncio.ensure_future(trickle())
        try:
            closed = await asyncio.wait_for(reader.read(65536), 10) == b""
        except ConnectionError:
            closed = True
        assert closed
    finally:
        if dribbler is not None:
            dribbler.cancel()
        writer.close()
    assert [s.path for s in upstream.seen] == ["/anything/first"]


async def test_a_connect_handler_can_take_the_connection_over():
    """``Request.take_over`` (for a CONNECT answered 200): the connection gives up its transport and the
    bytes after the head; what follows is not parsed as HTTP. The taker here echoes (a stand-in tunnel)."""
    taken = asyncio.get_running_loop().create_future()

    class Echo(asyncio.Protocol):
        def __init__(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data.upper())

    async def handler(request, response):
        assert request.method == "CONNECT" and request.upgrade
        await response.send(200, [], b"")
        transport, leftover, release = request.take_over()
        transport.set_protocol(Echo(transport))
        transport.write(leftover.upper())
        transport.resume_reading()
        taken.set_result(release)

    listener = CallerListener.http(lambda live: ConnectionContext("test", handler, live=live))
    [address] = await listener.start(Listen.parse("127.0.0.1:0"), None)
    try:
        reader, writer = await asyncio.open_connection(*address[:2])
        writer.write(b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\nearly ")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        echoed = b""
        while len(echoed) < len(b"EARLY GET / HTTP/1.1\r\n\r\n"):
            echoed += await asyncio.wait_for(reader.read(100), 5)
        assert echoed == b"EARLY GET / HTTP/1.1\r\n\r\n"
        assert await taken is None  # a context without a connection limit: nothing to give back
        writer.close()
    finally:
        await listener.cleanup()
