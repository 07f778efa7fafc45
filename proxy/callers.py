"""Who is calling: caller tokens (SHA-256 only, constant-time compare), client certificates.

``authenticate`` reads the request's own headers; the pipeline removes both
caller-credential headers from what it forwards, whatever the outcome.
``check_source`` applies the caller's
``allow_ips`` lock to the socket peer address; it is a separate step so the
audit line and the misuse alerts name the caller whose token was used from the
wrong place.

A ``cert_subject`` such as ``"CN=billing"`` or ``"CN=billing,O=acme"`` (RFC 4514) names
attributes the verified client certificate's subject must carry (it may carry
more, such as the issuing CA's ``O``/``OU``). A certificate that matches more
than one caller identifies none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

try:  # CPython's own SHA-256: for a token of one or two blocks, half the time of OpenSSL's per-call setup
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - a build without it
    _sha256 = hashlib.sha256
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config.fields import SubjectAttributes, subject_attributes
from proxy.config.models import CallerConfig
from proxy.errors import Forbidden, Unauthenticated

ANONYMOUS = "anonymous"
CALLER_HEADERS = ("Proxy-Authorization", "Authorization")


@dataclass(frozen=True, slots=True)
class Caller:
    name: str


_ANONYMOUS = Caller(ANONYMOUS)


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _basic(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (ValueError, binascii.Error):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user or not password:
        return None
    return user, password


# The ssl module's peer dict names attributes by OpenSSL's long names; configured subjects use RFC 4514's.
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "emailAddress": "EMAILADDRESS",
          "serialNumber": "SERIALNUMBER", "userId": "UID", "streetAddress": "STREET"}


def cert_attributes(peercert: dict | None) -> SubjectAttributes:
    """``{("CN", "billing"), ("O", "acme")}`` from the ssl module's verified peer certificate dict."""
    if not peercert:
        return frozenset()
    return frozenset((_SHORT.get(key, key), value) for rdn in peercert.get("subject", ()) for key, value in rdn)


class Authenticator:
    def __init__(self, callers: dict[str, CallerConfig] | None) -> None:
        self.anonymous = callers is None
        # Looked up by the SHA-256 of the presented token: the digest of a wrong token is unpredictable, so
        # the lookup's timing says nothing about the stored ones (what comparing every digest also ensured).
        # One Caller per configured caller, made here: a request costs one hash and one dict lookup.
        self._tokens: dict[bytes, Caller] = {bytes.fromhex(c.token_sha256): Caller(name)
                                             for name, c in (callers or {}).items() if c.token_sha256}
        self._subjects = [(subject_attributes(c.cert_subject), name) for name, c in (callers or {}).items() if c.cert_subject]
        self._nets = {name: tuple(c.allow_ips) for name, c in (callers or {}).items() if c.allow_ips is not None}
        self.sources_locked = bool(self._nets)  # False: ``check_source`` has nothing to check (not called)

    def authenticate(self, presented: Mapping[str, str], peer_ip: ipaddress._BaseAddress | None,
                     peercert: dict | None = None) -> Caller:
        """Identify the caller from the request's own headers (``presented``: looked up by lower-case name, as
        a case-insensitive multidict or ``Request.first`` is; read only; the pipeline
        removes ``CALLER_HEADERS`` from what it forwards, whatever the outcome)."""
        if self.anonymous:
            return _ANONYMOUS
        proxy_auth = presented.get("proxy-authorization")
        token = _bearer(proxy_auth) if proxy_auth else None
        caller = self._by_token(token or _bearer(presented.get("authorization")))
        if caller is None and peercert:
            caller = self._by_cert(cert_attributes(peercert))
        if caller is None:
            raise Unauthenticated("no valid caller token or certificate", reason="bad_caller_token")
        return caller

    def authenticate_proxy(self, proxy_authorization: str | None) -> Caller:
        """Forward proxy (SPEC §10): ``Proxy-Authorization: Basic`` (user = caller name, password = its
        token; the name must be the token's caller) or ``Bearer <token>``."""
        if self.anonymous:
            return _ANONYMOUS
        caller = None
        basic = _basic(proxy_authorization)
        if basic is not None:
            user, token = basic
            caller = self._by_token(token)
            if caller is not None and not hmac.compare_digest(caller.name.encode(),
                                                              user.encode("utf-8", "surrogateescape")):
                caller = None  # another caller's token under this name: neither identity holds
        else:
            caller = self._by_token(_bearer(proxy_authorization))
        if caller is None:
            raise Unauthenticated("no valid caller token on the proxy request", reason="bad_caller_token")
        return caller

    def check_source(self, caller: Caller, peer_ip: ipaddress._BaseAddress | None) -> None:
        nets = self._nets.get(caller.name)
        if nets is not None and (peer_ip is None or not any(peer_ip in n for n in nets)):
            raise Forbidden("caller used from a source address outside allow_ips", reason="source_ip")

    def _by_cert(self, attributes: SubjectAttributes) -> Caller | None:
        matches = [name for wanted, name in self._subjects if wanted and wanted <= attributes]
        return Caller(matches[0]) if len(matches) == 1 else None

    def _by_token(self, token: str | None) -> Caller | None:
        if token is None:
            return None
        return self._tokens.get(_sha256(token.encode("utf-8", "surrogateescape")).digest())
