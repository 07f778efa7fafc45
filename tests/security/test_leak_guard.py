"""The leak guard: every injected secret is found raw, percent-encoded, JSON-escaped
and base64-encoded, across chunk boundaries, and replaced (``redact``) or refused
(``block``) before the caller sees it."""

from __future__ import annotations

import base64
import gzip
import json
import re
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from proxy.redact.leak_guard import REDACTED, LeakGuard

from .harness import CALLER_TOKEN, CANARY, assert_clean

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}


def encodings(secret: str) -> dict[str, bytes]:
    raw = secret.encode()
    return {
        "raw": raw,
        "percent": quote(secret, safe="").encode(),
        "percent-lower-hex": re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe="")).encode(),
        "percent-keep-slash": quote(secret).encode(),
        "form": quote_plus(secret, safe="").encode(),
        "json": json.dumps(secret)[1:-1].encode(),
        "json-ascii-escaped-slash": json.dumps(secret).replace("/", "\\/")[1:-1].encode(),
        "base64": base64.b64encode(raw),
        "base64-urlsafe": base64.urlsafe_b64encode(raw),
        "base64-unpadded": base64.b64encode(raw).rstrip(b"="),
    }


SECRETS = [CANARY, "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "pässwörd/€😀+ok", "a\"quote\\and\ttab"]


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("form", list(encodings(CANARY)))
def test_every_form_is_redacted(secret, form):
    guard = LeakGuard([secret])
    encoded = encodings(secret)[form]
    out, n = guard.redact(b"before " + encoded + b" after")
    assert n >= 1 and REDACTED in out
    assert encoded not in out and secret.encode() not in out


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"xyz"])
def test_base64_inside_a_longer_encoded_text(prefix):
    """``Basic base64(user:password)``: the password sits at any byte alignment."""
    guard = LeakGuard([CANARY])
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        out, n = guard.redact(enc(prefix + CANARY.encode() + b"!tail"))
        assert n == 1, (prefix, enc)


def test_split_at_every_boundary_gives_the_one_shot_answer():
    guard = LeakGuard([CANARY])
    body = b"".join(b"<" + f + b">" for f in encodings(CANARY).values())
    whole, _ = guard.redact(body)
    for cut in range(1, len(body)):
        s = guard.stream()
        assert b"".join((s.feed(body[:cut]), s.feed(body[cut:]), s.flush())) == whole, cut
    s = guard.stream()
    assert b"".join(s.feed(body[i : i + 1]) for i in range(len(body))) + s.flush() == whole


def test_short_values_are_not_patterns():
    """A 3-character value would redact ordinary text everywhere; no real secret is that short."""
    assert not LeakGuard(["abc"]).active


async def test_echoing_upstream_returns_redacted(proxy, upstream):
    """An httpbin-like ``/anything`` echo: the injected header comes back as [REDACTED]."""
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/demo/anything/echo?q=1", headers=AUTH, data=b"hello") as r:
            assert r.status == 200
            raw = await r.read()
    echoed = json.loads(raw)
    assert echoed["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert echoed["data"] == "hello" and echoed["url"] == "/anything/echo?q=1"
    assert_clean(raw)
    assert upstream.seen[0].header("Authorization") == f"Bearer {CANARY}"  # it was injected


async def test_every_encoding_in_small_writes_is_redacted(proxy):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/forms", headers=AUTH) as r:
            body = await r.read()
    assert_clean(body)
    assert body.count(REDACTED) == 6  # a base64 form may keep a last character that holds 6 bits of padding
    metrics = await _metrics(proxy)
    assert 'credproxy_leaks_redacted_total{credential="demo"} 6.0' in metrics


async def test_block_answers_502_for_a_leak_in_the_first_mebibyte(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"leak_guard": "block"})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/anything/x", headers=AUTH) as r:
            assert r.status == 502
            body = await r.read()
    assert json.loads(body)["error"] == "upstream_error"
    assert_clean(body)
    assert proxy.audit()[0]["reason"] == "leak_blocked"


async def test_block_aborts_a_late_leak(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"leak_guard": "block"})
    received = b""
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(proxy.url + f"/demo/late?n={2 << 20}", headers=AUTH) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    received += chunk
    assert_clean(received)
    assert proxy.audit()[0]["reason"] == "leak_blocked"


async def test_block_scans_compressed_bodies(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"leak_guard": "block"})
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/demo/gzip", headers=AUTH) as r:
            assert r.status == 502
            assert_clean(await r.read())
    assert proxy.audit()[0]["reason"] == "leak_blocked"


async def test_with_the_guard_on_upstreams_are_asked_for_uncompressed_answers_so_echoes_are_redacted(proxy):
    """A caller asking for gzip would otherwise get a compressed echo the guard cannot read."""
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/demo/negotiated", headers={**AUTH, "Accept-Encoding": "gzip, br"}) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            raw = await r.read()
    assert_clean(raw)
    echoed = json.loads(raw)
    assert echoed["headers"]["Accept-Encoding"] == "identity"
    assert echoed["headers"]["Authorization"] == "Bearer " + REDACTED.decode()


async def test_with_the_guard_off_the_callers_accept_encoding_is_forwarded(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"credentials": {"demo": {"leak_guard": "off"}}})
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/demo/negotiated", headers={**AUTH, "Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert json.loads(gzip.decompress(await r.read()))["headers"]["Accept-Encoding"] == "gzip"


async def test_redact_decodes_a_compressed_echo_and_redacts_it(proxy):
    """An upstream that compresses although asked for identity (httpbin's ``/gzip``): decoded for the scan,
    sent decoded."""
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/demo/gzip", headers=AUTH) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            data = await r.read()
    assert_clean(data)
    assert json.loads(data)["headers"]["Authorization"] == "Bearer " + REDACTED.decode()


async def test_off_passes_the_echo_unchanged(upstream, make_proxy):
    proxy = await make_proxy(upstream.url, {"credentials": {"demo": {"leak_guard": "off"}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/anything/x", headers=AUTH) as r:
            echoed = await r.json()
    assert echoed["headers"]["Authorization"] == f"Bearer {CANARY}"


async def _metrics(proxy) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/metrics") as r:
            return await r.text()
