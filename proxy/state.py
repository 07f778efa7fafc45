"""The running configuration as one immutable-by-convention bundle.

A request takes ``holder.current`` once at its start and finishes on it, so a
reload (which swaps ``current``) never changes a request mid-flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.alerts import AlertMonitor
from proxy.audit import AuditLog
from proxy.callers import Authenticator
from proxy.config import Config
from proxy.credential import Credential
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.ratelimit import RateLimiter
from proxy.secretcache import SecretCache


@dataclass
class State:
    config: Config
    credentials: dict[str, Credential]
    policy: Policy
    authenticator: Authenticator
    audit: AuditLog
    metrics: Metrics
    cache: SecretCache
    ready: bool = True
    alerts: AlertMonitor | None = None  # long-lived (owned by Proxy): carry it into a reloaded State
    limiter: RateLimiter | None = None  # built from the config: rebuild it on reload


@dataclass
class StateHolder:
    current: State
    draining: bool = False
    extras: dict = field(default_factory=dict)
