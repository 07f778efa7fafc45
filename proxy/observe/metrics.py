"""Prometheus metrics. Label values come from config (credential and caller names,
status classes, fixed reasons), never from request data.

Under ``serve --workers`` each worker runs with ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor): prometheus_client then keeps every value in files the supervisor merges.
Gauges are ``livesum`` there (a dead process's values go), and nothing here computes a
value at collection time by itself: ``ScrapeTimeGauge`` stores what it computes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.observe.loop_metrics import HistogramChild, LoopCounter, LoopGauge, LoopHistogram, count_and_observe
from proxy.observe.mmap_metrics import mmap_counter, mmap_histogram

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # read at import, as prometheus_client does
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def forget(gauge: Gauge, *labels: str) -> None:
    """Drop one series of a labelled gauge. The value files of multiprocess mode (``serve --workers``)
    cannot forget a series, so it is set to NaN there first, which the supervisor's merge leaves out."""
    if MULTIPROCESS:
        gauge.labels(*labels).set(math.nan)
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


class ScrapeTimeGauge:
    """A gauge computed when metrics are rendered: one function per label value (or one, unlabelled).

    ``update`` (run by ``Metrics.render``) stores each function's value in a plain gauge, so the
    workers' values reach the supervisor's multiprocess merge like any other. A function that
    returns None has no series. Registering a function replaces the previous one; ``remove`` only
    removes the caller's own function, so a replaced owner cannot drop its successor.
    """

    def __init__(self, name: str, doc: str, registry: CollectorRegistry, label: str | None = None) -> None:
        self._gauge = Gauge(name, doc, [label] if label else [], registry=registry, multiprocess_mode="livesum")
        self._labelled = label is not None
        self._fns: dict[str, Callable[[], float | None]] = {}
        self._shown: set[str] = set()

    def set_function(self, fn: Callable[[], float | None], *, label: str = "") -> None:
        self._fns[label] = fn

    def remove(self, fn: Callable[[], float | None], *, label: str = "") -> None:
        if self._fns.get(label) == fn:
            del self._fns[label]

    def update(self) -> None:
        for label, fn in self._fns.items():
            value = fn()
            if value is not None:
                (self._gauge.labels(label) if self._labelled else self._gauge).set(value)
                self._shown.add(label)
            elif self._labelled and label in self._shown:
                self._shown.discard(label)
                forget(self._gauge, label)
        for gone in self._shown - self._fns.keys():
            self._shown.discard(gone)
            if self._labelled:
                forget(self._gauge, gone)


def _per_request(loop_type, mmap_type):
    """The type for a metric the request path moves on every request. One process: ``loop_type``, plain
    numbers (prometheus_client's children take a lock per update, a histogram two). Under ``serve --workers``
    values must reach the multiprocess files the supervisor merges as they happen: ``mmap_type``,
    prometheus_client's metrics whose children write their value straight at its offset in the file."""
    if MULTIPROCESS:
        return mmap_type

    def make(name: str, doc: str, labelnames=(), *, registry: CollectorRegistry, buckets=None):
        if loop_type is LoopHistogram:
            return LoopHistogram(name, doc, tuple(labelnames), registry, buckets=buckets)
        return loop_type(name, doc, tuple(labelnames), registry)

    return make


_Counter = _per_request(LoopCounter, mmap_counter)
_Histogram = _per_request(LoopHistogram, mmap_histogram)


