"""Rate limits per caller and per credential: token buckets, answered with 429.

A request takes one token from its caller's bucket and one from its
credential's bucket (where configured), both or neither: a request refused by
one bucket does not drain the other. Buckets refill continuously at ``rps``
up to ``burst``. ``Retry-After`` is the whole seconds until both buckets have
a token again. Checked after policy, so denied requests do not use up a
caller's budget (they are counted by the misuse alerts instead).

A reload builds a new limiter (``from_config(cfg, previous=...)``) that takes
over the bucket objects of every caller and credential whose limit is
unchanged, so a reload never refills a bucket; a changed limit starts full.
Until the new State is committed both limiters draw from the same buckets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from proxy.config.models import RateLimit
from proxy.errors import RateLimited


class TokenBucket:
    def __init__(self, rps: float, burst: int, now: float) -> None:
        self.rps = rps
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    @property
    def limit(self) -> tuple[float, float]:
        return (self.rps, self.burst)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: one is available now)."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rps)
        self._stamp = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rps

    def take(self) -> None:
        self._tokens -= 1


def _bucket(limit: RateLimit, now: float) -> TokenBucket:
    return TokenBucket(limit.rps, limit.burst or max(1, math.ceil(limit.rps)), now)


def _buckets(limits: Mapping[str, RateLimit], before: Mapping[str, TokenBucket], now: float) -> dict[str, TokenBucket]:
    out = {}
    for name, limit in limits.items():
        fresh = _bucket(limit, now)
        kept = before.get(name)
        out[name] = kept if kept is not None and kept.limit == fresh.limit else fresh
    return out


class RateLimiter:
    def __init__(self, callers: Mapping[str, RateLimit], credentials: Mapping[str, RateLimit], *,
                 clock: Callable[[], float] = time.monotonic, previous: "RateLimiter | None" = None) -> None:
        self._clock = clock
        now = clock()
        self._callers = _buckets(callers, previous._callers if previous else {}, now)
        self._credentials = _buckets(credentials, previous._credentials if previous else {}, now)

    @classmethod
    def from_config(cls, cfg, *, clock: Callable[[], float] = time.monotonic,
                    previous: "RateLimiter | None" = None) -> "RateLimiter | None":
        """None when no caller or credential sets a limit: the request path then skips the step."""
        callers = {n: c.rate_limit for n, c in (cfg.callers or {}).items() if c.rate_limit}
        credentials = {n: c.rate_limit for n, c in cfg.credentials.items() if c.rate_limit}
        if not callers and not credentials:
            return None
        return cls(callers, credentials, clock=clock, previous=previous)

    def acquire(self, caller: str, credential: str) -> None:
        by_caller, by_credential = self._callers.get(caller), self._credentials.get(credential)
        if by_caller is None and by_credential is None:
            return
        now = self._clock()
        # The longer wait names the limit (the credential's on a tie); no lists built per request.
        wait, kind = max((by_caller.wait(now) if by_caller is not None else 0.0, "caller"),
                         (by_credential.wait(now) if by_credential is not None else 0.0, "credential"))
        if wait > 0:
            raise RateLimited(f"{kind} rate limit", reason=f"rate_limited_{kind}", retry_after=math.ceil(wait))
        if by_caller is not None:
            by_caller.take()
        if by_credential is not None:
            by_credential.take()
