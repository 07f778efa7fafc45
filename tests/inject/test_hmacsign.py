"""``hmac``: a configured canonical string, HMAC-signed, into configured headers.

Signatures are checked against RFC 4231's published HMAC values, and through
credproxy by recomputing them at a real upstream from the request as it arrived."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.config import models as config_mod
from proxy.inject.hmacsign import HmacInjector
from proxy.upstream.outbound import Outbound
from proxy.store.secret import Secret
from tests._signing_harness import CALLER, assert_nowhere, json_logs, signing_proxy  # noqa: F401

KEY = b"exchange-signing-key-\x00\x01\xfe-CANARY"
KEY_B64 = base64.b64encode(KEY).decode()
NOW = 1_700_000_000.25


def auth_model(**kw):
    doc = {"type": "hmac", "secret": "apis/x#key", "canonical": "{method}", **kw}
    cfg = config_mod.parse(json.dumps({"credentials": {"x": {"upstream": "https://api.example", "auth": doc}}}))
    return cfg.credentials["x"].auth


@pytest.mark.parametrize("algorithm,encoding,expected", [
    ("sha256", "hex", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    ("sha512", "hex", "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65"
                      "f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"),
    ("sha256", "base64", base64.b64encode(bytes.fromhex(
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")).decode()),
])
def test_rfc4231_test_case_2(algorithm, encoding, expected):
    auth = auth_model(canonical="what do ya want for nothing?", algorithm=algorithm, encoding=encoding,
                      headers={"X-Signature": "v1={signature}"})
    out = Outbound("GET", URL("https://api.example"), "/", "", CIMultiDict({"X-Signature": "caller's"}))
    HmacInjector(auth).inject(out, {"secret": Secret("Jefe")})
    assert out.headers.getall("X-Signature") == [f"v1={expected}"]


def test_timestamp_formats_and_literal_braces():
    auth = auth_model(canonical="{{{timestamp}}}", timestamp_format="iso8601",
                      headers={"X-Sig": "{signature}", "X-Ts": "{timestamp}", "X-Key": "id={key_id}"}, key_id="k1")
    out = Outbound("GET", URL("https://api.example"), "/", "")
    HmacInjector(auth, clock=lambda: NOW).inject(out, {"secret": Secret("k")})
    assert out.headers["X-Ts"] == "2023-11-14T22:13:20Z"
    assert out.headers["X-Key"] == "id=k1"
    assert out.headers["X-Sig"] == hmac.new(b"k", b"{2023-11-14T22:13:20Z}", hashlib.sha256).hexdigest()


@pytest.mark.parametrize("bad,where", [
    ({"canonical": "{method}{secret}"}, "canonical"),
    ({"canonical": "{method"}, "canonical"),
    ({"headers": {"X-Ts": "{timestamp}"}}, "headers"),
    ({"headers": {}}, "headers"),
    ({"algorithm": "md5"}, "algorithm"),
    ({"secret": "not-a-reference"}, "secret"),
])
def test_config_problems(bad, where):
    with pytest.raises(config_mod.ConfigInvalid) as err:
        auth_model(**bad)
    assert [p.path for p in err.value.problems] == [f"credentials.x.auth.{where}"]


def exchange_credential(upstream_url: str, **session) -> dict:
    """An exchange-style API: base64 key; HMAC of timestamp + method + path?query + body, base64."""
    return {
        "upstream": upstream_url + "/api", "allow_insecure_upstream": True,
        "auth": {"type": "hmac", "secret": "exchange/api#key", "key_encoding": "base64", "key_id": "key-42",
                 "canonical": "{timestamp}{method}{path_query}{body}", "encoding": "base64",
                 "headers": {"CB-ACCESS-SIGN": "{signature}", "CB-ACCESS-TIMESTAMP": "{timestamp}",
                             "CB-ACCESS-KEY": "{key_id}"}},
        "session": session, "allow": [{"callers": [CALLER], "paths": ["/**"]}],
    }


async def test_signed_through_credproxy_and_verified_at_the_upstream(signing_proxy, upstream, json_logs):
    async def leak(request, body):
        from aiohttp import web
        return web.Response(text="key was " + KEY_B64)

    upstream.routes["/api/echo"] = leak
    running = await signing_proxy({"ex": exchange_credential(upstream.url)}, {"exchange/api#key": KEY_B64})
    async with aiohttp.ClientSession() as http:
        headers = {**running.caller_headers, "CB-ACCESS-SIGN": "forged", "CB-ACCESS-TIMESTAMP": "1"}
        async with http.post(f"{running.url}/ex/orders?product=BTC-USD", data=b'{"size":"1"}', headers=headers) as r:
            assert r.status == 200
        async with http.get(f"{running.url}/ex/echo", headers=running.caller_headers) as r:
            echoed = await r.text()
    seen = upstream.seen[0]
    ts = seen.headers["CB-ACCESS-TIMESTAMP"]
    assert seen.path_qs == "/api/orders?product=BTC-USD" and seen.body == b'{"size":"1"}'
    expected = base64.b64encode(hmac.new(KEY, f"{ts}POST{seen.path_qs}".encode() + seen.body,
                                         hashlib.sha256).digest()).decode()
    assert seen.headers.getall("CB-ACCESS-SIGN") == [expected]
    assert seen.headers["CB-ACCESS-KEY"] == "key-42" and ts.isdigit() and ts != "1"
    assert echoed == "key was [REDACTED]"
    await assert_nowhere(running, KEY_B64, json_logs.getvalue(), echoed)


async def test_streamed_body_cannot_be_signed_413_unless_the_body_is_not_signed(signing_proxy, upstream):
    no_body = exchange_credential(upstream.url, replay_max_body="1KiB")
    no_body["auth"] = {**no_body["auth"], "canonical": "{timestamp}{method}{path_query}"}
    running = await signing_proxy({"ex": exchange_credential(upstream.url, replay_max_body="1KiB"),
                                   "nobody": no_body}, {"exchange/api#key": KEY_B64})
    big = b"x" * 4096
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{running.url}/ex/upload", data=big, headers=running.caller_headers) as r:
            assert (r.status, (await r.json())["error"]) == (413, "too_large")
        assert upstream.seen == []
        async with http.post(f"{running.url}/nobody/upload", data=big, headers=running.caller_headers) as r:
            assert r.status == 200
    assert upstream.seen[0].body == big and "CB-ACCESS-SIGN" in upstream.seen[0].headers


async def test_key_that_is_not_base64_answers_503(signing_proxy, upstream):
    running = await signing_proxy({"ex": exchange_credential(upstream.url)}, {"exchange/api#key": "not base64 !"})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{running.url}/ex/x", headers=running.caller_headers) as r:
            assert (r.status, (await r.json())["error"]) == (503, "credential_unavailable")
    assert upstream.seen == []
