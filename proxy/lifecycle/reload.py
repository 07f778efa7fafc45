"""Reload as a transaction: build the whole new State, then commit it by swapping one reference.

Triggered by SIGHUP, ``POST /v1/reload`` and the config-file watcher; one at a time.

- Build, with nothing running touched: the file is read and validated
  (``config.parse``), ``admin.token_file`` read, and the new State built from
  it (``Proxy.build_state``: credentials, policy, callers, upstream address
  policy, rate limiter, alert settings); new token sources are started, every
  secret reference the new config adds is read, and the dedicated listeners it
  adds or moves are bound and their TLS loaded (``DedicatedListeners.prepare``)
  but not served. Any problem (an invalid file, an unreadable token file, a
  secret that cannot be read, a listener that cannot bind) rejects the reload
  whole, with every problem found: what was built is discarded and the running
  State, its listeners and its secrets cache entries are as they were (the secrets
  only the rejected config wanted are forgotten again, ``proxy.lifecycle.unreferenced``).
- Commit: ``holder.current`` is assigned (no await while the operator's kill
  switch and the request counters are carried over to new Credential objects),
  then leaving listeners stop accepting and the new ones start. A request runs
  on the State it started with (``StateHolder.use``), so in-flight requests
  finish on the old config.
- Carried over: a credential whose config is unchanged keeps its Credential
  object (token cache, pool) unless the upstream clients' settings changed;
  one whose auth-relevant settings are unchanged keeps its AuthSource; rate
  limit buckets whose limit is unchanged keep their level; the alert history
  is kept under the new thresholds.
- Retiring: the old State's credentials the new one no longer uses, and the
  listeners it stopped, are closed once every request on the old State is done;
  then the secret references no live State uses are released (cache entries no
  longer polled, values out of the log scrubber after its grace period).
- The main and admin listeners, ``server.tls``, ``server.limits``,
  ``secrets``, ``audit`` and ``cluster`` are bound at start: a change to them is
  reported under ``restart_required`` (and logged as a warning) and takes
  effect at the next restart; the rest of the new config is applied.
- The last reload that changed something is kept (``last_change``, with its
  trigger and time): a reload that finds nothing to change says who changed
  it last, e.g. the file watcher a moment before ``credproxy reload``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from proxy.server.listener import CallerListener

from proxy.config import models as config_mod
from proxy.admin.api import AdminAuth
from proxy.config.models import Config, CredentialConfig, Problem
from proxy.config.references import secret_references
from proxy.errors import AdminTokenError, ConfigInvalid, ListenerUnavailable, SecretAccessDenied, SecretNotFound
from proxy.lifecycle.listeners import Plan
from proxy.lifecycle.state import State
from proxy.lifecycle.unreferenced import release_unreferenced

log = logging.getLogger("credproxy.reload")

# Credential settings that do not change how material is obtained: a change to them keeps the token cache.
SOURCE_INDEPENDENT = frozenset({"allow", "listen", "tls", "leak_guard", "probe", "rate_limit", "hosts"})
# Bound when the process starts; a change needs a restart.
RESTART_REQUIRED = (("server", "listen"), ("server", "tls"), ("server", "limits"), ("admin", "listen"),
                    ("secrets",), ("audit",), ("alerts", "webhook_url"), ("cluster",))
RESOLVE_TIMEOUT = 5.0  # for reading every secret reference a reload adds
TRIGGERS = {"api": "the admin API (credproxy reload)", "sighup": "SIGHUP", "watch": "the file watcher",
            "start": "the start of the proxy"}


def source_reusable(old: CredentialConfig, new: CredentialConfig) -> bool:
    return all(getattr(old, f) == getattr(new, f) for f in type(new).model_fields if f not in SOURCE_INDEPENDENT)


def settings_changed(old: Config, new: Config) -> list[str]:
    """Dotted names of the settings outside ``credentials`` that differ (two levels deep)."""
    out = []
    for name in type(new).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if name == "credentials" or a == b:
            continue
        fields = getattr(type(b), "model_fields", None)
        if fields and a is not None:
            out += [f"{name}.{f}" for f in fields if getattr(a, f) != getattr(b, f)]
        else:
            out.append(name)
    return out


def restart_required(old: Config, new: Config) -> list[str]:
    out = []
    for path in RESTART_REQUIRED:
        a, b = old, new
        for part in path:
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            out.append(".".join(path))
    old_fp, new_fp = old.forward_proxy, new.forward_proxy  # tunnel_hosts and credentials' hosts apply at once
    for part in ("listen", "ca"):
        if getattr(old_fp, part, None) != getattr(new_fp, part, None):
            out.append(f"forward_proxy.{part}")
    return out


@dataclass
class ReloadResult:
    result: str  # ok | invalid | refused
    trigger: str
    problems: list[Problem] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    sessions_reset: list[str] = field(default_factory=list)  # updated credentials whose token cache was dropped
    listeners_started: list[str] = field(default_factory=list)
    listeners_stopped: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # other settings applied (callers, server.deny_..., alerts...)
    admin_token_replaced: bool = False
    restart_required: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)
    last_change: "ReloadResult | None" = None  # set when this reload changed nothing: who changed it last

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.updated or self.listeners_started or self.listeners_stopped
                    or self.settings or self.admin_token_replaced)

    @property
    def status(self) -> int:
        return {"ok": 200, "invalid": 422}.get(self.result, 503)

    def changes(self) -> dict:
        return {"credentials": {"added": self.added, "removed": self.removed, "updated": self.updated,
                                "sessions_reset": self.sessions_reset},
                "listeners": {"started": self.listeners_started, "stopped": self.listeners_stopped},
                "settings": self.settings, "admin_token_replaced": self.admin_token_replaced}

    def as_dict(self) -> dict:
        if self.result == "invalid":
            return {"error": "invalid_config", "result": self.result, "trigger": self.trigger,
                    "problems": [p.as_dict() for p in self.problems]}
        if self.result == "refused":
            return {"error": "draining", "result": self.result, "trigger": self.trigger,
                    "message": "the proxy is shutting down"}
        out = {"result": self.result, "trigger": self.trigger, "at": _iso(self.at), "changed": self.changed,
               **self.changes(), "restart_required": self.restart_required}
        if self.last_change is not None:
            last = self.last_change
            out["last_change"] = {"trigger": last.trigger, "by": TRIGGERS.get(last.trigger, last.trigger),
                                  "at": _iso(last.at), **last.changes()}
        return out


@dataclass(eq=False)
class _Built:
    """A new State and what was made for it, not yet committed."""

    state: State
    new_sources: list
    listeners: Plan | None = None


class Rejected(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


class Reloader:
    """Needs from the proxy (``proxy.app.Proxy``): ``holder``, ``config_path``, ``admin_auth``,
    ``build_state(cfg, previous)`` and ``listeners`` (``DedicatedListeners``)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.lock = asyncio.Lock()
        self.last_digest: str | None = None  # of the file content the last reload (or the start) saw
        self.last_change: ReloadResult | None = None  # the last reload that changed something (or the start)
        self._retiring: set[State] = set()
        self._stopping: list[CallerListener] = []
        self._tasks: set[asyncio.Task] = set()

    def started(self) -> None:
        """The proxy is serving the config it started with."""
        self.last_change = ReloadResult("ok", "start")
        self.remember_file()

    def remember_file(self) -> None:
        if self.proxy.config_path is None:
            return
        try:
            self.last_digest = hashlib.sha256(Path(self.proxy.config_path).read_bytes()).hexdigest()
        except OSError:
            self.last_digest = None

    async def reload(self, trigger: str = "api") -> ReloadResult:
        async with self.lock:
            result = await self._reload(trigger)
        self._report(result)
        return result

    # --- the steps ----------------------------------------------------------------

    async def _reload(self, trigger: str) -> ReloadResult:
        proxy = self.proxy
        holder = proxy.holder
        if holder is None or holder.draining:
            return ReloadResult("refused", trigger)
        path = proxy.config_path
        if path is None:
            return ReloadResult("invalid", trigger, [Problem("<config>", None, "", "not started from a config file")])
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            problem = Problem(path, None, "", f"cannot be read ({exc.strerror or 'error'})")
            return ReloadResult("invalid", trigger, [problem])
        self.last_digest = hashlib.sha256(raw).hexdigest()
        try:
            cfg = config_mod.parse(raw.decode("utf-8"), path)
            admin_digest = AdminAuth.read(cfg.admin.token_file)
        except UnicodeDecodeError:
            return ReloadResult("invalid", trigger, [Problem(path, None, "", "is not UTF-8 text")])
        except ConfigInvalid as exc:
            return ReloadResult("invalid", trigger, exc.problems)
        except AdminTokenError as exc:
            return ReloadResult("invalid", trigger, [Problem(path, None, "admin.token_file", exc.reason)])

        old = holder.current
        try:
            built = await self._build(cfg, old)
        except Rejected as exc:
            return ReloadResult("invalid", trigger, exc.problems)

        # --- the commit: no await from here to the assignment --------------------------------
        state = built.state
        for name, cred in state.credentials.items():
            before = old.credentials.get(name)
            if before is not None and before is not cred:
                cred.disabled = before.disabled
                cred.stats = before.stats
        admin_replaced = proxy.admin_auth.digest != admin_digest
        holder.current = state
        proxy.admin_auth.digest = admin_digest
        # -----------------------------------------------------------------------------------
        stopped = await proxy.listeners.commit(built.listeners)
        await self._start_new(state, old)
        result = self._describe(trigger, old, state, built, admin_replaced)
        self._retire(old, stopped)
        if result.changed:
            self.last_change = result
        else:
            result.last_change = self.last_change
        return result

    async def _build(self, cfg: Config, old: State) -> _Built:
        """The new State with its sources started, its new secrets read and its listeners bound; raises
        ``Rejected`` (with every problem found) after discarding all of it."""
        path = self.proxy.config_path
        built: _Built | None = None
        problems: list[Problem] = []
        try:
            state = self.proxy.build_state(cfg, old)
            old_sources = {id(c.source) for c in old.credentials.values()}
            built = _Built(state, [c.source for c in state.credentials.values() if id(c.source) not in old_sources])
            for source in built.new_sources:
                await source.start()
            problems += await self._resolve(state, old)
            try:
                built.listeners = await self.proxy.listeners.prepare(cfg)
            except ListenerUnavailable as exc:
                problems.append(Problem(path, None, f"credentials.{exc.credential}.{exc.field}", exc.reason))
        except Exception as exc:  # noqa: BLE001 - any failure here rejects the reload whole
            log.warning("reload could not be applied", exc_info=True)
            problems.append(Problem(path, None, "", f"cannot be applied ({type(exc).__name__})"))
        if problems:
            if built is not None:
                await self._discard(built, old)
            raise Rejected(problems)
        return built

    async def _resolve(self, state: State, old: State) -> list[Problem]:
        """Read every secret reference the new config adds (those the running config also has are not
        its doing); one that cannot be read now is a problem: the running config stays."""
        path = self.proxy.config_path
        before = {ref for c in old.credentials.values() for ref in c.refs()}
        deadline = time.monotonic() + RESOLVE_TIMEOUT
        problems = []
        for name, cred in state.credentials.items():
            fields: dict = {}
            for loc, ref in secret_references(state.config.credentials[name]):
                fields.setdefault(ref, ".".join(map(str, ("credentials", name, *loc))))
            for ref in sorted(cred.refs() - before, key=str):
                try:
                    await asyncio.wait_for(state.cache.read(ref), max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - each one is reported
                    problems.append(Problem(path, None, fields.get(ref, f"credentials.{name}"),
                                            _unreadable(exc, ref, path, state)))
        return problems

    async def _discard(self, built: _Built, old: State) -> None:
        """Close what only the rejected State had; nothing the running one uses."""
        if built.listeners is not None:
            await self.proxy.listeners.discard(built.listeners)
        old_creds = {id(c) for c in old.credentials.values()}
        old_sources = {id(c.source) for c in old.credentials.values()}
        for cred in built.state.credentials.values():
            if id(cred) in old_creds:
                continue
            if id(cred.source) not in old_sources:
                await cred.close()
            else:
                await cred.client.close()
        release_unreferenced(old.cache, [built.state], self._live())

    async def _start_new(self, state: State, old: State) -> None:
        """After the commit: upstream client certificates of new Credential objects start watching for
        rotation (they register with the shared cache and metrics, so not before)."""
        kept = {id(c) for c in old.credentials.values()}
        for cred in state.credentials.values():
            if id(cred) not in kept and cred.tls is not None:
                await cred.tls.start()

    def _describe(self, trigger: str, old: State, state: State, built: _Built, admin_replaced: bool) -> ReloadResult:
        old_cfg, cfg = old.config, state.config
        plan = built.listeners
        return ReloadResult(
            "ok", trigger,
            added=sorted(set(cfg.credentials) - set(old_cfg.credentials)),
            removed=sorted(set(old_cfg.credentials) - set(cfg.credentials)),
            updated=sorted(n for n, c in cfg.credentials.items()
                           if n in old.credentials and old.credentials[n].cfg != c),
            sessions_reset=sorted(n for n, c in cfg.credentials.items()
                                  if n in old.credentials and old.credentials[n].cfg != c
                                  and state.credentials[n].source is not old.credentials[n].source),
            listeners_started=plan.started,
            listeners_stopped=[f"{n} {old_cfg.credentials[n].listen}" for n in plan.leaving],
            settings=[s for s in settings_changed(old_cfg, cfg) if not _restart_field(s)],
            admin_token_replaced=admin_replaced,
            restart_required=restart_required(old_cfg, cfg))

    def _retire(self, old: State, runners: list[CallerListener]) -> None:
        self._retiring.add(old)
        self._stopping.extend(runners)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(old, runners))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_when_idle(self, old: State, runners: list[CallerListener]) -> None:
        try:
            await old.wait_idle()
            for runner in runners:
                await runner.cleanup()
                if runner in self._stopping:
                    self._stopping.remove(runner)
            self._retiring.discard(old)
            await self._close_unused(old.credentials.values())
            async with self.lock:  # not while a reload reads the secrets its new config adds
                release_unreferenced(old.cache, [old], self._live())
        except Exception:  # noqa: BLE001 - a failed close must not take the proxy down
            log.exception("closing retired credentials failed")
        finally:
            self._retiring.discard(old)

    def _live(self) -> list[State]:
        holder = self.proxy.holder
        return [holder.current, *self._retiring] if holder is not None else list(self._retiring)

    async def _close_unused(self, credentials) -> None:
        live = self._live()
        used = {id(c) for s in live for c in s.credentials.values()}
        used_sources = {id(c.source) for s in live for c in s.credentials.values()}
        closed = set()
        for cred in credentials:
            if id(cred) in used or id(cred) in closed:
                continue
            closed.add(id(cred))
            if id(cred.source) in used_sources:
                await cred.client.close()
                if cred.tls is not None:  # its own (a kept source does not own it): stop its rotation watch
                    await cred.tls.close()
            else:
                await cred.close()
                used_sources.add(id(cred.source))  # another retired credential may share it

    # --- reporting --------------------------------------------------------------------

    def _report(self, result: ReloadResult) -> None:
        holder = self.proxy.holder
        metrics = holder.current.metrics if holder is not None else None
        if metrics is not None:
            metrics.reloads.labels(result.result).inc()
            if result.result != "refused":
                metrics.last_reload_ok.set(1 if result.ok else 0)
        extra = {"trigger": result.trigger, "result": result.result}
        if result.ok:
            for item in result.restart_required:
                log.warning("config change needs a restart to take effect", extra={"field": item})
            log.info("config reloaded" if result.changed else "config reloaded: nothing changed",
                     extra={**extra, "added": ",".join(result.added), "removed": ",".join(result.removed),
                            "updated": ",".join(result.updated), "settings": ",".join(result.settings)})
        elif result.result == "invalid":
            log.error("config reload rejected; the running config stays",
                      extra={**extra, "problems": "; ".join(str(p) for p in result.problems)})
        else:
            log.warning("config reload refused: shutting down", extra=extra)

    # --- shutdown ---------------------------------------------------------------------

    def stopping_runners(self) -> list[CallerListener]:
        return list(self._stopping)

    async def close_all(self) -> None:
        """At shutdown: close every credential of the current and retired states (each once)."""
        states = self._live()  # before cancelling: a cancelled retirement forgets its state
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._retiring.clear()
        seen_sources = set()
        seen = set()
        for state in states:
            for cred in state.credentials.values():
                if id(cred) in seen:
                    continue
                seen.add(id(cred))
                if id(cred.source) in seen_sources:
                    await cred.client.close()
                else:
                    seen_sources.add(id(cred.source))
                    await cred.close()


def _restart_field(name: str) -> bool:
    return any(name == ".".join(p) or name.startswith(".".join(p) + ".") for p in RESTART_REQUIRED)


def _unreadable(exc: Exception, ref, config_path: str, state: State) -> str:
    """Why a secret could not be read, in words that say what to do (never the store's own text)."""
    if isinstance(exc, SecretNotFound):
        if state.config.secrets.backend == "file":
            command = shlex.join(["credproxy", "secrets", "put", "-c", config_path, ref.path, ref.field])
            return f"{ref} is not in the secret store; add it with: {command}"
        return f"{ref} is not in the secret store"
    if isinstance(exc, SecretAccessDenied):
        return f"{ref} cannot be read: access denied by the secret store"
    if isinstance(exc, TimeoutError):
        return f"{ref} cannot be read: the secret store did not answer within {RESOLVE_TIMEOUT:g}s"
    return f"{ref} cannot be read: the secret store is unavailable ({type(exc).__name__})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
