"""``credproxy serve --workers N`` as real processes: one port served by every worker, one
admin listener that speaks for all of them, signals and drain as a single process has,
and one audit chain that loses nothing on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from proxy.observe.audit import verify
from tests.fullfs import fill, small_fs  # noqa: F401 - small_fs: a fixture
from proxy.config.fields import Listen
from tests.ops_support import upstream  # noqa: F401 - the ops tests' upstream fixture
from tests.ops_support import (ADMIN_TOKEN, CALLER_TOKEN, CANARY, PYTHON, Admin, Upstream, assert_no_secret,
                               base_config, credential, make_store, metric, subprocess_env, write_config)

AUTH = {"Authorization": f"Bearer {CALLER_TOKEN}"}


class Served:
    def __init__(self, proc, data: dict, path: Path, log: Path) -> None:
        self.proc, self.data, self.path, self.log = proc, data, path, log
        self.main = f"http://{data['server']['listen']}"
        self.admin = Admin(Listen.parse(data["admin"]["listen"]), ADMIN_TOKEN)
        self.audit = Path(data["audit"]["path"])

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def worker_pids(self) -> list[int]:
        text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(p) for p in text.split()]

    async def calls(self, path: str, n: int) -> list[int]:
        """``n`` requests, each on a new connection (so the kernel spreads them over the workers)."""
        async def one() -> int:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(self.main + path, headers=AUTH) as r:
                    await r.read()
                    return r.status
        return list(await asyncio.gather(*(one() for _ in range(n))))


async def start(tmp_path: Path, upstream: Upstream, workers: int, audit: dict | None = None) -> Served:
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": CANARY + "2"}})
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_token=True, drain_timeout="10s")
    data["audit"].update(audit or {})
    path = write_config(tmp_path / "config.yaml", data)
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(PYTHON, "-m", "proxy", "serve", "-c", str(path),
                                                    "--workers", str(workers), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=err, env=subprocess_env(), cwd=tmp_path)
    s = Served(proc, data, path, log)
    for _ in range(300):
        try:
            if (await s.admin.call("GET", "/readyz", token=None))[0] == 200:
                return s
        except aiohttp.ClientError:
            pass
        assert proc.returncode is None, log.read_text()
        await asyncio.sleep(0.1)
    proc.kill()
    pytest.fail("credproxy --workers did not become ready: " + log.read_text())


@pytest.fixture
async def serve(tmp_path, upstream):
    running: list[Served] = []

    async def make(workers: int = 2, audit: dict | None = None) -> Served:
        s = await start(tmp_path, upstream, workers, audit)
        running.append(s)
        return s

    yield make
    for s in running:
        if s.proc.returncode is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(s.proc.wait(), 15)
            except TimeoutError:
                s.proc.kill()
                await s.proc.wait()


async def test_every_worker_serves_the_port_and_the_admin_listener_speaks_for_all(serve):
    s = await serve(2)
    assert set(await s.calls("/demo/v1/x", 40)) == {200}
    status, _, text = await s.admin.call("GET", "/metrics")
    assert status == 200
    per_worker = [metric(text, "credproxy_requests_total", credential="demo", code="200", worker=str(i)) or 0
                  for i in (0, 1)]
    assert sum(per_worker) == 40 and all(n > 0 for n in per_worker), per_worker
    assert metric(text, "credproxy_workers") == 2 and metric(text, "credproxy_workers_serving") == 2
    status, body, _ = await s.admin.call("GET", "/v1/credentials")
    assert status == 200
    (demo,) = body["credentials"]
    assert demo["requests"] == 40 and [w["worker"] for w in demo["workers"]] == [0, 1]
    assert sum(w["requests"] for w in demo["workers"]) == 40
    status, body, _ = await s.admin.call("GET", "/readyz", token=None)
    assert status == 200 and [w["ready"] for w in body["workers"]] == [True, True]
    assert (await s.admin.call("GET", "/metrics", token=None))[0] == 401
    assert (await s.admin.call("GET", "/metrics", token="wrong"))[0] == 401
    lines = s.log_lines()
    assert {line.get("worker") for line in lines if line.get("msg") == "credproxy serving"} >= {0, 1}
    assert_no_secret(s.log.read_text())
    assert_no_secret(text)


async def test_admin_operations_reach_every_worker(serve):
    s = await serve(2)
    status, body, _ = await s.admin.call("POST", "/v1/credentials/demo/disable")
    assert status == 200, body
    assert set(await s.calls("/demo/v1/x", 20)) == {503}  # whichever worker answers, it is disabled
    status, body, _ = await s.admin.call("POST", "/v1/credentials/nope/disable")
    assert status == 404
    assert (await s.admin.call("POST", "/v1/credentials/demo/enable"))[0] == 200
    assert set(await s.calls("/demo/v1/x", 20)) == {200}


async def test_a_worker_that_dies_is_started_again(serve):
    s = await serve(2)
    assert set(await s.calls("/demo/v1/x", 20)) == {200}
    before = s.worker_pids()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    for _ in range(300):  # 1 s restart delay plus a worker's start, which a busy machine can make slow
        await asyncio.sleep(0.1)
        pids = s.worker_pids()
        status, body, _ = await s.admin.call("GET", "/healthz", token=None)
        if len(pids) == 2 and before[0] not in pids and body["serving"] == 2:
            break
    else:
        pytest.fail(f"worker not restarted: {pids} {body}\n" + s.log.read_text()[-3000:])
    assert set(await s.calls("/demo/v1/x", 20)) == {200}
    assert any(line.get("msg") == "worker exited; starting it again" for line in s.log_lines())
    _, _, text = await s.admin.call("GET", "/metrics")  # the killed worker's requests still count
    assert sum(metric(text, "credproxy_requests_total", credential="demo", code="200", worker=str(i)) or 0
               for i in (0, 1)) == 40


async def test_sighup_reloads_every_worker(serve, upstream):
    s = await serve(2)
    s.data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
    write_config(s.path, s.data)
    s.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        reloaded = {line.get("worker") for line in s.log_lines() if line.get("msg") == "config reloaded"}
        if reloaded == {0, 1}:
            break
        await asyncio.sleep(0.1)
    assert reloaded == {0, 1}
    assert set(await s.calls("/second/v1/x", 20)) == {200}


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_and_every_request_is_in_one_audit_chain(serve, upstream, workers):
    """Lines still buffered when SIGTERM arrives are written before exit; the in-flight request
    finishes; with two workers the file is still one chain."""
    s = await serve(workers)
    statuses = await s.calls("/demo/v1/x", 100)
    session = aiohttp.ClientSession()
    try:
        slow = await session.get(f"{s.main}/demo/v1/slow", headers=AUTH)
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
        s.proc.send_signal(signal.SIGTERM)  # within the 200 ms flush interval of the last calls
        for _ in range(100):
            status, body, _ = await s.admin.call("GET", "/readyz", token=None)
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503 and "draining" in body["waiting"]
        assert s.proc.returncode is None
        upstream.release.set()
        assert await slow.read() == b"first part;second part"
    finally:
        await session.close()
    assert await asyncio.wait_for(s.proc.wait(), 15) == 0
    assert set(statuses) == {200}
    assert verify(str(s.audit)) == []
    lines = [json.loads(raw) for raw in s.audit.read_text().splitlines()]
    mine = [line for line in lines if line["caller"] == "app"]
    assert len(mine) == 101 and len({line["request_id"] for line in mine}) == 101
    assert [(line["path"], line["status"]) for line in mine].count(("/v1/slow", 200)) == 1


async def test_workers_refuse_while_the_shared_audit_disk_is_full_and_lose_no_line(serve, small_fs):
    s = await serve(2, {"path": str(small_fs / "audit.log"), "flush_interval": "50ms"})
    ids: list[str] = []

    async def one() -> int:  # a new connection each time: the kernel spreads them over the workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.get(s.main + "/demo/v1/x", headers=AUTH) as r:
                ids.append(r.headers["X-Request-Id"])
                await r.read()
                return r.status

    assert {await one() for _ in range(4)} == {200}
    filler = fill(small_fs)
    for _ in range(200):
        if 503 in await asyncio.gather(*(one() for _ in range(4))):
            break
    else:
        pytest.fail("no request refused while the shared audit file could not be written")
    status, body, _ = await s.admin.call("GET", "/readyz", token=None)
    assert status == 503 and "audit" in body["waiting"]
    filler.unlink()
    for _ in range(300):
        if (await s.admin.call("GET", "/readyz", token=None))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert {await one() for _ in range(4)} == {200}
    s.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(s.proc.wait(), 15) == 0
    assert verify(str(s.audit)) == []
    found = [json.loads(raw)["request_id"] for raw in s.audit.read_text().splitlines()]
    assert sorted(found) == sorted(ids)  # every request once (refused ones too), from both workers, in one chain


@pytest.mark.parametrize("change, says", [
    (lambda d: d["server"].update(listen="unix:/tmp/credproxy-test.sock"), "server.listen: --workers needs TCP"),
    (lambda d: d["server"].update(listen="127.0.0.1:0"), "server.listen: --workers needs a fixed port"),
    (lambda d: d["audit"].update(path="-"), "audit.path: --workers needs a file"),
])
def test_configs_that_cannot_run_as_workers_are_refused(tmp_path, change, says):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    data = base_config(tmp_path, secrets, {"demo": credential("http://127.0.0.1:9/api")})
    change(data)
    path = write_config(tmp_path / "config.yaml", data)
    done = subprocess.run([PYTHON, "-m", "proxy", "serve", "-c", str(path), "--workers", "2"], capture_output=True,
                          text=True, env=subprocess_env(), cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert says in done.stderr


def test_an_admin_port_in_use_stops_the_supervisor_with_exit_1(tmp_path):
    import socket

    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    data = base_config(tmp_path, secrets, {"demo": credential("http://127.0.0.1:9/api")})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data["admin"]["listen"] = "127.0.0.1:%d" % taken.getsockname()[1]
        path = write_config(tmp_path / "config.yaml", data)
        done = subprocess.run([PYTHON, "-m", "proxy", "serve", "-c", str(path), "--workers", "2"],
                              capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert "cannot start" in done.stderr
