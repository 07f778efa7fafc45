"""The hostile-input catalogue, caller side: raw bytes through a socket to a running
credproxy with a recording upstream behind it.

Every refused case also carries a valid request pipelined behind the hostile
one (``/demo/anything/smuggled``): the upstream must receive nothing at all —
neither the hostile request nor anything a desynchronised parser might make of
the bytes after it.
"""

from __future__ import annotations

import asyncio

import pytest

from .harness import CALLER_TOKEN, OTHER_TOKEN, raw_exchange

AUTH = f"Authorization: Bearer {CALLER_TOKEN}"
HOST = "Host: credproxy"
FOLLOW_UP = f"GET /demo/anything/smuggled HTTP/1.1\r\n{HOST}\r\n{AUTH}\r\n\r\n".encode()


def req(line: str, *headers: str, body: bytes = b"", auth: bool = True) -> bytes:
    hs = [HOST, *( [AUTH] if auth else [] ), *headers] if not line.endswith("HTTP/0.9") else []
    return (line + "\r\n" + "".join(h + "\r\n" for h in hs) + "\r\n").encode() + body


CHUNKED_0 = b"0\r\n\r\n"
BIG = 70 * 1024  # over the harness's max_body of 64 KiB

# (id, raw request, expected status, expected error code)
REFUSED = [
    # request smuggling: framing an upstream could read differently
    ("cl-and-te", req("POST /demo/anything/a HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked", body=CHUNKED_0), 400, "bad_request"),
    ("te-gzip", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: gzip", body=b"abc"), 400, "bad_request"),
    ("te-chunked-twice-in-list", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: chunked, chunked", body=CHUNKED_0), 400, "bad_request"),
    ("te-gzip-then-chunked", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: gzip, chunked", body=CHUNKED_0), 400, "bad_request"),
    ("te-two-headers", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: chunked", "Transfer-Encoding: identity", body=CHUNKED_0), 400, "bad_request"),
    ("te-unknown-coding", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: xchunked", body=CHUNKED_0), 400, "bad_request"),
    ("te-space-before-colon", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding : chunked", body=CHUNKED_0), 400, "bad_request"),
    ("te-in-http10", req("POST /demo/anything/a HTTP/1.0", "Transfer-Encoding: chunked", body=CHUNKED_0), 400, "bad_request"),
    ("cl-duplicate-same", req("POST /demo/anything/a HTTP/1.1", "Content-Length: 3", "Content-Length: 3", body=b"abc"), 400, "bad_request"),
    ("cl-duplicate-different", req("POST /demo/anything/a HTTP/1.1", "Content-Length: 3", "Content-Length: 4", body=b"abcd"), 400, "bad_request"),
    ("cl-list", req("POST /demo/anything/a HTTP/1.1", "Content-Length: 3, 3", body=b"abc"), 400, "bad_request"),
    ("cl-negative", req("POST /demo/anything/a HTTP/1.1", "Content-Length: -3", body=b"abc"), 400, "bad_request"),
    ("cl-plus-sign", req("POST /demo/anything/a HTTP/1.1", "Content-Length: +3", body=b"abc"), 400, "bad_request"),
    ("cl-hex", req("POST /demo/anything/a HTTP/1.1", "Content-Length: 0x3", body=b"abc"), 400, "bad_request"),
    ("chunk-size-not-hex", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"), 400, "bad_request"),
    ("chunk-bare-lf", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: chunked", body=b"3\nabc\n0\n\n"), 400, "bad_request"),
    # CR / LF / NUL / folding in the head
    ("cr-in-header-value", req("GET /demo/anything/a HTTP/1.1", "X-A: a\rb"), 400, "bad_request"),
    ("nul-in-header-value", req("GET /demo/anything/a HTTP/1.1", "X-A: a\x00b"), 400, "bad_request"),
    ("ctl-in-header-value", req("GET /demo/anything/a HTTP/1.1", "X-A: a\x01b"), 400, "bad_request"),
    ("bare-lf-line-endings", f"GET /demo/anything/a HTTP/1.1\n{HOST}\n{AUTH}\n\n".encode(), 400, "bad_request"),
    ("obs-fold", req("GET /demo/anything/a HTTP/1.1", "X-A: a", "  folded"), 400, "bad_request"),
    ("space-in-header-name", req("GET /demo/anything/a HTTP/1.1", "X A: b"), 400, "bad_request"),
    ("duplicate-host", req("GET /demo/anything/a HTTP/1.1", "Host: evil.example"), 400, "bad_request"),
    # request targets and methods a secrets proxy never forwards
    ("absolute-form", req("GET http://evil.example/demo/anything/a HTTP/1.1"), 400, "bad_request"),
    ("absolute-form-own-host", req("GET http://credproxy/demo/anything/a HTTP/1.1"), 400, "bad_request"),
    ("asterisk-form", req("OPTIONS * HTTP/1.1"), 400, "bad_request"),
    ("connect", req("CONNECT evil.example:443 HTTP/1.1"), 400, "bad_request"),
    ("connect-to-credential", req("CONNECT /demo/anything/a HTTP/1.1"), 400, "bad_request"),
    ("trace", req("TRACE /demo/anything/a HTTP/1.1"), 400, "bad_request"),
    ("track", req("TRACK /demo/anything/a HTTP/1.1"), 400, "bad_request"),
    ("http-0.9", b"GET /demo/anything/a\r\n\r\n", 400, "bad_request"),
    ("http-2.0-version", req("GET /demo/anything/a HTTP/2.0"), 400, "bad_request"),
    ("h2-prior-knowledge", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_request"),
    ("bad-method-token", req("G@T /demo/anything/a HTTP/1.1"), 400, "bad_request"),
    # protocol upgrades
    ("upgrade-websocket", req("GET /demo/anything/a HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket",
                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"), 400, "bad_request"),
    ("connection-upgrade-only", req("GET /demo/anything/a HTTP/1.1", "Connection: keep-alive, Upgrade"), 400, "bad_request"),
    ("upgrade-h2c-and-websocket", req("GET /demo/anything/a HTTP/1.1", "Connection: Upgrade", "Upgrade: h2c, websocket"),
     400, "bad_request"),
    ("upgrade-tcp", req("GET /demo/anything/a HTTP/1.1", "Connection: Upgrade", "Upgrade: tcp"), 400, "bad_request"),
    # method override: a caller allowed POST must not make the upstream run DELETE
    ("x-http-method-override", req("POST /demo/anything/a HTTP/1.1", "X-HTTP-Method-Override: DELETE", "Content-Length: 0"), 400, "bad_request"),
    ("x-http-method", req("POST /demo/anything/a HTTP/1.1", "X-HTTP-Method: DELETE", "Content-Length: 0"), 400, "bad_request"),
    ("x-method-override", req("POST /demo/anything/a HTTP/1.1", "X-Method-Override: PUT", "Content-Length: 0"), 400, "bad_request"),
    ("_method-query", req("POST /demo/anything/a?x=1&_method=DELETE HTTP/1.1", "Content-Length: 0"), 400, "bad_request"),
    ("_method-query-encoded", req("POST /demo/anything/a?%5Fmethod=DELETE HTTP/1.1", "Content-Length: 0"), 400, "bad_request"),
    # oversized heads (431) and bodies (413)
    ("header-line-too-long", req("GET /demo/anything/a HTTP/1.1", "X-A: " + "a" * 9000), 431, "too_large"),
    ("too-many-headers", req("GET /demo/anything/a HTTP/1.1", *[f"X-{i}: a" for i in range(120)]), 431, "too_large"),
    ("request-line-too-long", req("GET /demo/anything/" + "a" * 9000 + " HTTP/1.1"), 431, "too_large"),
    ("header-name-too-long", req("GET /demo/anything/a HTTP/1.1", "X-" + "a" * 9000 + ": b"), 431, "too_large"),
    # name and value each under the 8 KiB line limit, the line they make over it
    ("header-line-too-long-together", req("GET /demo/anything/a HTTP/1.1", "X-" + "n" * 5000 + ": " + "v" * 5000), 431,
     "too_large"),
    ("content-length-over-max-body", req("POST /demo/anything/a HTTP/1.1", f"Content-Length: {BIG}", body=b"a" * 1000), 413, "too_large"),
    ("chunked-over-max-body", req("POST /demo/anything/a HTTP/1.1", "Transfer-Encoding: chunked",
                                  body=b"".join(b"2000\r\n" + b"a" * 0x2000 + b"\r\n" for _ in range(9)) + CHUNKED_0), 413, "too_large"),
    # paths: traversal and encoding variants
    ("encoded-slash", req("GET /demo/anything/a%2F..%2F..%2Fadmin HTTP/1.1"), 400, "bad_request"),
    ("encoded-slash-lower", req("GET /demo/anything/a%2f..%2fadmin HTTP/1.1"), 400, "bad_request"),
    ("encoded-backslash", req("GET /demo/anything/a%5C..%5Cadmin HTTP/1.1"), 400, "bad_request"),
    ("raw-backslash", req("GET /demo/anything/a\\..\\admin HTTP/1.1"), 400, "bad_request"),
    ("encoded-nul", req("GET /demo/anything/a%00.json HTTP/1.1"), 400, "bad_request"),
    ("dot-dot-semicolon", req("GET /demo/anything/..;/admin HTTP/1.1"), 400, "bad_request"),
    ("escape-above-root", req("GET /demo/../../etc/passwd HTTP/1.1"), 400, "bad_request"),
    ("bad-percent-escape", req("GET /demo/anything/%zz HTTP/1.1"), 400, "bad_request"),
    ("fragment-in-target", req("GET /demo/anything/a#frag HTTP/1.1"), 400, "bad_request"),
    ("dot-dot-out-of-allowed-prefix", req("GET /demo/anything/../admin HTTP/1.1"), 403, "forbidden"),
    ("encoded-dot-dot-out-of-prefix", req("GET /demo/anything/%2e%2e/admin HTTP/1.1"), 403, "forbidden"),
    ("dot-dot-into-other-credential", req("GET /demo/../other/x HTTP/1.1"), 403, "forbidden"),
    ("double-encoded-dot-dot", req("GET /demo/%252e%252e/admin HTTP/1.1"), 403, "forbidden"),
    ("overlong-utf8-dot", req("GET /demo/%c0%ae%c0%ae/admin HTTP/1.1"), 403, "forbidden"),
    ("credential-name-case", req("GET /DEMO/anything/a HTTP/1.1"), 403, "forbidden"),
    # identity and source spoofing
    ("no-caller-token", req("GET /demo/anything/a HTTP/1.1", auth=False), 401, "unauthenticated"),
    ("caller-token-in-query", req(f"GET /demo/anything/a?access_token={CALLER_TOKEN} HTTP/1.1", auth=False), 401, "unauthenticated"),
    ("other-caller-not-allowed", req("GET /demo/anything/a HTTP/1.1", f"Proxy-Authorization: Bearer {OTHER_TOKEN}", auth=False), 403, "forbidden"),
    ("xff-does-not-unlock-ip-lock", req("GET /demo/v1/locked HTTP/1.1", "X-Forwarded-For: 10.1.2.3", "X-Real-IP: 10.1.2.3",
                                       "Forwarded: for=10.1.2.3"), 403, "forbidden"),
]

# An extra credential whose only rule is locked to 10.0.0.0/8, to show that
# forwarding headers cannot claim an allowed source address.
LOCKED = {"credentials": {"demo": {"allow": [
    {"callers": ["billing"], "paths": ["/anything/**", "/v1/public/**"]},
    {"callers": ["billing"], "paths": ["/v1/locked"], "source_ips": ["10.0.0.0/8"]},
]}}}


@pytest.mark.parametrize("raw,status,code", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_refused_and_nothing_reaches_the_upstream(raw, status, code, upstream, make_proxy):
    proxy = await make_proxy(upstream.url, LOCKED)
    resp = await raw_exchange(proxy.port, raw + FOLLOW_UP)
    assert resp.status == status, resp.raw[:300]
    body = resp.json()
    assert body["error"] == code and body["request_id"] == resp.headers["x-request-id"]
    assert set(body) == {"error", "message", "request_id"}
    await asyncio.sleep(0.05)  # let a (wrongly) forwarded follow-up request arrive
    if status >= 400 and code in ("bad_request", "too_large"):
        # the connection is closed after a malformed request: the follow-up is never read
        assert upstream.seen == [], [s.path for s in upstream.seen]
    else:
        # a denial keeps the connection in sync: only the valid follow-up goes through
        assert [s.path for s in upstream.seen] == ["/anything/smuggled"]
    lines = proxy.audit()
    assert lines and lines[0]["status"] == status and lines[0]["outcome"] in ("denied", "error")


async def test_catalogue_is_large_enough():
    assert len(REFUSED) >= 40


async def test_body_that_looks_like_a_request_stays_a_body(proxy, upstream):
    inner = f"GET /demo/admin HTTP/1.1\r\n{HOST}\r\n{AUTH}\r\n\r\n".encode()
    resp = await raw_exchange(proxy.port, req("POST /demo/anything/a HTTP/1.1", f"Content-Length: {len(inner)}",
                                              "Connection: close", body=inner))
    assert resp.status == 200
    assert [(s.method, s.path, s.body) for s in upstream.seen] == [("POST", "/anything/a", inner)]


async def test_pipelined_requests_are_each_checked(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(req("GET /demo/anything/first HTTP/1.1") + req("GET /demo/admin HTTP/1.1", "Connection: close"))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.count(b"HTTP/1.1 200") == 1 and data.count(b"HTTP/1.1 403") == 1
    assert [s.path for s in upstream.seen] == ["/anything/first"]


async def test_host_and_forwarding_headers_never_reach_the_upstream(proxy, upstream):
    spoofed = ["X-Forwarded-For: 10.9.9.9", "X-Forwarded-Host: evil.example", "X-Forwarded-Proto: https",
               "X-Forwarded-Prefix: /admin", "Forwarded: for=10.9.9.9;host=evil.example", "X-Real-IP: 10.9.9.9",
               "X-Original-URL: /admin", "X-Rewrite-URL: /admin", "True-Client-IP: 10.9.9.9", "X-Request-Id: forged"]
    raw = (f"GET /demo/anything/a HTTP/1.1\r\nHost: evil.example\r\n{AUTH}\r\nConnection: close\r\n"
           + "".join(h + "\r\n" for h in spoofed) + "\r\n").encode()
    resp = await raw_exchange(proxy.port, raw)
    assert resp.status == 200
    [seen] = upstream.seen
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"
    names = {k.lower() for k, _ in seen.headers}
    for h in spoofed:
        name = h.split(":")[0].lower()
        if name == "x-request-id":
            assert seen.header("X-Request-Id") == resp.headers["x-request-id"] != "forged"
        else:
            assert name not in names, name


async def test_ip_lock_per_rule_allows_the_right_source(upstream, make_proxy):
    """The same rule locked to 127.0.0.0/8 lets the loopback caller through."""
    proxy = await make_proxy(upstream.url, {"credentials": {"demo": {"allow": [
        {"callers": ["billing"], "paths": ["/v1/locked"], "source_ips": ["127.0.0.0/8"]}]}}})
    resp = await raw_exchange(proxy.port, req("GET /demo/v1/locked HTTP/1.1", "Connection: close"))
    assert resp.status == 200
    assert [s.path for s in upstream.seen] == ["/v1/locked"]
