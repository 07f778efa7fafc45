"""Forward proxy: which names credproxy intercepts, tunnels or refuses, and which credential a request uses.

Pure data, no I/O. ``HostMap`` is built from the config (``credentials.*.hosts``,
``forward_proxy.tunnel_hosts``); the listener asks it about a ``CONNECT`` target,
the routing step (``proxy.routing.route_forward``) asks it which credential a request
inside the tunnel is for.

Names are compared lower-case, without a trailing dot. IP literals never match
anything: credproxy decides where a request goes by name, never by address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

HostPort = tuple[str, int]
PLACEHOLDER = "credproxy:"
# RFC 1123 labels; no wildcards, no underscores (a CONNECT target is a DNS name or nothing)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_SCHEMES = ("bearer", "token")


def _name(text: str) -> str | None:
    """The canonical host name, or None when ``text`` is not a DNS name (IP literals included)."""
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or name.startswith("["):
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # 10.0.0.1, 1.2.3.4. and the like: an address, not a name
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None  # pragma: no cover - every address form is caught by the digit check above


def split_authority(text: str) -> tuple[str, int | None]:
    """``"host:port"`` / ``"host"`` / ``"[::1]:443"`` -> (host as written, port or None); ValueError when malformed."""
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [ in host")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("junk after ]")
            port = _port(rest[1:])
    elif ":" in text:
        host, _, p = text.rpartition(":")
        port = _port(p)
    return host, port


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise ValueError("port must be 1-65535")
    return int(text)


def parse_host(entry: str, *, default_port: int | None) -> HostPort:
    """A config entry: ``"api.stripe.com"`` (``default_port``) or ``"api.stripe.com:8443"``."""
    host, port = split_authority(entry.strip())
    name = _name(host)
    if name is None:
        raise ValueError("must be a DNS name (no IP literals, wildcards or schemes)")
    if port is None:
        if default_port is None:
            raise ValueError("must be host:port")
        port = default_port
    return name, port


@functools.lru_cache(maxsize=256)  # once per distinct authority, not per request: ~3.7 us (ip_address raising)
def target(authority: str, *, default_port: int | None) -> HostPort | None:
    """A caller's ``CONNECT`` target or ``Host``; None when it is malformed or an IP literal. A pure function of
    its arguments: the cache is bounded and holds no secret (these are host names)."""
    try:
        host, port = split_authority(authority)
    except ValueError:
        return None
    name = _name(host)
    port = port if port is not None else default_port
    if name is None or port is None:
        return None
    return name, port


@dataclass(frozen=True)
class HostMap:
    intercept: Mapping[HostPort, tuple[str, ...]] = field(default_factory=dict)  # -> credential names
    tunnels: frozenset[HostPort] = frozenset()

    @classmethod
    def from_config(cls, cfg) -> "HostMap":
        intercept: dict[HostPort, list[str]] = {}
        for name, cred in cfg.credentials.items():
            for entry in cred.hosts:
                intercept.setdefault(parse_host(entry, default_port=443), []).append(name)
        fp = cfg.forward_proxy
        tunnels = frozenset(parse_host(e, default_port=None) for e in (fp.tunnel_hosts if fp else ()))
        return cls({hp: tuple(names) for hp, names in intercept.items()}, tunnels)

    def decide(self, hp: HostPort | None) -> str:
        """``"intercept"``, ``"tunnel"`` or ``"refuse"`` for a CONNECT target."""
        if hp is None:
            return "refuse"
        if hp in self.intercept:
            return "intercept"
        return "tunnel" if hp in self.tunnels else "refuse"

    def http_candidates(self, hp: HostPort) -> tuple[str, ...]:
        """Absolute-form ``http://`` requests: a ``hosts`` entry without a port names 443, so plain
        HTTP matches only entries that name the port (``host:80``, or the upstream's test port)."""
        return self.intercept.get(hp, ())


def named_pick(value: str | None) -> str | None:
    """``credproxy:stripe``, ``Bearer credproxy:stripe`` or ``Token credproxy:stripe`` -> ``stripe``."""
    if not value:
        return None
    value = value.strip()
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.lower() in _SCHEMES:
        value = rest.strip()
    if value.startswith(PLACEHOLDER):
        return value[len(PLACEHOLDER):]
    return None


def pick(candidates: tuple[str, ...], headers: Mapping[str, str],
         injected_headers: Callable[[str], tuple[str, ...]]) -> str | None:
    """The credential for a request: the one whose injected header carries ``credproxy:<its name>``, or the
    host's only credential when the request names none. No pick among several, an ambiguous one, or a pick of
    a credential the host does not have (``credproxy:stripe-test`` sent to a host only ``stripe-live`` claims):
    None — a caller never gets a credential other than the one it named."""
    if len(candidates) == 1:  # the usual host: its one credential, unless the request names another
        only = candidates[0]
        named = {named_pick(headers.get(h)) for h in injected_headers(only)} - {None}
        return only if not named or named == {only} else None
    picks = {name: {named_pick(headers.get(h)) for h in injected_headers(name)} - {None} for name in candidates}
    chosen = [name for name in candidates if picks[name] == {name}]
    return chosen[0] if len(chosen) == 1 else None
