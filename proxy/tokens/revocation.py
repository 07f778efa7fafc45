"""RFC 7009 token revocation: tell the provider an access token is no longer used.

Only the access token is revoked, never a refresh token: revoking that would end
the credential for good. The outcome is logged (status only) and never raised:
a token that cannot be revoked is still dropped locally.
"""

from __future__ import annotations

import logging

from proxy.store.secret import Secret
from proxy.tokens.clientauth import FormRequest, authenticate
from proxy.errors import TokenFailure

log = logging.getLogger("credproxy.tokens")


def revocation_request(url: str, token: Secret) -> FormRequest:
    return FormRequest(url, {"token": token.reveal(), "token_type_hint": "access_token"})


async def send_revocation(provider, req: FormRequest, credential: str) -> bool:
    try:
        answer = await provider.post(req)
    except TokenFailure as exc:
        log.warning("token revocation failed", extra={"credential": credential, "reason": exc.reason,
                                                      "detail": exc.detail})
        return False
    # RFC 7009 §2.2: 200 whether or not the token was known.
    ok = answer.status == 200
    log.log(logging.INFO if ok else logging.WARNING, "token revocation answered",
            extra={"credential": credential, "status": answer.status})
    return ok


class ClientRevocation:
    """``revocable``/``revoke`` for OAuth2 clients that authenticate at the revocation
    endpoint the same way as at the token endpoint (mixed into their Provider)."""

    @property
    def revocable(self) -> bool:
        return bool(self.auth.revocation_url)

    async def revoke(self, token: Secret, secrets) -> None:
        if not self.auth.revocation_url:
            return
        req = revocation_request(self.auth.revocation_url, token)
        await authenticate(req, self.auth, secrets, now=self.wall(), jti=self.new_id())
        await send_revocation(self, req, self.credential)
