"""``UpstreamResponse.forward_headers`` (built in the same pass that reads the framing facts) is what
``strip_hop_by_hop`` makes of the answer's full headers: the fields the caller's answer carries."""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.upstream.answer import UpstreamResponse
from proxy.upstream.hop_by_hop import strip_hop_by_hop

from tests.security.test_upstream_answers import _Wire

_NAMES = st.sampled_from(["X-A", "Close", "Keep-Alive", "keep-alive", "TE", "Trailer", "Upgrade", "Content-Type",
                          "Content-Encoding", "Proxy-Authenticate", "x-b", "Connection", "connection"])
_VALUES = st.sampled_from(["keep-alive", "close", "Keep-Alive", "x-a", "X-A, close", " keep-alive ", "x-b,te",
                           "gzip", "1", ""])


@settings(max_examples=300, deadline=None)
@example([("Connection", "close"), ("Close", "1"), ("X-A", "2")], b"")  # "close" names a field too
@example([("X-A", "1"), ("Connection", "keep-alive"), ("Connection", "x-a")], b"")
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8), st.sampled_from([b"", b"Content-Length: 2\r\n"]))
def test_forward_headers_are_the_stripped_headers(fields, framing):
    head = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in fields)
    loop = asyncio.new_event_loop()
    try:
        answer = UpstreamResponse(_Wire(loop), "GET", 5.0)
        answer.feed(b"HTTP/1.1 200 OK\r\n" + head + framing + b"\r\nok")
        answer.connection_lost()
        loop.run_until_complete(answer.wait_head())
    finally:
        loop.close()
    assert list(answer.forward_headers.items()) == list(strip_hop_by_hop(answer.headers).items())
    assert answer.encoded == ("Content-Encoding" in answer.headers)
