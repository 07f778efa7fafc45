"""Token endpoint answers, validated. Plain functions: no I/O, no clock of their own.

Every way an answer can be wrong ends in a ``TokenFailure`` with a fixed reason,
or in a documented substitution (a string ``expires_in`` is read as a number; a
huge one is capped). Nothing here puts the body into an exception or log line.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from yarl import URL

from proxy.store.secret import Secret
from proxy.errors import TokenFailure
from proxy.tokens.http import Answer

log = logging.getLogger("credproxy.tokens")

MAX_LIFETIME = 86400.0  # longer promised lifetimes are capped: a token is re-obtained at least daily
_OAUTH_ERROR = re.compile(r"^[a-z_]{1,64}$")  # RFC 6749 §5.2 codes; anything else is not logged


@dataclass(frozen=True, eq=False)
class TokenAnswer:
    """What a provider obtained. ``expires_in`` is None when the answer gave no usable expiry."""

    access: Secret = field(repr=False)
    expires_in: float | None = None
    refresh_token: Secret | None = field(default=None, repr=False)
    upstream: URL | None = None
    lifetime: float | None = None  # the whole lifetime when issued earlier (a token shared by another replica)


def check_status(answer: Answer, what: str = "token endpoint") -> None:
    if 200 <= answer.status < 300:
        return
    code = _oauth_error(answer)
    detail = f"{what} answered HTTP {answer.status}" + (f" error={code}" if code else "")
    raise TokenFailure("rejected" if 400 <= answer.status < 500 else "http_error", detail)


def _oauth_error(answer: Answer) -> str | None:
    try:
        code = json.loads(answer.body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return code if isinstance(code, str) and _OAUTH_ERROR.match(code) else None


def looks_like_html(answer: Answer) -> bool:
    head = answer.body.lstrip()[:64].lower()
    return "html" in answer.content_type or head.startswith((b"<!doctype html", b"<html"))


def _reject_constant(name: str) -> float:
    raise ValueError(name)  # NaN / Infinity are not JSON


def json_object(answer: Answer) -> dict:
    if looks_like_html(answer):
        raise TokenFailure("html", f"HTML instead of JSON (HTTP {answer.status})")
    try:
        data = json.loads(answer.body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenFailure("invalid_json", f"answer is not JSON (HTTP {answer.status}, {len(answer.body)} bytes)") from None
    if not isinstance(data, dict):
        raise TokenFailure("invalid_json", "answer is JSON but not an object")
    return data


def lifetime(value: object, source: str = "expires_in") -> float | None:
    """Seconds from an ``expires_in``-like value: numbers and numeric strings (Azure AD v1
    sends "3599"); zero or negative refuses the answer; unusable values count as absent."""
    if isinstance(value, bool) or value is None:
        if value is not None:
            log.warning("token answer has an unusable expiry; using the fallback", extra={"field": source})
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            log.warning("token answer has an unusable expiry; using the fallback", extra={"field": source})
            return None
    if not isinstance(value, (int, float)) or math.isnan(value):
        log.warning("token answer has an unusable expiry; using the fallback", extra={"field": source})
        return None
    if value <= 0:
        raise TokenFailure("bad_expires_in", f"{source} is {'zero' if value == 0 else 'negative'}")
    if value > MAX_LIFETIME:
        log.warning("token lifetime capped", extra={"field": source, "capped_to_s": MAX_LIFETIME})
        return MAX_LIFETIME
    return float(value)


def jwt_lifetime(token: str, now_wall: float) -> float | None:
    """Seconds until a JWT access token's ``exp`` (unverified: only used as a hint for expiry)."""
    import jwt  # PyJWT: once a token endpoint has answered (not imported by a proxy that gets no tokens)

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.DecodeError:  # an opaque token, or not a JWT after all
        return None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or math.isnan(exp) or math.isinf(exp):
        return None
    remaining = exp - now_wall
    if remaining <= 0:
        raise TokenFailure("bad_expires_in", "the access token's exp is in the past")
    return min(remaining, MAX_LIFETIME)


def upstream_from(url_text: object, base: URL, insecure_ok: bool) -> URL:
    """``instance_url`` / ``serverUrl``: its scheme, host and port replace the upstream's; the
    configured path prefix stays."""
    if not isinstance(url_text, str) or not url_text:
        raise TokenFailure("bad_instance_url", "no server URL in the answer")
    try:
        parts = urlsplit(url_text.strip())
        port = parts.port
    except ValueError:
        raise TokenFailure("bad_instance_url", "server URL is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise TokenFailure("bad_instance_url", "server URL is not absolute")
    if parts.scheme == "http" and not insecure_ok:
        raise TokenFailure("bad_instance_url", "server URL is http:// without allow_insecure_upstream")
    if parts.username is not None or "@" in parts.netloc:
        raise TokenFailure("bad_instance_url", "server URL carries userinfo")
    return URL.build(scheme=parts.scheme, host=parts.hostname, port=port, path=base.raw_path or "/", encoded=True)


def parse_oauth2(answer: Answer, *, now_wall: float, want_instance_url: bool = False, base: URL | None = None,
                 insecure_ok: bool = False) -> TokenAnswer:
    """RFC 6749 §5.1 successful answer -> ``TokenAnswer``; anything else -> ``TokenFailure``."""
    check_status(answer)
    data = json_object(answer)
    access = data.get("access_token")
    if not isinstance(access, str) or not access.strip():
        raise TokenFailure("no_access_token", "answer has no access_token string")
    expires = lifetime(data["expires_in"]) if "expires_in" in data else None
    if expires is None:
        expires = jwt_lifetime(access, now_wall)
    refresh = data.get("refresh_token")
    refresh_secret = Secret(refresh) if isinstance(refresh, str) and refresh else None
    upstream = None
    if want_instance_url:
        upstream = upstream_from(data.get("instance_url"), base or URL("/"), insecure_ok)
    return TokenAnswer(Secret(access), expires, refresh_secret, upstream)
