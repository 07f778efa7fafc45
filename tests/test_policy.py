"""Policy: default deny; caller x method x path, evaluated on the canonical path,
which is byte for byte the path forwarded."""

import aiohttp
import pytest

from proxy.config import models as config_mod
from proxy.policy import Policy, compile_glob
from tests.helpers import CALLER_TOKENS, auth, base_config


@pytest.mark.parametrize("pattern,path,ok", [
    ("/v1/customers/**", "/v1/customers", True),
    ("/v1/customers/**", "/v1/customers/42/orders", True),
    ("/v1/customers/**", "/v1/customersX", False),
    ("/v1/*", "/v1/a", True),
    ("/v1/*", "/v1/a/b", False),
    ("/v1/*", "/v1", False),
    ("/v1/*/x", "/v1//x", False),
    ("/**", "/anything/at/all", True),
    ("/v1/*.json", "/v1/a.json", True),
    ("/v1/*.json", "/v1/a/b.json", False),
    ("/v1/a+b", "/v1/a+b", True),
    ("/v1/a.b", "/v1/aXb", False),
])
def test_globs(pattern, path, ok):
    assert bool(compile_glob(pattern).match(path)) is ok


def test_default_deny_and_rule_fields():
    cfg = config_mod.Config.model_validate({
        "callers": {"billing": {"token_sha256": "a" * 64}, "reports": {"token_sha256": "b" * 64}},
        "credentials": {
            "c": {"upstream": "https://x.example", "auth": {"type": "header", "secret": "a#b"},
                  "allow": [{"callers": ["billing"], "methods": ["get"], "paths": ["/v1/**"]},
                            {"callers": ["reports"], "paths": ["/reports/*"], "source_ips": ["10.0.0.0/8"]}]},
            "none": {"upstream": "https://y.example", "auth": {"type": "header", "secret": "a#b"}},
        }})
    import ipaddress
    p = Policy.compile(cfg)
    assert p.allowed("billing", "c", "GET", "/v1/x")
    assert not p.allowed("billing", "c", "POST", "/v1/x")
    assert not p.allowed("reports", "c", "GET", "/v1/x")
    assert p.allowed("reports", "c", "DELETE", "/reports/1", ipaddress.ip_address("10.1.2.3"))
    assert not p.allowed("reports", "c", "DELETE", "/reports/1", ipaddress.ip_address("192.168.1.1"))
    assert not p.allowed("reports", "c", "DELETE", "/reports/1", None)
    assert not p.allowed("billing", "none", "GET", "/")
    assert not p.allowed("billing", "missing", "GET", "/")



def test_rules_for_named_methods_any_method_and_source_ips_combine():
    """Each request is allowed when any one rule naming its caller and method matches (rules are grouped by
    caller and method at load; this checks the grouping changes no answer)."""
    import ipaddress
    cfg = config_mod.Config.model_validate({
        "callers": {"billing": {"token_sha256": "a" * 64}, "reports": {"token_sha256": "b" * 64}},
        "credentials": {
            "c": {"upstream": "https://x.example", "auth": {"type": "header", "secret": "a#b"},
                  "allow": [{"callers": ["billing"], "methods": ["GET"], "paths": ["/a/*"]},
                            {"callers": ["billing"], "paths": ["/b/**"]},
                            {"callers": ["billing"], "methods": ["POST"], "paths": ["/c"], "source_ips": ["10.0.0.0/8"]},
                            {"methods": ["GET", "*"], "paths": ["/d"]}]}}})
    p = Policy.compile(cfg)
    inside, outside = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("192.0.2.1")
    assert p.allowed("billing", "c", "GET", "/a/x") and not p.allowed("billing", "c", "POST", "/a/x")
    assert p.allowed("billing", "c", "DELETE", "/b/y/z") and p.allowed("billing", "c", "GET", "/b")
    assert p.allowed("billing", "c", "POST", "/c", inside)
    assert not p.allowed("billing", "c", "POST", "/c", outside) and not p.allowed("billing", "c", "GET", "/c", inside)
    assert p.allowed("reports", "c", "PATCH", "/d") and p.allowed("billing", "c", "GET", "/d")
    assert not p.allowed("reports", "c", "GET", "/a/x") and not p.allowed("reports", "c", "GET", "/b/y")
    assert not p.allowed("someone-else", "c", "GET", "/a/x") and p.allowed("someone-else", "c", "GET", "/d")

