"""``plain_request.render`` (the outbound head of a request answered in callbacks, ``pipeline._send_now``) is
byte for byte what the general path makes of the same request: ``strip_hop_by_hop`` + ``pipeline._outbound``
+ ``client.request_head`` (``forward`` -> ``client.send``), or both refuse it.

The requests are real caller bytes parsed by the caller connection itself (``HTTPConnection``'s llhttp parser
and its ``on_headers_complete``), routed by the main listener's ``route_prefixed`` and shape-checked as
``_admit`` does; the credentials are real ``Credential`` objects built from a parsed config (their injectors and
upstream clients are what the test compares; their material comes from the test's own grants)."""

from __future__ import annotations

import httptools
import yaml
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy import pipeline
from proxy.config import models as config_mod
from proxy.credential import Credential
from proxy.errors import BadRequest
from proxy.grant import Grant
from proxy.observe.request_id import new_request_id
from proxy.routing import Route, route_prefixed
from proxy.server import request_shape
from proxy.server.connection import ConnectionContext, HTTPConnection
from proxy.server.upload import NO_BODY
from proxy.store.secret import Secret
from proxy.upstream import plain_request
from proxy.upstream.client import request_head, strip_hop_by_hop

_BASES = ["http://127.0.0.1:8080", "http://127.0.0.1:8080/base/", "https://api.example.com",
          "https://api.example.com:8443/v2", "http://[::1]:9000/p/q"]
_AUTHS = {
    "bearer": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": "a/b#token"},
    "apikey": {"type": "header", "header": "X-Api-Key", "value": "{secret}", "secret": "a/b#token"},
    "lower": {"type": "header", "header": "x-custom-auth", "value": "k={secret};v=1", "secret": "a/b#token"},
    "basic": {"type": "basic", "username": "a/b#user", "password": "a/b#password"},
}


def _credentials() -> dict[tuple[str, str, str], Credential]:
    """One real Credential per (auth, base, leak_guard)."""
    creds = {}
    entries = {}
    for auth_name, auth in _AUTHS.items():
        for i, base in enumerate(_BASES):
            for mode in ("redact", "block", "off"):
                entries[f"{auth_name}-{i}-{mode}"] = {
                    "upstream": base, "allow_insecure_upstream": True, "auth": auth, "leak_guard": mode,
                    "allow": [{"callers": ["app"], "methods": ["GET"], "paths": ["/**"]}]}
    cfg = config_mod.parse(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"},
        "secrets": {"backend": "file", "file": {"path": "/nonexistent/s.enc", "key_file": "/nonexistent/k"}},
        "audit": {"path": "/nonexistent/audit.log"},
        "callers": {"app": {"token_sha256": "0" * 64}},
        "credentials": entries,
    }), "test.yaml")
    for name in entries:
        auth_name, i, mode = name.split("-")
        creds[(auth_name, _BASES[int(i)], mode)] = Credential(name, cfg.credentials[name], cfg.server, None,
                                                              cfg.leak_guard_for(name))
    return creds


CREDS = _credentials()

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Names the pipeline never forwards (hop-by-hop, caller credentials, the ones it sets, spoofable addresses) and
# names it treats specially, besides ordinary ones. Those that make a head not plain (Connection, Upgrade,
# Content-Length, Transfer-Encoding, method overrides) are in too: such heads must take the general path.
_SPECIAL = ["Authorization", "Proxy-Authorization", "X-Api-Key", "X-Custom-Auth", "Keep-Alive", "Proxy-Connection",
            "TE", "Trailer", "Proxy-Authenticate", "HTTP2-Settings", "Host", "X-Request-Id", "Expect", "Forwarded",
            "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "True-Client-IP",
            "X-Original-URL", "CF-Connecting-IP", "Accept-Encoding", "Accept-Encoding", "Accept", "Content-Type",
            "User-Agent", "Cookie", "X-Amz-Date", "Connection", "Upgrade", "Content-Length", "Transfer-Encoding",
            "X-HTTP-Method-Override"]


def _any_case(name: str) -> st.SearchStrategy[str]:
    return st.tuples(*[st.sampled_from(sorted({c.lower(), c.upper()})) for c in name]).map("".join)


_NAMES = st.one_of(st.sampled_from(_SPECIAL).flatmap(_any_case), st.text(_TCHAR, min_size=1, max_size=12))
# Field values: printable ASCII and tab (llhttp strict takes no other control byte), surrounding blanks included
# (the connection strips them, as the decoded headers are stripped).
_VALUES = st.text(st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t"]), max_size=24)
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES), max_size=10)
_SEGMENT = st.one_of(
    st.text("abcXYZ019-._~!$&'()*+,;=:@", min_size=0, max_size=8),
    st.sampled_from(["%2F", "%41", "%7e", "..", ".", "", "a%20b", "%25", "%C3%A9"]))
_PATHS = st.lists(_SEGMENT, max_size=4).map(lambda parts: "/" + "/".join(parts))
_QUERIES = st.one_of(st.just(""), st.text("abc019=&%+/?:@-._~!$'()*,;", max_size=16),
                     st.sampled_from(["a=1&b=2", "q=%20x", "x", "_method=DELETE", "a=1&&b", "=", "k=v?w"]))
_METHODS = st.sampled_from(["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH"])
# Secret material: printable, and a few not: non-ASCII (both sides write it as UTF-8), and CR LF or NUL (which
# no side may write: header_line gives no line, so _send_now leaves the request to forward, which refuses it).
_SECRETS = st.one_of(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
                     st.sampled_from(["sk_live_CANARY", "caf\u00e9-\u00fcber", "a b\tc", "x:y", "a\r\nX-Evil: 1",
                                      "n\x00l"]))


