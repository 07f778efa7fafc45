"""The leak guard's literal prefilter must never let a secret through: whatever it skips,
the full regex would not have matched either."""

from __future__ import annotations

import base64
import copy
import re
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.leakguard import REDACTED, LeakGuard
from proxy.needles import may_match, needles

SECRET = "sk_live_CANARY_b7e1f0c93d2a"


def redact_stream(guard: LeakGuard, body: bytes, cuts: list[int]) -> tuple[bytes, int]:
    r = guard.stream()
    out, pos = [], 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        out.append(r.feed(body[pos:cut]))
        pos = cut
    out.append(r.flush())
    return b"".join(out), r.count


def without_prefilter(guard: LeakGuard) -> LeakGuard:
    """The same guard with the prefilter switched off: the regex decides every buffer."""
    plain = copy.copy(guard)
    plain._needles = None
    return plain


def test_every_form_of_a_secret_contains_one_of_its_needles():
    guard = LeakGuard([SECRET])
    assert guard._needles
    for form in ("raw", "quoted", "b64", "b64url", "b64-shift1", "b64-shift2"):
        assert may_match(guard._needles, b"..." + encode(SECRET, form) + b"..."), form
    assert not may_match(guard._needles, b'{"id": "cus_123", "note": "nothing to see"}')


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
    out = r.feed(body[:split]) + r.feed(body[split:]) + r.flush()
    assert out == b'{"a":"' + REDACTED + b'"}' and r.count == 1


forms = st.sampled_from(["raw", "quoted", "b64", "b64url", "b64-shift1", "b64-shift2"])


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
@given(secret=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=8, max_size=40),
       filler=st.binary(max_size=300), inserts=st.lists(st.tuples(st.integers(0, 300), forms), max_size=4),
       cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_prefiltered_stream_redacts_exactly_as_the_regex_alone(secret, filler, inserts, cuts):
    guard = LeakGuard([secret])
    body = filler
    for at, form in inserts:
        at %= len(body) + 1
        body = body[:at] + encode(secret, form) + body[at:]
    fast = redact_stream(guard, body, cuts)
    slow = redact_stream(without_prefilter(guard), body, cuts)
    assert fast == slow
    assert guard.redact(body) == without_prefilter(guard).redact(body)
    if inserts:
        assert secret.encode() not in fast[0]
