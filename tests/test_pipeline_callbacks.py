"""The request answered in callbacks (``pipeline._send_now`` -> ``Exchange.arrived`` -> ``_arrived``) and the
general coroutine path (``_run`` -> ``forward`` -> ``relay``) agree: the same requests, served once with the
callback path on and once with it off, give the caller the same answers, the upstream the same request heads
and the audit log the same lines.

Real parts: an aiohttp upstream on loopback that records each request's method, raw target, version and raw
header fields (name and value bytes in order, as they came on the wire); a credproxy on loopback with its
encrypted file store; a caller on a raw socket, so one connection carries every request (keep-alive) and some
are pipelined (written in one go, answered in order). Each pass gets a proxy and a store of its own.

The callback path is turned off by making ``proxy.pipeline._send_now`` return False: it is the one place that
decides whether a request goes out in callbacks (``handle`` offers it every plain body-less request), and False
is what it answers for any request it cannot send now, so the request is then served by ``_run`` as every other
request is. No setting turns it off, by design. With it on, the same function is wrapped only to count what it
said, so the test also checks that the callback path really served the requests it compares.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import pipeline
from tests.helpers import CALLER_TOKENS, base_config, start_proxy, write_store
from tests.ops_support import put_secret

OLD = "sk_live_OLD_CANARY_4f1e2d3c"
NEW = "sk_live_NEW_CANARY_9a8b7c6d"
BIG = (64 * 1024 + 1, 1 << 20)


class Upstream:
    """Records every request; answers by path. ``/v1/expired`` accepts only the NEW secret (401 otherwise)."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path, request.version, tuple(request.raw_headers)))
        path, sent = request.path, request.headers.get("Authorization", "")
        if path == "/v1/json":
            return web.json_response({"ok": True, "path": request.raw_path, "n": [1, 2, 3]})
        if path == "/v1/echo-body":
            return web.json_response({"you_sent": sent, "again": sent[7:]})
        if path == "/v1/echo-header":
            return web.Response(text="fine", headers={"X-Echo": sent, "X-Plain": "yes"})
        if path == "/v1/204":
            return web.Response(status=204, headers={"X-Thing": "1"})
        if path == "/v1/304":
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
        if path == "/v1/gzip":
            return web.Response(body=gzip.compress(b'{"zipped": "' + b"z" * 3000 + b'"}', mtime=0),
                                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if path.startswith("/v1/big/"):
            size = int(path.rsplit("/", 1)[1])
            return web.Response(body=bytes(i % 251 for i in range(size)), content_type="application/octet-stream")
        if path == "/v1/chunked":
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"piece %d;" % i)
            await resp.write_eof()
            return resp
        if path == "/v1/expired":
            if sent != "Bearer " + NEW:
                return web.json_response({"error": "invalid_token"}, status=401)
            return web.json_response({"ok": "renewed"})
        return web.json_response({"ok": True, "path": path})


def _config(tmp: Path, upstream: str) -> dict:
    cfg = base_config(tmp, upstream)
    cfg["server"]["read_timeout"] = "10s"
    example = cfg["credentials"]["example"]
    example["allow"][0]["methods"] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    cfg["credentials"]["blocked"] = {**example, "leak_guard": "block"}
    cfg["credentials"]["open"] = {**example, "leak_guard": "off"}  # no Accept-Encoding: identity, nothing scanned
    return cfg


CALLER = CALLER_TOKENS["billing"]


def _request(method: str, target: str, extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {CALLER}\r\n"
            f"User-Agent: caller/1\r\nAccept: */*\r\n{extra}\r\n").encode()


