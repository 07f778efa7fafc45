"""Differential tests: the same generated request bytes go to credproxy's caller-side parser path
(``proxy.server.connection.HTTPConnection`` on a real socket pair) and to h11, the reference.

The verdicts must agree, with one documented direction of difference:

- what credproxy accepts, h11 accepts too, and reads as the same method, target,
  headers (names case-folded, values without surrounding whitespace) and body — so no
  request credproxy forwards can be read differently by a conforming HTTP/1.1 peer;
- what h11 refuses, credproxy refuses;
- credproxy refuses more than h11 only for inputs carrying one of ``STRICTER`` — the
  leniencies h11 allows and llhttp in strict mode (rightly, for a security proxy) does
  not: bare-LF line endings, obsolete line folding, a repeated or listed
  ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, methods llhttp
  does not know, and control characters in header values (h11 refuses only NUL, CR
  and LF there).
"""

from __future__ import annotations

import asyncio
import socket
import string

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.server.connection import ConnectionContext, HTTPConnection

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
STRICTER = {"bare_lf", "obs_fold", "cl_repeated", "cl_list", "cl_and_te", "unknown_method", "ctl_in_value"}


def h11_verdict(data: bytes):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    request, body = None, b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return (request.method.decode(), request.target.decode("latin-1"),
                        [(k.lower(), v) for k, v in request.headers.raw_items()], body)
            elif event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return None  # incomplete: refused
    except h11.RemoteProtocolError:
        return None


async def _ours(data: bytes):
    seen = []

    async def handler(request, response) -> None:
        body = b""
        try:
            if request.body is not None:
                while chunk := await request.body.read():
                    body += chunk
        except (ProxyError, ConnectionError):
            await response.send(400, [], b"")
            return
        seen.append((request.method, request.target,
                     [(k.encode("utf-8", "surrogateescape").lower(), v.encode("utf-8", "surrogateescape"))
                      for k, v in request.headers.items()], body))
        await response.send(200, [], b"")

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(lambda: HTTPConnection(ConnectionContext("test", handler)),
                                                      ours)
    try:
        await loop.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            while await loop.sock_recv(theirs, 65536):
                pass
    finally:
        theirs.close()
        transport.close()
    return seen[0] if seen else None


_runner: asyncio.Runner | None = None


def our_verdict(data: bytes):
    global _runner
    if _runner is None:  # one loop for all examples: a loop per example costs more than the exchange
        _runner = asyncio.Runner()
    return _runner.run(_ours(data))


def teardown_module() -> None:
    if _runner is not None:
        _runner.close()


