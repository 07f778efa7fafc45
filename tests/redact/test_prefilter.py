"""The leak guard's literal prefilter must never let a secret through: whatever it skips,
the full regex would not have matched either."""

from __future__ import annotations

import base64
import copy
import re
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.redact import prefilter as needles_module
from proxy.redact.leak_guard import REDACTED, LeakGuard
from proxy.redact.prefilter import NeedleSet, may_match, needles

# Both ways of checking the needles, on every buffer size: hyperscan (the ``fast`` extra) and ``bytes in``.
ENGINES = [pytest.param("hyperscan", marks=pytest.mark.skipif(needles_module.hyperscan is None,
                                                               reason="hyperscan not installed")),
           "bytes.find"]

SECRET = "sk_live_CANARY_b7e1f0c93d2a"


def redact_stream(guard: LeakGuard, body: bytes, cuts: list[int]) -> tuple[bytes, int]:
    r = guard.stream()
    out, pos = [], 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        out.append(r.feed(body[pos:cut]))
        pos = cut
    out.append(r.flush())
    return b"".join(out), r.count


def with_engine(guard: LeakGuard, engine: str) -> LeakGuard:
    """The same guard checking its needles with ``engine`` on buffers of any length."""
    forced = copy.copy(guard)
    if guard._needles is not None:
        forced._needles = NeedleSet(guard._needles.needles, use_hyperscan=engine == "hyperscan", hyperscan_min=0)
        assert forced._needles.engine == engine
    return forced


def without_prefilter(guard: LeakGuard) -> LeakGuard:
    """The same guard with the prefilter switched off: the regex decides every buffer."""
    plain = copy.copy(guard)
    plain._needles = None
    return plain


@pytest.mark.parametrize("engine", ENGINES)
def test_every_form_of_a_secret_contains_one_of_its_needles(engine):
    guard = with_engine(LeakGuard([SECRET]), engine)
    assert guard._needles
    for form in ("raw", "quoted", "b64", "b64url", "b64-shift1", "b64-shift2"):
        assert guard.may_match(b"..." + encode(SECRET, form) + b"..."), form
        assert guard.may_match(encode(SECRET, form)), form  # the whole buffer, no neighbours
    assert not guard.may_match(b'{"id": "cus_123", "note": "nothing to see"}')


@pytest.mark.skipif(needles_module.hyperscan is None, reason="hyperscan not installed")
def test_long_buffers_use_hyperscan_and_find_needles_at_both_ends_and_across_chunks():
    guard = LeakGuard([SECRET])
    assert guard._needles.engine == "hyperscan"
    filler = b'{"id": "cus_0123456789abcdef", "email": "user1@example.com"},' * 2000  # ~120 KiB of JSON
    raw = SECRET.encode()
    assert not guard.may_match(filler)
    for body in (raw + filler, filler + raw, filler[:50_000] + raw + filler[50_000:]):
        assert guard.may_match(body)
        for size in (4096, 65536):  # fed in chunks, the secret may straddle two of them
            out, count = redact_stream(guard, body, list(range(size, len(body), size)))
            assert raw not in out and count == 1 and REDACTED in out


def test_escaped_character_patterns_yield_their_longest_literal_run():
    """A guard that matches escaped forms per character still has a run every match contains."""
    pattern = re.compile(rb"sk(?:_|%5[fF])live(?:_|%5[fF])CANARY(?:_|%5[fF])b7e1f0c93d2a|c2tfbGl2ZV9D")
    assert set(needles(pattern)) == {b"b7e1f0c93d2a", b"c2tfbGl2ZV9D"}
    for hit in (b"xx sk%5flive_CANARY%5Fb7e1f0c93d2a yy", b"...c2tfbGl2ZV9D..."):
        assert pattern.search(hit) and may_match(needles(pattern), hit)


def test_patterns_without_a_usable_literal_are_not_prefiltered():
    assert needles(re.compile(rb"a(?:_|%5F)b|xyz")) is None  # the first alternative has no 3-byte literal
    assert needles(re.compile(rb"abcdef", re.IGNORECASE)) is None
    assert needles(None) is None


def test_redundant_needles_are_dropped():
    assert needles(re.compile(rb"abcdef|xxabcdefyy|zzz")) == (b"zzz", b"abcdef")


def test_clean_chunks_pass_through_unchanged_and_held_back_tail_still_catches_a_split_secret():
    guard = LeakGuard([SECRET])
    r = guard.stream()
    body = b'{"a":"' + SECRET.encode() + b'"}'
    split = 10
    out = b"".join((r.feed(body[:split]), r.feed(body[split:]), r.flush()))
    assert out == b'{"a":"' + REDACTED + b'"}' and r.count == 1


