"""``relay.relay_raw`` (the usual answer, relayed as the bytes it came in) writes to the caller byte for byte
what the exact path — ``prepare`` and ``relay_now``, through ``ResponseWriter.send_now`` — writes for the same
answer, or declines (None) and leaves the answer untouched for that path."""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.redact.leak_guard import LeakGuard
from proxy.server.response import ResponseWriter
from proxy.upstream.answer import UpstreamResponse
from proxy.upstream.relay import prepare, relay_now, relay_raw

from tests.security.test_upstream_answers import _Wire

SECRET = "sk_live_relay_raw_9f8e7d"


class _Caller:
    """Stands in for the caller's connection under the writer (a fake: it only records what is written)."""

    def __init__(self, closing: bool) -> None:
        self.closing = closing
        self.written: list[bytes] = []
        self.must_drain = False

    def send(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def send_parts(self, parts) -> None:
        self.written.extend(bytes(p) for p in parts)

    def abort(self) -> None:
        self.written.append(b"<abort>")


class _Request:
    def __init__(self, method: str) -> None:
        self.method = method


class _Trace:
    request_id = "0123456789abcdef0123456789abcdef"
    outcome = "allowed"
    reason = ""


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, n: int = 1) -> None:
        self.n += n


def _answer(loop, wire: bytes, method: str) -> UpstreamResponse:
    answer = UpstreamResponse(_Wire(loop), method, 5.0)
    answer.feed(wire)
    loop.run_until_complete(answer.wait_head())
    return answer


_NAMES = st.sampled_from(["Content-Type", "X-A", "x-request-id", "X-Request-Id", "Date", "Server", "Set-Cookie",
                          "Connection", "Keep-Alive", "Content-Encoding", "Location", "x-b", "Trailer"])
_VALUES = st.sampled_from(["application/json", "keep-alive", "close", "x-a", "1", "", "gzip", "caf\xe9",
                           SECRET, "Bearer " + SECRET, "a, b", "v" * 40])
_BODIES = st.sampled_from([b"", b'{"ok": true}', b"x" * 70000, SECRET.encode(), b"prefix " + SECRET[:8].encode()])


@settings(max_examples=400, deadline=None)
@example([("Content-Type", "application/json")], b'{"ok": true}', "OK", 200, "GET", "redact", False, True)
@example([("X-Request-Id", "up-1"), ("X-A", "1")], b"{}", "OK", 200, "GET", "redact", False, True)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=6), _BODIES,
       st.sampled_from(["OK", "", "Not Found", "caf\xe9", "odd\x7freason"]), st.sampled_from([200, 201, 404, 204, 599]),
       st.sampled_from(["GET", "HEAD", "POST"]), st.sampled_from(["redact", "block", "off"]), st.booleans(),
       st.booleans())
def test_relay_raw_writes_what_the_exact_path_writes(fields, body, reason, status, method, mode, closing, length):
    head = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in fields if n.lower() != "content-length")
    framing = b"Content-Length: %d\r\n" % len(body) if length else b"Transfer-Encoding: chunked\r\n"
    payload = body if length else (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
    wire = b"HTTP/1.1 %d %s\r\n%s%s\r\n%s" % (status, reason.encode(), head, framing, payload)
    if status == 204 or method == "HEAD":
        wire = b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, reason.encode(), head, framing)
    guard = LeakGuard([SECRET])
    loop = asyncio.new_event_loop()
    try:
        try:
            fast, exact = _answer(loop, wire, method), _answer(loop, wire, method)
        except Exception:  # noqa: BLE001 - an answer the client refuses reaches neither path
            return
        fast_out, exact_out = _Caller(closing), _Caller(closing)
        fast_writer = ResponseWriter(fast_out, method, (1, 1), True)
        exact_writer = ResponseWriter(exact_out, method, (1, 1), True)
        sent = relay_raw(_Request(method), fast_writer, fast, guard, mode, _Trace())
        if sent is None:
            assert not fast_out.written and not fast_writer.started  # declined: untouched
            assert fast.peek_whole() == exact.peek_whole() if fast.done else True
            return
        ready = prepare(_Request(method), exact, b"", guard, mode, _Trace(), _Counter())
        assert ready.at_hand  # relay_raw takes only what relay_now would send
        relay_now(exact_writer, exact, ready, guard, mode, _Trace(), _Counter())
    finally:
        loop.close()
    assert b"".join(fast_out.written) == b"".join(exact_out.written)
    assert fast_writer.close == exact_writer.close and fast_writer.finished and exact_writer.finished