# (method, target, extra header lines): the requests of one pass, in order, on one caller connection.
SINGLE = [
    ("GET", "/example/v1/json", ""),
    ("GET", "/example/v1/json?limit=10&x=%20y", "Accept-Encoding: gzip, br\r\nX-Caller-Thing: 7\r\n"),
    ("GET", "/example/v1/echo-body", ""),
    ("GET", "/example/v1/echo-header", ""),
    ("GET", "/blocked/v1/json", ""),  # the block credential's first request: no pooled connection yet for it
    ("GET", "/blocked/v1/json", ""),
    ("GET", "/blocked/v1/echo-body", ""),
    ("GET", "/blocked/v1/echo-header", ""),
    ("HEAD", "/example/v1/json", ""),
    ("GET", "/example/v1/204", ""),
    ("GET", "/example/v1/304", 'If-None-Match: "v1"\r\n'),
    ("GET", "/example/v1/gzip", "Accept-Encoding: gzip\r\n"),
    ("GET", f"/example/v1/big/{BIG[0]}", ""),
    ("GET", f"/example/v1/big/{BIG[1]}", ""),
    ("GET", "/example/v1/chunked", ""),
    ("POST", "/example/v1/json", "X-Forwarded-For: 10.9.9.9\r\nKeep-Alive: timeout=5\r\n"),
    ("DELETE", "/example/v1/json", "Proxy-Authorization: Basic eA==\r\nTE: trailers\r\n"),
    ("GET", "/open/v1/json", "Accept-Encoding: gzip\r\n"),
    ("GET", "/open/v1/json", "Accept-Encoding: gzip\r\n"),
    ("GET", "/open/v1/gzip", "Accept-Encoding: gzip\r\n"),
    ("GET", "/open/v1/chunked", ""),
]
PIPELINED = [
    ("GET", "/example/v1/json?p=1", ""),
    ("HEAD", "/example/v1/json?p=2", ""),
    ("GET", "/example/v1/echo-body", ""),
    ("GET", "/example/v1/204", ""),
    ("GET", f"/example/v1/big/{BIG[0]}", ""),
    ("GET", "/example/v1/json?p=3", ""),
]
EXPIRED = [("GET", "/example/v1/json", ""), ("GET", "/example/v1/expired", ""), ("GET", "/example/v1/expired", "")]


