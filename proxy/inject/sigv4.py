"""``aws_sigv4``: sign every outbound request with AWS Signature Version 4.

The signature math and canonicalization are botocore's (``SigV4Auth``, or
``S3SigV4Auth`` for S3, which signs the path as sent and always sends
``X-Amz-Content-SHA256``). We set the date, token and payload-hash headers
ourselves so the clock is injectable and a streamed body never has to be read.

Before signing, whatever the caller sent that belongs to a signature is removed
(``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``,
``X-Amz-Content-SHA256``, ``Date``, and presigned-URL query parameters), and
the path and query are rewritten in AWS's canonical percent-encoding so the
bytes sent are the bytes signed. ``Host`` is set explicitly to what aiohttp
would send, so the signed Host is the one on the wire.

The pipeline calls ``inject`` last, after every other header change, and again
for a replay, so each attempt carries a fresh signature.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from urllib.parse import quote_from_bytes, unquote_to_bytes

from proxy.inject.base import Injector, SecretValues
from proxy.upstream.outbound import Outbound

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# aws-chunked bodies with trailing checksums: the value describes the body's framing, so it is kept.
STREAMING_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
SIGNATURE_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256", "Date")
PRESIGN_PARAMS = frozenset(p.lower() for p in (
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
    "X-Amz-Signature", "X-Amz-Security-Token",
))
_UNRESERVED = "-_.~"


def aws_encode(raw: str, *, plus_is_space: bool = False) -> str:
    """Percent-encode the way AWS canonicalizes: everything but unreserved characters, upper-case hex."""
    if plus_is_space:
        raw = raw.replace("+", " ")
    return quote_from_bytes(unquote_to_bytes(raw), safe=_UNRESERVED)


def canonical_path(path: str) -> str:
    return "/".join(aws_encode(seg) for seg in path.split("/"))


def canonical_query(query: str) -> str:
    """Re-encode each pair canonically (``+`` read as a space, as form encoding has it) and
    drop presigned-URL signature parameters the caller may have sent."""
    out = []
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        key = aws_encode(key, plus_is_space=True)
        if unquote_to_bytes(key).decode("utf-8", "replace").lower() in PRESIGN_PARAMS:
            continue
        out.append(f"{key}={aws_encode(value, plus_is_space=True)}")
    return "&".join(out)


def _botocore():
    try:
        from botocore.auth import S3SigV4Auth, SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError:  # config validation refuses aws_sigv4 without botocore; this is the backstop
        raise RuntimeError("aws_sigv4 needs botocore: install credproxy[aws]") from None
    return SigV4Auth, S3SigV4Auth, AWSRequest, Credentials


class SigV4Injector(Injector):
    removes = SIGNATURE_HEADERS

    def __init__(self, region: str, service: str, *, clock: Callable[[], float] = time.time) -> None:
        sigv4, s3sigv4, self._request_cls, self._credentials_cls = _botocore()
        self.region = region
        self.service = service
        self.s3 = service == "s3" or service.startswith("s3-")
        self._signer_cls = s3sigv4 if self.s3 else sigv4
        self._clock = clock

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        trailer = out.headers.get("X-Amz-Content-SHA256", "").strip() == STREAMING_TRAILER
        for name in SIGNATURE_HEADERS:
            out.headers.popall(name, None)
        out.path = canonical_path(out.path)
        out.query = canonical_query(out.query)
        out.headers["Host"] = out.url.host_port_subcomponent or ""
        timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        out.headers["X-Amz-Date"] = timestamp
        token = secrets.get("session_token")
        if token:
            out.headers["X-Amz-Security-Token"] = token.reveal()
        buffered = out.body is None or isinstance(out.body, bytes)
        if trailer:
            out.headers["X-Amz-Content-SHA256"] = STREAMING_TRAILER
        elif not buffered:  # a streamed body is never read ahead to hash it (S3 accepts this; most services do not)
            out.headers["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
        elif self.s3:
            out.headers["X-Amz-Content-SHA256"] = hashlib.sha256(out.body or b"").hexdigest()
        # Otherwise botocore hashes the buffered body itself and no payload header is sent.
        out.headers["Authorization"] = self._authorization(out, secrets, timestamp)

    def _authorization(self, out: Outbound, secrets: SecretValues, timestamp: str) -> str:
        token = secrets.get("session_token")
        creds = self._credentials_cls(secrets["access_key_id"].reveal(), secrets["secret_access_key"].reveal(),
                                      token.reveal() if token else None)
        signer = self._signer_cls(creds, self.service, self.region)
        body = out.body if isinstance(out.body, bytes) else b""
        request = self._request_cls(method=out.method, url=str(out.url), data=body)
        for name, value in out.headers.items():
            request.headers[name] = value  # HTTPHeaders appends: a repeated header is signed comma-joined
        request.context["timestamp"] = timestamp
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signed = signer.signed_headers(signer.headers_to_sign(request))
        return f"AWS4-HMAC-SHA256 Credential={signer.scope(request)}, SignedHeaders={signed}, Signature={signature}"
