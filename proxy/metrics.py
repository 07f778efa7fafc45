"""Prometheus metrics. Label values come from config (credential and caller names,
status classes, fixed reasons), never from request data."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