MATRIX = [
    # caller, method, raw path after /example, expected status, forwarded path (None: nothing forwarded)
    ("billing", "GET", "/v1/customers", 200, "/v1/customers"),
    ("billing", "POST", "/v1/customers/42", 200, "/v1/customers/42"),
    ("billing", "DELETE", "/v1/customers/42", 403, None),
    ("reports", "GET", "/v1/customers", 403, None),
    ("reports", "GET", "/reports/daily", 200, "/reports/daily"),
    ("reports", "GET", "/reports/daily/extra", 403, None),
    ("billing", "GET", "/reports/daily", 403, None),
    ("nobody", "GET", "/v1/customers", 401, None),
    # traversal and encoding variants
    ("billing", "GET", "/v1/customers/../../admin", 403, None),
    ("billing", "GET", "/v1/customers/%2e%2e/%2E%2E/admin", 403, None),
    ("billing", "GET", "/v1/./customers/./x", 200, "/v1/customers/x"),
    ("billing", "GET", "/v1/customers/a/../b", 200, "/v1/customers/b"),
    ("billing", "GET", "/v1/%63ustomers", 200, "/v1/customers"),
    ("billing", "GET", "/v1/customers/%2Fadmin", 400, None),
    ("billing", "GET", "/v1/customers/%2fadmin", 400, None),
    ("billing", "GET", "/v1/customers/%5cadmin", 400, None),
    ("billing", "GET", "/v1/customers/%00", 400, None),
    ("billing", "GET", "/v1/../../../etc/passwd", 400, None),
    ("billing", "GET", "/v1/customers/%zz", 400, None),
    ("billing", "GET", "/v1/customers/%e2%82%ac", 200, "/v1/customers/%E2%82%AC"),
    ("billing", "GET", "/V1/customers", 403, None),
]


@pytest.fixture
async def matrix_proxy(proxy_factory, upstream, tmp_path):
    cfg = base_config(tmp_path, upstream.url)
    cfg["credentials"]["example"]["allow"] = [
        {"callers": ["billing"], "methods": ["GET", "POST"], "paths": ["/v1/customers/**"]},
        {"callers": ["reports"], "methods": ["GET"], "paths": ["/reports/*"]},
    ]
    return await proxy_factory(cfg)


async def raw_get(url_base: str, raw_path: str, method: str, headers: dict) -> int:
    """Send the path exactly as written (no client-side normalization)."""
    host, port = url_base.split("//")[1].split(":")
    import asyncio

    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {raw_path} HTTP/1.1", f"Host: {host}", "Connection: close", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize("caller,method,path,expected,forwarded", MATRIX)
async def test_policy_matrix(matrix_proxy, upstream, caller, method, path, expected, forwarded):
    headers = {"Authorization": f"Bearer {CALLER_TOKENS.get(caller, 'wrong-token')}"}
    status = await raw_get(matrix_proxy.url, "/example" + path, method, headers)
    assert status == expected
    if forwarded is None:
        assert upstream.seen == []
    else:
        assert [s.path_qs for s in upstream.seen] == [forwarded]


async def test_unknown_credential_and_forbidden_share_one_body(matrix_proxy):
    async with aiohttp.ClientSession() as s:
        async with s.get(matrix_proxy.url + "/nope/v1/customers", headers=auth()) as r:
            unknown = (r.status, await r.json())
        async with s.get(matrix_proxy.url + "/example/v2/customers", headers=auth()) as r:
            denied = (r.status, await r.json())
        async with s.get(matrix_proxy.url + "/Example/v1/customers", headers=auth()) as r:
            case_folded = (r.status, await r.json())
    for status, body in (unknown, denied, case_folded):
        assert status == 403
        assert {k: v for k, v in body.items() if k != "request_id"} == {"error": "forbidden", "message": "not permitted"}


async def test_denials_are_audited(matrix_proxy, tmp_path):
    async with aiohttp.ClientSession() as s:
        async with s.get(matrix_proxy.url + "/example/v2/x?token=abc", headers=auth()) as r:
            assert r.status == 403
        async with s.get(matrix_proxy.url + "/example/v1/customers") as r:
            assert r.status == 401
    lines = matrix_proxy.audit_lines(tmp_path)
    assert [(x["status"], x["outcome"], x["reason"]) for x in lines[-2:]] == [
        (403, "denied", "policy"), (401, "denied", "bad_caller_token")]
    assert lines[-2]["path"] == "/v2/x?token"


async def test_unauthenticated_callers_cannot_probe_credential_names(matrix_proxy):
    async with aiohttp.ClientSession() as s:
        for path in ("/nope/v1/x", "/example/v1/customers"):
            async with s.get(matrix_proxy.url + path) as r:
                assert r.status == 401