@st.composite
def requests(draw):
    """(bytes, the leniencies the request relies on)."""
    used: set[str] = set()
    version = draw(st.sampled_from(["1.1", "1.0"]))
    method = draw(st.sampled_from(METHODS))
    if draw(st.integers(0, 15)) == 0:
        method = draw(st.text(TCHAR, min_size=1, max_size=8))
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "ACL", "COPY", "LOCK",
                          "MOVE", "BIND", "LINK", "PURGE", "REPORT", "SEARCH", "SOURCE", "UNLINK", "UNLOCK",
                          "MKCOL", "MERGE", "NOTIFY", "QUERY", "REBIND", "TRACE", "CONNECT", "PROPFIND",
                          "PROPPATCH", "SUBSCRIBE", "UNSUBSCRIBE", "CHECKOUT", "MKACTIVITY", "MKCALENDAR",
                          "M-SEARCH", "DESCRIBE", "ANNOUNCE", "SETUP", "PLAY", "PAUSE", "TEARDOWN",
                          "GET_PARAMETER", "SET_PARAMETER", "REDIRECT", "RECORD", "FLUSH", "PRI"):
            used.add("unknown_method")
        if method in ("CONNECT", "PRI"):
            method = "GET"
    target = "/" + draw(st.text(PATH_CHARS, max_size=20))
    if draw(st.booleans()):
        target += "?" + draw(st.text(PATH_CHARS + "?", max_size=12))
    if draw(st.integers(0, 15)) == 0:
        target += draw(st.sampled_from(['"', "{", "}", "|", "\\", "^", "`", "<", ">", "\x7f", "\x01", "#x"]))
    headers = [("Host", "example")] if version == "1.1" else []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.text(TCHAR, min_size=1, max_size=12))
        if name.lower() in ("content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"):
            continue
        value = draw(st.text(VCHAR + " \t" + "\xe9", max_size=20))
        headers.append((name, value))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    raw_body = b""
    if framing == "length" or (framing == "none" and body and method in ("POST", "PUT")):
        headers.append(("Content-Length", str(len(body))))
        raw_body = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        cut = draw(st.integers(0, len(body)))
        for part in (body[:cut], body[cut:]):
            if part:
                raw_body += b"%x\r\n" % len(part) + part + b"\r\n"
        raw_body += b"0\r\n\r\n"
    mutation = draw(st.sampled_from(["none"] * 6 + ["ctl_in_value", "space_before_colon", "obs_fold", "bare_lf",
                                                    "cl_repeated", "cl_list", "cl_and_te", "bad_chunk",
                                                    "short_body", "empty_name", "space_in_name"]))
    lines = [f"{method} {target} HTTP/{version}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    eol = "\r\n"
    if mutation == "ctl_in_value":
        ctl = draw(st.sampled_from(["\x00", "\r", "\x01", "\x7f", "\x1b"]))
        lines.append("X-Ctl: a" + ctl + "b")
        if ctl not in "\x00\r":
            used.add("ctl_in_value")
    elif mutation == "space_before_colon":
        lines.append("X-Sp : a")
    elif mutation == "obs_fold":
        lines += ["X-Fold: a", " folded"]
        used.add("obs_fold")
    elif mutation == "bare_lf":
        eol = "\n"
        used.add("bare_lf")
    elif mutation == "cl_repeated" and framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        used.add("cl_repeated")
    elif mutation == "cl_list" and framing == "length":
        lines[-1] = f"Content-Length: {len(body)}, {len(body)}"
        used.add("cl_list")
    elif mutation == "cl_and_te" and framing == "chunked":
        lines.append("Content-Length: 3")
        used.add("cl_and_te")
    elif mutation == "bad_chunk" and framing == "chunked":
        raw_body = b"zz\r\n" + raw_body
    elif mutation == "short_body" and framing == "length" and body:
        raw_body = raw_body[:-1]
    elif mutation == "empty_name":
        lines.append(": v")
    elif mutation == "space_in_name":
        lines.append("X A: v")
    head = eol.join(lines) + eol + eol
    return head.encode("utf-8", "surrogateescape"), used


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_llhttp_and_h11_agree(case):
    data, stricter = case
    ours, reference = our_verdict(data), h11_verdict(data)
    if ours is not None:
        assert reference is not None, f"credproxy accepted what h11 refuses: {data!r}"
        method, target, headers, body = ours
        assert (method, target.encode("utf-8", "surrogateescape"), headers, body) == \
            (reference[0], reference[1].encode("latin-1"), reference[2], reference[3]), data
    elif reference is not None:
        assert stricter & STRICTER, f"credproxy refused what h11 accepts, for no documented reason: {data!r}"


def test_the_differences_are_real():
    """Each documented leniency is one h11 allows and credproxy refuses (so STRICTER lists no accident)."""
    base = "GET /a HTTP/1.1\r\nHost: x\r\n"
    samples = {
        "bare_lf": b"GET /a HTTP/1.1\nHost: x\n\n",
        "obs_fold": (base + "X: a\r\n b\r\n\r\n").encode(),
        "cl_repeated": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
        "cl_list": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na",
        "cl_and_te": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "unknown_method": b"FROB /a HTTP/1.1\r\nHost: x\r\n\r\n",
        "ctl_in_value": (base + "X: a\x01b\r\n\r\n").encode(),
    }
    assert set(samples) == STRICTER
    for name, data in samples.items():
        assert h11_verdict(data) is not None, name
        assert our_verdict(data) is None, name
