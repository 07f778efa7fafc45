"""Graceful shutdown of caller listeners: stop accepting, wait for in-flight requests, then close.

aiohttp's ``runner.cleanup()`` does wait for a handler in progress, but per runner
and for up to ``shutdown_timeout`` twice (once for the handler, once after
cancelling it), and a runner cleaned up after another keeps accepting meanwhile.
So the drain is done here, once for all listeners: every site stops accepting
first, then one deadline bounds the wait for the requests counted by
``StateHolder.use()``; only then are the runners cleaned up, with a short grace
(``FINISH_GRACE``, their ``shutdown_timeout``) for answers whose handler has
returned but whose last bytes are still being written. Whatever is still running
at the deadline is cancelled here, at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiohttp import web

from proxy.lifecycle.state import StateHolder

log = logging.getLogger("credproxy.drain")

FINISH_GRACE = 1.0


async def stop_accepting(runners: Iterable[web.BaseRunner]) -> None:
    """Close the listening sockets; idle keep-alive connections close now, busy ones after their answer
    (so no new request arrives on an old connection while draining)."""
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()
        pre_shutdown = getattr(runner.server, "pre_shutdown", None)
        if pre_shutdown is not None:
            pre_shutdown()


async def drain(runners: list[web.BaseRunner], holder: StateHolder, timeout: float) -> bool:
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
            # Cancelled here rather than by aiohttp, which would first wait its shutdown_timeout once more.
            cancelled = holder.cancel_in_flight()
            if cancelled:
                await asyncio.wait(cancelled, timeout=FINISH_GRACE)
    await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
    log.info("listeners closed", extra={"drained": finished, "duration_ms": round((time.monotonic() - started) * 1000)})
    return finished
