"""The proxy's own Vault token, kept alive by one loop (Vault Agent's auth handler
and lifetime watcher in one owner).

After a login the token is renewed at two thirds of its TTL, but never later than
2 s before it expires. When renewal fails, or Vault caps the renewal because the
token's max TTL is near, or the token is not renewable, the keeper logs in again,
that same margin before the old token runs out: the new token is there before the
old one stops working, even on a slow machine. TTLs are counted from when the
request was sent, so the keeper never believes in a token longer than Vault does.
Failed logins back off with jitter from 1 s to 5 min; a still-valid token keeps
being used meanwhile. When Vault says the token itself is no longer valid, the
store calls ``invalidate`` and the keeper logs in again at once (unless that keeps
happening, then it backs off too).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from proxy.errors import SecretBackendError, StoreError
from proxy.store.secret import Secret
from proxy.store.vault_auth import Login
from proxy.tasks import stop_task

log = logging.getLogger("credproxy.vault")

RENEW_AT = 2 / 3
MIN_MARGIN = 2.0  # seconds left on a token when it is renewed or replaced, at least (TTLs under 4 s: half the TTL)
CAP_TOLERANCE = 0.9  # a renewal granting less than this share of the login TTL means the max TTL is near
FLAP_WINDOW = 10.0  # an invalidation this soon after a login does not earn an immediate retry


class Backoff:
    """1 s doubling to 5 min, each delay stretched by up to a quarter at random."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, rand: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.rand, self._n = base, cap, rand, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self._n)
        self._n = min(self._n + 1, 32)
        return min(self.cap, delay * (1 + 0.25 * self.rand()))

    def reset(self) -> None:
        self._n = 0


class TokenKeeper:
    def __init__(self, login: Callable[[], Awaitable[Login]], renew: Callable[[Secret, float], Awaitable[Login]],
                 *, clock: Callable[[], float] = time.monotonic,
                 backoff: Backoff | None = None) -> None:
        self._login_fn = login
        self._renew_fn = renew
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._current: Login | None = None
        self._issued_at = 0.0  # when the login or renewal that set the TTL was sent (keeper's clock)
        self._login_ttl = 0.0  # the TTL a fresh login grants: the increment asked for on renewal
        self._renew_next = False
        self._logged_in_at = float("-inf")
        self._flap_backoff = Backoff(rand=self._backoff.rand)
        self._hold = 0.0
        self._closing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- what the store asks ------------------------------------------------------

    @property
    def token(self) -> Secret | None:
        """The current token, or None while there is no valid one."""
        cur = self._current
        if cur is None or (cur.ttl and self._clock() >= self._issued_at + cur.ttl):
            return None
        return cur.token

    @property
    def expires_at(self) -> float | None:
        """When (on the keeper's clock) the current token stops being used; None: no token, or no TTL."""
        cur = self._current
        return self._issued_at + cur.ttl if cur is not None and cur.ttl else None

    @property
    def refresh_at(self) -> float | None:
        """When (on the keeper's clock) the current token is renewed or replaced; None: never."""
        expires = self.expires_at
        return None if expires is None else expires - _margin(self._login_ttl or self._current.ttl)

    def invalidate(self, used: Secret) -> None:
        """Vault rejected ``used`` as a token; log in again (only if it is still the current one)."""
        cur = self._current
        if cur is None or cur.token != used:
            return
        log.warning("vault no longer accepts credproxy's token; logging in again")
        if self._clock() - self._logged_in_at < FLAP_WINDOW:
            self._hold = self._flap_backoff.next()  # refused right after a login: do not hammer Vault
        else:
            self._flap_backoff.reset()
        self._drop()
        self._wake.set()

    # --- lifecycle ----------------------------------------------------------------

    async def first_login(self) -> None:
        """One attempt, for start-up: raises LoginRefused (bad credentials) or VaultUnavailable."""
        sent = self._clock()
        self._use(await self._login_fn(), sent, fresh=True)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vault-token-keeper")

    async def close(self) -> None:
        self._closing = True  # the loop also stops by itself, should a cancellation get lost
        self._wake.set()
        await stop_task(self._task)
        self._task = None
        self._drop()

    async def _run(self) -> None:
        while not self._closing:
            self._wake.clear()  # before the work: a wake-up that arrives during it is not lost
            try:
                delay = await self.step()
            except Exception:  # the keeper must outlive any surprise; the next round retries
                log.exception("vault token keeper failed")
                delay = self._backoff.next()
            await self._sleep(delay)

    async def _sleep(self, delay: float | None) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def step(self) -> float | None:
        """Do whatever is due now; return how long until the next thing is due (None: nothing is)."""
        if self.token is None and self._current is not None:
            log.warning("credproxy's vault token expired before it could be renewed")
            self._drop()
        now = self._clock()
        if self._current is None:
            if self._hold:
                hold, self._hold = self._hold, 0.0
                return hold
            return await self._relogin()
        due = self.refresh_at
        if due is None:
            return None
        if now < due:
            return due - now
        if not self._renew_next:
            return await self._relogin()
        sent = self._clock()
        try:
            renewed = await self._renew_fn(self._current.token, self._login_ttl)
        except SecretBackendError as exc:
            log.info("vault token renewal failed; logging in again", extra={"error": exc.detail})
            return await self._relogin()
        self._use(renewed, sent, fresh=False)
        return self._until_due()

    async def _relogin(self) -> float | None:
        sent = self._clock()
        try:
            login = await self._login_fn()
        except (StoreError, SecretBackendError) as exc:
            delay = self._backoff.next()
            log.warning("vault login failed; retrying", extra={"error": str(exc), "retry_in_s": round(delay, 1)})
            return delay
        self._use(login, sent, fresh=True)
        return self._until_due()

    def _use(self, login: Login, sent: float, *, fresh: bool) -> None:
        # Vault starts the TTL when it handles the request, after it was sent: counting from the
        # send time keeps our expiry no later than Vault's, however late the answer reached us.
        self._issued_at = sent
        if fresh:
            self._login_ttl = login.ttl
            self._logged_in_at = self._issued_at
            self._backoff.reset()
            log.info("logged in to vault", extra={"ttl_s": login.ttl, "renewable": login.renewable})
        self._renew_next = login.renewable and login.ttl >= CAP_TOLERANCE * self._login_ttl
        if not fresh and not self._renew_next:
            log.info("vault token near its max TTL; will log in again", extra={"ttl_s": login.ttl})
        elif not fresh:
            log.debug("vault token renewed", extra={"ttl_s": login.ttl})
        self._current = login

    def _drop(self) -> None:
        self._current = None

    def _until_due(self) -> float | None:
        due = self.refresh_at
        return None if due is None else max(0.0, due - self._clock())


def _margin(login_ttl: float) -> float:
    """How long before expiry to renew or log in again: a third of the TTL a login grants
    (scaled by the login's TTL, not a capped renewal's, so it does not shrink near the max TTL),
    at least MIN_MARGIN for a slow Vault or a busy machine, at most half the TTL so a very
    short-lived token is not renewed non-stop."""
    return min(max(login_ttl * (1 - RENEW_AT), MIN_MARGIN), login_ttl / 2)
