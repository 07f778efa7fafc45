"""An answer received whole, or whose connection is gone, holds no reference cycle (its parser, whose callbacks
refer back to it, is dropped): it is freed as soon as its reader lets go, not left to the cyclic GC."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from proxy.upstream.answer import UpstreamResponse

from tests.security.test_upstream_answers import _Wire


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("data, lost", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", False),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\n\r\nuntil close", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ncut", True),
    (b"HTTP/1.1 200 OK\r\nContent-", True),
])
def test_a_finished_answer_is_freed_without_the_gc(no_gc, data, lost):
    loop = asyncio.new_event_loop()
    try:
        wire = _Wire(loop)
        answer = UpstreamResponse(wire, "GET", 5.0, lambda a: None)
        answer.feed(data)
        if lost:
            answer.connection_lost()
        assert answer.done or lost
        wire.head_clock.stop()  # the connection's clock keeps its latest answer until the next one or its end
        gone = weakref.ref(answer)
        del answer
        assert gone() is None
    finally:
        loop.close()
