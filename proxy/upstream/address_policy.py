"""Where credproxy will connect: upstream addresses are checked at connect time.

The check runs after DNS, for IP literals too, on the addresses the socket is
then connected to — in ``proxy.upstream.dial`` for the upstream client, and in
the socket factory aiohttp calls for the control-plane clients (token
endpoints, webhooks) — so a name that resolves (or re-resolves, DNS rebinding)
into a denied range cannot slip past it.

- Always refused: link-local (169.254.0.0/16 — cloud metadata at
  169.254.169.254 — and fe80::/10), other known metadata addresses,
  unspecified, multicast, broadcast and reserved ranges.
- Refused with ``server.deny_private_upstreams: true``: RFC 1918, CGNAT
  (100.64.0.0/10), benchmarking (198.18.0.0/15) and unique-local IPv6. Loopback
  stays allowed, for sidecar and test upstreams on 127.0.0.1.
- ``server.deny_upstream_networks``: further ranges the operator names.
- The proxy itself: any of its own listening addresses (a request relayed back
  into credproxy would be injected twice and could loop).

IPv4 addresses embedded in IPv6 (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4) are judged as the IPv4 address they reach.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable

from proxy.errors import AddressDenied

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_DENIED: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "::/128", "fe80::/10", "ff00::/8",
    "fd00:ec2::254/128",  # AWS metadata over IPv6
))
PRIVATE: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "198.18.0.0/15", "fc00::/7",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def effective(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def _is_local(ip: IPAddress) -> bool:
    """True when ``ip`` is one of this host's own addresses (binding to it works)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True


class OwnListeners:
    """The addresses credproxy itself listens on: a fact about the process, not the config, so one
    registry is shared by the address policy of every config (a listener a rejected reload bound is
    forgotten again when that reload discards it)."""

    def __init__(self) -> None:
        self._exact: set[tuple[IPAddress, int]] = set()
        self._any_host: set[int] = set()  # ports we listen on at 0.0.0.0 / ::

    def add(self, host: str, port: int) -> None:
        ip = effective(ipaddress.ip_address(host))
        if ip.is_unspecified:
            self._any_host.add(port)
        else:
            self._exact.add((ip, port))

    def discard(self, host: str, port: int) -> None:
        ip = effective(ipaddress.ip_address(host))
        if ip.is_unspecified:
            self._any_host.discard(port)
        else:
            self._exact.discard((ip, port))

    def match(self, ip: IPAddress, port: int) -> bool:
        return (ip, port) in self._exact or (port in self._any_host and _local(ip))


@functools.lru_cache(maxsize=4096)
def _local(ip: IPAddress) -> bool:
    return _is_local(ip)


class AddressPolicy:
    """The ranges one config denies (immutable: a reload builds a new policy and commits it with its
    State), plus credproxy's own listeners."""

    __slots__ = ("denied", "own")

    def __init__(self, *, deny_private: bool = False, deny: Iterable[IPNetwork] = (),
                 own: OwnListeners | None = None) -> None:
        object.__setattr__(self, "denied", ALWAYS_DENIED + (PRIVATE if deny_private else ()) + tuple(deny))
        object.__setattr__(self, "own", own if own is not None else OwnListeners())

    def __setattr__(self, name, value) -> None:
        raise AttributeError("an AddressPolicy is immutable: build a new one from the config")

    def __eq__(self, other) -> bool:
        return isinstance(other, AddressPolicy) and self.denied == other.denied and self.own is other.own

    __hash__ = None

    @classmethod
    def from_config(cls, server, own: OwnListeners | None = None) -> "AddressPolicy":
        """``server.deny_private_upstreams`` / ``deny_upstream_networks``."""
        return cls(deny_private=server.deny_private_upstreams, deny=server.deny_upstream_networks, own=own)

    def refusal(self, host: str, port: int) -> str | None:
        """Why connecting to ``host:port`` is refused, or None when it is allowed."""
        try:
            ip = effective(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            return "not an IP address"
        for net in self.denied:
            if ip.version == net.version and ip in net:
                return f"in denied range {net}"
        if self.own.match(ip, port):
            return "credproxy's own listener"
        return None

    def socket_factory(self, addr_info) -> socket.socket:
        """For ``aiohttp.TCPConnector(socket_factory=...)``: check, then create the socket."""
        family, type_, proto, _canon, sockaddr = addr_info
        why = self.refusal(sockaddr[0], sockaddr[1])
        if why is not None:
            raise AddressDenied(why)
        return socket.socket(family=family, type=type_, proto=proto)
