"""The hostile-input catalogue, upstream side: answers with bad framing (more, closer to
the client, in ``test_upstream_answers.py``), redirects to other hosts, upstream addresses in denied ranges, and an upstream that is credproxy itself."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.upstream.relay import WHOLE_ANSWER_MAX

from .harness import CALLER_TOKEN, CANARY, RawUpstream, assert_clean, raw_exchange

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}
GET_A = f"GET /demo/anything/a HTTP/1.1\r\nHost: credproxy\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n\r\n".encode()

BAD_ANSWERS = [
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("cl-conflicting", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    ("cl-duplicate", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ("cl-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nabc"),
    ("te-gzip-only", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("te-chunked-twice", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("te-two-headers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("bad-status-code", b"HTTP/1.1 2x0 OK\r\n\r\n"),
    ("not-http", b"hello there\r\n\r\n"),
    ("nul-in-header", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ("cr-in-header", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n"),
    ("bad-chunk-size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("unrequested-101", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw"),
    ("header-too-long", b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 20000 + b"\r\nContent-Length: 0\r\n\r\n"),
    ("closed-without-answer", b""),
    ("te-identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc"),
    ("te-chunked-then-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("lf-only", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("status-line-too-long", b"HTTP/1.1 200 " + b"O" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"),
    ("too-many-headers", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(129))
     + b"Content-Length: 0\r\n\r\n"),
    ("head-too-large", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(40))
     + b"Content-Length: 0\r\n\r\n"),
    ("1xx-flood", b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("garbage-status", b"ICY 200 OK\r\n\r\n"),
]


@pytest.mark.parametrize("mode", ["redact", "block"])
@pytest.mark.parametrize("answer", [a for _, a in BAD_ANSWERS], ids=[n for n, _ in BAD_ANSWERS])
async def test_bad_upstream_framing_is_a_502(answer, mode, make_proxy):
    bad = await RawUpstream(answer).start()
    try:
        proxy = await make_proxy(bad.url, {"leak_guard": mode})
        resp = await raw_exchange(proxy.port, GET_A)
        assert resp.status == 502, resp.raw[:200]
        assert resp.json()["error"] == "upstream_error"
        assert bad.requests >= 1  # aiohttp retries an idempotent request once when the server just hung up
        [line] = proxy.audit()
        assert (line["status"], line["outcome"]) == (502, "error")
    finally:
        await bad.close()


@pytest.mark.parametrize("length", [100, 100_000, WHOLE_ANSWER_MAX + 1])
async def test_truncated_upstream_body_is_never_passed_off_as_complete(make_proxy, length):
    """An answer up to 1 MiB (read whole before anything is sent) becomes a 502; a streamed one is cut off."""
    bad = await RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nonly-this" % length).start()
    try:
        proxy = await make_proxy(bad.url)
        async with aiohttp.ClientSession() as s:
            if length <= WHOLE_ANSWER_MAX:
                async with s.get(proxy.url + "/demo/anything/a", headers=AUTH) as r:
                    assert r.status == 502 and (await r.json())["error"] == "upstream_error"
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with s.get(proxy.url + "/demo/anything/a", headers=AUTH) as r:
                        await r.read()
        [line] = proxy.audit()
        assert (line["outcome"], line["reason"]) == ("error", "upstream_body_failed")
    finally:
        await bad.close()


async def test_redirect_to_another_host_is_passed_back_unfollowed_and_scanned(proxy, upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/redirect", headers=AUTH, allow_redirects=False) as r:
            assert r.status == 302
            location = r.headers["Location"]
    assert location.startswith("https://elsewhere.example/cb?token=")
    assert "[REDACTED]" in location
    assert_clean(location)
    assert [s.path for s in upstream.seen] == ["/redirect"]


async def test_secret_in_reason_phrase_and_header_name_is_redacted(proxy, upstream):
    resp = await raw_exchange(proxy.port, f"GET /demo/reason HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n"
                                          "Connection: close\r\n\r\n".encode())
    assert resp.status == 200
    assert_clean(resp.raw)
    assert b"[REDACTED]" in resp.raw.split(b"\r\n")[0]
    assert not any(k.startswith("x-echo-") for k in resp.headers)


async def test_block_mode_refuses_a_leaking_head(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"leak_guard": "block"})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/redirect", headers=AUTH, allow_redirects=False) as r:
            assert r.status == 502
            assert (await r.json())["error"] == "upstream_error"
    assert proxy.audit()[0]["reason"] == "leak_blocked"


DENIED = [
    ("metadata", "http://169.254.169.254/latest", {}),
    ("metadata-v4-mapped", "http://[::ffff:169.254.169.254]/latest", {}),
    ("metadata-nat64", "http://[64:ff9b::a9fe:a9fe]/latest", {}),
    ("link-local-v6", "http://[fe80::1]/x", {}),
    ("unspecified", "http://0.0.0.0:9/x", {}),
    ("private-when-denied", "http://10.1.2.3/x", {"server": {"deny_private_upstreams": True}}),
    ("cgnat-when-denied", "http://100.64.0.1/x", {"server": {"deny_private_upstreams": True}}),
    ("operator-range", "http://192.0.2.10/x", {"server": {"deny_upstream_networks": ["192.0.2.0/24"]}}),
]


@pytest.mark.parametrize("url,extra", [d[1:] for d in DENIED], ids=[d[0] for d in DENIED])
async def test_upstream_in_a_denied_range_is_never_connected(url, extra, make_proxy):
    proxy = await make_proxy(url, extra)
    resp = await raw_exchange(proxy.port, GET_A)
    assert resp.status == 502 and resp.json()["error"] == "upstream_error"
    assert proxy.audit()[0]["reason"] == "upstream_address_denied"


async def test_a_name_is_checked_after_resolution(upstream, make_proxy):
    """``localhost`` resolves to loopback; with loopback denied the listening upstream gets nothing."""
    url = f"http://localhost:{upstream.port}"
    proxy = await make_proxy(url, {"server": {"deny_upstream_networks": ["127.0.0.0/8", "::1/128"]}})
    resp = await raw_exchange(proxy.port, GET_A)
    assert resp.status == 502
    assert proxy.audit()[0]["reason"] == "upstream_address_denied"
    assert upstream.seen == []


async def test_loopback_upstreams_stay_allowed(proxy, upstream):
    resp = await raw_exchange(proxy.port, GET_A)
    assert resp.status == 200 and [s.path for s in upstream.seen] == ["/anything/a"]


@pytest.mark.parametrize("which", ["{proxy}", "{admin}"])
async def test_an_upstream_that_is_credproxy_itself_is_refused(which, make_proxy):
    proxy = await make_proxy(which)
    resp = await raw_exchange(proxy.port, GET_A)
    assert resp.status == 502
    lines = proxy.audit()
    assert len(lines) == 1, "the request must not have come back in"
    assert lines[0]["reason"] == "upstream_address_denied"
    assert_clean(resp.raw)


async def test_upstream_ok_after_refusals(proxy, upstream):
    """A refused upstream answer leaves the proxy serving normally."""
    resp = await raw_exchange(proxy.port, GET_A)
    assert resp.status == 200
    assert CANARY not in resp.body.decode()



async def test_token_endpoints_are_checked_like_upstreams(upstream):
    """Token endpoints use their own client (``TokenHttp``); it checks addresses the same way."""
    import ipaddress

    from proxy.upstream.address_policy import AddressPolicy
    from proxy.errors import TokenFailure
    from proxy.tokens.http import TokenHttp

    assert TokenHttp().addresses.refusal("169.254.169.254", 80) is not None  # always, without any config
    http = TokenHttp(address_policy=AddressPolicy(deny=[ipaddress.ip_network("127.0.0.0/8")]))
    try:
        with pytest.raises(TokenFailure):
            await http.send("POST", upstream.url + "/oauth/token", headers={}, body=b"grant_type=client_credentials")
    finally:
        await http.close()
    assert upstream.seen == []
