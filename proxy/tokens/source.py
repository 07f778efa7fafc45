"""``TokenSource``: the ``AuthSource`` of every token type — one ``TokenSlot`` per principal.

Reads each principal's secret references (own fields, ``per_caller`` overrides,
template placeholders by ``PATH#FIELD``), hands them to the provider, wraps each
new token in the ``Grant`` requests inject, reports metrics, and revokes on
``revoke()`` and (with ``session.revoke_on_shutdown``) on close.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from proxy.errors import CredentialUnavailable, TokenFailure
from proxy.grant import AuthSource, Grant
from proxy.redact.scrubber import SCRUBBER
from proxy.store.secret import Secret, SecretRef
from proxy.store.cache import SecretCache
from proxy.tokens.answer import TokenAnswer
from proxy.tokens.http import TokenHttp
from proxy.tokens.lifecycle import Settings, Token, TokenSlot
from proxy.tokens.provider import PrincipalSecrets, Provider

log = logging.getLogger("credproxy.tokens")

REVOKE_TIMEOUT = 5.0


class TokenSource(AuthSource):
    def __init__(self, name: str, auth, session, provider: Provider, http: TokenHttp, cache: SecretCache, *,
                 store=None, metrics=None, settings: Settings | None = None, cluster=None) -> None:
        self.name = name
        self.auth = auth
        self.session = session
        self.provider = provider
        self.http = http
        self.cache = cache
        self.store = store
        self.metrics = metrics
        self.settings = settings or Settings(ttl=session.ttl, refresh_before=session.refresh_before)
        self.slots: dict[str, TokenSlot] = {}
        self._scrub_owner = object()  # this source's tokens in the log scrubber (another source of the name has its own)
        self.cluster = cluster  # a ClusterTokens (cluster.backend: vault): replicas share their tokens
        self._refused: dict[str, Secret] = {}  # principal -> the token the upstream refused, until the next fetch
        self._value_refs = tuple(auth.value.refs)

    # --- secrets -----------------------------------------------------------------------

    def refs(self) -> set[SecretRef]:
        return self.auth.all_refs()

    def secrets(self, principal: str) -> PrincipalSecrets:
        return PrincipalSecrets(principal, self.auth.refs_for(principal), self.cache, self.store)

    # --- slots -------------------------------------------------------------------------

    def slot(self, principal: str) -> TokenSlot:
        slot = self.slots.get(principal)
        if slot is None:
            label = self.name if not principal else f"{self.name}/{principal}"
            slot = TokenSlot(lambda: self._obtain(principal), self.settings, report=self._report, label=label)
            self.slots[principal] = slot
        return slot

    async def _obtain(self, principal: str) -> tuple[TokenAnswer, Grant]:
        secrets = self.secrets(principal)
        if self.cluster is None:
            answer = await self.provider.fetch(secrets)
        else:
            answer = await self.cluster.obtain(self.name, principal, lambda: self.provider.fetch(secrets),
                                               refresh_before=self.settings.refresh_before,
                                               rejected=self._refused.pop(principal, None))
            # Maybe another replica's: its server is checked as this replica checks its own answers.
            answer = replace(answer, upstream=self.provider.shared_upstream(answer.upstream))
        SCRUBBER.hold((self._scrub_owner, principal), answer.access.reveal())  # replaces the slot's last token
        values = {"secret": answer.access}
        for ref in self._value_refs:  # placeholders besides {secret} in the injected value
            values[str(ref)] = await secrets.read(str(ref))
        return answer, Grant(values, upstream=answer.upstream)

    def _report(self, result: str, duration: float, token: Token | None) -> None:
        if self.metrics is None:
            return
        self.metrics.token_refresh.labels(self.name, result).inc()
        self.metrics.token_refresh_duration.labels(self.name).observe(duration)

    # --- AuthSource --------------------------------------------------------------------

    async def grant(self, principal: str) -> Grant:
        return (await self.slot(principal).get()).grant

    def ready(self, principal: str) -> Grant | None:
        tok = self.slot(principal).ready()
        return tok.grant if tok is not None else None

    def _not_shared_again(self, principal: str, token) -> None:
        """Cluster mode: a token refused, revoked or refreshed by the operator is not to be taken
        again from the shared record by the next fetch."""
        value = token.grant.values.get("secret") if token is not None else None
        if self.cluster is not None and isinstance(value, Secret):
            self._refused[principal] = value

    async def expired(self, principal: str, used: Grant) -> bool:
        if self.cluster is not None and isinstance(used.values.get("secret"), Secret):
            self._refused[principal] = used.values["secret"]
        return await self.slot(principal).reject(used)

    def state(self) -> dict:
        slot = self.slots.get("") or next(iter(self.slots.values()), None)
        if slot is None:
            return {"state": "expired", "expires_in_s": None, "last_refresh": None, "last_error": None}
        remaining = slot.expires_in()
        return {"state": slot.state(), "expires_in_s": round(remaining, 3) if remaining is not None else None,
                "last_refresh": slot.last_refresh, "last_error": slot.last_error}

    async def refresh(self) -> None:
        """Admin refresh of every principal's token; raises unless every one was refreshed (a slot whose
        refresh was cancelled — the credential closed under it — or failed otherwise is not refreshed)."""
        principals = set(self.slots) | {""}
        for p in principals:
            self._not_shared_again(p, self.slots[p].token if p in self.slots else None)
        results = await asyncio.gather(*(self.slot(p).refresh_now() for p in principals), return_exceptions=True)
        for r in results:
            if isinstance(r, CredentialUnavailable):
                raise r
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("admin token refresh did not complete", extra={
                "credential": self.name, "error": type(failed[0]).__name__})
            raise CredentialUnavailable("token refresh did not complete; nothing was refreshed",
                                        reason="refresh_incomplete", retry_after=5)

    async def revoke(self) -> None:
        """Drop every principal's token, and revoke it at the provider where configured."""
        dropped = [(p, tok) for p, slot in self.slots.items() if (tok := slot.drop()) is not None]
        for p, tok in dropped:
            self._not_shared_again(p, tok)
        if not self.provider.revocable:
            return
        for principal, tok in dropped:
            try:
                await asyncio.wait_for(self.provider.revoke(tok.grant.values["secret"], self.secrets(principal)),
                                       REVOKE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - best effort; the token is dropped locally anyway
                log.warning("token revocation failed", extra={"credential": self.name, "error": type(exc).__name__},
                            exc_info=None if isinstance(exc, (TokenFailure, TimeoutError)) else exc)

    async def start(self) -> None:
        if self.session.prefetch:  # the credential's own token; per-caller ones stay lazy
            slot = self.slot("")
            slot.keep_fresh = True
            slot.start()

    async def close(self) -> None:
        for principal, slot in self.slots.items():
            await slot.close()
            SCRUBBER.release((self._scrub_owner, principal))
        if self.session.revoke_on_shutdown:
            await self.revoke()
        await self.http.close()
