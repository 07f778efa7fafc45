"""The head of a forward-proxy connection's first request, read before anything else is decided.

Only ``CONNECT`` heads are parsed here (request line, header fields, strictly: no obs-fold, no bare
CR/LF, one ``Proxy-Authorization`` at most). Any other method means an absolute-form request:
the connection's bytes go, untouched, to the HTTP protocol that parses and answers every
request (see ``proxy.server.forward.listener``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.errors import BadRequest

MAX_HEAD = 16 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_AUTHORITY = re.compile(rb"[A-Za-z0-9.\-:\[\]%_]+")  # host:port, [v6]:port; userinfo and paths never


@dataclass(frozen=True)
class ConnectHead:
    authority: str
    headers: dict[str, list[str]] = field(repr=False)  # lower-case name -> values

    def one(self, name: str) -> str | None:
        values = self.headers.get(name, [])
        if len(values) > 1:
            raise BadRequest(f"{name} repeated", reason="malformed_request")
        return values[0] if values else None


def first_line(buffer: bytes | bytearray) -> bytes | None:
    end = buffer.find(b"\r\n")
    return None if end < 0 else bytes(buffer[:end])


def is_connect(line: bytes) -> bool:
    return line.split(b" ", 1)[0] == b"CONNECT"


def parse_connect(head: bytes) -> ConnectHead:
    """``head`` is everything before the blank line that ends it."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("malformed CONNECT request line", reason="malformed_request")
    if not _AUTHORITY.fullmatch(parts[1]):
        raise BadRequest("CONNECT target is not host:port", reason="malformed_request")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or any(c in value for c in b"\r\n\x00"):
            raise BadRequest("malformed header field in CONNECT", reason="malformed_request")
        headers.setdefault(name.decode("ascii").lower(), []).append(value.strip(b" \t").decode("latin-1"))
    return ConnectHead(parts[1].decode("ascii"), headers)
