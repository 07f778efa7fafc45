"""RFC 7009 token revocation: tell the provider an access token is no longer used.

Only the access token is revoked, never a refresh token: revoking that would end
the credential for good. The outcome is logged (status only) and never raised:
a token that cannot be revoked is still dropped locally.
"""

from __future__ import annotations

import logging

from proxy.secret import Secret
from proxy.tokens.clientauth import FormRequest
from proxy.tokens.failure import TokenFailure

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
