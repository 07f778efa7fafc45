"""Request target -> (credential name, canonical upstream-relative path, raw query).

The canonical path is what policy sees and, byte for byte, what goes upstream:
unreserved characters are decoded, other escapes upper-cased, dot segments
resolved. Encoded ``/`` or ``\\``, raw ``\\``, NUL and other control bytes,
``..`` that would climb above the root, and dot segments carrying path
parameters (``..;x``) are refused.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import NamedTuple

from proxy.errors import BadRequest, Forbidden
from proxy.host_map import target

_UNRESERVED = frozenset((string.ascii_letters + string.digits + "-._~").encode())
# pchar minus pct-encoded: kept literally; anything else is percent-encoded.
_KEEP = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_FORBIDDEN_DECODED = frozenset({0x2F, 0x5C}) | frozenset(range(0x20)) | {0x7F}
# Paths made only of characters kept as they are, with no escapes: canonical already unless a
# segment starts with "." (checked separately), which is nearly every real request.
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# route_prefixed's shortcut: a _PLAIN path split into the credential's name and the rest; a query with
# nothing split_target refuses (a control byte, or the "#" of a fragment).
_PLAIN_PREFIXED = re.compile(r"/([A-Za-z0-9\-._~!$&'()*+,;=:@]*)(/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*)?")
_ODD_QUERY = re.compile(r"[\x00-\x1f\x7f#]")
_BAD_RAW = re.compile(rb"[\x00-\x20\x5c\x7f]")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})?")  # every "%", with its pair when it has a valid one
_ENCODE = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]")  # neither kept as is nor (already) an escape


def _unescape(match: re.Match) -> bytes:
    pair = match.group(1)
    if pair is None:
        raise BadRequest("invalid percent-encoding")
    v = int(pair, 16)
    if v in _FORBIDDEN_DECODED:
        raise BadRequest("encoded slash, backslash or control byte in path")
    return bytes((v,)) if v in _UNRESERVED else b"%" + pair.upper()


def _encode(match: re.Match) -> bytes:
    return b"%%%02X" % match.group()[0]


class Route(NamedTuple):  # immutable like a frozen dataclass, at half its construction cost (one per request)
    credential: str
    path: str  # canonical, starts with "/"
    query: str  # raw, without "?"


_new_route = tuple.__new__  # ``Route(a, b, c)`` is ``tuple.__new__(Route, (a, b, c))`` in a Python frame of its own


def canonical_path(raw: str) -> str:
    if _PLAIN.fullmatch(raw) and "/." not in raw:
        return raw
    data = raw.encode("utf-8", "surrogateescape")
    if not data.startswith(b"/"):
        raise BadRequest("request target is not origin-form")
    # Scanned by compiled patterns, not byte by byte: Python code runs only per escape and per odd byte.
    if _BAD_RAW.search(data):
        raise BadRequest("backslash, space or control byte in path")
    if b"%" in data:
        data = _PCT.sub(_unescape, data)
    out = _ENCODE.sub(_encode, data)
    segments: list[str] = []
    parts = out.decode("ascii").split("/")[1:]
    for n, seg in enumerate(parts):
        last = n == len(parts) - 1
        if ";" in seg and seg.split(";", 1)[0] in (".", ".."):
            # "..;x" is a dot segment to servers that strip path parameters (Tomcat, Jetty)
            raise BadRequest("dot segment with path parameters")
        if seg == ".":
            if last:
                segments.append("")
            continue
        if seg == "..":
            if not segments:
                raise BadRequest("path escapes the root")
            segments.pop()
            if last:
                segments.append("")
            continue
        segments.append(seg)
    return "/" + "/".join(segments)


def split_target(raw_target: str) -> tuple[str, str]:
    if "#" in raw_target:
        raise BadRequest("fragment in request target")
    path, _, query = raw_target.partition("?")
    if query and _CONTROL.search(query):
        raise BadRequest("control byte in query")
    return path, query


def route_prefixed(raw_target: str) -> Route:
    """Main listener: ``/<credential>/<rest>``. Whether the name exists is decided after
    the caller is authenticated, so unauthenticated callers learn nothing about names."""
    path, _, query = raw_target.partition("?")
    plain = _PLAIN_PREFIXED.fullmatch(path)
    if plain is not None and "/." not in path and not (query and _ODD_QUERY.search(query)):
        # Nearly every request: canonical already, so one match does what the steps below would
        # (tests/test_routing_fastpath.py holds the two to the same answer).
        return _new_route(Route, (plain[1][:64], plain[2] or "/", query))
    path, query = split_target(raw_target)
    canon = canonical_path(path)
    name, _, rest = canon[1:].partition("/")
    return Route(name[:64], "/" + rest, query)


def route_dedicated(raw_target: str, credential: str) -> Route:
    path, query = split_target(raw_target)
    return Route(credential, canonical_path(path), query)


@dataclass(frozen=True, slots=True)
class Via:
    """How a forward-proxy request reached credproxy (SPEC §10): inside the tunnel of a ``CONNECT`` to
    ``connect``, by a caller authenticated on that ``CONNECT``; or (``connect`` None) as an absolute-form
    ``http://`` request, which authenticates itself."""

    connect: tuple[str, int] | None
    caller: object | None = None  # proxy.callers.Caller
    listener: str = "forward"


def route_forward(raw_target: str, host_headers: list[str], via: Via, hosts, pick) -> Route:
    """Forward proxy: the credential is the one whose ``hosts`` name the request's host (``pick`` chooses
    among several, see ``proxy.host_map.pick``). Inside a tunnel the request is origin-form and
    its ``Host`` must be the ``CONNECT`` target: a tunnel opened to one name never carries requests for
    another (403, as for an unlisted host)."""
    if via.connect is not None:
        path, query = split_target(raw_target)
        hp = target(host_headers[0], default_port=443) if len(host_headers) == 1 else None
        if hp != via.connect:
            raise Forbidden("Host differs from the CONNECT target", reason="host_mismatch")
        candidates = hosts.intercept.get(hp, ())
    else:
        scheme, sep, rest = raw_target.partition("://")
        if not sep or scheme.lower() != "http":
            raise BadRequest("forward proxy requests are CONNECT or absolute-form http://", reason="not_absolute_form")
        authority, slash, target_rest = rest.partition("/")
        path, query = split_target(slash + target_rest if slash else "/")
        hp = target(authority, default_port=80) if "@" not in authority else None
        if hp is None or (host_headers and [target(h, default_port=80) for h in host_headers] != [hp]):
            raise Forbidden("absolute-form host unlisted, an IP literal, or not the Host", reason="host_mismatch")
        candidates = hosts.http_candidates(hp)
    if not candidates:
        raise Forbidden("no credential claims this host", reason="host_not_listed")
    name = pick(candidates)
    if name is None:
        raise Forbidden("several credentials claim this host and the request names none", reason="no_credential_pick")
    return Route(name, canonical_path(path), query)
