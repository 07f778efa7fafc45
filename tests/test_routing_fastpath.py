"""The plain-path shortcut in ``canonical_path`` must agree with the full canonicalization
on every input: same canonical path, or the same refusal."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import routing
from proxy.errors import ProxyError


def full(raw: str):
    saved = routing._PLAIN
    routing._PLAIN = re.compile(r"(?!)")  # never matches: every path takes the full route
    try:
        return routing.canonical_path(raw)
    finally:
        routing._PLAIN = saved


def outcome(fn, raw: str):
    try:
        return fn(raw)
    except ProxyError as exc:
        return type(exc)


pieces = st.sampled_from(["/", ".", "..", "%2F", "%2f", "%41", "%2e", "%2E", "%5C", "%00", "%", "a", "Z", "-", "_",
                          "~", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":", "@", " ", "\\", "\x00",
                          "\x7f", "é", "[", "]", "|", "^", "`", "{", "}", '"', "<", ">"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(pieces, max_size=25).map(lambda p: "/" + "".join(p)))
def test_shortcut_agrees_with_full_canonicalization(raw):
    assert outcome(routing.canonical_path, raw) == outcome(full, raw)


@pytest.mark.parametrize("raw", ["/v1/customers/cus_123", "/", "//a//b/", "/a;b=c/d@e:f", "/x/.well-known"])
def test_plain_paths(raw):
    assert routing.canonical_path(raw) == full(raw)
