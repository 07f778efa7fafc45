"""Who is calling: caller tokens (SHA-256 only, constant-time compare), client certificates.

``authenticate`` removes both caller-credential headers from what will be
forwarded, whatever the outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from collections.abc import Mapping

from proxy.config import CallerConfig
from proxy.errors import Forbidden, Unauthenticated

ANONYMOUS = "anonymous"
CALLER_HEADERS = ("Proxy-Authorization", "Authorization")


@dataclass(frozen=True, slots=True)
class Caller:
    name: str


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def cert_subject(peercert: dict | None) -> str | None:
    """``CN=billing,O=acme`` from the ssl module's peer certificate dict."""
    if not peercert:
        return None
    parts = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                     "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(parts)


class Authenticator:
    def __init__(self, callers: dict[str, CallerConfig] | None) -> None:
        self.anonymous = callers is None
        self._tokens = [(name, bytes.fromhex(c.token_sha256)) for name, c in (callers or {}).items() if c.token_sha256]
        self._subjects = {c.cert_subject: name for name, c in (callers or {}).items() if c.cert_subject}
        self._nets = {name: tuple(c.allow_ips) for name, c in (callers or {}).items() if c.allow_ips is not None}

    def authenticate(self, presented: Mapping[str, str], peer_ip: ipaddress._BaseAddress | None,
                     peercert: dict | None = None) -> Caller:
        """Identify the caller from the request's own headers (read only; the pipeline
        removes ``CALLER_HEADERS`` from what it forwards, whatever the outcome)."""
        proxy_auth = presented.get("Proxy-Authorization")
        auth = presented.get("Authorization")
        if self.anonymous:
            return Caller(ANONYMOUS)
        name = self._by_token(_bearer(proxy_auth) or _bearer(auth))
        if name is None and peercert is not None:
            name = self._subjects.get(cert_subject(peercert) or "")
        if name is None:
            raise Unauthenticated("no valid caller token or certificate", reason="bad_caller_token")
        nets = self._nets.get(name)
        if nets is not None and (peer_ip is None or not any(peer_ip in n for n in nets)):
            raise Forbidden("caller used from a source address outside allow_ips", reason="source_ip")
        return Caller(name)

    def _by_token(self, token: str | None) -> str | None:
        if token is None:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, expected in self._tokens:  # compare against every caller: timing says nothing
            if hmac.compare_digest(digest, expected):
                found = name
        return found
