"""Graceful shutdown of caller listeners: stop accepting, wait for in-flight requests, then close.

The drain is done once for all caller listeners (``proxy.server.listener``): every
one stops accepting first (idle keep-alive connections close, busy ones after their
answer), then one deadline bounds the wait for the requests counted by
``StateHolder.use()``; only then are the listeners cleaned up, with a short grace
(``FINISH_GRACE``) for answers whose handler has returned but whose last bytes are
still being written. Whatever is still running at the deadline is cancelled here,
at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from proxy.lifecycle.state import StateHolder

log = logging.getLogger("credproxy.drain")

FINISH_GRACE = 1.0


async def stop_accepting(runners: Iterable) -> None:
    """Close the listening sockets; idle keep-alive connections close now, busy ones after their answer
    (so no new request arrives on an old connection while draining). ``runners``: ``Listener``s."""
    for runner in runners:
        await runner.stop_accepting()


async def drain(runners: list, holder: StateHolder, timeout: float) -> bool:
    """True when every in-flight request finished within ``timeout``."""
    started = time.monotonic()
    await stop_accepting(runners)
    finished = True
    if holder.in_flight:
        log.info("waiting for in-flight requests", extra={"in_flight": holder.in_flight, "drain_timeout_s": timeout})
        try:
            await asyncio.wait_for(holder.wait_idle(), timeout)
        except TimeoutError:
            finished = False
            log.warning("drain timeout reached: cancelling the requests still in flight",
                        extra={"in_flight": holder.in_flight, "drain_timeout_s": timeout})
            cancelled = holder.cancel_in_flight()
            if cancelled:
                await asyncio.wait(cancelled, timeout=FINISH_GRACE)
    await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
    log.info("listeners closed", extra={"drained": finished, "duration_ms": round((time.monotonic() - started) * 1000)})
    return finished
