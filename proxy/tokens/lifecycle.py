"""The token of one (credential, principal): obtained once, shared, refreshed once.

- Lazy by default; ``keep_fresh`` (session.prefetch) obtains it at start and keeps
  retrying (with backoff) whenever it has none.
- Windows: a token is *fresh* until ``refresh_at`` (a random point in the first
  quarter of the refresh window before expiry; the window is ``refresh_before`` but
  never more than half the lifetime). After that it is *advisory*: requests keep
  using it while one background refresh runs. From ``MANDATORY_MARGIN`` before
  expiry it counts as expired: every request waits for the one refresh.
- A used token is also refreshed by a timer at ``refresh_at``, so steady traffic
  never waits; an idle one lapses and is obtained again on next use.
- Exactly one refresh runs at a time; waiters await it through ``asyncio.shield``,
  so a cancelled waiter never cancels it.
- Failures back off: 1 s doubling to 5 min, ±25 % jitter. While a valid token
  exists it keeps serving; without one callers get 503 with Retry-After.
- ``reject(used)``: the upstream refused the token. Only the first report for the
  current token drops it and refreshes; later reports wait for that refresh. A
  token refused within ``QUICK_REJECT`` of being issued more than once in a row
  backs off the next forced refresh, so an upstream that refuses every token
  cannot turn requests into a refresh storm.
All times are on the injected monotonic ``clock``; ``rng`` gives the jitter.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.errors import CredentialUnavailable, TokenFailure, TokenUnavailable
from proxy.grant import Grant
from proxy.tokens.answer import TokenAnswer

log = logging.getLogger("credproxy.tokens")

BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
REFRESH_JITTER = 0.25
QUICK_REJECT = 10.0


def backoff(attempt: int, rng: Callable[[], float]) -> float:
    """Delay after the ``attempt``-th consecutive failure (1-based)."""
    nominal = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(attempt - 1, 30))
    return min(BACKOFF_MAX, nominal * (0.75 + 0.5 * rng()))


def mandatory_margin(lifetime: float) -> float:
    return min(10.0, lifetime * 0.1)


@dataclass(eq=False)
class Token:
    grant: Grant = field(repr=False)
    obtained_at: float
    expires_at: float
    lifetime: float

    @property
    def usable_until(self) -> float:
        return self.expires_at - mandatory_margin(self.lifetime)


@dataclass
class Settings:
    ttl: float
    refresh_before: float
    keep_fresh: bool = False
    clock: Callable[[], float] = time.monotonic
    rng: Callable[[], float] = random.random


Report = Callable[[str, float, "Token | None"], None]  # (result, duration_s, token)


class TokenSlot:
    def __init__(self, obtain: Callable[[], Awaitable[tuple[TokenAnswer, Grant]]], settings: Settings, *,
                 report: Report | None = None, label: str = "") -> None:
        self._obtain = obtain  # a new token from the provider, and the Grant requests will inject
        self.settings = settings
        self._report = report or (lambda *_: None)
        self.label = label  # "credential" or "credential/principal", for logs
        self.keep_fresh = settings.keep_fresh  # prefetch: obtain at start, keep retrying until it has one
        self.token: Token | None = None
        self.refresh_at = math.inf
        self.failures = 0
        self.not_before = -math.inf
        self.quick_rejections = 0
        self._after_rejection = False  # the running refresh replaces a token the upstream refused
        self.last_error: str | None = None
        self.last_refresh: float | None = None  # wall clock, for the admin API
        self.used = False
        self.refreshes = 0
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- what requests call ----------------------------------------------------------

    def ready(self) -> Token | None:
        """The token ``get`` returns without waiting (one still usable; in the advisory window this starts
        the refresh behind the requests' backs), else None: then ``get`` waits for one. The request path
        takes this first: no coroutine while the token is usable."""
        return self._ready(self.settings.clock())

    def _ready(self, now: float) -> Token | None:
        tok = self.token
        if tok is not None and now < tok.usable_until:
            self.used = True
            if now >= self.refresh_at and self._task is None and now >= self.not_before:
                self._start()  # advisory window: refresh behind the requests' backs
            return tok
        return None

    async def get(self) -> Token:
        now = self.settings.clock()
        tok = self._ready(now)
        if tok is not None:
            return tok
        if self._task is None:
            if now < self.not_before:
                raise self._unavailable(now)
            self._start()
        tok = await asyncio.shield(self._task)
        self.used = True
        return tok

    async def reject(self, used: Grant) -> bool:
        """The upstream refused ``used``. True once a different, fresh token is in place."""
        cur = self.token
        now = self.settings.clock()
        if cur is not None and cur.grant is not used and now < cur.usable_until:
            return True
        if self._task is None:
            if cur is not None and cur.grant is used:
                self.token = None
                self._after_rejection = True
                self.refresh_at = math.inf
                quick = now - cur.obtained_at < QUICK_REJECT
                self.quick_rejections = self.quick_rejections + 1 if quick else 0
                if self.quick_rejections >= 2:
                    self.not_before = max(self.not_before, now + backoff(self.quick_rejections - 1, self.settings.rng))
                    self.last_error = "upstream_refused"
                log.info("upstream refused the token; dropped", extra={"credential": self.label,
                                                                       "quick_rejections": self.quick_rejections})
            if now < self.not_before:
                return False
            self._start()
        try:
            await asyncio.shield(self._task)
        except CredentialUnavailable:
            return False
        return True

    async def refresh_now(self) -> Token:
        """Admin refresh: a new token now (joins one already running), ignoring backoff."""
        if self._task is None:
            self._start()
        return await asyncio.shield(self._task)

    def drop(self) -> Token | None:
        tok, self.token = self.token, None
        self.refresh_at = math.inf
        self._cancel_timer()
        return tok

    # --- state for the admin API -------------------------------------------------------

    def state(self) -> str:
        now = self.settings.clock()
        if self._task is not None:
            return "refreshing"
        if self.failures:
            return "failing"
        if self.token is not None and now < self.token.usable_until:
            return "fresh"
        return "expired"

    def expires_in(self) -> float | None:
        if self.token is None:
            return None
        return max(0.0, self.token.expires_at - self.settings.clock())

    # --- the one refresh -----------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(_consume)

    async def _run(self) -> Token:
        clock = self.settings.clock
        started = clock()
        try:
            answer, grant = await self._obtain()
        except TokenFailure as exc:
            raise self._failed(exc.reason, exc.detail, started) from None
        except CredentialUnavailable as exc:
            raise self._failed("secret_unavailable", exc.detail, started) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not leave waiters hanging; its traceback goes to the log
            log.error("token provider failed unexpectedly", exc_info=exc, extra={"credential": self.label})
            raise self._failed("internal", type(exc).__name__, started) from None
        finally:
            self._task = None
        life = answer.expires_in if answer.expires_in is not None else self.settings.ttl
        whole = max(life, answer.lifetime or life)  # a shared token keeps the windows of its whole lifetime
        tok = Token(grant, obtained_at=started, expires_at=started + life, lifetime=whole)
        window = min(self.settings.refresh_before, whole / 2)
        self.refresh_at = tok.expires_at - window * (1 - REFRESH_JITTER * self.settings.rng())
        self.token = tok
        self.failures, self.not_before, self.last_error = 0, -math.inf, None
        if not self._after_rejection:  # an ordinary refresh ends a row of refusals
            self.quick_rejections = 0
        self._after_rejection = False
        self.last_refresh = time.time()
        self.used = False
        self.refreshes += 1
        self._report("ok", clock() - started, tok)
        log.info("token obtained", extra={"credential": self.label, "expires_in_s": round(life, 3)})
        self._arm(self.refresh_at)
        return tok

    def _failed(self, reason: str, detail: str, started: float) -> TokenUnavailable:
        now = self.settings.clock()
        self.failures += 1
        delay = backoff(self.failures, self.settings.rng)
        self.not_before = now + delay
        self.last_error = reason
        self._report(reason, now - started, None)
        log.warning("token refresh failed", extra={"credential": self.label, "reason": reason, "detail": detail,
                                                   "attempt": self.failures, "retry_in_s": round(delay, 3)})
        tok = self.token
        if self.keep_fresh or (tok is not None and now < tok.usable_until and self.used):
            self._arm(self.not_before)
        return self._unavailable(now, reason)

    def _unavailable(self, now: float, reason: str | None = None) -> TokenUnavailable:
        reason = reason or self.last_error or "backoff"
        return TokenUnavailable(f"no valid token ({reason})", reason=f"token_{reason}",
                                retry_after=max(1, math.ceil(self.not_before - now)))

    # --- the background timer ------------------------------------------------------------

    def _arm(self, at: float) -> None:
        self._cancel_timer()
        if self._closed or math.isinf(at):
            return
        delay = max(0.0, at - self.settings.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._task is not None:
            return
        now = self.settings.clock()
        tok = self.token
        wanted = self.keep_fresh or (tok is not None and self.used and now < tok.usable_until)
        if not wanted:
            return  # idle: let it lapse; the next request obtains a new one
        if now < self.not_before:
            self._arm(self.not_before)
        elif tok is None or now >= self.refresh_at:
            self._start()
        else:
            self._arm(self.refresh_at)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def start(self) -> None:
        """Prefetch: obtain now, in the background."""
        if self._task is None and self.token is None:
            self._start()

    async def close(self) -> None:
        self._closed = True
        self._cancel_timer()
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, CredentialUnavailable):
                pass


def _consume(task: asyncio.Task) -> None:
    """Background refreshes nobody awaited: their failure is already logged."""
    if not task.cancelled():
        task.exception()
