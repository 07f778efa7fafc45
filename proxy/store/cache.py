"""In-memory cache of secret entries read from the store.

Requests never wait on the backend for a secret that is cached. A background
poller re-reads paths whose version stamp changed (``refresh_interval``); an upstream
"expired" answer asks for an immediate re-read, rate-limited per path.
When the backend fails, last-known-good entries keep serving for up to
``max_staleness``; an explicit access-denied drops the entry at once.
Paths no config references any more are ``forget``-ten: no longer held nor polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import SecretAccessDenied, SecretBackendError, SecretNotFound
from proxy.store.secret import Secret, SecretRef
from proxy.store.base import SecretEntry, SecretStore
from proxy.tasks import stop_task

log = logging.getLogger("credproxy.secrets")

REREAD_MIN_INTERVAL = 30.0


@dataclass
class _Cached:
    entry: SecretEntry
    fetched_at: float  # monotonic time of the last successful read or version check
    reread_at: float = float("-inf")


class SecretCache:
    def __init__(self, store: SecretStore, *, refresh_interval: float = 60.0, max_staleness: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_backend_error: Callable[[Exception], None] | None = None) -> None:
        self.store = store
        self._on_backend_error = on_backend_error or (lambda _exc: None)
        self.refresh_interval = refresh_interval
        self.max_staleness = max_staleness
        self._clock = clock
        self._entries: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._forgotten: set[str] = set()  # forgotten while a read was in flight: that read is not kept
        self._listeners: list[Callable[[str], None]] = []
        self._poller: asyncio.Task | None = None

    def on_change(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(path)`` when a path's secret changed (rotation)."""
        self._listeners.append(fn)

    def off_change(self, fn: Callable[[str], None]) -> None:
        """Stop calling ``fn`` (its owner closed); unknown ``fn`` is ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    @property
    def listeners(self) -> int:
        """How many change callbacks are registered (bounded by what is running)."""
        return len(self._listeners)

    def current(self, path: str) -> SecretEntry | None:
        """The cached entry at ``path`` when it is fresh enough to serve without I/O, else None. One entry
        object stands for one read of one version: a re-read replaces it, so a caller may keep what it
        derived from an entry for as long as ``current`` still returns that same object."""
        cached = self._entries.get(path)
        if cached is not None and self._clock() - cached.fetched_at <= self.max_staleness:
            return cached.entry
        return None

    async def entry(self, path: str) -> SecretEntry:
        """``current``, or (missing or too stale) the entry read from the backend now."""
        found = self.current(path)
        if found is not None:
            return found
        if path in self._entries:
            log.warning("secret too stale to serve", extra={"secret_path": path})
        return await self._fetch(path)

    async def read(self, ref: SecretRef) -> Secret:
        return (await self.entry(ref.path)).get(ref)

    def forget(self, paths) -> None:
        """Drop ``paths`` (no running config references them): not served from memory, not polled again.
        A read of one still in flight (a reload's that timed out) is not kept when it lands."""
        for path in paths:
            self._entries.pop(path, None)
            if path in self._inflight:
                self._forgotten.add(path)

    def cached(self, path: str) -> bool:
        c = self._entries.get(path)
        return c is not None and self._clock() - c.fetched_at <= self.max_staleness

    async def _fetch(self, path: str) -> SecretEntry:
        fut = self._inflight.get(path)
        if fut is None:
            fut = asyncio.ensure_future(self._do_fetch(path))
            self._inflight[path] = fut
            fut.add_done_callback(lambda _f: (self._inflight.pop(path, None), self._forgotten.discard(path)))
        return await asyncio.shield(fut)

    async def refetch(self, path: str) -> SecretEntry:
        """Read ``path`` from the backend now, bypassing the cache and the re-read rate limit
        (an operator asked for it)."""
        return await self._fetch(path)

    async def _do_fetch(self, path: str) -> SecretEntry:
        try:
            entry = await self.store.get(path)
        except (SecretAccessDenied, SecretNotFound) as exc:
            self._entries.pop(path, None)
            self._on_backend_error(exc)
            raise
        except SecretBackendError as exc:
            self._on_backend_error(exc)
            raise
        if path in self._forgotten:
            return entry  # answers the reads waiting for it; not kept
        old = self._entries.get(path)
        self._entries[path] = _Cached(entry, self._clock(), old.reread_at if old else float("-inf"))
        if old is not None and old.entry.stamp != entry.stamp:
            log.info("secret rotated", extra={"secret_path": path, "version": entry.version})
            for fn in list(self._listeners):  # a callback may unregister itself
                fn(path)
        return entry

    async def reread(self, path: str) -> bool:
        """Re-read now (after an upstream said the secret is no longer valid), at most once per 30 s."""
        cached = self._entries.get(path)
        now = self._clock()
        if cached is not None and now - cached.reread_at < REREAD_MIN_INTERVAL:
            return False
        if cached is not None:
            cached.reread_at = now
        old_stamp = cached.entry.stamp if cached else None
        try:
            entry = await self._fetch(path)
        except SecretBackendError:
            return False
        return entry.stamp != old_stamp

    async def poll_once(self) -> None:
        # Paths are checked side by side: one slow or failing path must not hold up the others
        # (the store bounds how many calls really run at once).
        await asyncio.gather(*(self._check(path) for path in list(self._entries)))

    async def _check(self, path: str) -> None:
        cached = self._entries.get(path)
        if cached is None:
            return
        try:
            stamp = await self.store.stamp(path)
        except (SecretAccessDenied, SecretNotFound) as exc:
            self._entries.pop(path, None)
            self._on_backend_error(exc)
            log.warning("secret no longer readable; dropped", extra={"secret_path": path})
            return
        except SecretBackendError as exc:
            self._on_backend_error(exc)
            return  # keep last-known-good; staleness bounds how long
        if self._entries.get(path) is not cached:
            return  # forgotten (or replaced) while the stamp was read
        if stamp != cached.entry.stamp:
            try:
                await self._fetch(path)
            except SecretBackendError:
                pass  # counted and handled (dropped when denied) by the fetch
        else:
            cached.fetched_at = self._clock()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.poll_once()
            except Exception:  # the poller must survive anything; the next round retries
                log.exception("secret poll failed")

    def start(self) -> None:
        if self._poller is None and self.refresh_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def close(self) -> None:
        await stop_task(self._poller)
        self._poller = None
