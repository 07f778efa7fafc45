"""What every injector implements, and the values it injects."""

from __future__ import annotations

import re
from collections.abc import Mapping

from proxy.store.secret import Secret
from proxy.upstream.outbound import Outbound

# A field name (``secret``, ``username``, ...) or a reference string (``PATH#FIELD``, for
# template placeholders) -> its value: a ``Grant``'s values, as the injector receives them.
SecretValues = Mapping[str, Secret]


class Injector:
    """Sets credentials on an outbound request; ``removes`` names headers callers may not supply."""

    removes: tuple[str, ...] = ()
    sends = "signs each request"  # what ``credproxy check`` says it adds, as a template: never a value

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        raise NotImplementedError

    def header_line(self, secrets: SecretValues) -> bytes | None:
        """When all ``inject`` does is set one header (after dropping ``removes``): that header as the bytes
        ``client.request_head`` would write for it (``b"Name: value\r\n"``), so a plain request can be
        rendered without an ``Outbound``. None: only ``inject`` will do (signers, query parameters)."""
        return None


# Never set by header_line: names the request path writes itself.
_OWN = frozenset({"host", "content-length", "transfer-encoding", "x-request-id", "accept-encoding"})


def header_line(name: str, value: str) -> bytes | None:
    """``b"name: value\r\n"`` if it survives the wire as ``request_head`` checks it, else None."""
    line = f"{name}: {value}\r\n"
    if name.lower() in _OWN or "\x00" in line or line.count("\r") != 1 or line.count("\n") != 1 \
            or not _TOKEN.fullmatch(name):
        return None
    return line.encode("utf-8", "surrogateescape")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
