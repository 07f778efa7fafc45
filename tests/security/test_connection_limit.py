"""Caller connections per process (``server.limits.max_connections``): a connection
over the limit is answered ``503 overloaded`` and closed; those already open keep
working; the count drops when connections close, also when they are reset, also
mid-request. Raw sockets against a real credproxy on loopback; the tests wait for
effects (the gauge, an answer) within generous bounds and never measure time."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct

import aiohttp
import pytest
import trustme

from .harness import CALLER_TOKEN, free_port, read_response

LIMIT3 = {"server": {"limits": {"max_connections": 3}}}
GET = f"GET /demo/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n\r\n".encode()


@pytest.fixture
async def connect():
    """``await connect(port, tls=None)``: a raw connection, closed after the test."""
    opened = []

    async def open_one(port: int, tls: ssl.SSLContext | None = None):
        conn = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        opened.append(conn[1])
        return conn

    yield open_one
    for writer in opened:
        writer.close()


async def get(conn, request: bytes = GET):
    reader, writer = conn
    writer.write(request)
    return await asyncio.wait_for(read_response(reader), 10)


async def closed_by_server(reader: asyncio.StreamReader, limit: float = 10.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), limit) == b""
    except ConnectionError:
        return True


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a middlebox would."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def metric(proxy, name: str) -> float:
    """A metric as the admin listener serves it."""
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.admin_url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def eventually(proxy, name: str, expected: float, limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while (value := await metric(proxy, name)) != expected:
        assert loop.time() < deadline, f"{name} stayed at {value}, expected {expected}"
        await asyncio.sleep(0.05)


async def eventually_open(proxy, n: int) -> None:
    await eventually(proxy, "credproxy_caller_connections", n)


def refusals(proxy) -> list[dict]:
    return [line for line in proxy.audit() if line["reason"] == "too_many_connections"]


async def test_a_fourth_connection_is_refused_while_three_keep_working(upstream, make_proxy, connect):
    proxy = await make_proxy(upstream.url, LIMIT3)
    conns = [await connect(proxy.port) for _ in range(3)]
    for conn in conns:
        assert (await get(conn)).status == 200
    await eventually_open(proxy, 3)

    fourth = await connect(proxy.port)
    resp = await get(fourth)  # the request is sent as usual; the answer was already on its way
    assert resp.status == 503
    body = resp.json()
    assert (body["error"], body["message"]) == ("overloaded", "too many connections")
    assert resp.headers["x-request-id"] == body["request_id"]
    assert resp.headers["connection"] == "close" and resp.headers["retry-after"] == "1"
    assert await closed_by_server(fourth[0])
    fourth[1].close()

    for conn in conns:  # idle keep-alive connections, still served
        assert (await get(conn)).status == 200
    assert await metric(proxy, "credproxy_caller_connections") == 3
    assert await metric(proxy, "credproxy_connections_refused_total") == 1

    conns.pop()[1].close()
    await eventually_open(proxy, 2)
    conns.append(await connect(proxy.port))
    assert (await get(conns[-1])).status == 200
    assert len(upstream.seen) == 7  # the refused connection's request never went anywhere
    [line] = refusals(proxy)
    assert (line["status"], line["outcome"], line["client_ip"]) == (503, "error", "127.0.0.1")
    assert (line["request_id"], line["caller"], line["credential"]) == (body["request_id"], None, None)


async def test_reset_connections_are_released_also_mid_request(upstream, make_proxy, connect, caplog):
    proxy = await make_proxy(upstream.url, {"server": {"limits": {"max_connections": 2}}})
    idle = await connect(proxy.port)
    uploading = await connect(proxy.port)
    uploading[1].write(GET.replace(b"GET", b"POST").replace(b"\r\n\r\n", b"\r\nContent-Length: 100\r\n\r\nabc"))
    await eventually_open(proxy, 2)
    await eventually(proxy, "credproxy_requests_in_flight", 1)  # the POST's handler waits for the rest of its body
    assert (await get(await connect(proxy.port))).status == 503
    reset(idle[1])
    reset(uploading[1])
    await eventually_open(proxy, 0)
    for conn in [await connect(proxy.port) for _ in range(2)]:
        assert (await get(conn)).status == 200
    # The upload broken off by the reset is audited as such, not as an unhandled error.
    [broken] = [line for line in proxy.audit() if line["method"] == "POST"]
    assert (broken["status"], broken["outcome"], broken["reason"]) == (400, "error", "caller_disconnected")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert [seen.method for seen in upstream.seen] == ["GET", "GET"]  # the broken POST never went upstream


async def test_the_limit_spans_main_and_dedicated_listeners_but_not_admin(upstream, make_proxy, connect):
    dedicated_port = free_port()
    proxy = await make_proxy(upstream.url, {"server": {"limits": {"max_connections": 2}},
                                            "credentials": {"demo": {"listen": f"127.0.0.1:{dedicated_port}"}}})
    on_dedicated = GET.replace(b"/demo/v1/x", b"/v1/x")
    assert (await get(await connect(proxy.port))).status == 200
    assert (await get(await connect(dedicated_port), on_dedicated)).status == 200
    assert (await get(await connect(dedicated_port), on_dedicated)).status == 503
    assert (await get(await connect(proxy.port))).status == 503
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.admin_url}/healthz") as resp:
        assert resp.status == 200
    assert len(refusals(proxy)) == 2


async def test_refusal_over_tls(upstream, make_proxy, connect, tmp_path):
    """On a TLS listener a connection counts once its handshake is done; the refusal is sent over TLS
    (which cannot half-close: the client's close ends it)."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    proxy = await make_proxy(upstream.url, {"server": {"limits": {"max_connections": 1},
                                                       "tls": {"cert_file": str(tmp_path / "server.pem"),
                                                               "key_file": str(tmp_path / "server.pem")}}})
    held = await connect(proxy.port, ctx)
    assert (await get(held)).status == 200
    refused = await connect(proxy.port, ctx)
    resp = await get(refused)
    assert resp.status == 503 and resp.json()["error"] == "overloaded"
    refused[1].close()
    assert (await get(held)).status == 200
    held[1].close()
    await eventually_open(proxy, 0)
    assert (await get(await connect(proxy.port, ctx))).status == 200


def test_max_connections_default_and_bounds():
    from proxy.config.models import Limits

    assert Limits().max_connections == 10000  # well above the 5,000 keep-alive connections the benchmark holds
    with pytest.raises(ValueError):
        Limits(max_connections=0)
