"""Prometheus metrics. Label values come from config (credential and caller names,
status classes, fixed reasons), never from request data."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FunctionGauge:
    """A one-label gauge computed at scrape time: one function per label value.

    Registering a function for a label replaces the previous one; ``remove`` only
    removes the caller's own function, so a replaced owner cannot drop its successor.
    """

    def __init__(self, name: str, doc: str, label: str, registry: CollectorRegistry) -> None:
        self.name, self.doc, self.label = name, doc, label
        self._fns: dict[str, Callable[[], float | None]] = {}
        registry.register(self)

    def set_function(self, value: str, fn: Callable[[], float | None]) -> None:
        self._fns[value] = fn

    def remove(self, value: str, fn: Callable[[], float | None]) -> None:
        if self._fns.get(value) == fn:
            del self._fns[value]

    def describe(self):
        return [GaugeMetricFamily(self.name, self.doc, labels=[self.label])]

    def collect(self):
        family = GaugeMetricFamily(self.name, self.doc, labels=[self.label])
        for value, fn in sorted(self._fns.items()):
            v = fn()
            if v is not None:
                family.add_metric([value], v)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("credproxy_requests_total", "Requests handled", ["credential", "caller", "code"], registry=r)
        self.duration = Histogram("credproxy_request_duration_seconds", "Request duration, end to end",
                                  ["credential"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("credproxy_upstream_duration_seconds", "Time to the upstream's response head",
                                           ["credential"], buckets=LATENCY_BUCKETS, registry=r)
        self.token_refresh = Counter("credproxy_token_refresh_total", "Token refreshes", ["credential", "result"], registry=r)
        self.token_refresh_duration = Histogram("credproxy_token_refresh_duration_seconds", "Token refresh duration",
                                                ["credential"], buckets=LATENCY_BUCKETS, registry=r)
        self.token_expires = Gauge("credproxy_token_expires_in_seconds", "Seconds until the cached token expires",
                                   ["credential"], registry=r)
        self.leaks = Counter("credproxy_leaks_redacted_total", "Echoed secrets redacted or blocked", ["credential"], registry=r)
        self.alerts = Counter("credproxy_alerts_total", "Misuse alerts", ["kind"], registry=r)
        self.alert_webhook_failures = Counter("credproxy_alert_webhook_failures_total",
                                              "Alert webhook posts dropped or failed", ["reason"], registry=r)
        self.backend_errors = Counter("credproxy_secret_backend_errors_total", "Secret backend failures", ["backend"], registry=r)
        self.reloads = Counter("credproxy_config_reloads_total", "Config reloads", ["result"], registry=r)
        self.inflight = Gauge("credproxy_requests_in_flight", "Requests being handled", registry=r)
        self.caller_connections = Gauge("credproxy_caller_connections",
                                        "Open caller connections (main, dedicated and forward-proxy listeners)", registry=r)
        self.connections_refused = Counter("credproxy_connections_refused_total",
                                           "Caller connections refused at server.limits.max_connections", registry=r)
        self.upstream_cert_expires = FunctionGauge("credproxy_upstream_cert_expires_in_seconds",
                                                   "Seconds until the upstream client certificate expires",
                                                   "credential", r)
        self.last_reload_ok = Gauge("credproxy_config_last_reload_successful",
                                    "1 when the last reload attempt was applied, 0 when it was rejected", registry=r)
        self.last_reload_ok.set(1)
        self.audit_write_errors = Counter("credproxy_audit_write_errors_total",
                                          "Audit writes that failed (their lines stay buffered and are retried)",
                                          registry=r)
        self.audit_lines_dropped = Counter("credproxy_audit_lines_dropped_total",
                                           "Audit lines lost: over audit.max_buffered_lines, or unwritable at shutdown",
                                           registry=r)
        self.audit_lines_buffered = Gauge("credproxy_audit_lines_buffered", "Audit lines not yet written",
                                          registry=r)
        self.disabled = Gauge("credproxy_credential_disabled", "1 while an operator has disabled the credential",
                              ["credential"], registry=r)
        # forward proxy (SPEC §10): requests arriving through it are also in credproxy_requests_total
        self.forward_requests = Counter("credproxy_forward_requests_total",
                                        "Requests through the forward-proxy listener", ["credential", "code"], registry=r)
        self.forward_connects = Counter("credproxy_forward_connects_total",
                                        "CONNECT requests by outcome (intercepted, tunnelled, refused, unauthenticated)",
                                        ["outcome"], registry=r)
        self.forward_tunnel_bytes = Counter("credproxy_forward_tunnel_bytes_total",
                                            "Bytes through opaque tunnels (tunnel_hosts)", ["direction"], registry=r)
        self.forward_leaf_certs = Gauge("credproxy_forward_leaf_certificates",
                                        "Leaf certificates cached for intercepted hosts", registry=r)
        self._children: dict[tuple, object] = {}

    def record_refresh(self, credential: str, result: str, seconds: float) -> None:
        """One refresh of a credential's material (token fetch, or secret re-read for static types);
        ``result`` is "ok" or a fixed failure reason."""
        self.token_refresh.labels(credential, result).inc()
        self.token_refresh_duration.labels(credential).observe(seconds)

    def observe_credentials(self, described: list[dict]) -> None:
        """Set the per-credential gauges from ``Credential.describe()`` at scrape time;
        credentials removed by a reload lose their series."""
        names = set()
        for d in described:
            name = d["name"]
            names.add(name)
            self.disabled.labels(name).set(1 if d.get("state") == "disabled" else 0)
            if d.get("expires_in_s") is not None:
                self.token_expires.labels(name).set(d["expires_in_s"])
        for gauge in (self.disabled, self.token_expires):
            present = {sample.labels["credential"] for family in gauge.collect() for sample in family.samples}
            for gone in present - names:
                gauge.remove(gone)

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
        return generate_latest(self.registry)
