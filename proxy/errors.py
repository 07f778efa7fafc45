"""The proxy's exception tree and its one mapping to status + fixed message.

Every error credproxy itself answers is one of these. The public message is
fixed per class; ``detail`` goes to the (scrubbed) log only, never to callers.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web


class ProxyError(Exception):
    headers: tuple[tuple[str, str], ...] = ()  # sent with the answer (407's Proxy-Authenticate)
    status = 500
    code = "internal_error"
    message = "internal error"

    def __init__(self, detail: str = "", *, reason: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail or self.message)
        self.detail = detail
        self.reason = reason or self.code
        self.retry_after = retry_after


class BadRequest(ProxyError):
    status, code, message = 400, "bad_request", "malformed request"


class Unauthenticated(ProxyError):
    status, code, message = 401, "unauthenticated", "missing or invalid caller credentials"


class ProxyAuthRequired(Unauthenticated):
    """Forward proxy (SPEC §10): the CONNECT or absolute-form request carried no valid caller token."""

    status = 407
    headers = (("Proxy-Authenticate", 'Basic realm="credproxy"'),)


class Forbidden(ProxyError):
    # Unknown credential and not-permitted share this class and body on purpose.
    status, code, message = 403, "forbidden", "not permitted"


class NotFound(ProxyError):
    status, code, message = 404, "not_found", "no such resource"


class PayloadTooLarge(ProxyError):
    status, code, message = 413, "too_large", "request body too large"


class HeadersTooLarge(ProxyError):
    status, code, message = 431, "too_large", "request headers too large"


class RateLimited(ProxyError):
    status, code, message = 429, "rate_limited", "too many requests"


class UpstreamError(ProxyError):
    status, code, message = 502, "upstream_error", "upstream request failed"


class CredentialUnavailable(ProxyError):
    status, code, message = 503, "credential_unavailable", "credential unavailable"


class AuditUnavailable(CredentialUnavailable):
    """The audit trail cannot be written and ``audit.on_failure`` is refuse (SPEC §11): nothing is served
    that would not be audited. Callers see the same answer as any unavailable credential."""


class Overloaded(ProxyError):
    """The process already holds ``server.limits.max_connections`` caller connections (not in SPEC §6:
    ``credential_unavailable`` would send callers looking for a credential problem)."""

    status, code, message = 503, "overloaded", "too many connections"


class UpstreamTimeout(ProxyError):
    status, code, message = 504, "upstream_timeout", "upstream timed out"


class SecretBackendError(CredentialUnavailable):
    """The secret backend could not produce a value (unreachable, denied, missing)."""


class SecretNotFound(SecretBackendError):
    pass


class SecretAccessDenied(SecretBackendError):
    pass


class StoreError(Exception):
    """Operator-facing store problems (wrong key, tampered file): a clear message, no value."""


class ConflictError(StoreError):
    """A compare-and-set write lost against a concurrent writer."""


class ListenError(OSError):
    """A listener could not be opened (address in use, no permission): start-up ends with its one line.

    An ``OSError`` still (same errno), so a reload that cannot bind reports it as before."""

    def __init__(self, errno: int | None, address: str, field: str, reason: str) -> None:
        super().__init__(errno, reason)
        self.address, self.field, self.reason = address, field, reason

    def __str__(self) -> str:
        return f"{self.address} {self.reason} ({self.field})"


# After a malformed or oversized request the connection's framing cannot be trusted
# (nor is an unread body worth draining): answer, then close.
CLOSE_AFTER = frozenset({400, 413, 431})


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": code, "message": message, "request_id": request_id}).encode()


def to_bytes(exc: ProxyError, request_id: str) -> bytes:
    """The answer ``to_response`` gives, as a whole HTTP/1.1 response that closes the connection: for a
    connection refused before aiohttp's request handling ever sees it."""
    body = error_body(exc.code, exc.message, request_id)
    head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", f"X-Request-Id: {request_id}", "Cache-Control: no-store",
            "Connection: close"]
    if exc.retry_after is not None:
        head.append(f"Retry-After: {max(1, int(exc.retry_after))}")
    head += [f"{name}: {value}" for name, value in exc.headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def to_response(exc: ProxyError, request_id: str) -> web.Response:
    headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after)))
    headers.update(exc.headers)
    resp = web.Response(
        status=exc.status,
        body=error_body(exc.code, exc.message, request_id),
        content_type="application/json",
        headers=headers,
    )
    if exc.status in CLOSE_AFTER:
        resp.force_close()
    return resp
