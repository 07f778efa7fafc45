"""Graceful shutdown and SIGHUP on a real ``credproxy serve`` process (``python -m proxy``)."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from tests.ops_support import upstream  # noqa: F401 - the ops tests' upstream fixture
from tests.ops_support import (ADMIN_TOKEN, CALLER_TOKEN, CANARY, PYTHON, Admin, Upstream, assert_no_secret, base_config,
                         credential, make_store, subprocess_env, write_config)
from proxy.config.fields import Listen


class Served:
    def __init__(self, proc, data, path, log):
        self.proc, self.data, self.path, self.log = proc, data, path, log
        self.main = f"http://{data['server']['listen']}"
        self.admin = Admin(Listen.parse(data["admin"]["listen"]), ADMIN_TOKEN)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
async def served(tmp_path, upstream):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": CANARY + "2"}})
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_token=True, drain_timeout="10s")
    path = write_config(tmp_path / "config.yaml", data)
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(PYTHON, "-m", "proxy", "serve", "-c", str(path),
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=err,
                                                    env=subprocess_env(), cwd=tmp_path)
    s = Served(proc, data, path, log)
    try:
        for _ in range(150):
            try:
                if (await s.admin.call("GET", "/readyz", token=None))[0] == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert proc.returncode is None, log.read_text()
            await asyncio.sleep(0.1)
        else:
            pytest.fail("credproxy did not become ready: " + log.read_text())
        yield s
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _start_slow_request(s: Served, upstream: Upstream):
    session = aiohttp.ClientSession()
    response = await session.get(f"{s.main}/demo/v1/slow", headers={"Authorization": f"Bearer {CALLER_TOKEN}"})
    await asyncio.wait_for(upstream.slow_started.wait(), 10)
    return session, response


async def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(served, upstream):
    s = served
    session, response = await _start_slow_request(s, upstream)
    try:
        assert response.status == 200
        s.proc.send_signal(signal.SIGTERM)
        for _ in range(100):  # not ready while draining; the admin listener stays up until the end
            status, body, _ = await s.admin.call("GET", "/readyz", token=None)
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert (status, body) == (503, {"ready": False, "waiting": ["draining"]})
        with pytest.raises(aiohttp.ClientConnectorError):  # no new connections on the caller listener
            async with aiohttp.ClientSession() as other:
                await other.get(f"{s.main}/demo/v1/x", headers={"Authorization": f"Bearer {CALLER_TOKEN}"})
        assert s.proc.returncode is None  # still waiting for the request
        upstream.release.set()
        assert await response.read() == b"first part;second part"
    finally:
        response.release()
        await session.close()
    assert await asyncio.wait_for(s.proc.wait(), 10) == 0  # drain_timeout is 10s
    lines = s.log_lines()
    assert any(line["msg"] == "listeners closed" and line["drained"] is True for line in lines)
    assert_no_secret(s.log.read_text())


async def test_sigterm_cuts_requests_off_at_the_drain_timeout_and_still_exits_0(tmp_path, upstream, served):
    s = served
    s.data["server"]["drain_timeout"] = "1s"
    write_config(s.path, s.data)
    s.proc.send_signal(signal.SIGHUP)  # the shorter drain_timeout applies without a restart
    for _ in range(100):
        if any(line.get("msg") == "config reloaded" for line in s.log_lines()):
            break
        await asyncio.sleep(0.05)
    session, response = await _start_slow_request(s, upstream)
    try:
        s.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(s.proc.wait(), 6) == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # the upstream never finished: the caller sees a cut-off answer
    finally:
        response.release()
        await session.close()
    assert any(line["msg"] == "listeners closed" and line["drained"] is False for line in s.log_lines())
    audit = [json.loads(line) for line in (s.path.parent / "audit.log").read_text().splitlines()]
    assert [a["path"] for a in audit if a["caller"] == "app"] == ["/v1/slow"]  # the cut-off request is audited


async def test_sighup_reloads_and_a_broken_file_keeps_the_old_config(served, upstream):
    s = served
    s.data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
    write_config(s.path, s.data)
    s.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        _, body, _ = await s.admin.call("GET", "/v1/credentials")
        if len(body["credentials"]) == 2:
            break
        await asyncio.sleep(0.05)
    assert [c["name"] for c in body["credentials"]] == ["demo", "second"]
    s.path.write_text("credentials: {second: {upstream: 42}}\n")
    s.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if any(line.get("msg", "").startswith("config reload rejected") for line in s.log_lines()):
            break
        await asyncio.sleep(0.05)
    rejected = [line for line in s.log_lines() if line.get("msg", "").startswith("config reload rejected")]
    assert rejected and rejected[0]["trigger"] in ("sighup", "watch")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.main}/second/v1/x", headers={"Authorization": f"Bearer {CALLER_TOKEN}"}) as r:
            assert r.status == 200
    assert any(line.get("msg") == "config reloaded" and line["trigger"] == "sighup" for line in s.log_lines())
    s.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(s.proc.wait(), 10) == 0
