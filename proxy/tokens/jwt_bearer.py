"""``oauth2_jwt_bearer``: the RFC 7523 JWT bearer grant (Salesforce's server-to-server flow).

The assertion is signed with the private key (RS256 for RSA, ES256 for EC P-256):
``iss`` = client_id, ``sub`` = subject (or the caller's ``per_caller_subject``),
``aud`` = audience (default: token_url),
valid for ``ASSERTION_LIFETIME`` seconds (Salesforce accepts at most 3 minutes).
With ``use_instance_url`` the answer's ``instance_url`` becomes the upstream.
"""

from __future__ import annotations

from yarl import URL

from proxy.store.secret import Secret
from proxy.tokens.answer import TokenAnswer, parse_oauth2
from proxy.tokens.clientauth import FormRequest, sign_assertion
from proxy.tokens.provider import PrincipalSecrets, Provider
from proxy.tokens.revocation import revocation_request, send_revocation

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 150


def assertion_claims(auth, *, now: float, jti: str, principal: str = "") -> dict:
    issued = int(now)
    claims = {"iss": auth.client_id, "sub": auth.subject_for(principal), "aud": auth.audience or auth.token_url,
              "iat": issued, "exp": issued + ASSERTION_LIFETIME, "jti": jti}
    if auth.scope:
        claims["scope"] = auth.scope
    return claims


def token_request(auth, private_key: Secret, *, now: float, jti: str, principal: str = "") -> FormRequest:
    claims = assertion_claims(auth, now=now, jti=jti, principal=principal)
    form = {"grant_type": GRANT_TYPE, "assertion": sign_assertion(private_key, claims, auth.key_id)}
    if auth.scope:
        form["scope"] = auth.scope
    return FormRequest(auth.token_url, form)


class JwtBearerProvider(Provider):
    @property
    def takes_upstream(self) -> bool:
        return bool(self.auth.use_instance_url)

    def __init__(self, auth, http, *, base: URL, insecure_ok: bool = False, credential: str = "", **kw) -> None:
        super().__init__(http, **kw)
        self.auth = auth
        self.base = base
        self.insecure_ok = insecure_ok
        self.credential = credential

    async def fetch(self, secrets: PrincipalSecrets) -> TokenAnswer:
        req = token_request(self.auth, await secrets.read("private_key"), now=self.wall(), jti=self.new_id(),
                            principal=secrets.principal)
        return parse_oauth2(await self.post(req), now_wall=self.wall(), want_instance_url=self.auth.use_instance_url,
                            base=self.base, insecure_ok=self.insecure_ok)

    @property
    def revocable(self) -> bool:
        return bool(self.auth.revocation_url)

    async def revoke(self, token: Secret, secrets: PrincipalSecrets) -> None:
        if self.auth.revocation_url:
            # Salesforce's revoke endpoint, like RFC 7009 for public clients, needs only the token.
            await send_revocation(self, revocation_request(self.auth.revocation_url, token), self.credential)
