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


def reference(raw: str) -> str:
    """The byte-by-byte canonicalization ``canonical_path`` replaced with compiled patterns, kept as the
    reference its escapes, refusals and encodings must agree with."""
    data = raw.encode("utf-8", "surrogateescape")
    if not data.startswith(b"/"):
        raise ProxyError("not origin-form")
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x25:
            pair = data[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in routing._HEX for c in pair):
                raise ProxyError("invalid percent-encoding")
            v = int(pair, 16)
            if v in routing._FORBIDDEN_DECODED:
                raise ProxyError("encoded slash")
            out += bytes([v]) if v in routing._UNRESERVED else b"%" + pair.upper()
            i += 3
            continue
        if b == 0x5C or b < 0x21 or b == 0x7F:
            raise ProxyError("backslash")
        out += bytes([b]) if b in routing._KEEP else b"%%%02X" % b
        i += 1
    return full(out.decode("ascii"))  # dot segments: the same code either way


@settings(max_examples=1000, deadline=None)
@given(st.lists(pieces, max_size=25).map(lambda p: "/" + "".join(p)))
def test_pattern_scan_agrees_with_the_byte_by_byte_reference(raw):
    got, want = outcome(full, raw), outcome(reference, raw)
    assert got == want or (isinstance(got, type) and isinstance(want, type)), (raw, got, want)


def prefixed_in_steps(raw: str):
    """``route_prefixed`` without its one-match shortcut: split, canonicalize, then take the name."""
    path, query = routing.split_target(raw)
    name, _, rest = routing.canonical_path(path)[1:].partition("/")
    return routing.Route(name[:64], "/" + rest, query)


queries = st.sampled_from(["", "?", "?a=1", "?a=1&b=%2F", "?x#y", "?\x01", "?\x7f", "?é", "?a b", "??", "?#"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(pieces | st.just("#") | st.just("?"), max_size=25).map(lambda p: "/" + "".join(p)), queries)
def test_prefixed_shortcut_agrees_with_the_steps(raw, query):
    target = raw + query
    assert outcome(routing.route_prefixed, target) == outcome(prefixed_in_steps, target)


@pytest.mark.parametrize("target", ["/bench/v1/small", "/bench", "/bench/", "/a/b?c=d", "/" + "n" * 70 + "/x",
                                    "//x", "/bench/v1/./x", "/bench?q#f"])
def test_prefixed_examples(target):
    assert outcome(routing.route_prefixed, target) == outcome(prefixed_in_steps, target)
