"""Failures of a request answered in callbacks (``pipeline._send_now`` -> ``Exchange.arrived``): what the caller
gets and what the audit line says, the same as when the general path (``_run`` -> ``forward``) serves it.

Each case runs with the callback path on and with it off (``_send_now`` made to return False, as in
tests/test_pipeline_callbacks.py: the one switch between the two paths); with it on, the test checks that the
failing request really went out in callbacks. The upstream is a raw loopback server that answers request N
as its script says, so it can fail on demand: stay silent, hang up, hang up mid-head, or hold its answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from proxy import pipeline
from tests.helpers import base_config, start_proxy, write_store
from tests.ops_support import audit_lines
from tests.security.scripted_upstream import CLOSE, ScriptedUpstream
from tests.test_pipeline_callbacks import _answer, _request

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
READ_TIMEOUT = 0.5


class Upstream(ScriptedUpstream):
    """Answers request number N (counted across connections) with ``await script(N)``: bytes to send,
    ``(bytes, "close")`` to hang up after them, or None to hang up without answering."""

    def __init__(self, script: Callable[[int], Awaitable[bytes | tuple | None]]) -> None:
        async def scripted(n: int, head: bytes):
            answer = await script(n)
            return CLOSE if answer is None else answer

        super().__init__(scripted)

    @property
    def heads(self) -> list[bytes]:
        return [head for head, _ in self.requests]


def _second_answer_held():
    """A script that holds its answer to the second request (``asked`` is set when it comes) until ``release``."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def script(n):
        if n == 1:
            asked.set()
            await release.wait()
        return OK

    return asked, release, script


async def ok(n: int) -> bytes:
    return OK


@pytest.fixture(params=["callbacks", "general"])
def path(request, monkeypatch) -> list:
    """What ``_send_now`` said per request (None: the callback path is off)."""
    said: list = []
    real = pipeline._send_now

    def counted(ex, cred, caller):
        said.append(real(ex, cred, caller))
        return said[-1]

    def off(ex, cred, caller):
        said.append(None)
        return False

    monkeypatch.setattr(pipeline, "_send_now", counted if request.param == "callbacks" else off)
    return said


class Caller:
    """A proxy on loopback and a caller connection to it."""

    def __init__(self, tmp, upstream: Upstream, **server) -> None:
        self.tmp, self.upstream, self.server = tmp, upstream, server

    async def __aenter__(self) -> "Caller":
        write_store(self.tmp, {"apis/example#token": "sk_live_FAILCASE_0d9c"})
        cfg = base_config(self.tmp, self.upstream.url)
        cfg["server"].update({"read_timeout": f"{READ_TIMEOUT}s", **self.server})
        self.p = await start_proxy(cfg)
        host, port = self.p.proxy.bound["main"].rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.stopped = False
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()
        if not self.stopped:
            await self.p.proxy.stop()

    async def get(self, target: str = "/example/v1/x") -> tuple[int, bytes]:
        self.writer.write(_request("GET", target))
        status_line, _, body = await _answer(self.reader, "GET")
        return int(status_line.split()[1]), body

    def audit(self) -> list[dict]:
        if not self.stopped:
            self.p.proxy.holder.current.audit.flush()
        return audit_lines(self.tmp / "audit.log")

    @property
    def in_flight(self) -> int:
        return self.p.proxy.holder.in_flight

    @property
    def connections(self) -> int:
        return self.p.proxy._connections.open


def _went_out_in_callbacks(said: list, n: int) -> None:
    if said[0] is not None:  # the callback path is on: the request after the warm-up (pooled) went out in it
        assert said[n] is True


async def test_no_head_within_the_read_timeout_is_504(tmp_path, path):
    async def script(n):
        if n == 1:
            await asyncio.sleep(3600)
        return OK

    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        started = time.monotonic()
        status, body = await c.get()
        took = time.monotonic() - started
        assert (await c.get())[0] == 200  # the connection goes on
        lines = c.audit()
    _went_out_in_callbacks(path, 1)
    assert status == 504 and b'"upstream_timeout"' in body
    assert READ_TIMEOUT <= took < READ_TIMEOUT + 2
    assert [(line["status"], line["reason"]) for line in lines] == [(200, "allowed"), (504, "upstream_timeout"),
                                                                    (200, "allowed")]


async def test_a_pooled_connection_the_upstream_closed_is_retried_once_on_a_new_one(tmp_path, path):
    async def script(n):
        return None if n == 1 else OK  # request 1 arrives on the pooled connection: hung up without a byte

    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        status, body = await c.get()
        lines = c.audit()
    _went_out_in_callbacks(path, 1)
    assert status == 200 and body == b'{"ok":true}'
    assert len(up.heads) == 3 and up.connections == 2
    assert up.heads[1].split(b"X-Request-Id: ")[1][:32] == up.heads[2].split(b"X-Request-Id: ")[1][:32]
    assert [(line["status"], line["reason"]) for line in lines] == [(200, "allowed"), (200, "allowed")]


