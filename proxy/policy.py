"""Allow rules, compiled once at load. Pure: no I/O, no config lookups per request.

Per (credential, caller, method) the rules that can match are grouped at load; a request costs a dict
lookup and one regex match over the group's paths (rules with ``source_ips`` are checked one by one).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from proxy.callers import ANONYMOUS
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

    def permits(self, path: str, ip: ipaddress._BaseAddress | None) -> bool:
        """The source-IP and path checks (the rule was picked for its caller and method)."""
        if self.nets is not None and (ip is None or not any(ip in n for n in self.nets)):
            return False
        return any(p.match(path) for p in self.paths)


def _compile_rule(rule: AllowRule) -> _Rule:
    callers = None if rule.callers is None or "*" in rule.callers else frozenset(rule.callers)
    methods = None if "*" in rule.methods else frozenset(rule.methods)
    nets = tuple(rule.source_ips) if rule.source_ips is not None else None
    return _Rule(callers, methods, tuple(compile_glob(p) for p in rule.paths), nets)


@dataclass(frozen=True, slots=True)
class _Group:
    """The rules one (credential, caller, method) can match: the paths of those without a source-IP lock
    as one alternation (one regex match per request), the locked ones kept whole."""

    paths: re.Pattern[str] | None
    locked: tuple[_Rule, ...]

    @classmethod
    def of(cls, rules: list[_Rule]) -> "_Group":
        free = [p.pattern for r in rules if r.nets is None for p in r.paths]
        merged = re.compile("|".join(f"(?:{p})" for p in free)) if free else None  # each is anchored ^...$
        return cls(merged, tuple(r for r in rules if r.nets is not None))

    def permits(self, path: str, ip: ipaddress._BaseAddress | None) -> bool:
        if self.paths is not None and self.paths.match(path):
            return True
        for r in self.locked:
            if r.permits(path, ip):
                return True
        return False


_NOTHING = _Group(None, ())


@dataclass(frozen=True, slots=True)
class _CallerRules:
    """One caller's rules on one credential, by method (a method no rule names gets ``other``: rules for any)."""

    by_method: dict[str, _Group]
    other: _Group

    @classmethod
    def of(cls, rules: tuple[_Rule, ...]) -> "_CallerRules":
        named = {m for r in rules if r.methods is not None for m in r.methods}
        by_method = {m: _Group.of([r for r in rules if r.methods is None or m in r.methods]) for m in named}
        return cls(by_method, _Group.of([r for r in rules if r.methods is None]))


class Policy:
    def __init__(self, rules: dict[str, tuple[_Rule, ...]], callers: tuple[str, ...] = ()) -> None:
        self._rules = rules
        # (credential, caller) -> that caller's rules by method: a dict lookup per request to the rules that
        # can match. Built at load for the configured callers, else on first use (both names come from config:
        # policy runs after authentication and after the credential is known to exist, so this stays small).
        self._for_caller: dict[tuple[str, str], _CallerRules] = {}
        for credential in rules:
            for caller in callers:
                self._compiled(credential, caller)

    @classmethod
    def compile(cls, cfg: Config) -> "Policy":
        callers = tuple(cfg.callers) if cfg.callers is not None else (ANONYMOUS,)
        return cls({name: tuple(_compile_rule(r) for r in c.allow) for name, c in cfg.credentials.items()}, callers)

    def _compiled(self, credential: str, caller: str) -> _CallerRules:
        compiled = self._for_caller[(credential, caller)] = _CallerRules.of(
            tuple(r for r in self._rules[credential] if r.callers is None or caller in r.callers))
        return compiled

    def allowed(self, caller: str, credential: str, method: str, path: str,
                ip: ipaddress._BaseAddress | None = None) -> bool:
        compiled = self._for_caller.get((credential, caller))
        if compiled is None:
            if credential not in self._rules:
                return False
            compiled = self._compiled(credential, caller)
        group = compiled.by_method.get(method, compiled.other)
        if not group.locked:  # the usual group: one regex match, without a call to permits for it
            return group.paths is not None and group.paths.match(path) is not None
        return group.permits(path, ip)
