"""The one place that wires everything: store, cache, credentials, listeners, admin.

``Proxy.start()`` brings it up, ``Proxy.stop()`` drains and releases in reverse.
``serve()`` adds the process concerns: signals, reload on SIGHUP, exit code.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import logging
import signal
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import heap
from proxy.config import models as config_mod
from proxy.errors import ListenError, ListenerUnavailable
from proxy.redact import log_filter as logfilter
from proxy.admin.api import AdminAuth, build_admin_app
from proxy.observe.alerts import AlertMonitor, WebhookSender
from proxy.observe.audit import AuditLog
from proxy.callers import Authenticator
from proxy.config.models import Config, TLSConfig
from proxy.config.references import secret_references
from proxy.server.connlimit import ConnectionLimit, record_refusal
from proxy.auth_types import build_source
from proxy.credential import Credential
from proxy.errors import SecretBackendError
from proxy.lifecycle.drain import FINISH_GRACE, drain
from proxy.server.connection import ConnectionContext, HTTPConnection
from proxy.server.listener import CallerListener
from proxy.host_map import HostMap
from proxy.server.forward.listener import ForwardConnection, ForwardContext
from proxy.observe.metrics import Metrics
from proxy.upstream.address_policy import AddressPolicy, OwnListeners
from proxy.pipeline import handle, record_refused
from proxy.routing import route_dedicated, route_prefixed
from proxy.policy import Policy
from proxy.ratelimit import RateLimiter
from proxy.upstream.relay import AnswerBudget
from proxy.lifecycle.listeners import DedicatedListeners
from proxy.lifecycle.reload import ReloadResult, Reloader, source_reusable
from proxy.redact.scrubber import SCRUBBER
from proxy.store.cache import SecretCache
from proxy.lifecycle.state import State, StateHolder
from proxy.store import open_store
from proxy.tokens.cluster import cluster_for
from proxy.config.fields import Listen
from proxy.server.binding import LISTEN_BACKLOG, server_ssl
from proxy.lifecycle.watch import ConfigWatcher

if TYPE_CHECKING:  # loaded in _start_forward: the CA (cryptography's X.509, ~3 MiB at import) only with a forward proxy
    from proxy.server.forward.ca import LeafContexts

log = logging.getLogger("credproxy")


def listen_error(exc: OSError, listen: Listen, field: str) -> ListenError:
    """A failed bind in the words an operator needs: which address, why, and which config key asked for it."""
    if exc.errno == errno.EADDRINUSE:
        reason = "is already in use"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "may not be opened by this user (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "is not an address of this machine"
    else:
        reason = f"cannot be opened ({exc.strerror or type(exc).__name__})"
    return ListenError(exc.errno, str(listen), field, reason)


def fields_naming(cred: Credential, ref) -> list[str]:
    """The config field paths that name ``ref`` in ``cred`` (``credentials.x.auth.secret``), for the log."""
    return [config_mod.dotted(("credentials", cred.name) + loc) for loc, r in secret_references(cred.cfg) if r == ref]


def build_credentials(cfg: Config, cache: SecretCache, metrics: Metrics, reuse: dict[str, Credential] | None = None,
                      *, source_factory=build_source, keep_objects: bool = True,
                      address_policy: AddressPolicy | None = None, cluster=None,
                      committed_addresses=None) -> dict[str, Credential]:
    """``address_policy`` is ``cfg``'s (the upstream clients'); ``committed_addresses`` returns the one in
    force, for token sources (they can outlive this config: see ``proxy.tokens.http``)."""
    out = {}
    for name, c in cfg.credentials.items():
        old = (reuse or {}).get(name)
        if keep_objects and old is not None and old.cfg == c and old.leak_guard == cfg.leak_guard_for(name):
            out[name] = old  # unchanged: keep its token cache and pool
            continue
        if old is not None and source_reusable(old.cfg, c):
            source = old.source  # auth settings unchanged (only rules, listener, ...): the token cache survives
        else:
            shared = {"cluster": cluster} if cluster is not None else {}  # cluster.backend: vault
            if committed_addresses is not None:
                shared["addresses"] = committed_addresses
            source = source_factory(c, cache, name=name, metrics=metrics, store=cache.store, **shared)
        out[name] = Credential(name, c, cfg.server, source, cfg.leak_guard_for(name), cache=cache, metrics=metrics,
                               address_policy=address_policy)
    return out


class Proxy:
    def __init__(self, cfg: Config, config_path: str | None = None, *, source_factory=build_source,
                 watch_interval: float | None = 2.0, reuse_port: bool = False,
                 admin_listen: Listen | None = None) -> None:
        self._start_cfg = cfg
        self.config_path = config_path
        self.reuse_port = reuse_port  # serve --workers: every worker binds the same caller ports (SO_REUSEPORT)
        self.admin_listen = admin_listen  # serve --workers: the worker's private admin socket (see proxy.workers)
        self.holder: StateHolder | None = None
        self.source_factory = source_factory
        self.watch_interval = watch_interval  # None: no config-file watcher
        self.reloader = Reloader(self)
        self.admin_auth = AdminAuth()
        self._watcher: ConfigWatcher | None = None
        self._runners: list[CallerListener] = []  # main and forward
        self._admin_runner: web.AppRunner | None = None
        self._store = None
        self._cluster = None  # ClusterTokens when replicas share tokens (read at start)
        self._cache: SecretCache | None = None
        self._audit: AuditLog | None = None
        self._warm_task: asyncio.Task | None = None
        self._metrics: Metrics | None = None
        self.bound: dict[str, str] = {}  # "main", "admin", "credential:<name>" -> bound address
        self._own = OwnListeners()  # credproxy's own addresses: every config's address policy refuses them
        self.listeners = DedicatedListeners(runner_for=self._dedicated_runner, own=self._own, bound=self.bound,
                                            server_tls=cfg.server.tls, reuse_port=reuse_port)
        self._answer_budget = AnswerBudget()
        self._webhook: WebhookSender | None = None
        self._connections: ConnectionLimit | None = None  # server.limits.max_connections, across caller listeners
        self.forward_leaves: LeafContexts | None = None  # forward proxy: leaf certificates minted (read by tests)
        self.forward_context: ForwardContext | None = None  # what forward connections share (tests set its resolver)

    @property
    def cfg(self) -> Config:
        """The running config (the committed State's)."""
        return self.holder.current.config if self.holder is not None else self._start_cfg

    async def start(self) -> None:
        cfg = self.cfg
        logfilter.install(SCRUBBER)
        self._store = open_store(cfg.secrets)
        await self._store.start()
        self._cluster = cluster_for(cfg.cluster, self._store)
        vault = cfg.secrets.vault if cfg.secrets.backend == "vault" else None
        metrics = Metrics()
        backend_errors = metrics.backend_errors.labels(self._store.name)
        self._cache = SecretCache(self._store, refresh_interval=vault.refresh_interval if vault else 60.0,
                                  max_staleness=vault.max_staleness if vault else float("inf"),
                                  on_backend_error=lambda _exc: backend_errors.inc())
        self._metrics = metrics
        self._audit = AuditLog.open(cfg.audit, metrics)
        self._audit.start()
        self._start_webhook(cfg, metrics)
        self.admin_auth.load(cfg.admin.token_file)
        state = self.build_state(cfg)
        self.holder = StateHolder(state)
        for cred in state.credentials.values():
            await cred.start()
        self._cache.start()
        self.ensure_warming()
        holder = self.holder
        self._connections = connections = ConnectionLimit(
            cfg.server.limits.max_connections, on_refused=lambda client, rid: record_refusal(holder.current, client, rid))
        metrics.caller_connections.set_function(lambda: connections.open)
        metrics.inflight.set_function(lambda: holder.in_flight)  # what StateHolder.use() counts anyway
        await self._listen()
        self.reloader.started()
        if self.config_path is not None and self.watch_interval:
            self._watcher = ConfigWatcher(self.config_path, self.reloader, interval=self.watch_interval)
            self._watcher.start()

    def build_state(self, cfg: Config, previous: State | None = None) -> State:
        """Everything ``cfg`` decides, built without touching what is running: ``previous`` (the running
        State) is only read. Credentials whose config is unchanged are kept (with their token cache and
        pool) unless the upstream clients' settings changed; limiter buckets whose limit is unchanged
        and the alert history carry over."""
        addresses = AddressPolicy.from_config(cfg.server, own=self._own)
        if previous is None:
            keep = True
            alerts = AlertMonitor(cfg.alerts, audit=self._audit, counter=self._metrics.alerts, webhook=self._webhook)
            limiter = RateLimiter.from_config(cfg)
        else:
            old = previous.config.server
            # The address policy and the timeouts live in each Credential's upstream client (and pooled
            # connections were opened under the old rules): new rules mean new clients; sources are kept.
            keep = previous.addresses == addresses and \
                (old.connect_timeout, old.read_timeout) == (cfg.server.connect_timeout, cfg.server.read_timeout)
            alerts = previous.alerts.with_settings(cfg.alerts)
            limiter = RateLimiter.from_config(cfg, previous=previous.limiter)
        credentials = build_credentials(cfg, self._cache, self._metrics, previous.credentials if previous else None,
                                        source_factory=self.source_factory, keep_objects=keep,
                                        address_policy=addresses, cluster=self._cluster,
                                        committed_addresses=self.committed_addresses)
        return State(cfg, credentials, Policy.compile(cfg), Authenticator(cfg.callers), self._audit, self._metrics,
                     self._cache, addresses=addresses, alerts=alerts, limiter=limiter,
                     answer_budget=self._answer_budget, forward_hosts=HostMap.from_config(cfg))

    def committed_addresses(self) -> AddressPolicy:
        """The address rules in force: the committed State's (before the first commit, the start config's).
        Token, login and revocation calls are checked by these at each call: a token source kept across a
        reload serves the new config, and a rejected reload commits nothing."""
        if self.holder is None:
            return AddressPolicy.from_config(self._start_cfg.server, own=self._own)
        return self.holder.current.addresses

    def _start_webhook(self, cfg: Config, metrics: Metrics) -> None:
        if cfg.alerts.webhook_url:  # read at start: a changed webhook_url takes effect on restart
            failures = metrics.alert_webhook_failures
            self._webhook = WebhookSender(cfg.alerts.webhook_url, timeout=cfg.alerts.webhook_timeout,
                                          # operator infrastructure like Vault: not the upstream rules, but
                                          # never metadata ranges nor credproxy itself (an alert about a
                                          # denied request must not become a denied request)
                                          socket_factory=AddressPolicy(own=self._own).socket_factory,
                                          on_failure=lambda reason: failures.labels(reason).inc())
            self._webhook.start()

    async def reload(self, trigger: str = "api") -> ReloadResult:
        """Re-read the config file; see ``proxy.lifecycle.reload``. Used by SIGHUP, POST /v1/reload and the file watcher."""
        return await self.reloader.reload(trigger)

    def ensure_warming(self) -> None:
        if self._warm_task is None or self._warm_task.done():
            self._warm_task = asyncio.get_running_loop().create_task(self._warm())

    async def _warm(self) -> None:
        """Read every referenced secret once so the first request does not wait, retrying until all load."""
        delay = 1.0
        while True:
            state = self.holder.current
            failed = 0
            for cred in state.credentials.values():
                for ref in cred.refs():
                    try:
                        await state.cache.read(ref)
                    except Exception as exc:  # noqa: BLE001 - reported, retried
                        failed += 1
                        log.warning("secret not readable yet", extra={
                            "credential": cred.name, "secret_path": ref.path, "secret_field": ref.field,
                            "field": ", ".join(fields_naming(cred, ref)), "error": type(exc).__name__},
                            exc_info=None if isinstance(exc, SecretBackendError) else exc)
            if not failed:
                return
            await asyncio.sleep(delay)
            # Never wait longer than a poll round: a backend that comes back is noticed as soon as rotation would be.
            delay = min(delay * 2, 60.0, max(1.0, state.cache.refresh_interval))

    async def _site(self, listener: CallerListener, listen: Listen, tls: TLSConfig | None,
                    field: str = "listen") -> str:
        """Start a caller listener; returns the bound address ("host:port", or "unix:/path"). ``field`` names
        the config key in a ``ListenError``."""
        try:
            addresses = await listener.start(listen, server_ssl(tls), reuse_port=self.reuse_port)
        except OSError as exc:
            raise listen_error(exc, listen, field) from None
        if listen.unix:
            return str(listen)
        for address in addresses:
            self._own.add(*address[:2])  # no upstream may be credproxy itself
        host, port = addresses[-1][:2]
        return f"{host}:{port}"

    async def _admin_site(self, runner: web.AppRunner, listen: Listen) -> str:
        """The admin listener stays on aiohttp (control plane)."""
        if listen.unix:
            site = web.UnixSite(runner, listen.unix, backlog=LISTEN_BACKLOG)
        else:
            site = web.TCPSite(runner, listen.host, listen.port, reuse_port=self.reuse_port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise listen_error(exc, listen, "admin.listen") from None
        if listen.unix:
            return str(listen)
        host, port = runner.addresses[-1][:2]
        self._own.add(host, port)
        return f"{host}:{port}"

    def _context(self, name: str, live: set, *, route=None, via=None, counted: bool = True) -> ConnectionContext:
        """The connection context of a caller listener: requests go through ``pipeline.handle`` on the state
        current at their start. ``counted``: connections count under ``max_connections`` as they are made
        (not those the forward listener hands over, which it counted already)."""
        holder = self.holder
        return ConnectionContext.for_limits(
            name, self._handler, self.cfg.server.limits, route=route, via=via, live=live,
            connections=self._connections if counted else None,
            on_refused=lambda ip, exc, rid: record_refused(holder.current, ip, exc, rid))

    def _handler(self, request, response):
        return handle(request, response, self.holder)

    async def _listen(self) -> None:
        cfg = self.cfg
        # drain.drain() does the waiting for in-flight requests; the grace is for answers still being written.
        listener = CallerListener.http(lambda live: self._context("main", live, route=route_prefixed),
                                       grace=FINISH_GRACE)
        self._runners.append(listener)
        self.bound["main"] = await self._site(listener, cfg.server.listen, cfg.server.tls, "server.listen")
        try:
            await self.listeners.start(cfg)
        except ListenerUnavailable as exc:
            if exc.os_error is None:
                raise
            raise listen_error(exc.os_error, exc.listen, f"credentials.{exc.credential}.listen") from None
        if cfg.forward_proxy is not None:
            await self._start_forward(cfg)
        admin = build_admin_app(self.holder, self.admin_auth, reload=self.reload)
        self._admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None, shutdown_timeout=FINISH_GRACE)
        await self._admin_runner.setup()
        self.bound["admin"] = await self._admin_site(self._admin_runner, self.admin_listen or cfg.admin.listen)

    async def _start_forward(self, cfg: Config) -> None:
        """SPEC §10. Requests inside tunnels and absolute-form ones are parsed and answered by the caller
        connection protocol (``HTTPConnection``), attached to the connection with the ``Via`` it came through."""
        from proxy.server.forward.ca import LeafContexts, load_ca

        holder = self.holder
        fp = cfg.forward_proxy
        self.forward_leaves = leaves = LeafContexts(await load_ca(fp.ca, self._cache))
        self._metrics.forward_leaf_certs.set_function(lambda: len(leaves))
        live: set = set()

        def inner(via) -> HTTPConnection:
            return HTTPConnection(self._context("forward", live, via=via, counted=False))

        self.forward_context = ctx = ForwardContext(holder, leaves, inner, connections=self._connections)
        listener = CallerListener(lambda: ForwardConnection(ctx), live=live, pending=ctx.open, grace=FINISH_GRACE)
        self._runners.append(listener)
        try:
            addresses = await listener.start(fp.listen, None, reuse_port=self.reuse_port)
        except OSError as exc:
            raise listen_error(exc, fp.listen, "forward_proxy.listen") from None
        for address in addresses:
            self._own.add(*address[:2])
        host, port = addresses[-1][:2]
        self.bound["forward"] = f"{host}:{port}"

    async def _dedicated_runner(self, name: str) -> CallerListener:
        """Credential ``name``'s own listener, not serving yet; ``self.listeners`` binds and serves it."""
        route = functools.partial(route_dedicated, credential=name)
        return CallerListener.http(lambda live: self._context("dedicated", live, route=route), grace=FINISH_GRACE)

    async def stop(self, *, served: bool = True) -> None:
        """Drain and release everything. ``served=False`` (start-up failed): nothing was served, so the
        listeners that did open are closed without a drain."""
        if self._watcher is not None:
            await self._watcher.stop()
        if not served:
            for runner in self._runners + self.listeners.runners():
                await runner.cleanup()
        elif self.holder is not None:
            self.holder.draining = True  # /readyz answers 503 from here on; reloads are refused
            async with self.reloader.lock:
                pass  # a reload already under way finishes (or fails) before the drain starts
            runners = self._runners + self.listeners.runners() + self.reloader.stopping_runners()
            await drain(runners, self.holder, self.cfg.server.drain_timeout)
        self._runners.clear()
        self.listeners.clear()
        if self._connections is not None:
            self._connections.close()
        if self._warm_task is not None:
            self._warm_task.cancel()
        if self.holder is not None:
            await self.reloader.close_all()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._cache is not None:
            await self._cache.close()
        if self._webhook is not None:
            await self._webhook.close()
        if self._audit is not None:
            await self._audit.close()
        if self._store is not None:
            await self._store.close()


async def serve(config_path: str, **proxy_options) -> int:
    cfg = config_mod.load(config_path)
    proxy = Proxy(cfg, config_path, **proxy_options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(proxy.reload("sighup"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await proxy.start()
    except BaseException:
        await proxy.stop(served=False)  # release what did start (store, audit, listeners already bound)
        raise
    # Everything loaded so far lives as long as the process: keep it out of every future collection,
    # or each full one walks it all (tens of ms with the loop stopped, which is what p99 sees).
    gc.freeze()
    log.info("credproxy serving", extra={"listen": str(cfg.server.listen), "admin": str(cfg.admin.listen),
                                         "credentials": len(cfg.credentials)})
    await stop.wait()
    log.info("shutting down: draining in-flight requests", extra={"drain_timeout_s": proxy.cfg.server.drain_timeout})
    await proxy.stop()
    return 0


def run(config_path: str, **proxy_options) -> int:
    heap.keep_freed_heap()
    try:
        import uvloop  # type: ignore[import-not-found]

        return uvloop.run(serve(config_path, **proxy_options))
    except ImportError:
        return asyncio.run(serve(config_path, **proxy_options))
