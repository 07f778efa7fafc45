"""The proxy's exception tree and its one mapping to status + fixed message.

Every error credproxy itself answers is a ``ProxyError``. The public message is
fixed per class; ``detail`` goes to the (scrubbed) log only, never to callers.
The exceptions that never reach a caller (token failures, configuration, store
and admin-client problems) live here too, so the whole tree reads in one place.
"""

from __future__ import annotations

import errno
import json
from http import HTTPStatus



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


class TokenUnavailable(CredentialUnavailable):
    """No valid token could be obtained; ``reason`` is ``token_<failure reason>``."""


class VaultUnavailable(SecretBackendError):
    """Vault could not be asked or gave no usable answer: unreachable, timed out,
    TLS failure, sealed, standby, 5xx, 429, or an answer of the wrong shape."""


class VaultRefused(SecretBackendError):
    """Vault answered a 4xx. ``status`` lets the caller decide what it means
    (403 on a read: access denied; 400 on a cas write: conflict; 400 on login: bad credentials)."""

    def __init__(self, detail: str, status: int) -> None:
        super().__init__(detail, reason=f"vault_{status}")
        self.status = status


class LoginRefused(StoreError):
    """Vault rejected credproxy's own credentials, or they cannot be read. Retrying does not
    help until an operator acts: fatal at start-up, retried with backoff at run time."""


class AddressDenied(OSError):
    """Raised from the socket factory: aiohttp reports it as a connect failure."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EACCES, f"upstream address refused: {why}")
        self.why = why


class LeakBlocked(UpstreamError):
    """Under ``leak_guard: block``, the answer echoed an injected secret."""


# Upstream answers (proxy.upstream): what the client maps to UpstreamError / UpstreamTimeout.


class BadAnswer(Exception):
    """The upstream's head cannot be used; ``reason`` is the audit reason. ``stale``: the connection closed
    before a single byte of an answer arrived (a pooled connection the upstream had already dropped)."""

    def __init__(self, why: str, reason: str = "upstream_failed", *, stale: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.reason = reason
        self.stale = stale


class HeadTimeout(TimeoutError):
    """No answer head within the read timeout."""


class BodyFailed(Exception):
    """The answer's body cannot be read to its end: bad framing, the upstream closed early, or the answer was
    closed under the reader."""


class BodyTimeout(BodyFailed, TimeoutError):
    """No body bytes within the read timeout."""


# --- outside the request path -------------------------------------------------------


# The whole vocabulary; ``credproxy_token_refresh_total{result}`` takes these and "ok".
TOKEN_FAILURE_REASONS = frozenset({
    "timeout",            # the endpoint did not answer within the token request timeout
    "unreachable",        # connection refused / reset / DNS
    "tls",                # certificate verification failed
    "too_large",          # answer body over the limit
    "rejected",           # 4xx: bad client credentials, invalid_grant, ...
    "http_error",         # any other non-2xx answer (5xx, redirects)
    "html",               # an HTML page instead of a token (captive portal, error page)
    "invalid_json",       # not JSON, or not a JSON object
    "invalid_xml",        # not well-formed XML, or XML with a DOCTYPE
    "no_access_token",    # JSON without a usable access_token
    "no_session_id",      # login answer without the session ID
    "bad_expires_in",     # expires_in zero or negative
    "bad_instance_url",   # instance_url / server_url missing, not https, or with userinfo
    "bad_private_key",    # the private key is not a PEM RSA or EC P-256 key
    "secret_unavailable",  # a referenced secret could not be read
    "rotation_conflict",  # the rotated refresh token lost a compare-and-set race
    "store_unavailable",  # the rotated refresh token could not be written back
    "internal",           # a bug: logged with its type name only
})


class TokenFailure(Exception):
    """Why a token could not be obtained: a fixed reason (metric label, admin ``last_error``) and a
    detail that is safe to log. Neither ever carries a response body or a secret."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in TOKEN_FAILURE_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigInvalid(Exception):
    """The configuration cannot be used; each problem names file, line and field path, never a value."""

    def __init__(self, problems: list) -> None:  # of proxy.config.models.Problem
        super().__init__(f"{len(problems)} configuration problem(s)")
        self.problems = problems


class AdminTokenError(Exception):
    """The admin token file cannot be used; the message names the file, never its content."""

    def __init__(self, token_file: str, reason: str) -> None:
        super().__init__(f"admin.token_file {token_file} {reason}")
        self.reason = reason


class AdminClientError(Exception):
    """The CLI could not do what the operator asked through the admin API; ``exit_code`` per kind."""

    exit_code = 1
    code = "error"


class AdminConfigError(AdminClientError):
    exit_code, code = 2, "config"


class AdminUnreachable(AdminClientError):
    exit_code, code = 3, "proxy_unreachable"


class AdminUnauthorized(AdminClientError):
    exit_code, code = 4, "admin_unauthorized"


class AppendFailed(Exception):
    """An append that failed after ``written`` whole lines of its batch reached the file."""

    def __init__(self, cause: OSError, written: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.written = written


class ListenerUnavailable(Exception):
    """A dedicated listener of the new config cannot be set up (reported as a problem at ``field``)."""

    def __init__(self, credential: str, field: str, reason: str, *, listen=None,
                 os_error: OSError | None = None) -> None:
        super().__init__(f"credentials.{credential}.{field}: {reason}")
        self.credential = credential
        self.field = field
        self.reason = reason
        self.listen = listen
        self.os_error = os_error  # a failed bind (at start it is reported as a ListenError)


# After a malformed or oversized request the connection's framing cannot be trusted
# (nor is an unread body worth draining): answer, then close.
CLOSE_AFTER = frozenset({400, 413, 431})


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": code, "message": message, "request_id": request_id}).encode()


def to_bytes(exc: ProxyError, request_id: str) -> bytes:
    """The answer ``to_response`` gives, as a whole HTTP/1.1 response that closes the connection: for a
    connection refused before its request is parsed."""
    body = error_body(exc.code, exc.message, request_id)
    head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", f"X-Request-Id: {request_id}", "Cache-Control: no-store",
            "Connection: close"]
    if exc.retry_after is not None:
        head.append(f"Retry-After: {max(1, int(exc.retry_after))}")
    head += [f"{name}: {value}" for name, value in exc.headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Answer:
    """A whole answer made by credproxy itself, written by ``proxy.server.response.ResponseWriter.answer``."""

    __slots__ = ("status", "headers", "body", "close")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, close: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.close = close  # the connection's framing cannot be trusted after this one: close it


def to_response(exc: ProxyError, request_id: str) -> Answer:
    headers = [("Content-Type", "application/json"), ("X-Request-Id", request_id), ("Cache-Control", "no-store")]
    if exc.retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(exc.retry_after)))))
    headers += exc.headers
    return Answer(exc.status, headers, error_body(exc.code, exc.message, request_id), exc.status in CLOSE_AFTER)
