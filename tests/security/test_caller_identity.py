"""Callers identified by mTLS client certificate (``cert_subject``), and the IP lock
per caller (``allow_ips``) and per allow rule (``source_ips``)."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
import trustme

from proxy.config import models as config_mod

from .harness import CALLER_TOKEN

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    server_ca.cert_pem.write_to_path(str(d / "server-ca.pem"))
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    certs = {
        "billing": client_ca.issue_cert("billing.example", common_name="billing", organization_name="acme",
                                        organization_unit_name="payments"),
        "intruder": client_ca.issue_cert("intruder.example", common_name="intruder"),
        "rogue-billing": rogue_ca.issue_cert("billing.example", common_name="billing"),
    }
    return d, certs


def tls_config(d, callers: dict) -> dict:
    return {"server": {"tls": {"cert_file": str(d / "server.pem"), "key_file": str(d / "server.pem"),
                               "client_ca_file": str(d / "client-ca.pem")}},
            "callers": callers}


def client_ctx(d, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def get(url: str, ctx: ssl.SSLContext, headers=None) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, headers=headers or {}) as r:
            await r.read()
            return r.status


async def test_client_certificate_identifies_the_caller(pki, upstream, make_proxy):
    d, certs = pki
    proxy = await make_proxy(upstream.url, tls_config(d, {"billing": {"cert_subject": "CN=billing"}}))
    url = f"https://127.0.0.1:{proxy.port}/demo/anything/a"
    assert await get(url, client_ctx(d, certs["billing"])) == 200
    assert await get(url, client_ctx(d, certs["intruder"])) == 401
    assert await get(url, client_ctx(d)) == 401
    with pytest.raises(aiohttp.ClientError):  # a certificate from another CA fails the handshake
        await get(url, client_ctx(d, certs["rogue-billing"]))
    assert [s.path for s in upstream.seen] == ["/anything/a"]
    callers = [(line["caller"], line["status"]) for line in proxy.audit()]
    assert callers == [("billing", 200), (None, 401), (None, 401)]


async def test_subject_attributes_must_all_match(pki, upstream, make_proxy):
    d, certs = pki
    callers = {"billing": {"cert_subject": "O=acme,CN=billing"}, "other": {"cert_subject": "CN=billing,O=elsewhere"}}
    proxy = await make_proxy(upstream.url, tls_config(d, callers))
    assert await get(f"https://127.0.0.1:{proxy.port}/demo/anything/a", client_ctx(d, certs["billing"])) == 200
    assert proxy.audit()[0]["caller"] == "billing"


async def test_a_certificate_matching_two_callers_identifies_none(pki, upstream, make_proxy):
    d, certs = pki
    callers = {"billing": {"cert_subject": "CN=billing"}, "other": {"cert_subject": "O=acme"}}
    proxy = await make_proxy(upstream.url, tls_config(d, callers))
    assert await get(f"https://127.0.0.1:{proxy.port}/demo/anything/a", client_ctx(d, certs["billing"])) == 401
    assert upstream.seen == []


async def test_token_still_works_over_tls_without_a_certificate(pki, upstream, make_proxy):
    d, _ = pki
    from .harness import sha

    proxy = await make_proxy(upstream.url, tls_config(d, {"billing": {"token_sha256": sha(CALLER_TOKEN)}}))
    assert await get(f"https://127.0.0.1:{proxy.port}/demo/anything/a", client_ctx(d), AUTH) == 200


async def test_caller_ip_lock_refuses_other_sources_and_names_the_caller(upstream, make_proxy):
    from .harness import sha

    proxy = await make_proxy(upstream.url, {"callers": {"billing": {"token_sha256": sha(CALLER_TOKEN),
                                                                    "allow_ips": ["10.0.0.0/8"]}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/anything/a", headers={**AUTH, "X-Forwarded-For": "10.0.0.1"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "forbidden"
    assert upstream.seen == []
    [line] = proxy.audit()
    assert (line["caller"], line["outcome"], line["reason"]) == ("billing", "denied", "source_ip")


async def test_caller_ip_lock_admits_its_own_range(upstream, make_proxy):
    from .harness import sha

    proxy = await make_proxy(upstream.url, {"callers": {"billing": {"token_sha256": sha(CALLER_TOKEN),
                                                                    "allow_ips": ["127.0.0.0/8", "::1/128"]}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/demo/anything/a", headers=AUTH) as r:
            assert r.status == 200


@pytest.mark.parametrize("subject", ["billing", "=billing", ",", "CN=billing, O=acme", "cn=billing"])
def test_malformed_cert_subject_is_a_config_problem(subject):
    text = ("server: {tls: {cert_file: a, key_file: b, client_ca_file: c}}\n"
            f"callers: {{billing: {{cert_subject: '{subject}'}}}}\n")
    with pytest.raises(config_mod.ConfigInvalid) as err:
        config_mod.parse(text)
    assert any(p.path == "callers.billing.cert_subject" for p in err.value.problems)
