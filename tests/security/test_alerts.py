"""Misuse alerts: one caller from a second source address within the window, bursts
of denied requests. Audit line, metric, and a webhook that never holds up requests."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.observe.alerts import AlertMonitor, WebhookSender
from proxy.observe.audit import AuditEvent, AuditLog, verify
from proxy.config.models import AlertsConfig
from proxy.observe.metrics import Metrics
from proxy.upstream.address_policy import AddressPolicy

from .harness import CALLER_TOKEN, assert_clean

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(caller: str | None, ip: str, outcome: str = "allowed", status: int = 200) -> AuditEvent:
    return AuditEvent(request_id="r", caller=caller, client_ip=ip, credential="demo", method="GET", path="/x",
                      status=status, outcome=outcome, reason=outcome, duration_ms=1.0)


@pytest.fixture
def monitor(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.log"))
    metrics = Metrics()
    clock = Clock()
    cfg = AlertsConfig(multi_ip_window=300, denied_threshold=3, denied_window=60)
    mon = AlertMonitor(cfg, audit=audit, counter=metrics.alerts, clock=clock)

    def alerts() -> list[dict]:
        audit.flush()
        return [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines() if '"alert"' in x]

    yield mon, clock, alerts, metrics
    audit.flush()


def test_second_address_within_the_window_alerts_once(monitor):
    mon, clock, alerts, metrics = monitor
    mon.observe(event("billing", "10.0.0.1"))
    mon.observe(event("billing", "10.0.0.1"))
    assert alerts() == []
    clock.now += 60
    mon.observe(event("billing", "10.0.0.2"))
    mon.observe(event("billing", "10.0.0.2"))
    mon.observe(event("billing", "10.0.0.1"))
    [a] = alerts()
    assert (a["outcome"], a["reason"], a["caller"], a["client_ip"]) == ("alert", "multi_ip", "billing", "10.0.0.2")
    assert a["addresses"] == ["10.0.0.1", "10.0.0.2"] and a["window_s"] == 300
    assert metrics.alerts.labels("multi_ip")._value.get() == 1


def test_new_settings_keep_the_history_and_leave_the_running_monitor_alone(monitor):
    mon, clock, alerts, _ = monitor
    mon.observe(event(None, "10.0.0.9", outcome="denied", status=401))
    stricter = mon.with_settings(AlertsConfig(multi_ip_window=300, denied_threshold=2, denied_window=60))
    assert mon.cfg.denied_threshold == 3 and stricter.cfg.denied_threshold == 2
    stricter.observe(event(None, "10.0.0.9", outcome="denied", status=401))  # the earlier denial counts
    assert [a["reason"] for a in alerts()] == ["denied_burst"]
    mon.observe(event(None, "10.0.0.8", outcome="denied", status=401))
    mon.observe(event(None, "10.0.0.8", outcome="denied", status=401))
    assert len(alerts()) == 1  # the running monitor still wants 3


def test_addresses_outside_the_window_do_not_alert(monitor):
    mon, clock, alerts, _ = monitor
    mon.observe(event("billing", "10.0.0.1"))
    clock.now += 301
    mon.observe(event("billing", "10.0.0.2"))
    clock.now += 301
    mon.observe(event("billing", "10.0.0.1"))
    assert alerts() == []


def test_other_callers_and_anonymous_do_not_mix(monitor):
    mon, _, alerts, _ = monitor
    mon.observe(event("billing", "10.0.0.1"))
    mon.observe(event("other", "10.0.0.2"))
    mon.observe(event("anonymous", "10.0.0.3"))
    mon.observe(event("anonymous", "10.0.0.4"))
    assert alerts() == []


def test_denied_burst_alerts_once_per_burst(monitor):
    mon, clock, alerts, metrics = monitor
    for _ in range(2):
        mon.observe(event(None, "10.9.9.9", "denied", 401))
    assert alerts() == []
    mon.observe(event(None, "10.9.9.9", "denied", 401))
    mon.observe(event(None, "10.9.9.9", "denied", 401))
    [a] = alerts()
    assert (a["reason"], a["count"], a["client_ip"]) == ("denied_burst", 3, "10.9.9.9")
    clock.now += 61  # the burst window has passed: two more are not a burst
    mon.observe(event(None, "10.9.9.9", "denied", 401))
    mon.observe(event(None, "10.9.9.9", "denied", 401))
    assert len(alerts()) == 1
    mon.observe(event(None, "10.9.9.9", "denied", 401))
    assert len(alerts()) == 2
    assert metrics.alerts.labels("denied_burst")._value.get() == 2


def test_denials_are_counted_per_caller_or_per_address(monitor):
    mon, _, alerts, _ = monitor
    mon.observe(event("billing", "10.0.0.1", "denied", 403))
    mon.observe(event("other", "10.0.0.1", "denied", 403))
    mon.observe(event(None, "10.0.0.1", "denied", 401))
    mon.observe(event("billing", "10.0.0.1", "denied", 403))
    assert alerts() == []
    mon.observe(event("billing", "10.0.0.1", "denied", 429))
    assert [a["caller"] for a in alerts()] == ["billing"]


async def test_webhook_queue_overflow_is_dropped_and_counted():
    failures = []
    sender = WebhookSender("http://127.0.0.1:9/hook", timeout=1, socket_factory=AddressPolicy().socket_factory,
                           on_failure=failures.append, queue_size=2)
    for i in range(5):  # no sender task running: nothing drains the queue
        sender.submit({"n": i})
    assert failures == ["queue_full"] * 3


@pytest.fixture
async def webhook():
    """A webhook receiver; ``hold`` makes it hang until released."""
    received: list[dict] = []
    hold = asyncio.Event()
    hold.set()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        await hold.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received, hold
    hold.set()
    await runner.cleanup()


async def until(predicate, limit: float = 5.0) -> None:
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_one_caller_from_two_source_addresses(upstream, make_proxy, webhook):
    """Two real source addresses on loopback: 127.0.0.1 and 127.0.0.2."""
    url, received, _ = webhook
    proxy = await make_proxy(upstream.url, {"alerts": {"webhook_url": url}})
    for source in ("127.0.0.1", "127.0.0.2"):
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get(proxy.url + "/demo/anything/a", headers=AUTH) as r:
                assert r.status == 200
    lines = proxy.audit()
    alert = [x for x in lines if x["outcome"] == "alert"]
    assert len(alert) == 1 and alert[0]["reason"] == "multi_ip"
    assert alert[0]["addresses"] == ["127.0.0.1", "127.0.0.2"] and alert[0]["caller"] == "billing"
    assert verify(str(proxy.audit_path)) == []  # alert lines are part of the chain
    await until(lambda: received)
    assert received[0]["alert"] == "multi_ip" and received[0]["caller"] == "billing"
    assert_clean(json.dumps(received))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/metrics") as r:
            assert 'credproxy_alerts_total{kind="multi_ip"} 1.0' in await r.text()


async def test_denied_burst_alerts_while_the_webhook_hangs(upstream, make_proxy, webhook):
    url, received, hold = webhook
    hold.clear()  # the receiver accepts the POST and never answers
    proxy = await make_proxy(upstream.url, {"alerts": {"webhook_url": url, "denied_threshold": 3}})
    async with aiohttp.ClientSession() as s:
        for _ in range(9):
            async with s.get(proxy.url + "/demo/anything/a") as r:
                assert r.status == 401
    await until(lambda: received)
    assert not hold.is_set()  # the first POST is still hanging ...
    bursts = [x for x in proxy.audit() if x["outcome"] == "alert"]
    assert [b["reason"] for b in bursts] == ["denied_burst"] * 3  # ... and every request was answered regardless
    assert bursts[0]["count"] == 3 and bursts[0]["caller"] is None


async def test_the_webhook_never_posts_to_credproxy_itself(upstream, make_proxy):
    """A webhook_url naming credproxy's own listener is refused like an upstream would be: an alert about
    denied requests must not arrive as one more denied request (and alert again)."""
    from tests.helpers import free_port

    port = free_port()
    proxy = await make_proxy(upstream.url, {"server": {"listen": f"127.0.0.1:{port}"},
                                            "alerts": {"webhook_url": f"http://127.0.0.1:{port}/hook",
                                                       "denied_threshold": 3}})

    async def webhook_failures() -> float:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.admin_url + "/metrics") as r:
                text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("credproxy_alert_webhook_failures_total{"))

    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"http://127.0.0.1:{port}/demo/anything/a") as r:
                assert r.status == 401
    for _ in range(250):
        if await webhook_failures():
            break
        await asyncio.sleep(0.02)
    assert await webhook_failures() >= 1
    assert [x["path"] for x in proxy.audit() if x["outcome"] != "alert"] == ["/anything/a"] * 3
