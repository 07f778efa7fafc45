"""Property-based tests of the request path and the config loader: whatever the input,
no crash (only the defined refusals), no path outside what policy allowed reaches
the upstream, and no secret in any output."""

from __future__ import annotations

import json
import string

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.config import models as config_mod
from proxy.server import request_shape as guards
from proxy.errors import BadRequest
from proxy.redact.leak_guard import REDACTED, LeakGuard
from proxy.policy import Policy, compile_glob
from proxy.routing import canonical_path, route_prefixed

from .harness import CALLER_TOKEN, CANARY, assert_clean, canary_forms, raw_exchange

# Path pieces that matter to traversal and encoding tricks, plus ordinary text.
PIECES = ["/", "/", ".", "..", "%2e", "%2E", "%2f", "%5c", "%00", "%25", "%", ";", "..;", "v1", "public", "admin",
          "a", "~", "%41", "%7e", "é", "\\", "//", "?", "#", " ", "%20", "*"]
paths = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda parts: "/" + "".join(parts))
ALLOWED = "/v1/public/**"


@given(paths)
def test_canonical_path_is_stable_and_clean(raw):
    try:
        canon = canonical_path(raw.partition("?")[0])
    except BadRequest:
        return
    assert canon.startswith("/")
    assert canonical_path(canon) == canon  # what policy saw is what goes upstream, and stays so
    segments = canon.split("/")[1:]
    assert "." not in segments and ".." not in segments
    for bad in ("%2F", "%5C", "%00", "\\", " "):
        assert bad not in canon.upper()
    assert set(canon) <= set(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%")


@given(paths)
def test_policy_never_allows_outside_its_prefix(raw):
    policy = Policy({"demo": (_rule(),)})
    try:
        route = route_prefixed("/demo" + raw)
    except BadRequest:
        return
    if policy.allowed("billing", route.credential, "GET", route.path):
        assert route.path == "/v1/public" or route.path.startswith("/v1/public/")


def _rule():
    from proxy.policy import _Rule

    return _Rule(None, None, (compile_glob(ALLOWED),), None)


secrets = st.text(alphabet=st.characters(blacklist_characters="[]", blacklist_categories=("Cs",)), min_size=4, max_size=24)


@settings(max_examples=150)
@given(secret=secrets, filler=st.lists(st.binary(max_size=20), min_size=1, max_size=6),
       picks=st.lists(st.integers(0, 5), max_size=5), cuts=st.lists(st.integers(1, 400), max_size=8))
def test_stream_redaction_hides_every_form_however_the_body_is_cut(secret, filler, picks, cuts):
    guard = LeakGuard([secret])
    forms = canary_forms(secret)
    assume(not any(f in REDACTED for f in forms))
    parts = []
    for i, chunk in enumerate(filler):
        parts.append(chunk)
        if i < len(picks):
            parts.append(forms[picks[i]])
    body = b"".join(parts)
    whole, _ = guard.redact(body)
    stream = guard.stream()
    out, pos = [], 0
    for cut in sorted(set(cuts)):
        out.append(stream.feed(body[pos:cut]))
        pos = max(pos, cut)
    out.append(stream.feed(body[pos:]))
    out.append(stream.flush())
    streamed = b"".join(out)
    assert streamed == whole
    for f in forms:
        assert f not in streamed


header_names = st.sampled_from(["Transfer-Encoding", "Content-Length", "Upgrade", "Connection", "X-HTTP-Method-Override",
                                "HTTP2-Settings", "X-A", "Host"])
header_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(st.tuples(header_names, header_values), max_size=6), st.sampled_from([(1, 0), (1, 1)]), st.text(max_size=20))
def test_header_checks_only_ever_refuse_with_400(headers, version, query):
    from multidict import CIMultiDict

    h = CIMultiDict(headers)
    raw = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in headers]
    try:
        guards.check_framing(h, version)
        guards.check_header_bytes(raw)
        guards.check_upgrade(h)
        guards.check_method_override(h, query)
    except BadRequest as exc:
        assert exc.status == 400


@given(st.lists(st.tuples(header_names | st.sampled_from(["host", "HOST", "x-b", "conNection"]), header_values),
                max_size=6), st.sampled_from([(1, 0), (1, 1)]))