def _parsed(raw: bytes):
    """The ``Request`` the caller connection makes of ``raw``, or None when llhttp refuses it."""
    conn = HTTPConnection(ConnectionContext("main", None, route=route_prefixed))
    try:
        conn._parser.feed_data(raw)
    except httptools.HttpParserError:
        return None
    return conn._queue[0] if conn._queue else None


def _general(request, cred: Credential, grant: Grant, route: Route, rid: str) -> bytes | None:
    """What ``forward`` and ``client.send`` write for the request (the head; it has no body)."""
    drop = pipeline._never_forwarded(cred.injector.removes)
    headers = strip_hop_by_hop(request.headers, drop)
    out = pipeline._outbound(request, cred, grant, route, headers, NO_BODY, rid)
    base = out.base
    try:
        head, length = request_head(out, base.host_port_subcomponent or base.host or "")
    except (ValueError, UnicodeError):
        return None
    assert length in (None, 0)
    return head


def _callbacks(request, cred: Credential, grant: Grant, route: Route, rid: str) -> bytes | None:
    """What ``_send_now`` writes for it; None when it leaves the request to ``forward`` (injector or target)."""
    injected = cred.injector.header_line(grant.values)
    if injected is None:
        return None
    target = cred.client.target(grant.upstream or cred.base)
    assert target is not None  # no client certificate provider in these credentials
    drop = pipeline._never_forwarded(cred.injector.removes)
    return plain_request.render(request.method, target, route.path, route.query, request.raw_headers,
                                plain_request.as_bytes(drop), rid, cred.leak_guard != "off", injected)


def _grant(auth: str, secret: str, other: str, instance: bool) -> Grant:
    values = ({"username": Secret(secret), "password": Secret(other)} if auth == "basic"
              else {"secret": Secret(secret)})
    return Grant(values, URL("https://instance.example.com:8443/svc/") if instance else None)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@example("GET", "/v1/x", "a=1", [("Accept-Encoding", "gzip"), ("accept-encoding", "br"), ("X-A", "1")],
         "1.1", "bearer", _BASES[1], "redact", "s3cret", "pw", False)
@example("POST", "/v1/x", "", [("authorization", "Bearer caller"), ("X-Forwarded-For", "10.0.0.1"),
                               ("Proxy-Authorization", "Basic x"), ("Host", "evil")],
         "1.1", "basic", _BASES[3], "off", "user", "pw", True)
@example("PATCH", "/", "", [("X-Api-Key", "mine"), ("x-api-key", "mine2"), ("ACCEPT-ENCODING", " gzip ")],
         "1.0", "apikey", _BASES[4], "block", "k", "", False)
@given(_METHODS, _PATHS, _QUERIES, _FIELDS, st.sampled_from(["1.1", "1.0"]), st.sampled_from(sorted(_AUTHS)),
       st.sampled_from(_BASES), st.sampled_from(["redact", "block", "off"]), _SECRETS, _SECRETS, st.booleans())
def test_render_is_what_the_general_path_writes(method, path, query, fields, version, auth, base, mode, secret,
                                               other, instance):
    target = "/cred" + path + ("?" + query if query else "")
    raw = (f"{method} {target} HTTP/{version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
           + "\r\n").encode("ascii")
    request = _parsed(raw)
    assume(request is not None)
    if not (request.plain_head and request.body is None):
        # Not plain: handle() never offers it to _send_now. Plain heads are exactly those without the names the
        # shape checks read: hold that here too, so a head that should take the general path never is plain.
        lowered = {n.lower() for n, _ in fields}
        assert request.body is not None or not lowered.isdisjoint(request_shape.SHAPE_NAMES) \
            or sum(n == "host" for n in (x.lower() for x, _ in fields)) > 1
        event("not plain")
        return
    try:
        request_shape.check_request(request)  # what _admit checks before _send_now
        route = route_prefixed(request.target)
    except BadRequest:
        event("refused by the shape checks or routing")
        return
    cred = CREDS[(auth, base, mode)]
    grant = _grant(auth, secret, other, instance)
    rid = new_request_id()
    fast = _callbacks(request, cred, grant, route, rid)
    general = _general(request, cred, grant, route, rid)
    if fast is None:
        # _send_now leaves it to forward; the injector gives no line only for values the wire would refuse too.
        if cred.injector.header_line(grant.values) is None:
            assert general is None
        event("left to forward")
        return
    event("compared")
    assert fast == general


_TEXT = st.text(st.sampled_from(list("abc/%?=&.~-") + [" ", "\r", "\n", "\x00", "\t", "\u00e9", "\udcff"]),
                max_size=12)


@settings(max_examples=300, deadline=None)
@example("/a b", "", "GET")
@example("/a", "x=\r\nInjected: 1", "GET")
@example("/a\x00", "", "HEAD")
@given(_TEXT.map(lambda t: "/" + t), _TEXT, _METHODS)
def test_a_target_the_wire_would_refuse_is_refused_by_both(path, query, method):
    """Routes are canonical, so such targets do not reach render from a caller; if one did, both sides refuse it
    (render by returning None, so the request takes the general path, which answers 502) or both write it."""
    request = _parsed(f"{method} /cred/x HTTP/1.1\r\nX-A: 1\r\n\r\n".encode())
    cred = CREDS[("bearer", _BASES[1], "redact")]
    grant = _grant("bearer", "s3cret", "", False)
    route = Route("cred", path, query)
    rid = new_request_id()
    assert _callbacks(request, cred, grant, route, rid) == _general(request, cred, grant, route, rid)
