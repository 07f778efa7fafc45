"""``hmac``: sign each request with an HMAC over a configured canonical string.

Covers the many "HMAC of timestamp + method + path + body" APIs. The canonical
string is a template over the request as it will be sent::

    {method} {host} {path} {query} {path_query} {timestamp} {body} {body_sha256} {key_id}

(``{path}`` includes the upstream's path prefix; ``{path_query}`` is the path with
``?query`` when there is one; ``{body}`` is the raw body). ``{{`` and ``}}`` are
literal braces. The signature, hex or base64, goes into the configured headers,
whose values are templates over ``{signature}``, ``{timestamp}`` and ``{key_id}``.
The key itself can never be placed anywhere.

A body that is streamed (larger than ``session.replay_max_body``) cannot be signed
without reading it ahead: such a request is refused with 413 when the canonical
string needs the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from email.utils import formatdate

from proxy.errors import CredentialUnavailable, PayloadTooLarge
from proxy.config.hmac_template import CANONICAL_FIELDS, HEADER_FIELDS, Parts, fields, parse
from proxy.inject.base import Injector, SecretValues
from proxy.upstream.outbound import Outbound

ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def _render(parts: Parts, values: dict[str, bytes]) -> bytes:
    return b"".join(p.encode() if isinstance(p, str) else values[p[0]] for p in parts)


def format_timestamp(now: float, fmt: str) -> str:
    if fmt == "unix":
        return str(int(now))
    if fmt == "unix_ms":
        return str(int(now * 1000))
    if fmt == "http_date":
        return formatdate(now, usegmt=True)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))  # iso8601


class HmacInjector(Injector):
    def __init__(self, auth, *, clock: Callable[[], float] = time.time) -> None:
        self._canonical = parse(auth.canonical, CANONICAL_FIELDS)
        self._needs_body = bool(fields(self._canonical) & {"body", "body_sha256"})
        self._headers = {name: parse(value, HEADER_FIELDS) for name, value in auth.headers.items()}
        self._digest = ALGORITHMS[auth.algorithm]
        self._encoding = auth.encoding
        self._key_encoding = auth.key_encoding
        self._timestamp_format = auth.timestamp_format
        self._key_id = (auth.key_id or "").encode()
        self._clock = clock
        self.removes = tuple(self._headers)

    def _key(self, secrets: SecretValues) -> bytes:
        raw = secrets["secret"].reveal()
        try:
            if self._key_encoding == "base64":
                return base64.b64decode(raw, validate=True)
            if self._key_encoding == "hex":
                return bytes.fromhex(raw)
        except (binascii.Error, ValueError):
            raise CredentialUnavailable("stored hmac key is not valid " + self._key_encoding,
                                        reason="secret_invalid") from None
        return raw.encode()

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        for name in self._headers:
            out.headers.popall(name, None)
        if self._needs_body and not out.replayable:
            raise PayloadTooLarge("streamed body cannot be hmac-signed", reason="body_too_large_to_sign")
        body = out.body if isinstance(out.body, bytes) else b""
        url = out.url
        host = url.host_port_subcomponent or ""
        out.headers["Host"] = host  # what is signed is what aiohttp sends
        timestamp = format_timestamp(self._clock(), self._timestamp_format).encode()
        path = url.raw_path
        values = {
            "method": out.method.encode(), "host": host.encode(), "path": path.encode(),
            "query": out.query.encode(), "path_query": (path + ("?" + out.query if out.query else "")).encode(),
            "timestamp": timestamp, "body": body, "body_sha256": hashlib.sha256(body).hexdigest().encode(),
            "key_id": self._key_id,
        }
        mac = hmac.new(self._key(secrets), _render(self._canonical, values), self._digest).digest()
        signature = mac.hex() if self._encoding == "hex" else base64.b64encode(mac).decode()
        header_values = {"signature": signature.encode(), "timestamp": timestamp, "key_id": self._key_id}
        for name, parts in self._headers.items():
            out.headers[name] = _render(parts, header_values).decode()
