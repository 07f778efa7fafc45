"""Why a token could not be obtained: a fixed reason (metric label, admin ``last_error``)
and a detail that is safe to log. Neither ever carries a response body or a secret."""

from __future__ import annotations

# The whole vocabulary; ``credproxy_token_refresh_total{result}`` takes these and "ok".
REASONS = frozenset({
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
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
