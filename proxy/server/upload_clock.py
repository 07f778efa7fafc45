"""The request-body deadline (``server.limits.body_timeout``): how long a caller may go
without sending body bytes while credproxy waits for them.

Only a read that has to wait is timed: bytes already received are taken without
a timer, so a body that arrived with its head costs nothing. One timer serves all
the waits of a body. It is armed at the first wait and not moved by later ones;
when it fires it looks at the wait in progress: none, and it lapses (the next wait
arms it again); one that began later, and it is re-armed for that wait's deadline;
one that has lasted ``timeout``, and the body's stream is failed with
``BodyStalled``, which wakes the waiting read. A body arriving steadily thus
costs one timer per ``timeout`` of upload time, not one per chunk.

``read`` raises ``400 bad_request`` with its own audit reason:
``caller_body_timeout`` for a stall, ``caller_disconnected`` for a caller gone
mid-body (nobody reads that answer, but the audit line says what happened
rather than an unhandled error). The stream itself keeps ``BodyStalled``; a
connection whose request body was not wholly received closes after its answer.
"""

from __future__ import annotations

import asyncio

from proxy.errors import BadRequest
from proxy.server.request import BodyStream


class BodyStalled(TimeoutError):
    """No request-body bytes arrived within ``body_timeout`` while credproxy waited for them."""


class BodyClock:
    __slots__ = ("_content", "_timeout", "_loop", "_timer", "_since")

    def __init__(self, content: BodyStream, timeout: float) -> None:
        self._content = content
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None  # taken at the first wait: most bodies have none
        self._timer: asyncio.TimerHandle | None = None
        self._since: float | None = None  # when the wait in progress began; None while no read waits

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (whatever has arrived when -1); ``b""`` at the end of the body."""
        content = self._content
        try:
            data = content.read_nowait(n)
            if data or content.is_eof():
                return data
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            self._since = since = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(since + self._timeout, self._expire)
            try:
                return await (content.readany() if n < 0 else content.read(n))
            finally:
                self._since = None
        except BodyStalled:
            raise BadRequest("no request-body bytes within body_timeout", reason="caller_body_timeout") from None
        except ConnectionError:
            raise BadRequest("caller went away mid-body", reason="caller_disconnected") from None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._since is None:
            return
        deadline = self._since + self._timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._content.set_exception(BodyStalled())
