"""aws_sigv4 signing: the signer as plain data, and through credproxy to a real aiohttp
upstream that verifies each signature it receives with an independent SigV4
implementation (written from AWS's documented rules, not botocore), over the bytes
that actually arrived."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import os
from urllib.parse import quote, unquote

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.config import models as config_mod
from proxy.inject.sigv4 import SigV4Injector, canonical_query
from proxy.upstream.outbound import Outbound
from proxy.store.secret import Secret
from tests._signing_harness import CALLER, Running, assert_nowhere, json_logs, signing_proxy  # noqa: F401

KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
MATERIAL = {"access_key_id": Secret(KEY_ID), "secret_access_key": Secret(SECRET)}
AUG_30_2015 = calendar.timegm((2015, 8, 30, 12, 36, 0))


def outbound(method="GET", path="/", query="", headers=None, body=None, base="https://example.amazonaws.com"):
    return Outbound(method, URL(base), path, query, CIMultiDict(headers or {}), body)


def test_matches_the_signature_published_by_aws():
    """AWS's worked example (IAM ListUsers, 2015-08-30): the signature is the documented one."""
    out = outbound(query="Action=ListUsers&Version=2010-05-08", base="https://iam.amazonaws.com",
                   headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Injector("us-east-1", "iam", clock=lambda: AUG_30_2015).inject(out, MATERIAL)
    assert out.headers["X-Amz-Date"] == "20150830T123600Z"
    assert out.headers["Host"] == "iam.amazonaws.com"
    assert out.headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")


async def _stream():
    yield b"chunk"


@pytest.mark.parametrize("service,body,expected", [
    ("s3", b"hello", hashlib.sha256(b"hello").hexdigest()),
    ("s3", None, hashlib.sha256(b"").hexdigest()),
    ("s3", "stream", "UNSIGNED-PAYLOAD"),
    ("execute-api", "stream", "UNSIGNED-PAYLOAD"),
    ("execute-api", b"hello", None),  # non-S3 services hash the body into the signature without the header
])
def test_payload_hash_header(service, body, expected):
    out = outbound("PUT", "/k", body=_stream() if body == "stream" else body)
    SigV4Injector("eu-west-1", service).inject(out, MATERIAL)
    assert out.headers.get("X-Amz-Content-SHA256") == expected
    signed = out.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert ("x-amz-content-sha256" in signed) == (expected is not None)


def test_caller_signature_material_is_removed_and_content_headers_kept():
    out = outbound("PUT", "/b/k", "X-Amz-Signature=abc&x-amz-credential=AKIAFAKE&versionId=3&X-Amz-Date=1", headers={
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAFAKE/x, Signature=00", "X-Amz-Date": "19990101T000000Z",
        "X-Amz-Security-Token": "caller-token", "X-Amz-Content-SHA256": "0" * 64, "Date": "Fri, 01 Jan 1999",
        "X-Amz-Meta-Owner": "billing", "Content-Type": "text/plain"}, body=b"x")
    SigV4Injector("us-east-1", "s3", clock=lambda: AUG_30_2015).inject(out, MATERIAL)
    assert out.query == "versionId=3"
    assert "Date" not in out.headers and "X-Amz-Security-Token" not in out.headers
    assert out.headers.getall("Authorization") == [out.headers["Authorization"]]
    assert out.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/s3/")
    assert out.headers["X-Amz-Date"] == "20150830T123600Z"
    assert out.headers["X-Amz-Content-SHA256"] == hashlib.sha256(b"x").hexdigest()
    assert out.headers["X-Amz-Meta-Owner"] == "billing"
    signed = "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-owner,"
    assert signed in out.headers["Authorization"]


def test_session_token_is_sent_and_signed():
    out = outbound()
    SigV4Injector("us-east-1", "sts").inject(out, {**MATERIAL, "session_token": Secret("FwoGZXIvYXdzEXAMPLE")})
    assert out.headers["X-Amz-Security-Token"] == "FwoGZXIvYXdzEXAMPLE"
    assert ";x-amz-security-token," in out.headers["Authorization"]


def test_streaming_trailer_payload_value_is_kept():
    out = outbound("PUT", "/b/k", headers={"X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                           "Content-Encoding": "aws-chunked"}, body=b"5\r\nhello\r\n0\r\n\r\n")
    SigV4Injector("us-east-1", "s3").inject(out, MATERIAL)
    assert out.headers["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


def test_each_attempt_gets_a_fresh_signature():
    now = [AUG_30_2015]
    signer = SigV4Injector("us-east-1", "sts", clock=lambda: now[0])
    first, second = outbound(), outbound()
    signer.inject(first, MATERIAL)
    now[0] += 5
    signer.inject(second, MATERIAL)
    assert first.headers["X-Amz-Date"] != second.headers["X-Amz-Date"]
    assert first.headers["Authorization"] != second.headers["Authorization"]


def test_query_is_rewritten_in_canonical_encoding():
    assert (canonical_query("b=2&a=x+y&c=%7e&d&prefix=q1/&e=%2f&&k=%C3%A9")
            == "b=2&a=x%20y&c=~&d=&prefix=q1%2F&e=%2F&k=%C3%A9")


@pytest.mark.parametrize("bad,field", [
    ({"region": None}, "region"),
    ({"service": "S3 "}, "service"),
    ({"secret_access_key": "not a reference"}, "secret_access_key"),
])
def test_config_problems_name_the_field(bad, field):
    auth = {"type": "aws_sigv4", "access_key_id": "aws/app#id", "secret_access_key": "aws/app#secret",
            "region": "us-east-1", "service": "s3", **bad}
    auth = {k: v for k, v in auth.items() if v is not None}
    with pytest.raises(config_mod.ConfigInvalid) as err:
        config_mod.parse(json.dumps({"credentials": {"aws": {"upstream": "https://s3.amazonaws.com", "auth": auth}}}))
    assert [p.path for p in err.value.problems] == [f"credentials.aws.auth.{field}"]
    assert SECRET not in str([p.message for p in err.value.problems])


def test_config_without_botocore_says_what_to_install(monkeypatch):
    """botocore is an optional extra; its absence is simulated by hiding it from the importer."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "botocore" else real(name, *a))
    auth = {"type": "aws_sigv4", "access_key_id": "a#b", "secret_access_key": "a#c",
            "region": "us-east-1", "service": "s3"}
    with pytest.raises(config_mod.ConfigInvalid) as err:
        config_mod.parse(json.dumps({"credentials": {"aws": {"upstream": "https://s3.amazonaws.com", "auth": auth}}}))
    assert "install credproxy[aws]" in str(err.value.problems[0])


# --- through credproxy, verified by the upstream ------------------------------------------------


def _uri_encode(raw: bytes, keep_slash: bool) -> str:
    return quote(raw, safe="-_.~/" if keep_slash else "-_.~")


def verify_sigv4(method: str, raw_path: str, raw_query: str, headers, secret: str, region: str, service: str) -> str:
    """AWS's documented SigV4 check (S3 flavour: the path is encoded once), from the request as received.
    Returns "" when the signature is valid, else what is wrong."""
    auth = headers.get("Authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return "no sigv4 authorization"
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    key_id, date, f_region, f_service, term = fields["Credential"].split("/")
    if (f_region, f_service, term) != (region, service, "aws4_request"):
        return "wrong scope"
    signed = fields["SignedHeaders"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return "host and x-amz-date must be signed"
    path = _uri_encode(unquote(raw_path).encode(), keep_slash=True)
    pairs = []
    for pair in filter(None, raw_query.split("&")):
        k, _, v = pair.partition("=")
        pairs.append((_uri_encode(unquote(k.replace("+", " ")).encode(), False),
                      _uri_encode(unquote(v.replace("+", " ")).encode(), False)))
    query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    canon_headers = "".join(f"{h}:{','.join(' '.join(v.split()) for v in headers.getall(h))}\n" for h in signed)
    payload = headers.get("X-Amz-Content-SHA256", "")
    canonical = "\n".join([method, path, query, canon_headers, ";".join(signed), payload])
    stamp = headers["X-Amz-Date"]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, f"{date}/{region}/{service}/aws4_request",
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return "" if hmac.compare_digest(expected, fields["Signature"]) else "signature mismatch"


@pytest.fixture
async def verifying_upstream(aiohttp_server):
    """An S3-like upstream that checks every signature and records what it received."""
    received: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        raw_path, _, raw_query = request.raw_path.partition("?")
        problem = verify_sigv4(request.method, raw_path, raw_query, request.headers, SECRET, "us-east-1", "s3")
        payload = request.headers.get("X-Amz-Content-SHA256")
        if not problem and payload not in ("UNSIGNED-PAYLOAD", hashlib.sha256(body).hexdigest()):
            problem = "payload hash does not match the body"
        received.append({"path": raw_path, "query": raw_query, "headers": dict(request.headers), "body": body,
                         "problem": problem})
        if problem:
            return web.Response(status=403, text=f"<Error><Code>SignatureDoesNotMatch</Code>{problem}</Error>")
        if request.path.endswith("/echo-secret"):  # a misbehaving upstream that leaks what it should not know
            return web.Response(text=f"your secret is {SECRET}")
        return web.Response(text="ok")

    app = web.Application(client_max_size=8 << 20)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return server, received


async def test_signed_requests_verify_at_the_upstream(signing_proxy, verifying_upstream, json_logs):
    server, received = verifying_upstream
    running: Running = await signing_proxy({"s3": {
        "upstream": str(server.make_url("/")).rstrip("/"), "allow_insecure_upstream": True,
        "auth": {"type": "aws_sigv4", "access_key_id": "aws/app#id", "secret_access_key": "aws/app#secret",
                 "region": "us-east-1", "service": "s3"},
        "session": {"replay_max_body": "64KiB"},
        "allow": [{"callers": [CALLER], "paths": ["/**"]}],
    }}, {"aws/app#id": KEY_ID, "aws/app#secret": SECRET})
    big = os.urandom(200 * 1024)
    headers = {**running.caller_headers, "X-Amz-Meta-Team": "billing", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as http:
        async def call(method, target, **kw):
            async with http.request(method, f"{running.url}/s3{target}", headers=headers, **kw) as r:
                return r.status, await r.text()

        assert await call("PUT", "/bucket/a:b=c+d,%C3%A9%20(1).txt", data=b"small") == (200, "ok")
        assert await call("GET", "/bucket?list-type=2&prefix=q1/&delimiter=%2F&empty") == (200, "ok")
        assert await call("PUT", "/bucket/big.bin", data=big) == (200, "ok")

        async def chunks():  # no Content-Length: streamed from the first byte
            for i in range(0, len(big), 16384):
                yield big[i:i + 16384]
        status, _ = await call("PUT", "/bucket/chunked.bin", data=chunks())
        status_echo, echoed = await call("GET", "/bucket/echo-secret")
    assert [r["problem"] for r in received] == ["", "", "", "", ""]
    assert received[0]["body"] == b"small"
    assert received[0]["headers"]["X-Amz-Content-SHA256"] == hashlib.sha256(b"small").hexdigest()
    assert received[2]["headers"]["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD" and received[2]["body"] == big
    assert received[3]["headers"]["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD" and received[3]["body"] == big
    assert status == 200
    assert received[0]["headers"]["Host"] == f"127.0.0.1:{server.port}"
    assert "Bearer" not in json.dumps([r["headers"] for r in received])  # the caller token never goes upstream
    assert (status_echo, echoed) == (200, "your secret is [REDACTED]")
    await assert_nowhere(running, SECRET, json_logs.getvalue(), echoed)
