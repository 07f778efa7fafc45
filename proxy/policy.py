"""Allow rules, compiled once at load. Pure: no I/O, no config lookups per request."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from proxy.config.models import AllowRule, Config


def compile_glob(pattern: str) -> re.Pattern[str]:
    """``*`` is one non-empty segment (or part of one), ``**`` any number of segments."""
    out = []
    for seg in pattern.strip("/").split("/") if pattern.strip("/") else []:
        if seg == "**":
            out.append("(?:/[^/]*)*")
        elif seg == "*":
            out.append("/[^/]+")
        elif "*" in seg:
            out.append("/" + "[^/]*".join(re.escape(p) for p in seg.split("*")))
        else:
            out.append("/" + re.escape(seg))
    body = "".join(out)
    trailing = "/?" if not pattern.endswith("**") else ""
    return re.compile("^" + (body or "") + trailing + "$" if body else "^/?$")


@dataclass(frozen=True)
class _Rule:
    callers: frozenset[str] | None
    methods: frozenset[str] | None  # None: any
    paths: tuple[re.Pattern[str], ...]
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None

    def permits(self, caller: str, method: str, path: str, ip: ipaddress._BaseAddress | None) -> bool:
        if self.callers is not None and caller not in self.callers:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.nets is not None and (ip is None or not any(ip in n for n in self.nets)):
            return False
        return any(p.match(path) for p in self.paths)


def _compile_rule(rule: AllowRule) -> _Rule:
    callers = None if rule.callers is None or "*" in rule.callers else frozenset(rule.callers)
    methods = None if "*" in rule.methods else frozenset(rule.methods)
    nets = tuple(rule.source_ips) if rule.source_ips is not None else None
    return _Rule(callers, methods, tuple(compile_glob(p) for p in rule.paths), nets)


class Policy:
    def __init__(self, rules: dict[str, tuple[_Rule, ...]]) -> None:
        self._rules = rules
        self._for_caller: dict[tuple[str, str], tuple[_Rule, ...]] = {}  # (credential, caller) -> rules naming them

    @classmethod
    def compile(cls, cfg: Config) -> "Policy":
        return cls({name: tuple(_compile_rule(r) for r in c.allow) for name, c in cfg.credentials.items()})

    def allowed(self, caller: str, credential: str, method: str, path: str,
                ip: ipaddress._BaseAddress | None = None) -> bool:
        rules = self._for_caller.get((credential, caller))
        if rules is None:  # once per (credential, caller): both come from config, so this stays small
            rules = tuple(r for r in self._rules.get(credential, ()) if r.callers is None or caller in r.callers)
            if credential in self._rules:
                self._for_caller[(credential, caller)] = rules
        for r in rules:
            if r.permits(caller, method, path, ip):
                return True
        return False
