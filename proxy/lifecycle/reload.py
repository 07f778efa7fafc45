"""Reload: validate the config file, build its State, swap it in atomically, retire the old one.

Triggered by SIGHUP, ``POST /v1/reload`` and the config-file watcher; one at a time.

- Validation first: an unreadable or invalid file (``config.parse``), an
  unusable ``admin.token_file``, a dedicated listener that cannot be bound, or
  a credential source that cannot be built rejects the reload whole; the
  running config stays and nothing it owns is touched.
- The swap is one assignment (``holder.current``): a request runs on the
  state it started with (``StateHolder.use``), so in-flight requests finish on
  the old config. The operator's kill switch (``disabled``) and the request
  counters carry over to the new Credential objects at the moment of the swap.
- Token caches survive: a credential whose config is unchanged keeps its
  Credential object; one whose auth-relevant settings are unchanged (only its
  rules, listener, leak guard or probe changed) keeps its AuthSource.
- Retiring: the old state's credentials that the new state no longer uses are
  closed only after every request on the old state has finished.
- Listeners: dedicated listeners that are new are started before the swap, and
  removed or moved ones stop accepting at the swap and close once their
  requests are done. The main and admin listeners, ``server.tls``,
  ``server.limits``, ``secrets``, ``audit`` and ``cluster`` are bound at start: a change to
  them is reported under ``restart_required`` (and logged as a warning) and takes
  effect at the next restart; the rest of the new config is applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from proxy.config import models as config_mod
from proxy.admin.api import AdminAuth, AdminTokenError
from proxy.config.models import Config, ConfigInvalid, CredentialConfig, Problem
from proxy.lifecycle.drain import stop_accepting
from proxy.lifecycle.state import State

log = logging.getLogger("credproxy.reload")

# Credential settings that do not change how material is obtained: a change to them keeps the token cache.
SOURCE_INDEPENDENT = frozenset({"allow", "listen", "tls", "leak_guard", "probe", "rate_limit", "hosts"})
# Bound when the process starts; a change needs a restart.
RESTART_REQUIRED = (("server", "listen"), ("server", "tls"), ("server", "limits"), ("admin", "listen"),
                    ("secrets",), ("audit",), ("alerts", "webhook_url"), ("cluster",))
WARM_TIMEOUT = 5.0


def source_reusable(old: CredentialConfig, new: CredentialConfig) -> bool:
    return all(getattr(old, f) == getattr(new, f) for f in type(new).model_fields if f not in SOURCE_INDEPENDENT)


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
    restart_required: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    @property
    def status(self) -> int:
        return {"ok": 200, "invalid": 422}.get(self.result, 503)

    def as_dict(self) -> dict:
        if self.result == "invalid":
            return {"error": "invalid_config", "result": self.result, "trigger": self.trigger,
                    "problems": [p.as_dict() for p in self.problems]}
        if self.result == "refused":
            return {"error": "draining", "result": self.result, "trigger": self.trigger,
                    "message": "the proxy is shutting down"}
        return {"result": self.result, "trigger": self.trigger,
                "credentials": {"added": self.added, "removed": self.removed, "updated": self.updated,
                                "sessions_reset": self.sessions_reset},
                "listeners": {"started": self.listeners_started, "stopped": self.listeners_stopped},
                "restart_required": self.restart_required, "warnings": self.warnings}


class Reloader:
    def __init__(self, proxy) -> None:
        self.proxy = proxy  # proxy.app.Proxy
        self.lock = asyncio.Lock()
        self.last_digest: str | None = None  # of the file content the last reload (or the start) saw
        self._retiring: set[State] = set()
        self._stopping: list[web.BaseRunner] = []
        self._tasks: set[asyncio.Task] = set()

    def remember_file(self) -> None:
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

        old_cfg, old = proxy.cfg, holder.current
        result = ReloadResult("ok", trigger, restart_required=restart_required(old_cfg, cfg))
        # Upstream timeouts live in each Credential's client: rebuild the objects (sources are still kept).
        keep = (old_cfg.server.connect_timeout, old_cfg.server.read_timeout) == \
               (cfg.server.connect_timeout, cfg.server.read_timeout)
        old_sources = {id(c.source) for c in old.credentials.values()}
        state: State | None = None
        try:
            state = proxy.build_state(cfg, old.credentials, keep_objects=keep)
            new_sources = [c.source for c in state.credentials.values() if id(c.source) not in old_sources]
            for source in new_sources:
                await source.start()
            stopped = await self._start_listeners(old_cfg, cfg, result)
        except Exception as exc:  # noqa: BLE001 - any failure here rejects the reload whole
            if state is not None:
                await self._discard(state, old)
            problem = exc.problem if isinstance(exc, ApplyFailed) else \
                Problem(path, None, "", f"cannot be applied ({type(exc).__name__})")
            log.warning("reload could not be applied", exc_info=not isinstance(exc, ApplyFailed))
            return ReloadResult("invalid", trigger, [problem])

        # --- the swap: no await from here to the assignment --------------------------------
        for name, cred in state.credentials.items():
            before = old.credentials.get(name)
            if before is not None and before is not cred:
                cred.disabled = before.disabled
                cred.stats = before.stats
        proxy.cfg = cfg
        proxy.admin_auth.digest = admin_digest
        holder.current = state
        # -----------------------------------------------------------------------------------

        result.added = sorted(set(cfg.credentials) - set(old_cfg.credentials))
        result.removed = sorted(set(old_cfg.credentials) - set(cfg.credentials))
        result.updated = sorted(n for n, c in cfg.credentials.items()
                                if n in old.credentials and old.credentials[n].cfg != c)
        result.sessions_reset = sorted(n for n in result.updated
                                       if state.credentials[n].source is not old.credentials[n].source)
        self._retire(old, stopped)
        await self._warm(state, new_sources, result)
        return result

    async def _start_listeners(self, old_cfg: Config, cfg: Config, result: ReloadResult) -> list[web.BaseRunner]:
        """Start new dedicated listeners; stop accepting on removed or changed ones. Returns the runners to
        close once the old state is idle. On failure everything is put back as it was, then it raises."""
        proxy = self.proxy
        want = {n: (c.listen, c.tls) for n, c in cfg.credentials.items() if c.listen is not None}
        have = dict(proxy.dedicated)
        leaving = [n for n, (key, _) in have.items() if want.get(n) != key]
        coming = [n for n, key in want.items() if n not in have or have[n][0] != key]
        paused: list[str] = []
        started: list[str] = []
        bound = dict(proxy.bound)
        try:
            for name in coming:
                listen = str(cfg.credentials[name].listen)
                for other in leaving:  # same address as a listener that is going: it must let go first
                    if str(have[other][0][0]) == listen and other not in paused:
                        await _stop_sites(have[other][1])  # only the socket: rollback can re-open it
                        paused.append(other)
                try:
                    await proxy.start_dedicated(name, cfg.credentials[name])
                except OSError as exc:
                    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
                    raise ApplyFailed(Problem(proxy.config_path, None, f"credentials.{name}.listen",
                                              f"cannot listen ({reason})")) from None
                started.append(name)
        except BaseException:
            for name in started:
                _, runner = proxy.dedicated.pop(name)
                await runner.cleanup()
            for name in paused:
                proxy.dedicated[name] = have[name]
                key, runner = have[name]
                await proxy._site(runner, key[0], key[1] or old_cfg.server.tls)
            proxy.bound.clear()
            proxy.bound.update(bound)
            raise
        stopped = []
        for name in leaving:
            _, runner = have[name]
            if proxy.dedicated.get(name, (None, None))[1] is runner:
                del proxy.dedicated[name]
                proxy.bound.pop(f"credential:{name}", None)
            await stop_accepting([runner])
            stopped.append(runner)
        result.listeners_started = [f"{n} {want[n][0]}" for n in coming]
        result.listeners_stopped = [f"{n} {have[n][0][0]}" for n in leaving]
        return stopped

    async def _discard(self, state: State, old: State) -> None:
        """Undo a reload that failed before the swap: close what only the new state had."""
        old_creds = {id(c) for c in old.credentials.values()}
        old_sources = {id(c.source) for c in old.credentials.values()}
        for cred in state.credentials.values():
            if id(cred) in old_creds:
                continue
            if id(cred.source) not in old_sources:
                await cred.close()
            else:
                await cred.client.close()

    def _retire(self, old: State, runners: list[web.BaseRunner]) -> None:
        self._retiring.add(old)
        self._stopping.extend(runners)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(old, runners))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_when_idle(self, old: State, runners: list[web.BaseRunner]) -> None:
        try:
            await old.wait_idle()
            for runner in runners:
                await runner.cleanup()
                if runner in self._stopping:
                    self._stopping.remove(runner)
            self._retiring.discard(old)
            await self._close_unused(old.credentials.values())
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
            else:
                await cred.close()
                used_sources.add(id(cred.source))  # another retired credential may share it

    async def _warm(self, state: State, new_sources: list, result: ReloadResult) -> None:
        """Read the secrets of new or changed sources once, so the first caller does not wait and the
        answer can say what is missing; whatever fails keeps being retried in the background."""
        failed = False
        deadline = time.monotonic() + WARM_TIMEOUT
        fresh = {id(s) for s in new_sources}
        for name, cred in state.credentials.items():
            if id(cred.source) not in fresh:
                continue
            for ref in sorted(cred.source.refs(), key=str):
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(state.cache.read(ref), remaining)
                except Exception as exc:  # noqa: BLE001 - reported, retried by the warmer
                    failed = True
                    result.warnings.append(
                        f"credentials.{name}: secret {ref} is not readable yet ({type(exc).__name__})")
        if failed:
            self.proxy.ensure_warming()

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
            log.info("config reloaded", extra={**extra, "added": ",".join(result.added),
                                               "removed": ",".join(result.removed),
                                               "updated": ",".join(result.updated),
                                               "warnings": len(result.warnings)})
        elif result.result == "invalid":
            log.error("config reload rejected; the running config stays",
                      extra={**extra, "problems": "; ".join(str(p) for p in result.problems)})
        else:
            log.warning("config reload refused: shutting down", extra=extra)

    # --- shutdown ---------------------------------------------------------------------

    def stopping_runners(self) -> list[web.BaseRunner]:
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


class ApplyFailed(Exception):
    """A valid config that cannot be applied (a listener cannot bind): reported as a config problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


async def _stop_sites(runner: web.BaseRunner) -> None:
    for site in list(runner.sites):
        await site.stop()


