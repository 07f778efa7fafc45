"""The token keeper's decisions, stepped with an injected clock.

Login and renewal are scripted coroutines standing in for Vault here, because
these tests are about *when* the keeper renews, logs in again and backs off; the
real server runs the same keeper in test_store_vault.py and test_vault_proxy.py
(revoked token, 5 s TTL AppRole tokens over 30 s).
"""

from __future__ import annotations

import pytest

from proxy.store.secret import Secret
from proxy.errors import LoginRefused, VaultUnavailable
from proxy.store.vault_auth import Login
from proxy.store.vault_token import Backoff, TokenKeeper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeVault:
    """Issues tokens; a renewal grants the increment asked for, capped by the token's max TTL.
    Each call takes ``latency`` on the clock, and Vault handles it halfway through."""

    def __init__(self, clock: Clock, ttl: float = 30.0, max_ttl: float = 100.0, latency: float = 0.0) -> None:
        self.clock, self.ttl, self.max_ttl, self.latency = clock, ttl, max_ttl, latency
        self.calls: list[str] = []
        self.issued: dict[str, float] = {}
        self.expires: dict[str, float] = {}  # when Vault stops accepting each token
        self.fail_login: Exception | None = None
        self.fail_renew: Exception | None = None

    async def login(self) -> Login:
        self.calls.append("login")
        if self.fail_login:
            raise self.fail_login
        self.clock.now += self.latency / 2
        token = f"tok-{len(self.issued) + 1}"
        self.issued[token] = self.expires[token] = self.clock.now
        self.expires[token] += self.ttl
        self.clock.now += self.latency / 2
        return Login(Secret(token), self.ttl, True)

    async def renew(self, token: Secret, increment: float) -> Login:
        self.calls.append("renew")
        if self.fail_renew:
            raise self.fail_renew
        self.clock.now += self.latency / 2
        left = self.issued[token.reveal()] + self.max_ttl - self.clock.now
        granted = min(increment, left)
        self.expires[token.reveal()] = self.clock.now + granted
        self.clock.now += self.latency / 2
        return Login(token, granted, True)


def keeper_for(vault: FakeVault, clock: Clock, rand=lambda: 0.0) -> TokenKeeper:
    return TokenKeeper(vault.login, vault.renew, clock=clock, backoff=Backoff(rand=rand))


async def test_renews_at_two_thirds_of_the_ttl_and_logs_in_again_a_third_of_the_ttl_before_the_max_ttl():
    clock = Clock()
    vault = FakeVault(clock, ttl=30, max_ttl=100)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    assert keeper.token == Secret("tok-1")
    schedule = []
    for _ in range(8):
        delay = await keeper.step()
        schedule.append((round(clock.now - 1000, 1), vault.calls[-1], keeper.token.reveal(), round(delay, 1)))
        clock.now += delay
    assert schedule[0] == (0.0, "login", "tok-1", 20.0)  # first step: nothing due until 2/3 of 30 s
    assert schedule[1:6] == [
        (20.0, "renew", "tok-1", 20.0),
        (40.0, "renew", "tok-1", 20.0),
        (60.0, "renew", "tok-1", 20.0),
        (80.0, "renew", "tok-1", 10.0),  # Vault granted 20 s, not 30: the max TTL is near
        (90.0, "login", "tok-2", 20.0),  # so log in again instead of renewing, 10 s before tok-1 ends
    ]
    assert schedule[6] == (110.0, "renew", "tok-2", 20.0)


async def test_short_lived_tokens_are_renewed_and_replaced_at_least_2s_before_vault_expires_them():
    """5 s TTL, 12 s max TTL (the 30 s proxy test's tokens): two thirds of 5 s would leave 1.7 s,
    and two thirds of a renewal capped to 2 s only 0.7 s, too little on a busy machine."""
    clock = Clock()
    vault = FakeVault(clock, ttl=5, max_ttl=12)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    schedule = []
    for _ in range(6):
        delay = await keeper.step()
        token = keeper.token.reveal()
        assert keeper.refresh_at <= vault.expires[token] - 2.0  # the next move leaves 2 s, always
        schedule.append((round(clock.now - 1000, 1), vault.calls[-1], token, round(delay, 1)))
        clock.now += delay
    assert schedule == [
        (0.0, "login", "tok-1", 3.0),
        (3.0, "renew", "tok-1", 3.0),
        (6.0, "renew", "tok-1", 3.0),
        (9.0, "renew", "tok-1", 1.0),  # capped at the max TTL (3 s left): log in again 2 s before it
        (10.0, "login", "tok-2", 3.0),
        (13.0, "renew", "tok-2", 3.0),
    ]


