"""A deadline on one timer that outlives it: what a keep-alive connection needs for each head it waits for.

Moving the deadline later only records it; the timer, when it fires early, re-arms for the deadline then
recorded. So a busy connection costs a timer about once per timeout, not a ``call_later`` and its ``cancel``
per request (which cost more than the rest of setting a request up). Used by the caller's side
(``proxy.server.connection``: the head and idle deadlines) and the upstream's (``proxy.upstream.answer``:
the answer head's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

GRANULARITY = 0.001  # the loop's timer resolution: a timer this close to the deadline counts as on time


class Deadline:
    __slots__ = ("_loop", "_due", "_timer", "_timer_at", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop, due: Callable[[], None]) -> None:
        self._loop = loop
        self._due = due  # called once the deadline has passed (and was neither cleared nor moved)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.at: float | None = None  # the loop time it falls due, or None

    def set(self, delay: float) -> None:
        """Due ``delay`` seconds from now (replacing any earlier setting)."""
        at = self.at = self._loop.time() + delay
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)

    def clear(self) -> None:
        """No deadline for now (the timer lapses: it fires and finds none)."""
        self.at = None

    def stop(self) -> None:
        """No deadline and no timer (the connection is gone)."""
        self.at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        at = self.at
        if at is None:
            return
        if self._loop.time() + GRANULARITY < at:  # moved later since the timer was set
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)
            return
        self.at = None
        self._due()
