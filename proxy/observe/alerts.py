"""Misuse alerts (SPEC §8), raised from the audit events of finished requests.

- ``multi_ip``: a caller identity used from a source address it has not used
  within ``alerts.multi_ip_window`` while another address used it in that
  window — a copied token in use elsewhere. One alert per new address.
- ``denied_burst``: ``alerts.denied_threshold`` denied requests (401, 403,
  429) within ``alerts.denied_window`` from one caller, or from one source
  address when no caller was identified. One alert per burst; the count then
  starts over.

An alert is an audit line (``outcome: alert``, ``reason`` = the kind), a
``credproxy_alerts_total{kind}`` increment, a warning log line and, with
``alerts.webhook_url``, a JSON POST. The request path only puts the POST on a
bounded queue; a background task sends it. When the queue is full the webhook
copy is dropped (and counted) — never the audit line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import aiohttp
from yarl import URL

from proxy.observe.audit import AlertEvent, AuditEvent, AuditLog
from proxy.config.models import AlertsConfig
from proxy.tasks import stop_task

log = logging.getLogger("credproxy.alerts")

MAX_ADDRESSES_PER_CALLER = 64
MAX_TRACKED_SOURCES = 10_000
WEBHOOK_QUEUE = 100


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str  # multi_ip | denied_burst
    addresses: tuple[str, ...] = ()  # multi_ip: every address seen in the window, the new one last
    count: int = 0  # denied_burst: denied requests in the window
    window_s: float = 0.0


class _Source(NamedTuple):
    """What an alert's audit line repeats of the request that raised it."""

    request_id: str
    caller: str | None
    client_ip: str | None
    credential: str | None
    method: str
    path: str
    status: int


class WebhookSender:
    """Posts alert payloads from a bounded queue, off the request path. ``socket_factory`` (an
    ``AddressPolicy``'s) decides which addresses the webhook may reach."""

    def __init__(self, url: str, *, timeout: float, socket_factory: Callable[[tuple], socket.socket],
                 on_failure: Callable[[str], None] = lambda reason: None, queue_size: int = WEBHOOK_QUEUE) -> None:
        self.url = url
        self._socket_factory = socket_factory
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._on_failure = on_failure
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task | None = None
        self._host = URL(url).host  # the URL itself may embed a token: logs name only the host

    def submit(self, payload: dict) -> None:
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._on_failure("queue_full")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(socket_factory=self._socket_factory)
        async with aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False) as session:
            while True:
                payload = await self._queue.get()
                try:
                    async with session.post(self.url, json=payload, allow_redirects=False) as resp:
                        if resp.status >= 300:
                            self._failed("status", resp.status)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    self._failed(type(exc).__name__, None)

    def _failed(self, reason: str, status: int | None) -> None:
        self._on_failure("status" if status else "error")
        log.warning("alert webhook delivery failed", extra={"webhook_host": self._host, "error": reason,
                                                            "status": status})


class AlertMonitor:
    """One config's alert settings over the history of every config before it: a reload builds the
    next monitor with ``with_settings`` (nothing running changes until that State is committed), and
    the addresses and denied requests seen so far still count."""

    def __init__(self, cfg: AlertsConfig, *, audit: AuditLog, counter, webhook: WebhookSender | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._wall_clock = wall_clock
        self._audit = audit
        self._counter = counter
        self._webhook = webhook
        self._clock = clock
        self._addresses: dict[str, OrderedDict[str, float]] = {}
        self._denied: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def cfg(self) -> AlertsConfig:
        return self._cfg

    def with_settings(self, cfg: AlertsConfig) -> "AlertMonitor":
        """A monitor with ``cfg``'s windows and thresholds that shares this one's history (and its audit,
        metric and webhook); this one is left as it is."""
        new = AlertMonitor(cfg, audit=self._audit, counter=self._counter, webhook=self._webhook,
                           clock=self._clock, wall_clock=self._wall_clock)
        new._addresses, new._denied = self._addresses, self._denied
        return new

    def observe(self, event: AuditEvent) -> None:
        self.observe_request(event.request_id, event.caller, event.client_ip, event.credential, event.method,
                             event.path, event.status, event.outcome)

    def observe_request(self, request_id: str, caller: str | None, client_ip: str | None, credential: str | None,
                        method: str, path: str, status: int, outcome: str) -> None:
        """``observe`` from a finished request's audit values (the request path has no event object)."""
        now = self._clock()
        if caller and client_ip and caller != "anonymous":
            seen = self._addresses.get(caller)
            last = seen.get(client_ip) if seen is not None else None
            if last is not None and now - last <= self._cfg.multi_ip_window:
                # The usual request: an address seen within the window raises nothing. Older addresses
                # ahead of it are expired when a new one comes, which leaves the same ones as expiring now.
                seen[client_ip] = now
                seen.move_to_end(client_ip)
            else:
                self._check_addresses(_Source(request_id, caller, client_ip, credential, method, path, status), now)
        if outcome == "denied":
            self._check_denied(_Source(request_id, caller, client_ip, credential, method, path, status), now)

    def _check_addresses(self, event: _Source, now: float) -> None:
        window = self.cfg.multi_ip_window
        seen = self._addresses.get(event.caller)
        if seen is None:
            seen = self._addresses[event.caller] = OrderedDict()
        while seen and now - next(iter(seen.values())) > window:
            seen.popitem(last=False)
        new = event.client_ip not in seen
        seen[event.client_ip] = now
        seen.move_to_end(event.client_ip)
        if len(seen) > MAX_ADDRESSES_PER_CALLER:
            seen.popitem(last=False)
        if new and len(seen) > 1:
            self._raise(event, Alert("multi_ip", addresses=tuple(seen), window_s=window))

    def _check_denied(self, event: _Source, now: float) -> None:
        key = f"caller:{event.caller}" if event.caller else f"ip:{event.client_ip}"
        times = self._denied.pop(key, None) or deque()
        self._denied[key] = times  # most recent last: the oldest source is evicted first
        if len(self._denied) > MAX_TRACKED_SOURCES:
            self._denied.popitem(last=False)
        times.append(now)
        while now - times[0] > self.cfg.denied_window:
            times.popleft()
        if len(times) >= self.cfg.denied_threshold:
            count = len(times)
            times.clear()
            self._raise(event, Alert("denied_burst", count=count, window_s=self.cfg.denied_window))

    def _raise(self, event: _Source, alert: Alert) -> None:
        line = AlertEvent(request_id=event.request_id, caller=event.caller, client_ip=event.client_ip,
                          credential=event.credential, method=event.method, path=event.path, status=event.status,
                          outcome="alert", reason=alert.kind, duration_ms=0.0, addresses=alert.addresses,
                          count=alert.count, window_s=alert.window_s)
        self._audit.write(line)
        details = {"addresses": list(alert.addresses), "count": alert.count, "window_s": alert.window_s}
        self._counter.labels(alert.kind).inc()
        log.warning("misuse alert", extra={"kind": alert.kind, "caller": event.caller, "client_ip": event.client_ip,
                                           "request_id": event.request_id, **details})
        if self._webhook is not None:
            self._webhook.submit({"alert": alert.kind, "ts": round(self._wall_clock(), 3), **asdict(line)})