forms = st.sampled_from(["raw", "quoted", "b64", "b64url", "b64-shift1", "b64-shift2"])

# A secret, filler bytes, where (and in which form) the secret is inserted, and where the body is cut into chunks.
bodies_with_secrets = given(
    secret=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=8, max_size=40),
    filler=st.binary(max_size=300), inserts=st.lists(st.tuples(st.integers(0, 300), forms), max_size=4),
    cuts=st.lists(st.integers(0, 2000), max_size=6))


def engines() -> tuple[str, ...]:
    """The prefilter engines this machine has."""
    return ("hyperscan", "bytes.find") if needles_module.hyperscan is not None else ("bytes.find",)


def encode(secret: str, form: str) -> bytes:
    raw = secret.encode()
    return {
        "raw": raw,
        "quoted": quote(secret, safe="").encode(),
        "b64": base64.b64encode(raw),
        "b64url": base64.urlsafe_b64encode(raw),
        "b64-shift1": base64.b64encode(b"x" + raw),
        "b64-shift2": base64.b64encode(b"xy" + raw),
    }[form]


@settings(max_examples=300, deadline=None)
@bodies_with_secrets
def test_prefiltered_stream_redacts_exactly_as_the_regex_alone(secret, filler, inserts, cuts):
    for engine in engines():
        _same_as_the_regex_alone(with_engine(LeakGuard([secret]), engine), secret, filler, inserts, cuts)


def with_inserts(filler: bytes, secret: str, inserts) -> bytes:
    """``filler`` with ``secret`` inserted in each (position, form) of ``inserts``, one after another."""
    body = filler
    for at, form in inserts:
        at %= len(body) + 1
        body = body[:at] + encode(secret, form) + body[at:]
    return body


def _same_as_the_regex_alone(guard, secret, filler, inserts, cuts):
    body = with_inserts(filler, secret, inserts)
    fast = redact_stream(guard, body, cuts)
    slow = redact_stream(without_prefilter(guard), body, cuts)
    assert fast == slow
    assert guard.redact(body) == without_prefilter(guard).redact(body)
    if inserts:
        assert secret.encode() not in fast[0]


def redact_held(guard: LeakGuard, body: bytes, cuts: list[int]) -> tuple[bytes, int, int]:
    """``feed_held`` over ``body`` cut at ``cuts``: the redacted body, the count, and how many pieces it took."""
    r, pieces, pos = guard.stream(), [], 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        r.feed_held(pieces, body[pos:cut])
        pos = cut
    pieces.append(r.flush())
    return b"".join(pieces), r.count, len([p for p in pieces if p])


@settings(max_examples=300, deadline=None)
@bodies_with_secrets
def test_held_body_is_redacted_exactly_as_the_whole_body_at_once(secret, filler, inserts, cuts):
    for engine in engines():
        guard = with_engine(LeakGuard([secret]), engine)
        body = with_inserts(filler, secret, inserts)
        out, count, _ = redact_held(guard, body, cuts)
        assert (out, count) == guard.redact(body) == without_prefilter(guard).redact(body)


def test_a_clean_held_body_stays_in_the_chunks_it_came_in_and_a_split_secret_is_still_caught():
    guard = LeakGuard([SECRET])
    filler = b'{"id": "cus_0123456789abcdef", "email": "user1@example.com"},' * 100
    cuts = list(range(1000, len(filler), 1000))
    assert redact_held(guard, filler, cuts) == (filler, 0, len(cuts) + 1)
    raw = SECRET.encode()
    body = filler[:2990] + raw + filler[2990:]  # across the cut at 3000
    out, count, _ = redact_held(guard, body, cuts)
    assert out == filler[:2990] + REDACTED + filler[2990:] and count == 1


@pytest.mark.parametrize("at", ["start", "middle", "end"])
def test_what_was_fed_and_the_undecided_tail_count_every_echo_before_anything_is_decided(at):
    """Under block, the first MiB of a streamed answer is judged by ``count + tail_count`` after one feed."""
    guard = LeakGuard([SECRET])
    filler = b'{"id": "cus_0123456789abcdef"},' * 200
    raw = SECRET.encode()
    body = {"start": raw + filler, "middle": filler[:3000] + raw + filler[3000:], "end": filler + raw}[at]
    r = guard.stream()
    r.feed(body)
    assert r.count + r.tail_count() == 1 == guard.redact(body)[1]
    clean = guard.stream()
    clean.feed(filler)
    assert clean.count + clean.tail_count() == 0
