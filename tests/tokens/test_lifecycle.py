"""The token lifecycle on its own: windows, single flight, cancellation, backoff, rejection.

These drive ``TokenSlot`` with a scripted provider function and an injected clock and
randomness, because window and backoff boundaries cannot be hit on demand against a
real server without waiting on wall-clock time. The same behaviour end to end, against
the real authorization server, is in test_tokens_concurrency.py and test_tokens_faults.py.
"""

import asyncio
import math

import pytest

from proxy.grant import Grant
from proxy.store.secret import Secret
from proxy.tokens import lifecycle
from proxy.tokens.answer import TokenAnswer
from proxy.errors import TokenFailure
from proxy.errors import TokenUnavailable
from proxy.tokens.lifecycle import Settings, TokenSlot, backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Script:
    """The provider side: each call takes the next outcome (a lifetime, None, or a TokenFailure),
    optionally waiting for ``gate`` first."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        answer = TokenAnswer(Secret(f"token-{self.calls}"), outcome)
        return answer, Grant({"secret": answer.access})


def slot_for(script, clock, *, ttl=3600.0, refresh_before=300.0, rng=0.0, keep_fresh=False):
    return TokenSlot(script, Settings(ttl=ttl, refresh_before=refresh_before, clock=clock, rng=lambda: rng,
                                      keep_fresh=keep_fresh))


def token_of(tok) -> str:
    return tok.grant.values["secret"].reveal()


async def test_cold_start_many_waiters_one_fetch():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    script.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(slot.get()) for _ in range(500)]
    await asyncio.sleep(0)
    script.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert script.calls == 1
    assert {token_of(t) for t in tokens} == {"token-1"}
    await slot.close()


async def test_refresh_window_is_at_most_half_the_lifetime_with_jitter():
    clock = Clock()
    low = slot_for(Script(60.0), clock, refresh_before=300.0, rng=0.0)
    high = slot_for(Script(60.0), clock, refresh_before=300.0, rng=1.0)
    await low.get(), await high.get()
    assert low.refresh_at == pytest.approx(clock.now + 30.0)  # window = min(300, 60/2)
    assert high.refresh_at == pytest.approx(clock.now + 37.5)  # jitter: up to a quarter of the window later
    short = slot_for(Script(3600.0), clock, refresh_before=300.0, rng=0.0)
    await short.get()
    assert short.refresh_at == pytest.approx(clock.now + 3300.0)
    for s in (low, high, short):
        await s.close()


async def test_advisory_window_one_background_refresh_while_the_old_token_serves():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    first = await slot.get()
    clock.now += 3350.0  # inside the refresh window, well before expiry
    script.gate = asyncio.Event()
    during = [await slot.get() for _ in range(20)]  # nobody waits
    assert {token_of(t) for t in during} == {"token-1"}
    await asyncio.sleep(0)
    assert script.calls == 2 and slot.state() == "refreshing"
    script.gate.set()
    await asyncio.sleep(0.01)
    assert token_of(await slot.get()) == "token-2" and script.calls == 2
    assert first is not slot.token
    await slot.close()


async def test_ready_is_what_get_returns_without_waiting():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    assert slot.ready() is None and script.calls == 0  # nothing to hand out: only get() fetches
    first = await slot.get()
    assert slot.ready() is first
    clock.now += 3350.0  # the advisory window: ready() serves the old token and starts the one refresh
    script.gate = asyncio.Event()
    assert [slot.ready() for _ in range(5)] == [first] * 5
    await asyncio.sleep(0)
    assert script.calls == 2 and slot.state() == "refreshing"
    script.gate.set()
    await asyncio.sleep(0.01)
    assert token_of(slot.ready()) == "token-2"
    clock.now += 3600.0  # past its use: nothing without waiting
    assert slot.ready() is None
    await slot.close()


async def test_mandatory_window_everyone_waits_for_one_refresh():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    await slot.get()
    clock.now += 3600.0 - 5.0  # within the last 10 s: treated as expired
    script.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(slot.get()) for _ in range(200)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    script.gate.set()
    assert {token_of(t) for t in await asyncio.gather(*waiters)} == {"token-2"}
    assert script.calls == 2
    await slot.close()


async def test_a_cancelled_waiter_does_not_cancel_the_refresh():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    script.gate = asyncio.Event()
    waiter = asyncio.ensure_future(slot.get())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    script.gate.set()
    await asyncio.sleep(0.01)
    assert slot.token is not None and token_of(await slot.get()) == "token-1"
    assert script.calls == 1
    await slot.close()


async def test_failures_back_off_doubling_to_five_minutes_and_answer_retry_after():
    script, clock = Script(TokenFailure("http_error", "HTTP 503")), Clock()
    slot = slot_for(script, clock, rng=0.5)  # jitter factor 1.0
    delays = []
    for attempt in range(1, 12):
        with pytest.raises(TokenUnavailable) as err:
            await slot.get()
        assert script.calls == attempt
        delays.append(slot.not_before - clock.now)
        assert err.value.retry_after == math.ceil(delays[-1]) and err.value.reason == "token_http_error"
        # Until the backoff has passed, requests are answered without asking the provider.
        clock.now += delays[-1] - 0.5
        with pytest.raises(TokenUnavailable) as err:
            await slot.get()
        assert script.calls == attempt and err.value.retry_after == 1
        clock.now += 0.5
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert slot.state() == "failing" and slot.last_error == "http_error"
    await slot.close()


def test_backoff_jitter_stays_within_a_quarter():
    assert backoff(1, lambda: 0.0) == 0.75 and backoff(1, lambda: 1.0) == 1.25
    assert backoff(3, lambda: 0.0) == 3.0 and backoff(30, lambda: 1.0) == 300.0


async def test_a_failing_background_refresh_does_not_fail_requests_while_the_token_is_valid():
    script, clock = Script(3600.0, TokenFailure("timeout"), TokenFailure("timeout"), 3600.0), Clock()
    slot = slot_for(script, clock)
    await slot.get()
    clock.now += 3400.0
    seen = []
    for _ in range(3):  # each request starts one background attempt: fail, fail, succeed
        seen.append(token_of(await slot.get()))
        await asyncio.sleep(0.01)
        if _ < 2:
            assert slot.state() == "failing" and slot.last_error == "timeout"
        clock.now += 2.5  # past each backoff, still before expiry
    assert seen == ["token-1"] * 3 and script.calls == 4
    assert slot.failures == 0 and token_of(await slot.get()) == "token-4"
    await slot.close()


async def test_reject_many_reports_of_one_token_cause_one_refresh():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    old = (await slot.get()).grant
    clock.now += 60.0
    script.gate = asyncio.Event()
    reports = [asyncio.ensure_future(slot.reject(old)) for _ in range(300)]
    await asyncio.sleep(0)
    script.gate.set()
    assert all(await asyncio.gather(*reports))
    assert script.calls == 2
    assert await slot.reject(old) is True and script.calls == 2  # a late report of the old token
    await slot.close()


async def test_a_token_refused_again_and_again_backs_off_instead_of_storming():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock, rng=0.5)
    assert await slot.reject((await slot.get()).grant) is True  # first refusal: refresh at once
    assert script.calls == 2
    assert await slot.reject((await slot.get()).grant) is False  # refused again within seconds
    assert script.calls == 2
    with pytest.raises(TokenUnavailable) as err:
        await slot.get()
    assert err.value.retry_after == 1 and err.value.reason == "token_upstream_refused"
    clock.now += 1.0
    assert await slot.reject((await slot.get()).grant) is False and script.calls == 3
    assert slot.not_before - clock.now == 2.0  # doubling
    clock.now += 60.0
    await slot.get()  # token-4 lives a while before it is refused: counts as a fresh start
    clock.now += 30.0
    assert await slot.reject(slot.token.grant) is True and script.calls == 5
    await slot.close()


async def test_refusals_separated_by_an_ordinary_refresh_are_not_a_row():
    script, clock = Script(3600.0), Clock()
    slot = slot_for(script, clock)
    assert await slot.reject((await slot.get()).grant) is True  # refused at once: token-2
    clock.now += 3600.0  # token-2 lived its life; token-3 comes from an ordinary refresh
    assert token_of(await slot.get()) == "token-3"
    assert await slot.reject(slot.token.grant) is True and script.calls == 4  # no backoff
    await slot.close()


async def test_failed_refresh_after_reject_means_no_replay():
    script, clock = Script(3600.0, TokenFailure("unreachable")), Clock()
    slot = slot_for(script, clock)
    grant = (await slot.get()).grant
    assert await slot.reject(grant) is False
    with pytest.raises(TokenUnavailable):
        await slot.get()
    await slot.close()


async def test_timer_refreshes_a_used_token_in_the_background_and_lets_an_idle_one_lapse():
    """Real loop timers: the token lives 0.4 s and its refresh window is the last 0.2 s."""
    used = Script(0.4)
    slot = slot_for(used, __import__("time").monotonic, refresh_before=0.2)
    await slot.get()
    await slot.get()
    for _ in range(100):
        if used.calls >= 2:
            break
        await asyncio.sleep(0.02)
    assert used.calls == 2  # refreshed without a request waiting for it
    await slot.close()

    idle = Script(0.4)
    slot = slot_for(idle, __import__("time").monotonic, refresh_before=0.2)
    await slot.get()
    slot.used = False  # nobody used it since it was obtained
    await asyncio.sleep(0.5)
    assert idle.calls == 1 and slot.state() == "expired"
    await slot.close()


async def test_keep_fresh_retries_until_it_has_a_token(monkeypatch):
    monkeypatch.setattr(lifecycle, "BACKOFF_BASE", 0.01)
    script = Script(TokenFailure("unreachable"), TokenFailure("unreachable"), 3600.0)
    slot = slot_for(script, __import__("time").monotonic, keep_fresh=True)
    slot.start()
    for _ in range(100):
        if slot.token is not None:
            break
        await asyncio.sleep(0.02)
    assert script.calls == 3 and slot.state() == "fresh"
    await slot.close()


async def test_a_bug_in_the_provider_is_a_failure_not_a_hang():
    script, clock = Script(KeyError("x")), Clock()
    slot = slot_for(script, clock)
    with pytest.raises(TokenUnavailable) as err:
        await slot.get()
    assert err.value.reason == "token_internal"
    await slot.close()
