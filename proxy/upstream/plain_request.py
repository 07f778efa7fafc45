"""The outbound head of a plain body-less request, rendered from the caller's bytes.

A plain head (``proxy.server.request_shape.plain_head``: ASCII, no CR, LF or NUL, no framing, upgrade or
method-override fields, at most one Host) whose names llhttp (strict) let through as tokens needs none of
``request_head``'s checks on its fields, and no decoding: its (name, value) bytes are copied as they came,
minus those never forwarded. The result is byte for byte what ``strip_hop_by_hop``, ``pipeline._outbound``
and ``client.request_head`` make of the same request (a property test holds the two to it); anything else —
a target that would not survive the wire, an injector that does more than set one header — goes that way.
"""

from __future__ import annotations

import functools

from proxy.upstream.client import Target

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 (as request_head does)
_IDENTITY = b"Accept-Encoding: identity\r\n"
_UNSAFE = ("\r", "\n", "\x00", " ")


@functools.lru_cache(maxsize=64)
def as_bytes(names: frozenset[str]) -> frozenset[bytes]:
    """Lower-case names as bytes, to test the caller's raw header names against (they are ASCII tokens)."""
    return frozenset(n.encode("ascii") for n in names if n.isascii())


def render(method: str, target: Target, path: str, query: str, raw: list[tuple[bytes, bytes]],
           drop: frozenset[bytes], request_id: str, identity: bool, injected: bytes) -> bytes | None:
    """``raw``: the plain head's fields; ``drop``: lower-case names never forwarded (hop-by-hop, caller
    credentials, the injector's); ``identity``: ask for an unencoded answer (the leak guard reads it);
    ``injected``: the injector's header line. None when the target would not survive the wire."""
    where = target.prefix + path + ("?" + query if query else "")
    for bad in _UNSAFE:
        if bad in where:
            return None
    lines = [f"{method} {where} HTTP/1.1\r\n".encode("utf-8", "surrogateescape"), target.host_line]
    add = lines.append
    asked = False
    for name, value in raw:
        low = name.lower()
        if low in drop:
            continue
        if identity and low == b"accept-encoding":
            if not asked:  # the caller's first Accept-Encoding becomes identity, in its place; others go
                asked = True
                add(_IDENTITY)
            continue
        add(b"%s: %s\r\n" % (name, value))
    add(b"X-Request-Id: %s\r\n" % request_id.encode("ascii"))
    if identity and not asked:
        add(_IDENTITY)
    add(injected)
    if method in _BODY_METHODS:
        add(b"Content-Length: 0\r\n")
    add(b"\r\n")
    return b"".join(lines)
