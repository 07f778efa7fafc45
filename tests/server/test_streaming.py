"""Large bodies stream through without being held in memory: a real `credproxy serve`
process forwards 100 MiB each way while its RSS grows by less than 30 MiB."""

import os
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.helpers import auth, base_config, free_port, write_store

MiB = 1 << 20
SIZE = 100 * MiB
CHUNK = 64 * 1024


def rss_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture
async def big_upstream():
    received = {"bytes": 0}

    async def download(request):
        resp = web.StreamResponse(headers={"Content-Length": str(SIZE), "Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        block = bytes(range(256)) * (CHUNK // 256)
        for _ in range(SIZE // CHUNK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def upload(request):
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        received["bytes"] = n
        return web.json_response({"received": n})

    app = web.Application()
    app.router.add_get("/v1/download", download)
    app.router.add_post("/v1/upload", upload)
    async def ping(request):
        return web.Response(text="pong")

    app.router.add_get("/v1/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


@pytest.fixture
def proxy_process(tmp_path, big_upstream):
    url, _ = big_upstream
    write_store(tmp_path, {"apis/example#token": "sk_stream_CANARY_5e6f7a8b"})
    cfg = base_config(tmp_path, url)
    port, admin = free_port(), free_port()
    cfg["server"]["listen"] = f"127.0.0.1:{port}"
    cfg["admin"]["listen"] = f"127.0.0.1:{admin}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path)],
                            stderr=open(tmp_path / "serve.log", "wb"))
    deadline = time.monotonic() + 20
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError((tmp_path / "serve.log").read_text())
            time.sleep(0.1)
    yield proc, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


async def test_100mib_download_and_upload_stream_in_bounded_memory(proxy_process, big_upstream):
    proc, base = proxy_process
    _, received = big_upstream
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # warm up pools, imports and buffers before the baseline
            async with s.get(base + "/example/v1/ping", headers=auth()) as r:
                assert r.status == 200
        baseline = rss_kib(proc.pid, "VmRSS")

        got = 0
        async with s.get(base + "/example/v1/download", headers=auth()) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(CHUNK):
                got += len(chunk)
        assert got == SIZE

        async def body():
            block = b"u" * CHUNK
            for _ in range(SIZE // CHUNK):
                yield block

        async with s.post(base + "/example/v1/upload", data=body(),
                          headers={**auth(), "Content-Length": str(SIZE)}) as r:
            assert r.status == 200
            assert (await r.json())["received"] == SIZE
    assert received["bytes"] == SIZE
    growth_mib = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    print(f"proxy RSS baseline {baseline / 1024:.1f} MiB, peak growth {growth_mib:.1f} MiB over 2 x 100 MiB")
    assert growth_mib < 30
