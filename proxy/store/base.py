"""The store interface every backend implements: read a path, compare-and-set write one field."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.errors import SecretNotFound
from proxy.store.secret import Secret, SecretRef


@dataclass(frozen=True)
class SecretEntry:
    """All fields of one secret path, and its version (KV v2 style, starts at 1).

    ``created`` (where the backend has it: Vault's created_time) tells two versions with
    the same number apart, as after a path is deleted and written anew."""

    fields: Mapping[str, Secret] = field(repr=False)
    version: int
    created: str | None = None

    @property
    def stamp(self) -> tuple[int, str | None]:
        return self.version, self.created

    def get(self, ref: SecretRef) -> Secret:
        try:
            return self.fields[ref.field]
        except KeyError:
            raise SecretNotFound(f"secret field missing: {ref}") from None


class SecretStore(abc.ABC):
    name = "store"

    @abc.abstractmethod
    async def get(self, path: str) -> SecretEntry:
        """Read every field at ``path``; raise SecretNotFound / SecretBackendError."""

    @abc.abstractmethod
    async def put(self, path: str, field: str, value: Secret, *, cas: int | None = None) -> int:
        """Set one field (keeping the others). With ``cas`` the write happens only if the
        path is still at that version (0: must not exist); raises ConflictError otherwise.
        Returns the new version."""

    async def version(self, path: str) -> int:
        """The current version at ``path`` (cheap where the backend allows: metadata only)."""
        return (await self.get(path)).version

    async def stamp(self, path: str) -> tuple[int, str | None]:
        """What the poller compares with ``SecretEntry.stamp`` to see a change."""
        return await self.version(path), None

    async def start(self) -> None:
        """Connect / log in. Called once before serving."""

    async def close(self) -> None:
        """Release connections and background tasks."""