async def _answer(reader: asyncio.StreamReader, method: str) -> tuple[str, list[tuple[str, str]], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head[:-4].split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    fields = {k.lower(): v for k, v in headers}
    status = int(status_line.split()[1])
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "content-length" in fields:
        body = await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    else:
        body = await reader.read()
    return status_line, headers, body


def _masked(answer, request_id: str):
    status_line, headers, body = answer
    kept = [(k, v) for k, v in headers if k.lower() not in ("date", "x-request-id")]
    return status_line, kept, body.replace(request_id.encode(), b"<request-id>")


def _rotate(tmp: Path) -> None:
    put_secret({"file": {"path": str(tmp / "secrets.enc"), "key_file": str(tmp / "master.key")}},
               "apis/example", "token", NEW)


async def _pass(tmp: Path, upstream: Upstream, groups: list[list[tuple[str, str, str]]], *, pipelined: bool,
                rotate_after: int | None = None) -> dict:
    """Serve ``groups`` of requests on one caller connection of a fresh proxy with a store of its own (each
    group written at once when ``pipelined``); ``rotate_after``: the stored secret becomes NEW after that many
    answers. Request IDs are replaced by the number of the caller's request they belong to."""
    tmp.mkdir()
    write_store(tmp, {"apis/example#token": OLD})
    p = await start_proxy(_config(tmp, upstream.url))
    seen_before = len(upstream.seen)
    answers, ids = [], []
    try:
        host, port = p.proxy.bound["main"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        for group in groups:
            for batch in [group] if pipelined else [[r] for r in group]:
                writer.write(b"".join(_request(*r) for r in batch))
                for method, _, _ in batch:
                    answer = await _answer(reader, method)
                    ids.append(dict((k.lower(), v) for k, v in answer[1])["x-request-id"])
                    answers.append(_masked(answer, ids[-1]))
                    if len(answers) == rotate_after:
                        _rotate(tmp)
        writer.close()
        audit = p.audit_lines(tmp)
        in_flight = p.proxy.holder.in_flight
    finally:
        await p.proxy.stop()
    number = {request_id: f"<request {n}>" for n, request_id in enumerate(ids)}
    sent = [(method, target, version, [(k, number[v.decode()] if k.lower() == b"x-request-id" else v)
                                       for k, v in raw])
            for method, target, version, raw in upstream.seen[seen_before:]]
    for line in audit:
        line["request_id"] = number[line["request_id"]]
        for varies in ("duration_ms", "ts", "prev_hash", "hash"):
            line.pop(varies, None)
    return {"answers": answers, "upstream": sent, "audit": audit, "in_flight": in_flight}


def _switch(monkeypatch, on: bool) -> list:
    """What ``_send_now`` said for each request: True (sent in callbacks), False (left to ``forward``); None
    with the callback path off (see the module docstring: False makes ``handle`` run ``_run``)."""
    said: list = []
    real = _REAL_SEND_NOW

    def counted(ex, cred, caller):
        sent = real(ex, cred, caller)
        said.append(sent)
        return sent

    def off(ex, cred, caller):
        said.append(None)
        return False

    monkeypatch.setattr(pipeline, "_send_now", counted if on else off)
    return said


_REAL_SEND_NOW = pipeline._send_now


@pytest.fixture
async def upstream():
    up = Upstream()
    await up.server.start_server()
    up.url = str(up.server.make_url("")).rstrip("/")
    yield up
    await up.server.close()


async def _both(tmp_path, upstream, monkeypatch, groups, **kw) -> tuple[dict, dict, list]:
    said = _switch(monkeypatch, True)
    on = await _pass(tmp_path / "on", upstream, groups, **kw)
    _switch(monkeypatch, False)
    off = await _pass(tmp_path / "off", upstream, groups, **kw)
    return on, off, said


def _assert_same(on: dict, off: dict) -> None:
    assert len(on["answers"]) == len(off["answers"])
    for n, (a, b) in enumerate(zip(on["answers"], off["answers"])):
        assert a == b, f"answer {n}"
    assert on["upstream"] == off["upstream"]
    assert on["audit"] == off["audit"]
    assert on["in_flight"] == off["in_flight"] == 0


def _first_of_each_credential(requests) -> list[bool]:
    seen, out = set(), []
    for _, target, _ in requests:
        name = target.split("/")[1]
        out.append(name not in seen)
        seen.add(name)
    return out


async def test_one_request_at_a_time_on_one_connection(tmp_path, upstream, monkeypatch):
    on, off, said = await _both(tmp_path, upstream, monkeypatch, [SINGLE], pipelined=False)
    # Every request but the first of each credential (no idle pooled connection yet) went out in callbacks.
    assert said == [not first for first in _first_of_each_credential(SINGLE)]
    _assert_same(on, off)
    answers = on["answers"]
    statuses = [int(a[0].split()[1]) for a in answers]
    assert statuses == [200, 200, 200, 200, 200, 200, 502, 502, 200, 204, 304, 200, 200, 200, 200, 200, 200] + [200] * 4
    for status_line, headers, body in answers:
        assert OLD.encode() not in body and all(OLD not in v for _, v in headers)
    assert json.loads(answers[2][2]) == {"you_sent": "Bearer [REDACTED]", "again": "[REDACTED]"}
    assert ("X-Echo", "Bearer [REDACTED]") in answers[3][1]
    assert [line["reason"] for line in on["audit"]][6:8] == ["leak_blocked", "leak_blocked"]
    assert answers[11][2] == b'{"zipped": "' + b"z" * 3000 + b'"}'  # decoded for the leak guard
    assert [len(a[2]) for a in answers[12:14]] == list(BIG)
    assert answers[14][2] == answers[20][2] == b"".join(b"piece %d;" % i for i in range(5))
    assert ("Content-Encoding", "gzip") in answers[19][1]  # leak guard off: passed on as it came
    assert gzip.decompress(answers[19][2]) == answers[11][2]
    # The upstream saw one request per caller request, X-Request-Id naming it, none of the dropped fields.
    for n, (_, _, _, raw) in enumerate(on["upstream"]):
        names = [k.lower() for k, _ in raw]
        assert (b"X-Request-Id", f"<request {n}>") in raw
        assert not {b"x-forwarded-for", b"keep-alive", b"proxy-authorization", b"te"} & set(names)
        assert ((b"Accept-Encoding", b"identity") in raw) == (n < 17)  # asked for under redact and block only


async def test_pipelined_requests(tmp_path, upstream, monkeypatch):
    warm = [("GET", "/example/v1/json", "")]
    on, off, said = await _both(tmp_path, upstream, monkeypatch, [warm, PIPELINED], pipelined=True)
    # The callback path served some of them. Not all: a request that starts while the one before it is being
    # answered in callbacks (pipelined: it was queued already) finds that answer's upstream connection not yet
    # back in its pool (it goes back once the bytes the answer came in are handled, after the answer's
    # callbacks), so it is left to forward, which finds the connection pooled by then.
    assert said[:2] == [False, True] and sum(said) >= len(PIPELINED) // 2
    _assert_same(on, off)
    assert [int(a[0].split()[1]) for a in on["answers"]] == [200, 200, 200, 200, 204, 200, 200]


async def test_an_expired_secret_is_reread_and_the_request_replayed(tmp_path, upstream, monkeypatch):
    on, off, said = await _both(tmp_path, upstream, monkeypatch, [EXPIRED], pipelined=False, rotate_after=1)
    # The second went out in callbacks with the old secret; its 401 continued in a task (refresh, replay). The
    # third found the re-read secret not yet granted (a new version): forward granted it.
    assert said[:2] == [False, True]
    _assert_same(on, off)
    assert [int(a[0].split()[1]) for a in on["answers"]] == [200, 200, 200]
    assert [line["token_refreshed"] for line in on["audit"]] == [False, True, False]
    auths = [dict((k.lower(), v) for k, v in raw)[b"authorization"] for _, _, _, raw in on["upstream"]]
    assert auths == [f"Bearer {s}".encode() for s in (OLD, OLD, NEW, NEW)]
