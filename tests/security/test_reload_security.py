"""A config reload applies new rate limits, alert thresholds and address rules, and keeps
what it must: the alert history and the connect-time checks."""

from __future__ import annotations

import aiohttp
import yaml

from proxy.app import Proxy

from .harness import CALLER_TOKEN, Harness, merge

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}


async def get(url: str, source: str = "127.0.0.1") -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as s:
        async with s.get(url, headers=AUTH) as r:
            await r.read()
            return r.status


async def test_reload_applies_limits_and_keeps_alert_history(upstream, tmp_path):
    h = Harness(tmp_path, upstream.url)
    path = tmp_path / "credproxy.yaml"
    path.write_text(yaml.safe_dump(h.config_dict))
    h.proxy = Proxy(h.cfg, str(path), watch_interval=None)
    await h.start()
    try:
        url = h.url + "/demo/anything/a"
        assert [await get(url) for _ in range(3)] == [200, 200, 200]

        path.write_text(yaml.safe_dump(merge(h.config_dict, {
            "credentials": {"demo": {"rate_limit": {"rps": 0.01, "burst": 1}}},
            "server": {"deny_upstream_networks": ["192.0.2.0/24"]},
            "alerts": {"webhook_url": "http://127.0.0.1:9/hook"},
        })))
        result = await h.proxy.reload()
        assert result.result == "ok" and "demo" in result.updated
        assert result.sessions_reset == []  # a rate limit does not touch how material is obtained
        assert result.restart_required == ["alerts.webhook_url"]
        assert [await get(url) for _ in range(2)] == [200, 429]
        assert h.proxy.holder.current.addresses.refusal("192.0.2.1", 443) is not None

        # the address seen before the reload still counts: a second source raises the alert
        await get(url, source="127.0.0.2")
        alerts = [x for x in h.audit() if x["outcome"] == "alert"]
        assert [a["reason"] for a in alerts] == ["multi_ip"]
        assert alerts[0]["addresses"] == ["127.0.0.1", "127.0.0.2"]
    finally:
        await h.stop()
