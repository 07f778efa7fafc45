"""``oauth2_refresh_token``: RFC 6749 §6 at ``token_url``, with rotation written back.

The refresh token is read from the store itself (not the cache), with its version.
When the provider answers with a new refresh token, it is written back with
compare-and-set on that version *before* the new access token is handed out, so a
restart never loses it. A lost race (``ConflictError``) discards this answer: the
store holds a newer refresh token, and the next attempt uses it. A failed write
keeps the new refresh token in memory (the old one is spent) and retries the write
with the next refresh. No new refresh token in the answer: the old one stays.
"""

from __future__ import annotations

import logging

from proxy.errors import ConflictError, SecretBackendError, StoreError
from proxy.redact.scrubber import SCRUBBER, rotated_owner, secret_owner
from proxy.store.secret import Secret, SecretRef
from proxy.tokens.answer import TokenAnswer, parse_oauth2
from proxy.tokens.clientauth import FormRequest, authenticate
from proxy.errors import TokenFailure
from proxy.tokens.provider import PrincipalSecrets, Provider
from proxy.tokens.revocation import ClientRevocation

log = logging.getLogger("credproxy.tokens")


def token_request(auth, refresh_token: Secret) -> FormRequest:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    if auth.scope:
        form["scope"] = auth.scope
    return FormRequest(auth.token_url, form)


class RefreshTokenProvider(ClientRevocation, Provider):
    def __init__(self, auth, http, *, credential: str = "", **kw) -> None:
        super().__init__(http, **kw)
        self.auth = auth
        self.credential = credential
        # Rotated refresh tokens the store has not accepted yet: ref -> (token, version it replaces).
        self._unsaved: dict[SecretRef, tuple[Secret, int | None]] = {}

    async def _current(self, ref: SecretRef, secrets: PrincipalSecrets) -> tuple[Secret, int | None]:
        if ref in self._unsaved:
            return self._unsaved[ref]
        if secrets.store is None:
            return await secrets.read("refresh_token"), None
        try:
            entry = await secrets.store.get(ref.path)
            value = entry.get(ref)
        except SecretBackendError as exc:
            raise TokenFailure("secret_unavailable", f"{type(exc).__name__} for {ref.path}") from None
        SCRUBBER.hold(secret_owner(ref), value.reveal())
        return value, entry.version

    async def fetch(self, secrets: PrincipalSecrets) -> TokenAnswer:
        ref = secrets.refs["refresh_token"]
        refresh, version = await self._current(ref, secrets)
        req = token_request(self.auth, refresh)
        await authenticate(req, self.auth, secrets, now=self.wall(), jti=self.new_id())
        answer = parse_oauth2(await self.post(req), now_wall=self.wall())
        rotated = answer.refresh_token
        if rotated is not None and rotated != refresh:
            # Its own owner: the store may still answer the old one until the rotated one is saved.
            SCRUBBER.hold(rotated_owner(ref), rotated.reveal())
            await self._save(ref, rotated, version, secrets)
        elif ref in self._unsaved:
            await self._save(ref, refresh, version, secrets)
        return answer

    async def _save(self, ref: SecretRef, value: Secret, version: int | None, secrets: PrincipalSecrets) -> None:
        if secrets.store is None:
            raise TokenFailure("store_unavailable", "no store to write the rotated refresh token to")
        try:
            new_version = await secrets.store.put(ref.path, ref.field, value, cas=version)
        except ConflictError:
            self._unsaved.pop(ref, None)
            raise TokenFailure("rotation_conflict", f"{ref.path} changed while refreshing; using the stored one next") from None
        except (SecretBackendError, StoreError, OSError) as exc:
            self._unsaved[ref] = (value, version)
            log.error("rotated refresh token could not be stored; kept in memory until it can be",
                      extra={"credential": self.credential, "secret_path": ref.path, "error": type(exc).__name__})
            raise TokenFailure("store_unavailable", f"{type(exc).__name__} writing {ref.path}") from None
        self._unsaved.pop(ref, None)
        log.info("rotated refresh token stored", extra={"credential": self.credential, "secret_path": ref.path,
                                                         "version": new_version})
