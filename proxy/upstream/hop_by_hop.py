"""Hop-by-hop header fields (RFC 9110 §7.6.1): meant for one connection, never forwarded either way."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    "Proxy-Authenticate", "Proxy-Authorization", "HTTP2-Settings",
))


def strip_hop_by_hop(headers: CIMultiDict[str] | CIMultiDictProxy[str],
                     drop: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """A copy without the lower-case names in ``drop`` (a superset of ``HOP_BY_HOP``, prepared once) and those
    named in ``Connection``."""
    if "Connection" in headers:
        drop = drop | {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    # One pass over the few headers a request has, rather than a removal per name that might be there (~50).
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
