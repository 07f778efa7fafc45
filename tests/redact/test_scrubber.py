"""The log scrubber: bounded (replaced values are forgotten after a grace period), built off the
caller's thread, and fail closed while it builds. Both index engines (hyperscan, pure-Python grams)."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.observe.log_setup import JsonFormatter
from proxy.redact import log_filter
from proxy.redact import value_index
from proxy.redact.leak_guard import LeakGuard
from proxy.redact.scrubber import Scrubber
from proxy.redact import shapes
from proxy.redact.shapes import scrub_shapes

ENGINES = [pytest.param(True, id="hyperscan",
                        marks=pytest.mark.skipif(value_index.hyperscan is None, reason="hyperscan not installed")),
           pytest.param(False, id="grams")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def forms(value: str) -> list[str]:
    """What a log line could carry: raw, percent-encoded, JSON-escaped, base64."""
    return [value, quote(value, safe=""), json.dumps(value)[1:-1], base64.b64encode(value.encode()).decode()]


def clean(out: str, value: str) -> bool:
    return all(f not in out for f in forms(value))


@pytest.fixture(params=ENGINES)
def hs(request) -> bool:
    return request.param


def test_a_replaced_value_is_scrubbed_through_the_grace_period_then_forgotten(hs):
    clock = Clock()
    s = Scrubber(background=False, use_hyperscan=hs, clock=clock, grace=300)
    old, new = "tok-" + secrets.token_urlsafe(20), "tok-" + secrets.token_urlsafe(20)
    s.hold(("token", "github"), old)
    s.rebuild()
    s.hold(("token", "github"), new)
    s.rebuild()
    clock.now += 299
    assert clean(s.scrub(f"in flight with {old}, new {new}"), old)
    assert clean(s.scrub(f"new {new}"), new)
    clock.now += 2
    s.scrub("any line")  # the due expiry is noticed on the next line
    s.rebuild()
    assert s.values == {new}
    assert old in s.scrub(f"stale {old}")  # forgotten: the set stays bounded by its owners
    assert clean(s.scrub(f"current {new}"), new)


def test_refreshing_a_thousand_times_keeps_one_value_per_owner(hs):
    clock = Clock()
    s = Scrubber(background=False, use_hyperscan=hs, clock=clock, grace=60)
    for i in range(1000):
        s.hold(("token", "t"), f"access-token-number-{i:04d}")
        clock.now += 1
    s.scrub("x" * 10)
    s.rebuild()
    assert len(s.values) <= 61


def test_a_value_two_owners_hold_stays_while_one_still_holds_it(hs):
    clock = Clock()
    s = Scrubber(background=False, use_hyperscan=hs, clock=clock, grace=10)
    shared = secrets.token_hex(16)
    s.hold(("secret", "apis/a#key"), shared)
    s.hold(("secret", "apis/b#key"), shared)
    s.hold(("secret", "apis/a#key"), secrets.token_hex(16))
    clock.now += 11
    s.scrub("tick")
    s.rebuild()
    assert shared in s.values and clean(s.scrub(f"v={shared}"), shared)
    s.release(("secret", "apis/b#key"))
    clock.now += 11
    s.scrub("tick")
    s.rebuild()
    assert shared not in s.values


def test_new_values_are_scrubbed_before_the_index_is_built(hs):
    """Fail closed: between ``hold`` and the rebuild, the old index plus the plain check of the new value scrub."""
    s = Scrubber(background=False, use_hyperscan=hs)
    old = "old/" + secrets.token_urlsafe(24)
    s.hold("a", old)
    s.rebuild()
    new = "new+" + secrets.token_urlsafe(24) + "=="
    s.hold("b", new)  # not built yet
    assert s.builds == 1
    for f in forms(new) + forms(old):
        out = s.scrub(f"upstream said {f} twice: {f}.")
        assert clean(out, new) and clean(out, old), out
    s.rebuild()
    mixed = new[:4].replace("+", "%2b") + new[4:]  # a form only the compiled leak-guard regex knows
    assert "[REDACTED]" in s.scrub(f"x {mixed} y") and mixed not in s.scrub(f"x {mixed} y")


def test_a_value_that_cannot_be_compiled_keeps_its_plain_check(hs, monkeypatch):
    s = Scrubber(background=False, use_hyperscan=hs)
    value = secrets.token_hex(12)

    def broken(cls, v):  # fault injection: compiling this value's forms fails
        raise RuntimeError("boom")

    monkeypatch.setattr(value_index.ValueForms, "compile", classmethod(broken))
    s.hold("a", value)
    s.rebuild()
    assert clean(s.scrub(f"v {value}"), value)


def test_background_builds_coalesce_and_cover_every_value(hs):
    s = Scrubber(use_hyperscan=hs)
    values = [secrets.token_urlsafe(18) for _ in range(150)]
    for i, v in enumerate(values):
        s.hold(("token", i), v)
    assert s.settle(30)
    assert s.builds < len(values)
    line = " ".join(values[::7])
    out = s.scrub(line)
    assert all(v not in out for v in values)
    assert s.engine == ("hyperscan" if hs else "grams")


def test_longer_values_go_first_so_a_contained_value_cannot_break_them(hs):
    s = Scrubber(background=False, use_hyperscan=hs)
    inner = secrets.token_hex(8)
    outer = "pre" + inner + "post-" + secrets.token_hex(4)
    s.hold("inner", inner)
    s.hold("outer", outer)
    for built in (False, True):
        if built:
            s.rebuild()
        out = s.scrub(f"a {outer} b {inner} c")
        assert out == "a [REDACTED] b [REDACTED] c", out


def test_values_without_literal_runs_still_match(hs):
    s = Scrubber(background=False, use_hyperscan=hs)
    s.hold("odd", "a-b-c-d-e")  # no three literal bytes in a row: its regex runs on every line
    s.rebuild()
    assert s.scrub("x a%2Db-c-d-e y") == "x [REDACTED] y"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcXYZ019-_+/= %", min_size=4, max_size=12), min_size=1, max_size=6),
       st.lists(st.sampled_from(["", " ", "ab", "%2F", "\\/", "Bearer ", "\"", "+"]), max_size=5), st.booleans())
@example(values=["0001", "1111"], glue=[], hs=False)  # overlapping occurrences: once left "000" readable
@example(values=["0001", "1111"], glue=[], hs=True)
def test_same_result_as_one_leak_guard_over_all_values(values, glue, hs):
    """Whatever the values and their order of registration: the same output as the old one-regex scrubber
    where no value is contained in another (otherwise this one redacts at least as much)."""
    if hs and value_index.hyperscan is None:
        hs = False
    s = Scrubber(background=False, use_hyperscan=hs)
    for i, v in enumerate(values):
        s.hold(i, v)
    s.rebuild()
    text = "".join(g + v for g, v in zip(glue + [""] * len(values), values, strict=False)) + "".join(glue)
    old, _ = LeakGuard(values).redact_text(text)
    new = s.scrub(text)
    live = [v for v in values if len(v) >= 4]
    if not any(a != b and a in b for a in live for b in live):
        assert new == scrub_shapes(old)
    for v in live:
        assert v not in new


def test_a_field_named_for_a_secret_is_redacted_in_the_json_line():
    s = Scrubber(background=False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(log_filter.ScrubFilter(s))
    record = logging.LogRecord("credproxy.x", logging.INFO, __file__, 1, "answer", (), None)
    record.client_secret = "never-registered-value-42"
    record.access_token = 12345678
    record.secret_path = "apis/demo"
    handler.handle(record)
    line = json.loads(stream.getvalue())
    assert line["client_secret"] == "[REDACTED]" and line["access_token"] == "[REDACTED]"
    assert line["secret_path"] == "apis/demo"


def test_keyword_prefilter_finds_overlapping_words():
    assert scrub_shapes("basicookie: sid-0123456789") == "basicookie: [REDACTED]"
    assert scrub_shapes("apasswd-token=hunter2hunter2") == "apasswd-token=[REDACTED]"
    words = sorted({w for _, _, ws in shapes._RULES for w in ws})
    assert not [(a, b) for a in words for b in words if a != b and b.startswith(a)]


@given(st.text(alphabet="abcdeiknoprstwy_0D:= \"'-ABKE", max_size=40))
def test_prefiltered_shapes_equal_running_every_rule(text):
    every = text
    for rule, replacement, _ in shapes._RULES:
        every = rule.sub(replacement, every)
    assert scrub_shapes(text) == every


def test_every_held_value_is_scrubbed_at_every_moment_while_the_builder_runs(hs):
    """Fail closed under concurrency: owners replace their values (grace 0: the old ones go at once) while the
    background thread rebuilds; after each ``hold`` every value held at that moment is scrubbed."""
    s = Scrubber(use_hyperscan=hs, grace=0)
    held: dict[int, str] = {}
    for i in range(400):
        owner = i % 60
        held[owner] = f"v{i}-" + secrets.token_urlsafe(12)
        s.hold(owner, held[owner])
        line = " | ".join(held.values())
        out = s.scrub(line)
        assert not [v for v in held.values() if v in out], i
    assert s.settle(30)
    assert s.values == frozenset(held.values())


def test_a_pem_private_key_never_registered_is_redacted_whole_escaped_or_cut_off():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()
    for pem in (pkcs8, sec1):
        body = pem.splitlines()[2]
        for line in (f"loading {pem} failed", f"key={pem!r} rejected", json.dumps({"msg": pem}),
                     "cut: " + pem[: len(pem) // 2]):
            out = scrub_shapes(line)
            assert "[REDACTED]" in out and body not in out and "PRIVATE KEY" not in out, out
    assert scrub_shapes("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----") == \
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"  # public, left alone
