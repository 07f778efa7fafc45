"""The caller's address as an ``ipaddress`` object, read once per connection."""

from __future__ import annotations

import functools
import ipaddress


class _KeepsText:
    """An address that keeps its text: every request's audit line writes it, and ``ipaddress`` builds the
    text anew on each ``str`` (a join over the address bytes). Otherwise the ``ipaddress`` class after it."""

    __slots__ = ()

    def __init__(self, address) -> None:
        super().__init__(address)
        self._text = super().__str__()

    def __str__(self) -> str:
        return self._text


class _IPv4(_KeepsText, ipaddress.IPv4Address):
    __slots__ = ("_text",)


class _IPv6(_KeepsText, ipaddress.IPv6Address):
    __slots__ = ("_text",)


def transport_ip(transport) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP (an IPv4-mapped IPv6 address as the IPv4 one); None on a unix socket."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer or not isinstance(peer, tuple):
        return None
    return parse_ip(peer[0])


@functools.lru_cache(maxsize=4096)  # callers come from a few addresses; parsing one costs more than the lookup
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return _IPv4(int(mapped)) if mapped is not None else _IPv6(text)
    return _IPv4(int(ip))