async def test_a_slow_answer_does_not_make_the_keeper_trust_a_token_longer_than_vault_does():
    """Each call takes 1.5 s (a loaded machine): Vault starts the TTL while the answer is still
    on its way, so the TTL is counted from when the request was sent."""
    clock = Clock()
    vault = FakeVault(clock, ttl=5, max_ttl=12, latency=1.5)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    for _ in range(8):
        token = keeper.token.reveal()
        assert keeper.expires_at <= vault.expires[token]
        assert keeper.refresh_at <= vault.expires[token] - 2.0
        clock.now += await keeper.step()
    assert vault.calls.count("login") >= 2 and vault.calls.count("renew") >= 3


async def test_a_token_too_short_lived_for_the_margin_is_renewed_at_half_its_ttl():
    clock = Clock()
    vault = FakeVault(clock, ttl=2, max_ttl=100)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    assert await keeper.step() == 1.0  # a third of 2 s would leave less than 2 s; 2 s would be at once
    clock.now += 1.0
    assert await keeper.step() == 1.0 and vault.calls == ["login", "renew"]


async def test_failed_renewal_logs_in_again_at_once():
    clock = Clock()
    vault = FakeVault(clock)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    clock.now += 20
    vault.fail_renew = VaultUnavailable("vault renewal: vault answered 503")
    assert await keeper.step() == 20.0
    assert vault.calls == ["login", "renew", "login"] and keeper.token == Secret("tok-2")


async def test_failed_logins_back_off_from_1s_to_5min_with_jitter_and_keep_the_valid_token():
    clock = Clock()
    vault = FakeVault(clock, ttl=3600, max_ttl=3600)
    rand = iter([0.0, 1.0, 0.5] + [0.0] * 20)
    keeper = keeper_for(vault, clock, rand=lambda: next(rand))
    await keeper.first_login()
    clock.now += 2400  # renewal due, but Vault is down
    vault.fail_renew = vault.fail_login = VaultUnavailable("vault is unreachable")
    delays = []
    for _ in range(12):
        delays.append(await keeper.step())
        assert keeper.token == Secret("tok-1")  # still valid: keeps being used
        clock.now += 0.001
    assert delays[:3] == [1.0, 2.5, 4 * 1.125]  # 1, 2, 4 s stretched by up to a quarter
    assert delays[3:9] == [8, 16, 32, 64, 128, 256]
    assert delays[9:] == [300, 300, 300]  # capped at 5 min


async def test_expired_token_is_dropped_and_login_retried_with_backoff():
    clock = Clock()
    vault = FakeVault(clock, ttl=10, max_ttl=10)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    vault.fail_renew = vault.fail_login = VaultUnavailable("vault is unreachable")
    clock.now += 11
    assert keeper.token is None  # never used past its TTL
    assert await keeper.step() == 1.0
    vault.fail_login = None
    assert await keeper.step() is not None and keeper.token == Secret("tok-2")


async def test_invalidated_token_triggers_an_immediate_login_unless_it_keeps_happening():
    clock = Clock()
    vault = FakeVault(clock)
    keeper = keeper_for(vault, clock)
    await keeper.first_login()
    keeper.invalidate(Secret("tok-unrelated"))  # not the current token: ignored
    assert keeper.token == Secret("tok-1")
    clock.now += 15
    keeper.invalidate(Secret("tok-1"))
    assert keeper.token is None
    await keeper.step()
    assert vault.calls == ["login", "login"] and keeper.token == Secret("tok-2")
    # refused again right after logging in: wait (backoff) before the next login
    keeper.invalidate(Secret("tok-2"))
    assert await keeper.step() == 1.0 and vault.calls.count("login") == 2
    await keeper.step()
    assert vault.calls.count("login") == 3


async def test_non_expiring_token_needs_no_renewal():
    clock = Clock()

    async def login() -> Login:
        return Login(Secret("root-token"), 0, False)

    keeper = TokenKeeper(login, None, clock=clock)
    await keeper.first_login()
    assert await keeper.step() is None
    clock.now += 10**7
    assert keeper.token == Secret("root-token")


async def test_refused_first_login_raises_for_startup():
    async def login() -> Login:
        raise LoginRefused("vault approle login refused (HTTP 400)")

    with pytest.raises(LoginRefused):
        await TokenKeeper(login, None).first_login()


async def test_close_always_stops_the_keeper_even_when_a_call_completes_as_it_is_cancelled():
    """Python 3.11's wait_for could swallow a cancellation that arrives as a pool call finishes,
    leaving a keeper looping for ever after close(). Logins here fail at once on a real thread
    pool, and close() lands at random moments."""
    import asyncio
    import random

    from proxy.store.vault_client import VaultClients

    clients = VaultClients("http://127.0.0.1:1", namespace=None, ca_file=None, timeout=1)

    def refused():
        raise VaultUnavailable("vault is unreachable")

    async def login() -> Login:
        return await clients.run("vault token login", refused)

    rng = random.Random(7)
    try:
        for _ in range(200):
            keeper = TokenKeeper(login, None, backoff=Backoff(base=0.0001, cap=0.0001))
            keeper.start()
            await asyncio.sleep(rng.random() * 0.003)
            async with asyncio.timeout(5):
                await keeper.close()
    finally:
        clients.close()
