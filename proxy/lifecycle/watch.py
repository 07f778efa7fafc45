"""Reload when the config file changes: poll its stat every ``interval`` seconds.

No inotify dependency: one ``stat`` per interval is cheap, and it also works on
the symlink swaps Kubernetes uses for mounted ConfigMaps (the path is followed).
A change is acted on once the file has stopped changing for ``settle`` seconds
(so a half-written file is not loaded), and only when its content differs
from the last content a reload saw (applied or rejected) — a rejected file is
not retried every poll, and a reload by SIGHUP or the API is not repeated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from proxy.tasks import stop_task

log = logging.getLogger("credproxy.watch")


def file_digest(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ConfigWatcher:
    def __init__(self, path: str, reloader, *, interval: float = 2.0, settle: float = 0.2) -> None:
        self.path = path
        self.reloader = reloader  # .last_digest, async .reload(trigger)
        self.interval = interval
        self.settle = settle
        self._task: asyncio.Task | None = None

    async def check(self) -> bool:
        """One poll; True when it triggered a reload."""
        digest = file_digest(self.path)
        if digest is None or digest == self.reloader.last_digest:
            return False
        log.info("config file changed; reloading", extra={"config": self.path})
        await self.reloader.reload("watch")
        return True

    async def _run(self, last: tuple | None) -> None:
        while True:
            await asyncio.sleep(self.interval)
            sig = _signature(self.path)
            if sig == last:
                continue
            while True:  # wait for the writer to finish
                await asyncio.sleep(self.settle)
                again = _signature(self.path)
                if again == sig:
                    break
                sig = again
            last = sig
            try:
                await self.check()
            except Exception:  # the watcher must outlive any one failed reload
                log.exception("config reload after a file change failed")

    def start(self) -> None:
        if self._task is None:
            # The signature is taken now, not when the task first runs: a write in between must count.
            self._task = asyncio.get_running_loop().create_task(self._run(_signature(self.path)))

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
