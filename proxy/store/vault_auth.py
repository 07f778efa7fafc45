"""Logging in to Vault as credproxy: ``token``, ``approle`` or ``kubernetes``.

Credential files are re-read at every login, so a rotated secret_id or a
refreshed service-account token is picked up without a restart. What they hold
is registered with the log scrubber and never put in a message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config.models import VaultAuthConfig
from proxy.errors import LoginRefused, VaultRefused, VaultUnavailable
from proxy.redact.scrubber import SCRUBBER
from proxy.store.secret import Secret
from proxy.store.vault_client import VaultClients, expect_dict

TOKEN_ENV = "VAULT_TOKEN"
_HINT = {
    "token": "check secrets.vault.auth.token_file (or $VAULT_TOKEN)",
    "approle": "check the role_id_file and secret_id_file, and that the secret_id has not expired",
    "kubernetes": "check secrets.vault.auth.role and that the role binds this service account",
}


@dataclass(frozen=True)
class Login:
    token: Secret = field(repr=False)
    ttl: float  # seconds the token is valid from now; 0 = does not expire
    renewable: bool


def _read(path: str | None, what: str) -> str:
    if not path:
        raise LoginRefused(f"secrets.vault.auth.{what} is not set")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise LoginRefused(f"cannot read secrets.vault.auth.{what} {path} ({reason})") from None
    if not text:
        raise LoginRefused(f"secrets.vault.auth.{what} {path} is empty")
    SCRUBBER.hold(("vault auth", what), text)
    return text


def _from_auth(answer: object, what: str) -> Login:
    auth = expect_dict(answer, what).get("auth") or {}
    token = auth.get("client_token")
    if not isinstance(token, str) or not token:
        raise VaultUnavailable(f"{what}: vault answered without a token")
    SCRUBBER.hold("vault token", token)  # a new login's token replaces the last one
    return Login(Secret(token), float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))


class VaultLogin:
    def __init__(self, cfg: VaultAuthConfig, clients: VaultClients, env: Mapping[str, str] = os.environ) -> None:
        self.cfg = cfg
        self.method = cfg.method
        self._clients = clients
        self._env = env

    async def login(self) -> Login:
        what = f"vault {self.method} login"
        try:
            return await self._clients.run(what, self._login_sync)
        except VaultRefused as exc:
            raise LoginRefused(f"{what} refused (HTTP {exc.status}): {_HINT[self.method]}") from None

    async def renew(self, token: Secret, increment: float) -> Login:
        """Renew ``token``; the answer's TTL is below ``increment`` once the max TTL caps it."""
        return await self._clients.run("vault token renewal", self._renew_sync, token, increment)

    def _login_sync(self) -> Login:
        cfg = self.cfg
        if cfg.method == "approle":
            role_id = _read(cfg.role_id_file, "role_id_file")
            secret_id = _read(cfg.secret_id_file, "secret_id_file")
            answer = self._clients.client("").auth.approle.login(
                role_id, secret_id, use_token=False, mount_point=cfg.mount or "approle")
            return _from_auth(answer, "vault approle login")
        if cfg.method == "kubernetes":
            jwt = _read(cfg.jwt_file, "jwt_file")
            answer = self._clients.client("").auth.kubernetes.login(
                cfg.role, jwt, use_token=False, mount_point=cfg.mount or "kubernetes")
            return _from_auth(answer, "vault kubernetes login")
        token = _read(cfg.token_file, "token_file") if cfg.token_file else self._env_token()
        return self._lookup(token)

    def _env_token(self) -> str:
        token = (self._env.get(TOKEN_ENV) or "").strip()
        if not token:
            raise LoginRefused(f"no vault token: set secrets.vault.auth.token_file or ${TOKEN_ENV}")
        SCRUBBER.hold(("vault auth", TOKEN_ENV), token)
        return token

    def _lookup(self, token: str) -> Login:
        # A given token is not issued here: ask Vault how long it lives (and whether it is valid at all).
        data = expect_dict(self._clients.client(token).auth.token.lookup_self(), "vault token lookup").get("data") or {}
        return Login(Secret(token), float(data.get("ttl") or 0), bool(data.get("renewable")))

    def _renew_sync(self, token: Secret, increment: float) -> Login:
        answer = self._clients.client(token.reveal()).auth.token.renew_self(increment=f"{max(1, int(increment))}s")
        return _from_auth(answer, "vault token renewal")
