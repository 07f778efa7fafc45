"""The caller's address as an ``ipaddress`` object, read once per connection."""

from __future__ import annotations

import functools
import ipaddress


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
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