class CredentialMetrics:
    """One credential's metric children, bound when the credential is loaded: the request path observes
    them on every request, and ``labels()`` validates (and, for prometheus_client's types, locks) on every call."""

    __slots__ = ("upstream_duration", "duration", "leaks", "_requests", "_counter", "_name", "_plain")

    def __init__(self, metrics: "Metrics", name: str) -> None:
        self.upstream_duration = metrics.upstream_duration.labels(name)
        self.duration = metrics.duration.labels(name)
        self.leaks = metrics.leaks.labels(name)
        self._counter = metrics.requests
        self._name = name
        self._requests: dict[tuple[str, int], object] = {}  # (caller, status): callers come from config
        # One process: loop_metrics' plain children, both updated by one call (``count_and_observe``).
        self._plain = type(self.duration) is HistogramChild and isinstance(metrics.requests, LoopCounter)

    def record(self, caller: str, status: int, seconds: float) -> None:
        """One finished request: counted by (caller, status), its end-to-end duration observed."""
        key = (caller, status)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = self._counter.labels(self._name, caller, str(status))
        if self._plain:  # loop_metrics' plain children: both updates in one call
            count_and_observe(found, self.duration, seconds)
        else:
            found.inc()
            self.duration.observe(seconds)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # moved on every request: plain numbers without locks when one process serves (see _per_request)
        self.requests = _Counter("credproxy_requests_total", "Requests handled", ["credential", "caller", "code"],
                                 registry=r)
        self.duration = _Histogram("credproxy_request_duration_seconds", "Request duration, end to end",
                                   ["credential"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = _Histogram("credproxy_upstream_duration_seconds",
                                            "Time to the upstream's response head", ["credential"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.token_refresh = Counter("credproxy_token_refresh_total", "Token refreshes", ["credential", "result"], registry=r)
        self.token_refresh_duration = Histogram("credproxy_token_refresh_duration_seconds", "Token refresh duration",
                                                ["credential"], buckets=LATENCY_BUCKETS, registry=r)
        self.token_expires = Gauge("credproxy_token_expires_in_seconds", "Seconds until the cached token expires",
                                   ["credential"], registry=r, multiprocess_mode="livesum")
        self.leaks = _Counter("credproxy_leaks_redacted_total", "Echoed secrets redacted or blocked", ["credential"],
                              registry=r)
        self.alerts = Counter("credproxy_alerts_total", "Misuse alerts", ["kind"], registry=r)
        self.alert_webhook_failures = Counter("credproxy_alert_webhook_failures_total",
                                              "Alert webhook posts dropped or failed", ["reason"], registry=r)
        self.backend_errors = Counter("credproxy_secret_backend_errors_total", "Secret backend failures", ["backend"], registry=r)
        self.reloads = Counter("credproxy_config_reloads_total", "Config reloads", ["result"], registry=r)
        # read from StateHolder.in_flight when rendered (``set_function``), not moved twice per request
        self.inflight = (ScrapeTimeGauge if MULTIPROCESS else LoopGauge)("credproxy_requests_in_flight",
                                                                           "Requests being handled", r)
        self.caller_connections = ScrapeTimeGauge("credproxy_caller_connections",
                                                  "Open caller connections (main, dedicated and forward-proxy listeners)",
                                                  r)
        self.connections_refused = Counter("credproxy_connections_refused_total",
                                           "Caller connections refused at server.limits.max_connections", registry=r)
        self.upstream_cert_expires = ScrapeTimeGauge("credproxy_upstream_cert_expires_in_seconds",
                                                     "Seconds until the upstream client certificate expires",
                                                     r, label="credential")
        self.last_reload_ok = Gauge("credproxy_config_last_reload_successful",
                                    "1 when the last reload attempt was applied, 0 when it was rejected", registry=r,
                                    multiprocess_mode="livesum")
        self.last_reload_ok.set(1)
        self.audit_write_errors = Counter("credproxy_audit_write_errors_total",
                                          "Audit writes that failed (their lines stay buffered and are retried)",
                                          registry=r)
        self.audit_lines_dropped = Counter("credproxy_audit_lines_dropped_total",
                                           "Audit lines lost: over audit.max_buffered_lines, or unwritable at shutdown",
                                           registry=r)
        self.audit_lines_buffered = ScrapeTimeGauge("credproxy_audit_lines_buffered", "Audit lines not yet written", r)
        self.disabled = Gauge("credproxy_credential_disabled", "1 while an operator has disabled the credential",
                              ["credential"], registry=r, multiprocess_mode="livesum")
        # forward proxy (SPEC §10): requests arriving through it are also in credproxy_requests_total
        self.forward_requests = _Counter("credproxy_forward_requests_total",
                                         "Requests through the forward-proxy listener", ["credential", "code"],
                                         registry=r)
        self.forward_connects = Counter("credproxy_forward_connects_total",
                                        "CONNECT requests by outcome (intercepted, tunnelled, refused, unauthenticated)",
                                        ["outcome"], registry=r)
        self.forward_tunnel_bytes = Counter("credproxy_forward_tunnel_bytes_total",
                                            "Bytes through opaque tunnels (tunnel_hosts)", ["direction"], registry=r)
        self.forward_leaf_certs = ScrapeTimeGauge("credproxy_forward_leaf_certificates",
                                                  "Leaf certificates cached for intercepted hosts", r)
        self._scrape_time = (self.inflight, self.caller_connections, self.upstream_cert_expires,
                             self.audit_lines_buffered, self.forward_leaf_certs)
        self._credentials: set[str] = set()  # what observe_credentials last saw: every name,
        self._expiring: set[str] = set()  # and those with a token expiry
        self._children: dict[tuple, object] = {}

    def record_refresh(self, credential: str, result: str, seconds: float) -> None:
        """One refresh of a credential's material (token fetch, or secret re-read for static types);
        ``result`` is "ok" or a fixed failure reason."""
        self.token_refresh.labels(credential, result).inc()
        self.token_refresh_duration.labels(credential).observe(seconds)

    def observe_credentials(self, described: list[dict]) -> None:
        """Set the per-credential gauges from ``Credential.describe()`` at scrape time: a credential
        without a token has no expiry series, and credentials removed by a reload lose theirs."""
        names, expiring = set(), set()
        for d in described:
            name = d["name"]
            names.add(name)
            self.disabled.labels(name).set(1 if d.get("state") == "disabled" else 0)
            if d.get("expires_in_s") is not None:
                self.token_expires.labels(name).set(d["expires_in_s"])
                expiring.add(name)
        for gone in self._expiring - expiring:
            forget(self.token_expires, gone)
        for gone in self._credentials - names:
            forget(self.disabled, gone)
        self._credentials, self._expiring = names, expiring

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, remembered (only for series that are never removed): ``labels()``
        validates and takes a lock on every call, and the request path asks for the same few children
        (label values come from config) every time."""
        key = (id(metric), labels)  # metrics live as long as this object
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        for gauge in self._scrape_time:
            gauge.update()
        return generate_latest(self.registry)