async def test_a_second_stale_connection_is_the_upstreams_answer_502(tmp_path, path):
    """The retry is once: a request whose retry finds a hang-up too gets 502 (the retry is on a new
    connection, so its hang-up is no stale pooled connection)."""
    async def script(n):
        return None if n in (1, 2) else OK

    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        status, _ = await c.get()
        lines = c.audit()
    _went_out_in_callbacks(path, 1)
    assert status == 502 and len(up.heads) == 3
    assert [(line["status"], line["reason"]) for line in lines][1] == (502, "upstream_failed")


async def test_the_upstream_hanging_up_mid_head_is_502(tmp_path, path):
    async def script(n):
        if n == 1:
            return b"HTTP/1.1 200 OK\r\nContent-Ty", "close"
        return OK

    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        status, body = await c.get()
        lines = c.audit()
    _went_out_in_callbacks(path, 1)
    assert status == 502 and b'"upstream_error"' in body
    assert len(up.heads) == 2  # not retried: bytes of an answer had arrived
    assert [(line["status"], line["reason"]) for line in lines][1] == (502, "upstream_failed")


async def _until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_the_caller_going_away_while_the_answer_is_pending(tmp_path, path):
    asked, release, script = _second_answer_held()
    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        c.writer.write(_request("GET", "/example/v1/x"))
        await asyncio.wait_for(asked.wait(), 5)
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        c.writer.transport.abort()
        await _until(lambda: c.connections == 0)  # the proxy has seen its caller go
        assert c.in_flight == 1  # the request still waits for its answer
        release.set()
        await _until(lambda: c.in_flight == 0)
        lines = c.audit()
        assert c.connections == 0
        # Nothing broke: a new caller connection is served (on the pooled upstream connection).
        host, port = c.p.proxy.bound["main"].rsplit(":", 1)
        c.reader, c.writer = await asyncio.open_connection(host, int(port))
        assert (await c.get())[0] == 200
    _went_out_in_callbacks(path, 1)
    assert [(line["status"], line["outcome"], line["reason"]) for line in lines][1] == (
        200, "error", "caller_disconnected")


async def test_the_caller_closing_while_the_answer_is_pending(tmp_path, path):
    """A caller that closes (FIN) rather than resets: the proxy reads end of input while the request waits,
    answers once the upstream does (into a socket the caller no longer reads: whether the write meets the
    caller's reset first is timing), and then closes its side."""
    asked, release, script = _second_answer_held()
    async with Upstream(script) as up, Caller(tmp_path, up) as c:
        assert (await c.get())[0] == 200
        c.writer.write(_request("GET", "/example/v1/x"))
        await asyncio.wait_for(asked.wait(), 5)
        c.writer.close()
        await asyncio.sleep(0.1)
        assert c.in_flight == 1
        release.set()
        await _until(lambda: c.in_flight == 0 and c.connections == 0)
        lines = c.audit()
    _went_out_in_callbacks(path, 1)
    assert [(line["status"], line["outcome"], line["reason"]) for line in lines][1] in (
        (200, "allowed", "allowed"), (200, "error", "caller_disconnected"))


async def test_a_drain_deadline_ends_a_request_waiting_for_its_upstream(tmp_path, path):
    """``StateHolder.cancel_in_flight`` at the drain deadline: the request (``Exchange.cancel`` when it is
    answered in callbacks, its task otherwise) ends, without being sent again, and nothing stays in flight."""
    asked = asyncio.Event()

    async def script(n):
        if n >= 1:
            asked.set()
            await asyncio.sleep(3600)
        return OK

    async with Upstream(script) as up, Caller(tmp_path, up, drain_timeout="0.3s") as c:
        assert (await c.get())[0] == 200
        c.writer.write(_request("GET", "/example/v1/x"))
        await asyncio.wait_for(asked.wait(), 5)
        assert c.in_flight == 1
        started = time.monotonic()
        await c.p.proxy.stop()
        c.stopped = True
        took = time.monotonic() - started
        in_flight = c.in_flight
        got = await asyncio.wait_for(c.reader.read(), 5)  # the caller's connection is cut, no answer
        await asyncio.sleep(READ_TIMEOUT + 0.2)  # a request sent again would have reached the upstream by now
        lines = audit_lines(tmp_path / "audit.log")
    _went_out_in_callbacks(path, 1)
    assert in_flight == 0
    assert took < 3
    assert got == b""
    assert len(up.heads) == 2  # the cut request was not sent again
    # Its audit line, as a cancelled task writes it: no status (nothing was answered), an error.
    assert [(line["status"], line["outcome"], line["reason"]) for line in lines] == [(200, "allowed", "allowed"),
                                                                                   (0, "error", "error")]
