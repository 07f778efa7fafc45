"""Request-shape checks: what credproxy refuses to forward, however it is addressed.

llhttp already refuses most malformed requests (those answer through
``proxy.server.connection``). These checks run first in the request path and close
what the parser lets through or what would change meaning behind the proxy:

- framing an upstream could read differently (request smuggling): a
  ``Transfer-Encoding`` other than exactly ``chunked``, one together with
  ``Content-Length``, or in HTTP/1.0; repeated or non-numeric ``Content-Length``;
- CR, LF or NUL inside a header (defence in depth: the parser refuses them too);
- HTTP versions other than 1.0 and 1.1 (an HTTP/0.9 request line has no headers);
- ``CONNECT`` (credproxy is not a forward proxy), ``TRACE``/``TRACK`` (the
  upstream would echo the injected credential back);
- protocol upgrades other than ``h2c`` (WebSocket, ``tcp``, anything else, or
  ``Connection: upgrade`` with nothing to upgrade to): after a switch the proxy
  could no longer inspect or redact the stream. An ``h2c`` offer (what
  ``curl --http2`` sends on ``http://``: ``Upgrade: h2c``, ``HTTP2-Settings``
  and ``Connection`` naming both) is optional for the server to take up, so it
  is ignored: the pipeline strips those headers as hop-by-hop and the request is
  served over HTTP/1.1 (SPEC §11);
- method-override headers (``X-HTTP-Method-Override`` and kin) and the
  ``_method`` query parameter: frameworks honour them, so a caller allowed
  ``POST`` could have the upstream run ``DELETE``. They are refused, not
  stripped, so a caller learns at once that the call cannot work this way.

All are ``400 bad_request``. Headers through which a caller could claim another
address, host, scheme or path to the upstream (``SPOOFABLE``) are removed from
what the pipeline forwards.
"""

from __future__ import annotations

from itertools import chain
from urllib.parse import unquote_plus

from proxy.errors import BadRequest

REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
METHOD_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
METHOD_OVERRIDE_PARAMS = frozenset({"_method"})
SPOOFABLE = (
    "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port",
    "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Forwarded-Scheme", "X-Forwarded-Ssl", "X-Real-IP",
    "X-Client-IP", "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr", "True-Client-IP", "CF-Connecting-IP",
    "Fastly-Client-IP", "X-Cluster-Client-IP", "X-Original-URL", "X-Rewrite-URL", "X-Original-Host", "X-Host",
)


# Lower-case names the header checks below read (besides Host, which only a repeat makes them refuse).
SHAPE_NAMES = frozenset({"transfer-encoding", "content-length", "upgrade", "connection",
                         *(h.lower() for h in METHOD_OVERRIDE_HEADERS)})


def plain_head(joined: bytes, fields: int, names: list[str]) -> bool:
    """Whether a head passes the header checks of ``check_request`` without running them. ``joined``: its
    ``fields`` names and values joined by NUL; ``names``: the names in lower case. Plain: ASCII (names fold
    as the checks fold them), no CR, LF or NUL, none of ``SHAPE_NAMES``, at most one Host. The connection
    asks this once per head, from the pass that decodes it; a head that is not plain gets every check."""
    # (13, 10: CR and LF as ints, which bytes' ``in`` looks for with one memchr, not as a substring search)
    return joined.isascii() and 13 not in joined and 10 not in joined \
        and joined.count(b"\x00") == (fields - 1 if fields else 0) \
        and SHAPE_NAMES.isdisjoint(names) and names.count("host") < 2


def check_request(request) -> None:
    """``request``: a ``proxy.server.request.Request``."""
    if request.version not in ((1, 1), (1, 0)):
        raise BadRequest("HTTP version other than 1.0/1.1", reason="http_version")
    if request.method in REFUSED_METHODS:
        raise BadRequest(f"method {request.method} is never forwarded", reason="method_refused")
    if not request.plain_head:  # see plain_head: a plain head passes these four
        check_framing(request.headers, request.version)
        check_header_bytes(request.raw_headers)
        check_upgrade(request.headers)
        check_method_override(request.headers, request.target.partition("?")[2])
    elif "?" in request.target:
        check_method_override((), request.target.partition("?")[2])


def check_framing(headers, version) -> None:
    te = headers.getall("Transfer-Encoding", [])
    cl = headers.getall("Content-Length", [])
    if te and cl:
        raise BadRequest("both Transfer-Encoding and Content-Length", reason="smuggling")
    if len(te) > 1 or (te and te[0].strip().lower() != "chunked"):
        raise BadRequest("Transfer-Encoding other than a single chunked", reason="smuggling")
    if te and version == (1, 0):
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request", reason="smuggling")
    if len(cl) > 1 or (cl and not (cl[0].isascii() and cl[0].isdigit())):
        raise BadRequest("repeated or malformed Content-Length", reason="smuggling")
    if len(headers.getall("Host", ())) > 1:  # which one would the upstream (or a cache before it) believe?
        raise BadRequest("repeated Host", reason="bad_header")


def check_header_bytes(raw_headers) -> None:
    # One scan of all names and values joined (at C speed) rather than a generator per header: every request.
    joined = b"".join(chain.from_iterable(raw_headers))
    if b"\r" in joined or b"\n" in joined or b"\x00" in joined:
        raise BadRequest("CR, LF or NUL in a header", reason="bad_header")


def check_upgrade(headers) -> None:
    """Refuse a protocol switch; let an ``h2c`` offer through (the pipeline strips it as hop-by-hop)."""
    offered = {p.strip().lower() for v in headers.getall("Upgrade", []) for p in v.split(",")} - {""}
    if offered - {"h2c"}:
        raise BadRequest("protocol upgrade requested", reason="upgrade_refused")
    if not offered and "upgrade" in {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}:
        raise BadRequest("Connection: upgrade without an upgrade offer", reason="upgrade_refused")


def check_method_override(headers, query: str) -> None:
    if any(h in headers for h in METHOD_OVERRIDE_HEADERS):
        raise BadRequest("method-override header", reason="method_override")
    if query and any(unquote_plus(p.partition("=")[0]).lower() in METHOD_OVERRIDE_PARAMS
                     for p in query.split("&")):
        raise BadRequest("method-override query parameter", reason="method_override")
