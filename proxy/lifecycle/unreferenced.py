"""What no running config references any more is let go.

After a reload — a rejected one (what only its config wanted) or a committed one once the old
State has no request left (what only the old config wanted) — the secret references no live
State uses are released: their secret cache entries are dropped (no longer held in memory nor
polled) and their values leave the log scrubber after its grace period. So what credproxy holds
is bounded by the configs running now, not by every reference ever configured.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config.references import secret_references
from proxy.lifecycle.state import State
from proxy.redact.scrubber import SCRUBBER, rotated_owner, secret_owner
from proxy.store.cache import SecretCache
from proxy.store.secret import SecretRef


def references(state: State) -> set[SecretRef]:
    """Every secret reference ``state`` reads: its config's (the forward proxy's CA key too) and its
    credentials' (auth sources, upstream client certificates)."""
    refs = {ref for _loc, ref in secret_references(state.config)}
    for cred in state.credentials.values():
        refs |= cred.refs()
    return refs


def release_unreferenced(cache: SecretCache, leaving: Iterable[State], live: Iterable[State]) -> set[SecretRef]:
    """Release what the ``leaving`` States reference and no ``live`` one does; returns those references."""
    kept = set().union(*(references(s) for s in live))
    gone = set().union(*(references(s) for s in leaving)) - kept
    kept_paths = {ref.path for ref in kept}
    cache.forget({ref.path for ref in gone} - kept_paths)
    for ref in gone:
        SCRUBBER.release(secret_owner(ref))
        SCRUBBER.release(rotated_owner(ref))
    return gone
