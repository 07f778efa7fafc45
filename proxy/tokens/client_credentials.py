"""``oauth2_client_credentials``: RFC 6749 §4.4 at ``token_url``."""

from __future__ import annotations

from proxy.secret import Secret
from proxy.tokens.answer import TokenAnswer, parse_oauth2
from proxy.tokens.clientauth import FormRequest, authenticate
from proxy.tokens.provider import Material, Provider
from proxy.tokens.revocation import revocation_request, send_revocation


def token_request(auth) -> FormRequest:
    form = {"grant_type": "client_credentials"}
    if auth.scope:
        form["scope"] = auth.scope
    if auth.audience:
        form["audience"] = auth.audience  # Auth0-style APIs name the resource this way
    return FormRequest(auth.token_url, form)


class ClientCredentialsProvider(Provider):
    def __init__(self, auth, http, *, credential: str = "", **kw) -> None:
        super().__init__(http, **kw)
        self.auth = auth
        self.credential = credential

    async def fetch(self, material: Material) -> TokenAnswer:
        req = token_request(self.auth)
        await authenticate(req, self.auth, material, now=self.wall(), jti=self.new_id())
        return parse_oauth2(await self.post(req), now_wall=self.wall())

    @property
    def revocable(self) -> bool:
        return bool(self.auth.revocation_url)

    async def revoke(self, token: Secret, material: Material) -> None:
        if not self.auth.revocation_url:
            return
        req = revocation_request(self.auth.revocation_url, token)
        await authenticate(req, self.auth, material, now=self.wall(), jti=self.new_id())
        await send_revocation(self, req, self.credential)
