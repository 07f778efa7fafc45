"""``UpstreamResponse.wait_head``: the head, or ``HeadTimeout`` past the read timeout; however the wait ends
(head, refusal, timeout, the waiter cancelled and the connection aborted), the deadline passing afterwards does
nothing and leaves no timer running. (The deadline is on the connection's ``HeadClock``, one timer that outlives
the answers: it is still scheduled right after a head arrives, and finds nothing to do when it fires.)"""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import BadAnswer, HeadTimeout
from proxy.upstream.answer import UpstreamResponse

from tests.security.test_upstream_answers import _Wire

TIMEOUT = 0.05


def _live_timers(loop) -> list:
    return [h for h in loop._scheduled if not h.cancelled()]


def _past_deadline(loop) -> None:
    loop.run_until_complete(asyncio.sleep(TIMEOUT * 3))


def _run(feed):
    loop = asyncio.new_event_loop()
    try:
        wire = _Wire(loop)
        answer = UpstreamResponse(wire, "GET", TIMEOUT)

        async def wait():
            waiting = answer.wait_head()
            loop.call_soon(feed, answer)
            await waiting

        try:
            loop.run_until_complete(wait())
            outcome = None
        except (BadAnswer, HeadTimeout) as exc:
            outcome = exc
        aborted = wire.aborted
        _past_deadline(loop)
        assert wire.aborted == aborted and answer.failure is None  # the deadline passing changed nothing
        return outcome, _live_timers(loop), wire
    finally:
        loop.close()


def test_head_arrives():
    outcome, timers, wire = _run(lambda a: a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert outcome is None and timers == [] and not wire.aborted


def test_head_refused():
    outcome, timers, wire = _run(lambda a: a.feed(b"garbage\r\n\r\n"))
    assert isinstance(outcome, BadAnswer) and timers == [] and wire.aborted


def test_head_times_out():
    outcome, timers, wire = _run(lambda a: None)
    assert isinstance(outcome, HeadTimeout) and timers == [] and wire.aborted


def test_waiter_cancelled_then_connection_aborted():
    loop = asyncio.new_event_loop()
    try:
        answer = UpstreamResponse(_Wire(loop), "GET", TIMEOUT)

        async def wait():
            await answer.wait_head()

        task = loop.create_task(wait())
        loop.call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(task)
        answer.connection_lost()  # what the caller's abort() brings about
        _past_deadline(loop)
        assert _live_timers(loop) == []
    finally:
        loop.close()


def test_a_later_answer_times_out_at_its_own_deadline():
    """Answers in turn on one connection (``on_head``): the clock armed for the first one's deadline neither times
    out the second early nor lets it wait past its own."""
    loop = asyncio.new_event_loop()
    try:
        wire = _Wire(loop)
        heads, when = [], []

        def on_head(answer):
            heads.append(answer)
            when.append(loop.time())

        first = UpstreamResponse(wire, "GET", TIMEOUT, on_head)
        first.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        loop.run_until_complete(asyncio.sleep(TIMEOUT / 2))
        started = loop.time()
        second = UpstreamResponse(wire, "GET", TIMEOUT, on_head)
        loop.run_until_complete(asyncio.sleep(TIMEOUT * 0.75))  # past the first one's deadline, not the second's
        assert heads == [first] and not wire.aborted
        loop.run_until_complete(asyncio.sleep(TIMEOUT * 2))
        assert heads == [first, second] and isinstance(second.failure, HeadTimeout) and wire.aborted
        assert first.failure is None
        assert TIMEOUT - 0.002 <= when[1] - started < TIMEOUT * 1.75
        assert _live_timers(loop) == []
    finally:
        loop.close()
