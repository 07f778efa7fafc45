"""A connection reuses the decoding of its last plain head for a head whose fields are the same bytes
(``HTTPConnection.on_headers_complete``): what a request made so carries must be what the same head on a
fresh connection gives, whatever came before it on the connection (the same fields, or ones that differ in
a byte, a case, a repeat, a framing or shape field)."""

from __future__ import annotations

import asyncio

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.server.connection import ConnectionContext, HTTPConnection
from tests.helpers import StandInTransport

_NAMES = st.sampled_from(["Host", "host", "HOST", "Authorization", "authorization", "Accept", "X-A", "x-a",
                          "Upgrade", "Connection", "Content-Length", "X-HTTP-Method-Override", "Caf\xe9"])
_VALUES = st.sampled_from(["a", "A", "a ", "127.0.0.1:8080", "Bearer t0k", "Bearer t0K", "", "0", "3", "h2c",
                           "keep-alive", "close", "caf\xe9", "x" * 30])
_HEADS = st.lists(st.tuples(_NAMES, _VALUES), max_size=5)


def _wire(head: list[tuple[str, str]]) -> bytes:
    body = b"abc" if any(n.lower() == "content-length" and v == "3" for n, v in head) else b""
    return b"GET /x HTTP/1.1\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in head) + b"\r\n" + body


def _seen(request) -> tuple:
    return (request.plain_head, request.raw_headers, list(request.headers.items()),
            None if request.first is None else dict(request.first), request.content_length, request.chunked,
            request.keep_alive)


async def _served(*wires: bytes) -> list[tuple]:
    """What the requests in ``wires`` carry, sent one after the other on one connection."""
    seen = []

    def handler(request, response):
        seen.append(_seen(request))
        response.send_now(200, [], (b"",))
        response.complete()

    conn = HTTPConnection(ConnectionContext("test", handler))
    conn.connection_made(StandInTransport())
    for wire in wires:
        conn.data_received(wire)
    conn.connection_lost(None)
    return seen


@settings(max_examples=300, deadline=None)
@given(st.lists(_HEADS, min_size=1, max_size=3), _HEADS)
def test_a_head_after_others_carries_what_it_carries_on_a_fresh_connection(before, head):
    before = before + [before[0]]  # the same fields twice in a row, at least once
    runner = asyncio.Runner()
    try:
        alone = runner.run(_served(_wire(head)))
        after = runner.run(_served(*map(_wire, before), _wire(head)))
        again = runner.run(_served(_wire(before[0])))
    finally:
        runner.close()
    # Each served: none refused by the parser (an answer of the connection's own) or closing the connection.
    assume(alone and len(after) == len(before) + 1)
    assert after[-1] == alone[0]
    assert after[0] == after[len(before) - 1] == again[0]  # the repeat is served as its first was


def test_the_same_fields_again_are_served_from_the_last_decoding():
    head = [("Host", "a"), ("Authorization", "Bearer t0k")]
    seen = asyncio.run(_served(_wire(head), _wire(head), _wire([("Host", "a"), ("Authorization", "Bearer t0K")])))
    assert seen[0] == seen[1] and seen[0][0]  # plain, and the same
    assert seen[2][3] == {"host": "a", "authorization": "Bearer t0K"}  # one byte differs: decoded anew


def test_a_change_to_one_requests_lookups_does_not_reach_the_next():
    seen = []

    def handler(request, response):
        seen.append(dict(request.first))
        request.first["authorization"] = "changed"
        response.send_now(200, [], (b"",))
        response.complete()

    async def serve():
        conn = HTTPConnection(ConnectionContext("test", handler))
        conn.connection_made(StandInTransport())
        for _ in range(3):
            conn.data_received(_wire([("Host", "a"), ("Authorization", "Bearer t0k")]))
        conn.connection_lost(None)

    asyncio.run(serve())
    assert seen == [{"host": "a", "authorization": "Bearer t0k"}] * 3
