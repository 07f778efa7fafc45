"""``cluster.backend: vault``: replicas share the tokens they mint through Vault KV v2 (SPEC §9).

One record per token at ``<cluster.path>/<credential>[/<principal>]`` holds either
- a token: ``access_token``, ``expires_at`` (wall clock, epoch seconds, so that every
  replica can read it; converted to time left on read), ``lifetime``, ``upstream``; or
- a lease: ``holder`` (a random id of the refreshing replica) and ``lease_until`` —
  no secret: the old token is dropped from the record when the lease is taken.

Before fetching, a replica reads the record. A token outside its refresh window (and
not the one the upstream just refused) is used as it is. Otherwise the replica takes
the lease with a check-and-set write against the version it read — of several
replicas that saw the same stale record exactly one wins — fetches, and stores the
token with check-and-set against its lease. The others poll (short jittered
intervals) until the new token is there, or the lease runs out (its holder died) and
they take it over: a dead refresher holds the cluster up at most ``lease_timeout``.

When Vault cannot be asked (unreachable, sealed, denying), the replica fetches its
own token and logs it: the coordinator never fails a request by itself. Tokens never
appear in a log line; only paths, versions and replica ids do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from yarl import URL

from proxy.config.models import ClusterConfig
from proxy.errors import ConflictError, SecretBackendError
from proxy.store.secret import Secret
from proxy.tokens.answer import TokenAnswer
from proxy.tokens.lifecycle import mandatory_margin

log = logging.getLogger("credproxy.cluster")

POLL_MIN = 0.05  # waiting for another replica's token: poll every 50-150 ms (less for tiny lease timeouts)
FRESH_SLACK = 0.1  # share of the refresh window: a token this close to it counts as due (clock skew, latency)


@dataclass
class Record:
    """What the cluster record at one path says."""

    version: int
    token: Secret | None = field(default=None, repr=False)
    expires_at: float = 0.0
    lifetime: float = 0.0
    upstream: str | None = None
    holder: str | None = None
    lease_until: float = 0.0

    @classmethod
    def parse(cls, version: int, fields: dict[str, Secret]) -> Record:
        plain = {k: v.reveal() for k, v in fields.items() if k != "access_token"}
        try:
            rec = cls(version, token=fields.get("access_token"), expires_at=float(plain.get("expires_at", 0)),
                      lifetime=float(plain.get("lifetime", 0)), upstream=plain.get("upstream") or None,
                      holder=plain.get("holder") or None, lease_until=float(plain.get("lease_until", 0)))
        except ValueError:
            return cls(version)  # not ours or damaged: treated as empty, the next write replaces it
        if not all(math.isfinite(x) for x in (rec.expires_at, rec.lifetime, rec.lease_until)):
            return cls(version)
        return rec

    def usable(self, now: float, refresh_before: float, rejected: Secret | None) -> bool:
        """A token with time left beyond its refresh window, other than the one just refused."""
        if self.token is None or self.lifetime <= 0:
            return False
        if rejected is not None and secrets.compare_digest(self.token.reveal().encode(), rejected.reveal().encode()):
            return False
        window = max(min(refresh_before, self.lifetime / 2), mandatory_margin(self.lifetime))
        return self.expires_at - now > window * (1 + FRESH_SLACK)

    def leased(self, now: float) -> bool:
        return self.holder is not None and now < self.lease_until

    def answer(self, now: float) -> TokenAnswer:
        return TokenAnswer(self.token, expires_in=self.expires_at - now, lifetime=self.lifetime,
                           upstream=URL(self.upstream) if self.upstream else None)


class VaultUnusable(Exception):
    """Vault could not be asked; carries the fixed detail of the store error."""


class ClusterTokens:
    """The coordinator one replica shares across its token sources. ``wall`` (epoch seconds),
    ``clock`` (monotonic), ``rng`` and ``replica_id`` are injectable for tests."""

    def __init__(self, store, cfg: ClusterConfig, *, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random,
                 replica_id: str | None = None) -> None:
        self.store = store  # a VaultStore: record() / write_record() on its own client pool
        self.root = cfg.path.strip("/")
        self.lease_timeout = cfg.lease_timeout
        self.wall = wall
        self.clock = clock
        self.rng = rng
        self.replica_id = replica_id or uuid.uuid4().hex

    def path(self, credential: str, principal: str = "") -> str:
        return f"{self.root}/{credential}" + (f"/{principal}" if principal else "")

    async def obtain(self, credential: str, principal: str, fetch: Callable[[], Awaitable[TokenAnswer]], *,
                     refresh_before: float, rejected: Secret | None = None) -> TokenAnswer:
        """The shared token if it is good, else a new one from ``fetch`` — fetched by one replica."""
        path = self.path(credential, principal)
        try:
            return await self._coordinated(path, fetch, refresh_before, rejected)
        except VaultUnusable as exc:
            log.warning("cluster: vault not usable; this replica refreshes on its own",
                        extra={"credential": credential, "cluster_path": path, "error": str(exc)})
            return await fetch()

    async def _coordinated(self, path: str, fetch, refresh_before: float, rejected: Secret | None) -> TokenAnswer:
        give_up = self.clock() + 2 * self.lease_timeout + 5  # leases are bounded; this guards against a livelock
        while self.clock() < give_up:
            rec = await self._read(path)
            now = self.wall()
            if rec.usable(now, refresh_before, rejected):
                return rec.answer(now)
            if rec.leased(now) and rec.holder != self.replica_id:
                await asyncio.sleep(self._poll_interval())  # another replica is fetching it
                continue
            try:
                leased = await self._write(path, {"holder": self.replica_id,
                                                  "lease_until": repr(now + self.lease_timeout)}, rec.version)
            except ConflictError:
                continue  # another replica wrote first: see what it wrote
            if rec.holder is not None and rec.holder != self.replica_id:
                log.warning("cluster: lease ran out before its holder stored the token; taking over",
                            extra={"cluster_path": path, "holder": rec.holder})
            return await self._fetch_and_store(path, fetch, leased)
        raise VaultUnusable("no token or lease settled in time")

    async def _fetch_and_store(self, path: str, fetch, leased: int) -> TokenAnswer:
        try:
            answer = await fetch()
        except BaseException:
            await self._release(path, leased)
            raise
        if answer.expires_in is None:
            # No stated lifetime: its expiry is a local guess (session.ttl); not shared.
            await self._release(path, leased)
            return answer
        now = self.wall()
        fields = {"access_token": answer.access, "expires_at": repr(now + answer.expires_in),
                  "lifetime": repr(answer.expires_in), "issued_by": self.replica_id}
        if answer.upstream is not None:
            fields["upstream"] = str(answer.upstream)
        try:
            version = await self._write(path, fields, leased)
        except ConflictError:
            log.info("cluster: lease was taken over while fetching; the new token stays with this replica",
                     extra={"cluster_path": path})
        except VaultUnusable as exc:
            log.warning("cluster: storing the new token failed; it stays with this replica",
                        extra={"cluster_path": path, "error": str(exc)})
        else:
            log.info("cluster: refreshed and shared the token", extra={"cluster_path": path, "version": version,
                                                                   "expires_in_s": round(answer.expires_in, 3)})
        return answer

    async def _release(self, path: str, leased: int) -> None:
        """The fetch failed: let the others try now instead of after the lease timeout."""
        try:
            await self._write(path, {"holder": "", "lease_until": "0"}, leased)
        except (ConflictError, VaultUnusable):
            pass

    def _poll_interval(self) -> float:
        base = min(POLL_MIN, self.lease_timeout / 20)
        return base * (1 + 2 * self.rng())

    # --- the two Vault operations ------------------------------------------------------

    async def _read(self, path: str) -> Record:
        try:
            version, fields = await self.store.record(path)
        except SecretBackendError as exc:
            raise VaultUnusable(exc.detail) from None
        return Record.parse(version, fields)

    async def _write(self, path: str, fields: dict[str, Secret | str], cas: int) -> int:
        values = {k: v if isinstance(v, Secret) else Secret(v) for k, v in fields.items()}
        try:
            return await self.store.write_record(path, values, cas=cas)
        except SecretBackendError as exc:
            raise VaultUnusable(exc.detail) from None


def cluster_for(cfg: ClusterConfig, store) -> ClusterTokens | None:
    """The coordinator for ``cluster.backend`` (None: each replica refreshes its own tokens)."""
    if cfg.backend != "vault":
        return None
    coordinator = ClusterTokens(store, cfg)
    log.info("cluster: sharing tokens through vault", extra={"cluster_path": coordinator.root,
                                                             "replica": coordinator.replica_id})
    return coordinator
