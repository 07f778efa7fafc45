"""``secrets.backend: vault``: secrets in a KV v2 mount, read and written with hvac.

``get`` returns every field of a path with its version; ``version`` reads only
the metadata (what the cache's poller asks every refresh_interval); ``put`` is a
KV v2 check-and-set write with the file store's semantics. A 403 is checked
against the token itself: when Vault no longer accepts credproxy's token the
keeper logs in again and the answer is "unavailable" (cached secrets keep
serving); only a 403 for a valid token is an access denial, which makes the
cache drop that secret at once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
from hvac import exceptions as hx

from proxy.config.models import VaultConfig
from proxy.errors import (ConflictError, LoginRefused, SecretAccessDenied, SecretBackendError, SecretNotFound,
                          VaultRefused, VaultUnavailable)
from proxy.store.secret import Secret
from proxy.store.base import SecretEntry, SecretStore
from proxy.store.vault_auth import VaultLogin
from proxy.store.vault_client import POOL_SIZE, VaultClients, expect_dict
from proxy.store.vault_token import Backoff, TokenKeeper

log = logging.getLogger("credproxy.vault")

T = TypeVar("T")
PUT_ATTEMPTS = 3  # an unconditional put re-reads and retries when another writer got in between


class VaultStore(SecretStore):
    name = "vault"

    def __init__(self, cfg: VaultConfig, *, env: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic, backoff: Backoff | None = None,
                 pool_size: int = POOL_SIZE) -> None:
        self.cfg = cfg
        self._mount = cfg.kv_mount.strip("/")
        self._clients = VaultClients(cfg.address, namespace=cfg.namespace, ca_file=cfg.ca_file,
                                     timeout=cfg.timeout, pool_size=pool_size)
        login = VaultLogin(cfg.auth, self._clients, env)
        self.keeper = TokenKeeper(login.login, login.renew, clock=clock, backoff=backoff)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Log in once. Wrong credentials stop start-up with a clear error; an unreachable,
        sealed or standby Vault does not: the keeper keeps trying and /readyz says 503."""
        if _plain_http_off_host(self.cfg.address):
            log.warning("secrets.vault.address is plain http to another host: token and secrets cross the network "
                        "unencrypted", extra={"vault": self.cfg.address})
        try:
            await self.keeper.first_login()
        except LoginRefused as exc:
            self._clients.close()
            raise LoginRefused(f"cannot log in to vault at {self.cfg.address}: {exc}") from None
        except SecretBackendError as exc:
            log.warning("vault not available at start; retrying in the background", extra={"error": exc.detail})
        self.keeper.start()

    async def close(self) -> None:
        await self.keeper.close()
        self._clients.close()

    # --- reads --------------------------------------------------------------------

    async def get(self, path: str) -> SecretEntry:
        def read(client: hvac.Client) -> SecretEntry:
            answer = client.secrets.kv.v2.read_secret_version(path=path, mount_point=self._mount,
                                                              raise_on_deleted_version=True)
            return _entry(expect_dict(answer, "vault read"))

        return await self._call(f"vault read {path}", path, read)

    async def version(self, path: str) -> int:
        return (await self.stamp(path))[0]

    async def stamp(self, path: str) -> tuple[int, str | None]:
        def metadata(client: hvac.Client) -> tuple[int, str | None]:
            answer = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self._mount)
            return _live_stamp(expect_dict(answer, "vault metadata read"))

        try:
            stamp = await self._call(f"vault metadata read {path}", path, metadata)
        except SecretAccessDenied:
            # A policy without metadata access: the data read reports the version too (and a real
            # denial there still drops the secret).
            return (await self.get(path)).stamp
        if stamp[0] == 0:
            raise SecretNotFound(f"secret path missing or its latest version deleted: {path}")
        return stamp

    # --- compare-and-set write ------------------------------------------------------

    async def put(self, path: str, field: str, value: Secret, *, cas: int | None = None) -> int:
        """Set one field, keeping the others. With ``cas`` only if the path is still at that
        version (0: must not exist), else ConflictError. Returns the new version."""
        for _ in range(PUT_ATTEMPTS):
            current, fields = await self._current(path)
            if cas is not None and cas != current:
                raise ConflictError(f"{path} is at version {current}, expected {cas}")
            fields[field] = value
            try:
                # Always check-and-set against what was read: a concurrent writer's other fields are never lost.
                return await self._write(path, fields, current)
            except ConflictError:
                if cas is not None:
                    raise
        raise ConflictError(f"{path} kept changing while writing {field}")

    async def _current(self, path: str) -> tuple[int, dict[str, Secret]]:
        try:
            entry = await self.get(path)
        except SecretNotFound:
            try:
                # Missing, or its latest version deleted: Vault's cas counts the deleted version too.
                version = await self._call(f"vault metadata read {path}", path, self._metadata_version(path))
            except SecretNotFound:
                return 0, {}
            try:
                # Written by someone else between the two reads? Then these are its fields, not none.
                entry = await self.get(path)
            except SecretNotFound:
                return version, {}
        return entry.version, dict(entry.fields)

    def _metadata_version(self, path: str) -> Callable[[hvac.Client], int]:
        def metadata(client: hvac.Client) -> int:
            answer = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self._mount)
            return int(expect_dict(answer, "vault metadata read")["data"]["current_version"])

        return metadata

    # --- whole records (cluster token sharing) ---------------------------------------

    async def record(self, path: str) -> tuple[int, dict[str, Secret]]:
        """Every field at ``path`` and the version a check-and-set write must name
        (0 when the path was never written)."""
        return await self._current(path)

    async def write_record(self, path: str, fields: dict[str, Secret], *, cas: int) -> int:
        """Replace every field at ``path`` if it is still at version ``cas``, else ConflictError."""
        return await self._write(path, fields, cas, quiet=True)

    async def _write(self, path: str, fields: dict[str, Secret], cas: int, *, quiet: bool = False) -> int:
        def write(client: hvac.Client) -> int:
            try:
                answer = client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret={k: v.reveal() for k, v in fields.items()}, cas=cas, mount_point=self._mount)
            except hx.InvalidRequest as exc:
                # The message is only inspected here, never passed on.
                if "check-and-set" in str(exc):
                    raise ConflictError(f"{path} changed since version {cas}") from None
                raise
            return int(expect_dict(answer, "vault write")["data"]["version"])

        version = await self._call(f"vault write {path}", path, write)
        log.log(logging.DEBUG if quiet else logging.INFO, "secret written to vault", extra={"secret_path": path, "version": version})
        return version

    # --- the one way a call is made -------------------------------------------------

    async def _call(self, what: str, path: str, op: Callable[[hvac.Client], T]) -> T:
        token = self.keeper.token
        if token is None:
            raise VaultUnavailable(f"{what}: not logged in to vault")
        try:
            return await self._clients.run(what, lambda: op(self._clients.client(token.reveal())))
        except VaultRefused as exc:
            if exc.status == 404:
                raise SecretNotFound(f"secret path missing: {path}") from None
            if exc.status in (401, 403):
                raise await self._denied(what, path, token) from None
            raise

    async def _denied(self, what: str, path: str, token: Secret) -> SecretBackendError:
        """Vault said 403: is the secret denied, or is it our token that is no longer valid?"""
        def lookup() -> Any:
            return self._clients.client(token.reveal()).auth.token.lookup_self()

        try:
            await self._clients.run("vault token lookup", lookup)
        except VaultRefused:
            self.keeper.invalidate(token)
            return VaultUnavailable(f"{what}: vault no longer accepts credproxy's token; logging in again")
        except VaultUnavailable as exc:
            return exc
        return SecretAccessDenied(f"{what}: vault denied access to {path}")


def _entry(answer: dict) -> SecretEntry:
    data = answer["data"]
    fields = data["data"]
    if not isinstance(fields, dict):
        raise TypeError("secret data is not an object")
    # KV v2 values may be any JSON; non-strings are used as their JSON text.
    values = {k: Secret(v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}
    return SecretEntry(values, int(data["metadata"]["version"]), data["metadata"].get("created_time"))


def _live_stamp(answer: dict) -> tuple[int, str | None]:
    """The current version and its creation time from KV v2 metadata; version 0 when the
    current version is deleted or destroyed."""
    data = answer["data"]
    current = int(data["current_version"])
    meta = (data.get("versions") or {}).get(str(current)) or {}
    if meta.get("deletion_time") or meta.get("destroyed"):
        return 0, None
    return current, meta.get("created_time")


def _plain_http_off_host(address: str) -> bool:
    parts = urlsplit(address)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
