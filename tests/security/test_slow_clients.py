"""Slow clients: a head trickled byte by byte (slowloris), a connection that never
speaks, and a reader that stops taking the answer. Timeouts are set short; the
tests wait for the effect (a closed connection, an audit line) rather than
measuring time."""

from __future__ import annotations

import asyncio
import socket

import pytest

from .harness import CALLER_TOKEN, raw_exchange, read_response

SHORT = {"server": {"limits": {"header_timeout": "300ms", "write_timeout": "300ms"}}}
HEAD = f"GET /demo/anything/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n"


async def closed_by_server(reader: asyncio.StreamReader, limit: float = 10.0) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), limit)
    except ConnectionError:
        return True
    except asyncio.TimeoutError:
        return False
    return data == b""


async def test_slowloris_head_is_cut_off(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, SHORT)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(HEAD.encode())

    async def trickle():
        for i in range(200):  # would take 20 s to finish the head
            await asyncio.sleep(0.1)
            writer.write(f"X-{i}: a\r\n".encode())
            await writer.drain()

    dribbler = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(reader)
    finally:
        dribbler.cancel()
        writer.close()
    assert upstream.seen == []


async def test_silent_connection_is_closed(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, SHORT)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        assert await closed_by_server(reader)
    finally:
        writer.close()


async def test_idle_keepalive_between_requests_is_not_a_slow_head(upstream, make_proxy):
    """The deadline runs from a head's first byte: an idle pause between requests is fine."""
    proxy = await make_proxy(upstream.url, SHORT)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write((HEAD + "\r\n").encode())
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        await asyncio.sleep(0.6)  # twice the header timeout, with no bytes in flight
        writer.write((HEAD + "Connection: close\r\n\r\n").encode())
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    finally:
        writer.close()
    assert len(upstream.seen) == 2


async def test_fast_requests_pass_under_a_short_deadline(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, SHORT)
    resp = await raw_exchange(proxy.port, (HEAD + "Connection: close\r\n\r\n").encode())
    assert resp.status == 200


@pytest.mark.slow
async def test_slow_reader_is_disconnected_and_the_upstream_released(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, SHORT)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    n = 64 << 20
    await loop.sock_sendall(sock, (HEAD.replace("/anything/a", f"/big?n={n}") + "\r\n").encode())
    try:
        line = None
        for _ in range(200):  # the proxy stalls, waits write_timeout, aborts, writes the audit line
            await asyncio.sleep(0.05)
            lines = proxy.audit()
            if lines:
                line = lines[0]
                break
        assert line is not None, "the stalled response was never ended"
        assert (line["outcome"], line["reason"]) == ("error", "caller_write_timeout")
        received = 0
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
                received += len(chunk)
        except ConnectionError:
            pass
        assert received < n
    finally:
        sock.close()
