"""``UpstreamResponse.wait_head``: the head, or ``HeadTimeout`` past the read timeout; however the wait ends
(head, refusal, timeout, the waiter cancelled and the connection aborted), no head timer is left running."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import BadAnswer, HeadTimeout
from proxy.upstream.answer import UpstreamResponse

from tests.security.test_upstream_answers import _Wire


def _live_timers(loop) -> list:
    return [h for h in loop._scheduled if not h.cancelled()]


def _run(feed, timeout: float = 5.0):
    loop = asyncio.new_event_loop()
    try:
        wire = _Wire(loop)
        answer = UpstreamResponse(wire, "GET", timeout)

        async def wait():
            waiting = answer.wait_head()
            loop.call_soon(feed, answer)
            await waiting

        try:
            loop.run_until_complete(wait())
            outcome = None
        except (BadAnswer, HeadTimeout) as exc:
            outcome = exc
        return outcome, _live_timers(loop), wire
    finally:
        loop.close()


def test_head_arrives():
    outcome, timers, _ = _run(lambda a: a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert outcome is None and timers == []


def test_head_refused():
    outcome, timers, wire = _run(lambda a: a.feed(b"garbage\r\n\r\n"))
    assert isinstance(outcome, BadAnswer) and timers == [] and wire.aborted


def test_head_times_out():
    outcome, timers, wire = _run(lambda a: None, timeout=0.05)
    assert isinstance(outcome, HeadTimeout) and timers == [] and wire.aborted


def test_waiter_cancelled_then_connection_aborted():
    loop = asyncio.new_event_loop()
    try:
        answer = UpstreamResponse(_Wire(loop), "GET", 5.0)

        async def wait():
            await answer.wait_head()

        task = loop.create_task(wait())
        loop.call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(task)
        answer.connection_lost()  # what the caller's abort() brings about
        assert _live_timers(loop) == []
    finally:
        loop.close()
