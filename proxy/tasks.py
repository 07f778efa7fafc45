"""Background tasks owned by one object: started once, stopped by cancelling and
waiting until they have really ended (so nothing runs after ``close()`` returns)."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
