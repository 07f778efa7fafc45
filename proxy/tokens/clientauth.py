"""OAuth2 client authentication and signed assertions (RFC 6749 §2.3.1, RFC 7523).

``client_secret_basic`` (HTTP Basic, form-urlencoded parts), ``client_secret_post``
(in the form), ``private_key_jwt`` (a short-lived RS256/ES256 assertion signed with
the client's private key). Plain functions: the caller passes the clock and the JWT ID.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import quote

from proxy.store.secret import Secret
from proxy.errors import TokenFailure

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ASSERTION_LIFETIME = 60  # seconds; private_key_jwt assertions are single-use


@dataclass
class FormRequest:
    """A form POST about to be sent. Holds revealed secrets: never logged, never kept."""

    url: str
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def encoded(self) -> bytes:
        return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.form.items()).encode()


def signing_key(pem: Secret):
    """Load a PEM private key; RSA signs RS256, EC P-256 signs ES256."""
    # Imported here, with PyJWT below: only a credential that signs assertions needs them (~2 MiB at import).
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.reveal().encode(), password=None)
    except (ValueError, TypeError):
        raise TokenFailure("bad_private_key", "private_key is not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise TokenFailure("bad_private_key", "private_key must be RSA or EC P-256")


def sign_assertion(pem: Secret, claims: dict, key_id: str | None) -> str:
    import jwt

    key, alg = signing_key(pem)
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def apply_client_auth(req: FormRequest, method: str, client_id: str, *, client_secret: Secret | None = None,
                      private_key: Secret | None = None, key_id: str | None = None, now: float = 0.0,
                      jti: str = "", aud: str | None = None) -> None:
    """Authenticate ``client_id`` on ``req`` with ``method`` (basic | post | private_key_jwt).
    Without a client secret under basic/post the client is public: only client_id is sent.
    ``aud`` of a private_key_jwt assertion is the token endpoint, also when revoking."""
    if method == "private_key_jwt":
        if private_key is None:
            raise TokenFailure("secret_unavailable", "private_key_jwt without private_key")
        issued = int(now)
        claims = {"iss": client_id, "sub": client_id, "aud": aud or req.url, "jti": jti,
                  "iat": issued, "exp": issued + CLIENT_ASSERTION_LIFETIME}
        req.form["client_id"] = client_id
        req.form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        req.form["client_assertion"] = sign_assertion(private_key, claims, key_id)
    elif client_secret is None:
        req.form["client_id"] = client_id
    elif method == "post":
        req.form["client_id"] = client_id
        req.form["client_secret"] = client_secret.reveal()
    else:
        pair = f"{quote(client_id, safe='')}:{quote(client_secret.reveal(), safe='')}"
        req.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()


async def authenticate(req: FormRequest, auth, secrets, *, now: float, jti: str) -> None:
    """``apply_client_auth`` with the secrets of ``auth`` (client_secret / private_key) read
    for this principal."""
    private_key = await secrets.read("private_key") if auth.client_auth == "private_key_jwt" else None
    client_secret = await secrets.maybe("client_secret") if auth.client_auth != "private_key_jwt" else None
    apply_client_auth(req, auth.client_auth, auth.client_id, client_secret=client_secret, private_key=private_key,
                      key_id=auth.key_id, now=now, jti=jti, aud=auth.token_url)
