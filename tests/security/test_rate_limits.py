"""Rate limits per caller and per credential: token buckets answering 429 with Retry-After."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.config import models as config_mod
from proxy.config.models import RateLimit
from proxy.errors import RateLimited
from proxy.ratelimit import RateLimiter

from .harness import CALLER_TOKEN, OTHER_TOKEN, sha


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_rps():
    clock = Clock()
    limiter = RateLimiter({"billing": RateLimit(rps=1, burst=2)}, {}, clock=clock)
    limiter.acquire("billing", "demo")
    limiter.acquire("billing", "demo")
    with pytest.raises(RateLimited) as err:
        limiter.acquire("billing", "demo")
    assert err.value.retry_after == 1 and err.value.reason == "rate_limited_caller"
    clock.now += 0.5
    with pytest.raises(RateLimited):
        limiter.acquire("billing", "demo")
    clock.now += 0.5
    limiter.acquire("billing", "demo")
    limiter.acquire("other", "demo")  # no limit for callers without one


def test_retry_after_rounds_up_to_whole_seconds():
    clock = Clock()
    limiter = RateLimiter({}, {"demo": RateLimit(rps=0.25, burst=1)}, clock=clock)
    limiter.acquire("billing", "demo")
    with pytest.raises(RateLimited) as err:
        limiter.acquire("billing", "demo")
    assert err.value.retry_after == 4 and err.value.reason == "rate_limited_credential"
    clock.now += 2.5
    with pytest.raises(RateLimited) as err:
        limiter.acquire("billing", "demo")
    assert err.value.retry_after == 2


def test_a_refused_request_takes_from_neither_bucket():
    clock = Clock()
    limiter = RateLimiter({"billing": RateLimit(rps=1, burst=1)}, {"demo": RateLimit(rps=1, burst=1)}, clock=clock)
    limiter.acquire("other", "demo")  # empties the credential's bucket
    with pytest.raises(RateLimited):
        limiter.acquire("billing", "demo")  # the credential refuses: the caller's token stays
    limiter.acquire("billing", "elsewhere")


def test_a_rebuilt_limiter_keeps_the_buckets_whose_limit_is_unchanged():
    clock = Clock()
    old = RateLimiter({"billing": RateLimit(rps=1, burst=1), "other": RateLimit(rps=1, burst=1)},
                      {"demo": RateLimit(rps=1, burst=1)}, clock=clock)
    old.acquire("billing", "x")
    old.acquire("other", "demo")
    new = RateLimiter({"billing": RateLimit(rps=1, burst=1), "other": RateLimit(rps=1, burst=2)},
                      {"demo": RateLimit(rps=1, burst=1)}, clock=clock, previous=old)
    with pytest.raises(RateLimited):
        new.acquire("billing", "x")  # unchanged: still empty
    with pytest.raises(RateLimited):
        new.acquire("nobody", "demo")
    new.acquire("other", "x")  # changed: starts full
    new.acquire("other", "x")
    with pytest.raises(RateLimited):
        old.acquire("other", "x")  # the old limiter's bucket for "other" is its own (and empty)
    clock.now += 1
    new.acquire("billing", "x")
    with pytest.raises(RateLimited):
        old.acquire("billing", "x")  # until the commit both draw from the one kept bucket


def test_burst_defaults_to_rps_rounded_up():
    clock = Clock()
    limiter = RateLimiter({"billing": RateLimit(rps=2.5)}, {}, clock=clock)
    for _ in range(3):
        limiter.acquire("billing", "demo")
    with pytest.raises(RateLimited):
        limiter.acquire("billing", "demo")


@pytest.mark.parametrize("limit", ["{rps: 0}", "{rps: -1}", "{rps: 1, burst: 0}", "{burst: 3}", "{rps: 1, extra: 2}"])
def test_bad_rate_limits_are_config_problems(limit):
    text = f"callers: {{billing: {{token_sha256: '{'a' * 64}', rate_limit: {limit}}}}}\n"
    with pytest.raises(config_mod.ConfigInvalid) as err:
        config_mod.parse(text)
    assert all(p.path.startswith("callers.billing.rate_limit") for p in err.value.problems)


RULES = {"credentials": {"demo": {"allow": [{"callers": ["billing", "other"], "paths": ["/anything/**"]}]}}}


async def statuses(proxy, token: str, n: int) -> list[tuple[int, str | None]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(proxy.url + "/demo/anything/a", headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json() if r.status == 429 else None
                out.append((r.status, r.headers.get("Retry-After")))
                if body is not None:
                    assert body["error"] == "rate_limited"
    return out


async def test_caller_limit_answers_429_with_retry_after(upstream, make_proxy):
    extra = {**RULES, "callers": {"billing": {"token_sha256": sha(CALLER_TOKEN), "rate_limit": {"rps": 0.1, "burst": 2}},
                                  "other": {"token_sha256": sha(OTHER_TOKEN)}}}
    proxy = await make_proxy(upstream.url, extra)
    assert await statuses(proxy, CALLER_TOKEN, 3) == [(200, None), (200, None), (429, "10")]
    assert await statuses(proxy, OTHER_TOKEN, 3) == [(200, None)] * 3
    assert len(upstream.seen) == 5
    refused = [x for x in proxy.audit() if x["status"] == 429]
    assert [(x["caller"], x["outcome"], x["reason"]) for x in refused] == [("billing", "denied", "rate_limited_caller")]


async def test_credential_limit_is_shared_by_all_callers(upstream, make_proxy):
    extra = merge_rules({"credentials": {"demo": {"rate_limit": {"rps": 0.05, "burst": 2}}}})
    proxy = await make_proxy(upstream.url, extra)
    assert await statuses(proxy, CALLER_TOKEN, 1) == [(200, None)]
    assert await statuses(proxy, OTHER_TOKEN, 2) == [(200, None), (429, "20")]
    assert len(upstream.seen) == 2


def merge_rules(extra: dict) -> dict:
    from .harness import merge

    return merge(RULES, extra)
