"""The connect-time address policy: which addresses are refused, and that the check
sits where DNS rebinding cannot get around it."""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver

from proxy.errors import AddressDenied, UpstreamError
from proxy.upstream.address_policy import AddressPolicy, OwnListeners

from .scripted_upstream import OK, ScriptedUpstream, always, client, fetch


@pytest.mark.parametrize("ip", ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254",
                                "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "fd00:ec2::254", "100.100.100.200",
                                "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "240.0.0.1"])
def test_always_refused(ip):
    assert AddressPolicy().refusal(ip, 80) is not None


@pytest.mark.parametrize("ip", ["10.0.0.1", "172.16.5.5", "192.168.1.1", "100.64.0.1", "fd12::1", "::ffff:10.0.0.1"])
def test_private_ranges_only_when_configured(ip):
    assert AddressPolicy().refusal(ip, 443) is None
    assert AddressPolicy(deny_private=True).refusal(ip, 443) is not None


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "93.184.216.34", "2606:2800:220:1::1"])
def test_loopback_and_public_stay_allowed(ip):
    assert AddressPolicy(deny_private=True).refusal(ip, 443) is None


def test_own_listeners_are_refused():
    own = OwnListeners()
    own.add("127.0.0.1", 8080)
    own.add("0.0.0.0", 9090)
    policy = AddressPolicy(own=own)
    assert policy.refusal("127.0.0.1", 8080) is not None
    assert policy.refusal("127.0.0.1", 8081) is None
    # a wildcard listener is reachable at every local address, loopback or not
    assert policy.refusal("127.0.0.2", 9090) is not None
    try:
        local = socket.gethostbyname(socket.gethostname())
    except OSError:
        local = None  # no resolvable host name here: loopback above covers the rule
    if local is not None:
        assert policy.refusal(local, 9090) is not None
    assert policy.refusal("93.184.216.34", 9090) is None
    own.discard("127.0.0.1", 8080)  # a listener a rejected reload bound, then let go
    assert policy.refusal("127.0.0.1", 8080) is None


def test_a_policy_cannot_be_changed_in_place():
    policy = AddressPolicy()
    with pytest.raises(AttributeError):
        policy.denied = ()
    assert AddressPolicy(deny_private=True) != AddressPolicy(deny_private=True)  # each has its own listeners
    own = OwnListeners()
    assert AddressPolicy(deny_private=True, own=own) == AddressPolicy(deny_private=True, own=own)
    assert AddressPolicy(own=own) != AddressPolicy(deny_private=True, own=own)


def test_operator_ranges():
    policy = AddressPolicy(deny=[ipaddress.ip_network("203.0.113.0/24")])
    assert policy.refusal("203.0.113.7", 443) is not None and policy.refusal("203.0.114.7", 443) is None


class FlippingAiohttpResolver(AbstractResolver):
    """Answers a name with a harmless address first and a metadata address after — a
    DNS-rebinding attacker's resolver. A fault-injecting fake: no DNS server does this on demand."""

    def __init__(self, first: str, port: int) -> None:
        self.answers = [first, "169.254.169.254"]
        self.port = port

    async def resolve(self, host, port=0, family=socket.AF_INET):
        ip = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [{"hostname": host, "host": ip, "port": self.port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_a_name_rebound_to_metadata_is_refused_at_connect_by_aiohttp_clients(upstream):
    """Token endpoints and webhooks stay on aiohttp: its socket factory runs the same check."""
    policy = AddressPolicy()
    connector = aiohttp.TCPConnector(resolver=FlippingAiohttpResolver("127.0.0.1", upstream.port), use_dns_cache=False,
                                     force_close=True, socket_factory=policy.socket_factory)
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.get(f"http://api.example.test:{upstream.port}/first") as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectorError) as err:
            await s.get(f"http://api.example.test:{upstream.port}/second")
    assert isinstance(err.value.os_error, AddressDenied)
    assert [s.path for s in upstream.seen] == ["/first"]


# -- the upstream client (proxy.upstream.dial): resolve, check every address, connect to a checked one --


class FlippingResolver:
    """Answers the name with a harmless address first and a metadata address after — a DNS-rebinding
    attacker's resolver (a fault-injecting fake: no DNS server does this on demand)."""

    def __init__(self, first: str) -> None:
        self.answers = [first, "169.254.169.254"]

    async def __call__(self, host: str, port: int):
        ip = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [(socket.AF_INET, (ip, port))]


async def test_a_name_rebound_to_metadata_is_refused_at_connect():
    async with ScriptedUpstream(always((OK, "close"))) as up:
        c = client(resolver=FlippingResolver("127.0.0.1"))
        try:
            assert await fetch(c, f"http://api.example.test:{up.port}") == (200, b"ok")
            with pytest.raises(UpstreamError) as err:
                await fetch(c, f"http://api.example.test:{up.port}")
        finally:
            await c.close()
    assert err.value.reason == "upstream_address_denied"
    assert len(up.requests) == 1


async def test_a_name_with_one_denied_address_is_refused():
    async def mixed(host, port):
        return [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET, ("169.254.169.254", port))]

    async with ScriptedUpstream(always(OK)) as up:
        c = client(resolver=mixed)
        try:
            with pytest.raises(UpstreamError) as err:
                await fetch(c, f"http://api.example.test:{up.port}")
        finally:
            await c.close()
    assert err.value.reason == "upstream_address_denied" and up.connections == 0


async def test_credproxy_itself_is_refused_as_an_upstream():
    async with ScriptedUpstream(always(OK)) as up:
        own = OwnListeners()
        own.add("0.0.0.0", up.port)  # as if credproxy listened on this port on every address
        c = client(address_policy=AddressPolicy(own=own))
        try:
            with pytest.raises(UpstreamError) as err:
                await fetch(c, f"http://127.0.0.1:{up.port}")
        finally:
            await c.close()
    assert err.value.reason == "upstream_address_denied" and up.connections == 0
