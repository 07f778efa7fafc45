"""One llhttp parser per upstream connection (``answer.Reader``), for one answer after another: each answer on a
reused connection is parsed as a fresh parser would parse it, whatever came before it on that connection (a HEAD
answer that declared a body llhttp never saw, 1xx answers, chunked ones with trailers, a 204)."""

from __future__ import annotations

import pytest

from tests.security.scripted_upstream import ScriptedUpstream, client, fetch, outbound

_BEFORE = {
    "head declaring a body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b""),
    "head, chunked": ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b""),
    "head, length 0": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
    "1xx first": ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
    "chunked with trailers": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\nhi\r\n0\r\nX-Trailer: t\r\n\r\n", b"hi"),
    "204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    "304 declaring a length": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", b""),
}
_NEXT = b"HTTP/1.1 201 Created\r\nX-Next: yes\r\nContent-Length: 4\r\n\r\nnext"


@pytest.mark.parametrize("name", sorted(_BEFORE))
async def test_the_next_answer_on_a_reused_connection_parses_as_on_a_new_one(name):
    method, first, body = _BEFORE[name]
    async with ScriptedUpstream(lambda n, head: first if n == 0 else _NEXT) as up:
        c = client()
        try:
            status, got = await fetch(c, up.url, method)
            assert got == body and status in (200, 204, 304)
            for _ in range(3):
                answer = await c.send(outbound(up.url))
                try:
                    assert (answer.status, answer.headers.get("X-Next"), await answer.read()) == (201, "yes", b"next")
                finally:
                    answer.release()
            assert up.connections == 1  # the same connection (and reader) served every answer
        finally:
            await c.close()
