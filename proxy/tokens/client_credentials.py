"""``oauth2_client_credentials``: RFC 6749 §4.4 at ``token_url``."""

from __future__ import annotations

from proxy.tokens.answer import TokenAnswer, parse_oauth2
from proxy.tokens.clientauth import FormRequest, authenticate
from proxy.tokens.provider import PrincipalSecrets, Provider
from proxy.tokens.revocation import ClientRevocation


def token_request(auth) -> FormRequest:
    form = {"grant_type": "client_credentials"}
    if auth.scope:
        form["scope"] = auth.scope
    if auth.audience:
        form["audience"] = auth.audience  # Auth0-style APIs name the resource this way
    return FormRequest(auth.token_url, form)


class ClientCredentialsProvider(ClientRevocation, Provider):
    def __init__(self, auth, http, *, credential: str = "", **kw) -> None:
        super().__init__(http, **kw)
        self.auth = auth
        self.credential = credential

    async def fetch(self, secrets: PrincipalSecrets) -> TokenAnswer:
        req = token_request(self.auth)
        await authenticate(req, self.auth, secrets, now=self.wall(), jti=self.new_id())
        return parse_oauth2(await self.post(req), now_wall=self.wall())
