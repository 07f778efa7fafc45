"""What a request injects (``Grant``), and the interface of whatever supplies it (``AuthSource``).

Both the static source (``proxy.static_source``) and the token source
(``proxy.tokens.source``) implement ``AuthSource``; ``proxy.credential`` holds one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from yarl import URL

from proxy.redact.leak_guard import LeakGuard
from proxy.store.secret import Secret, SecretRef


@dataclass(eq=False)
class Grant:
    """What one request injects: values by field name (or ``PATH#FIELD``), and, for
    flows whose login answer names the server, the upstream to use instead."""

    values: Mapping[str, Secret] = field(repr=False)
    upstream: URL | None = None

    @cached_property
    def guard(self) -> LeakGuard:
        return LeakGuard(s.reveal() for s in self.values.values())


class AuthSource(abc.ABC):
    @abc.abstractmethod
    async def grant(self, principal: str) -> Grant:
        """Material for ``principal`` (a caller name with its own per_caller entry, or "")."""

    def ready(self, principal: str) -> Grant | None:
        """What ``grant(principal)`` would return when that needs no I/O, else None. The request path takes
        this first and awaits ``grant`` only on a miss (a coroutine per request costs more than the lookup)."""
        return None

    @abc.abstractmethod
    async def expired(self, principal: str, used: Grant) -> bool:
        """The upstream said ``used`` is no longer valid. Get fresh material once;
        True when a replay with new material makes sense."""

    def refs(self) -> set[SecretRef]:
        """Every secret reference this source reads (readiness checks them)."""
        return set()

    def state(self) -> dict:
        return {"state": "static", "expires_in_s": None, "last_refresh": None, "last_error": None}

    async def refresh(self) -> None:
        """Admin: obtain fresh material now."""

    async def revoke(self) -> None:
        """Admin: drop cached material (and revoke it at the provider where supported)."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