def test_a_head_vouched_plain_passes_every_header_check(headers, version):
    """The connection skips the header checks for a head ``plain_head`` vouches for: they must all pass."""
    from multidict import CIMultiDict

    raw = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in headers]
    joined = b"\x00".join(b for pair in raw for b in pair)
    if not guards.plain_head(joined, 2 * len(raw), [k.lower() for k, _ in headers]):
        return
    h = CIMultiDict(headers)
    guards.check_framing(h, version)
    guards.check_header_bytes(raw)
    guards.check_upgrade(h)
    guards.check_method_override(h, "")


# --- the config loader -------------------------------------------------------------------

leaves = st.one_of(st.just(CANARY), st.text(max_size=12), st.integers(), st.booleans(), st.none(),
                   st.sampled_from(["5m", "redact", "header", "apis/x#y", "http://127.0.0.1:1", "10.0.0.0/8"]))
keys = st.sampled_from(["server", "listen", "credentials", "demo", "auth", "type", "secret", "upstream", "callers",
                        "token_sha256", "allow", "paths", "rate_limit", "rps", "alerts", "webhook_url", "leak_guard",
                        "limits", "max_body", "source_ips", "cert_subject", CANARY])
documents = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=200)
@given(documents)
def test_config_loader_never_crashes_nor_repeats_a_value(doc):
    text = yaml.safe_dump(doc)
    try:
        config_mod.parse(text, "fuzz.yaml")
    except config_mod.ConfigInvalid as exc:
        for p in exc.problems:  # the field path names keys the operator wrote; the message never a value
            assert_clean(p.message, where="problem message")


VALID = {"server": {"listen": "127.0.0.1:8080", "limits": {"max_body": "1MiB"}},
         "alerts": {"multi_ip_window": "5m", "webhook_url": "https://hooks.example/x"},
         "callers": {"billing": {"token_sha256": "a" * 64, "allow_ips": ["10.0.0.0/8"], "rate_limit": {"rps": 1}}},
         "credentials": {"demo": {"upstream": "https://api.example.com", "leak_guard": "block",
                                  "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                                           "secret": "apis/x#y"},
                                  "allow": [{"callers": ["billing"], "methods": ["GET"], "paths": ["/**"],
                                             "source_ips": ["10.0.0.0/8"]}]}}}


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaf_paths(v, prefix + (i,))
    yield prefix


LEAF_PATHS = [p for p in _leaf_paths(VALID) if p]


@settings(max_examples=300)
@given(st.sampled_from(LEAF_PATHS), st.one_of(st.just(CANARY), leaves, st.lists(leaves, max_size=2),
                                          st.dictionaries(keys, leaves, max_size=2)))
def test_a_valid_config_with_one_value_replaced(path, value):
    doc = json.loads(json.dumps(VALID))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        config_mod.parse(yaml.safe_dump(doc), "fuzz.yaml")
    except config_mod.ConfigInvalid as exc:
        for p in exc.problems:
            assert_clean(p.message, where="problem message")


def test_an_auth_type_that_is_a_secret_is_not_repeated():
    doc = json.loads(json.dumps(VALID))
    doc["credentials"]["demo"]["auth"]["type"] = CANARY
    try:
        config_mod.parse(yaml.safe_dump(doc), "fuzz.yaml")
    except config_mod.ConfigInvalid as exc:
        [problem] = exc.problems
        assert problem.path == "credentials.demo.auth.type" and "header" in problem.message
        assert_clean(problem.message)
    else:
        raise AssertionError("an unknown auth type must be refused")


# --- the live request path -------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=paths)
async def test_random_targets_through_a_running_proxy(proxy, upstream, raw):
    """Each example is a real request; the proxy and its upstream are shared across examples."""
    target = "/demo" + raw.replace(" ", "%20").replace("#", "%23")
    before = len(upstream.seen)
    resp = await raw_exchange(proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_TOKEN}\r\n"
                                          "Connection: close\r\n\r\n".encode("utf-8"))
    assert resp.status in (200, 400, 403), resp.raw[:200]
    assert_clean(resp.raw)
    reached = upstream.seen[before:]
    if resp.status != 200:
        assert reached == [] and resp.json()["error"] in ("bad_request", "forbidden")
    else:
        [seen] = reached
        path = seen.path.partition("?")[0]
        # what arrived is, byte for byte, a canonical path the policy allowed
        assert canonical_path(path) == path
        assert proxy.state.policy.allowed("billing", "demo", "GET", path), path
