"""What the leak guard costs: scan throughput, and a download through a running proxy
with ``leak_guard: redact`` against ``off``.

    PYTHONPATH=$PWD python -m tests.security.bench_leak_guard

Not collected by pytest (the machine is shared; this takes a few seconds of CPU).
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.redact.leak_guard import LeakGuard

from .harness import CALLER_TOKEN, Harness, RecordingUpstream

SECRETS = ["sk_live_4eC39HqLyjWDarjtT1zdp7dc", "00D5g000004XYZA!AQ4AQL.abc/def+ghi=jkl", "client-secret-0123456789"]


def scan_throughput() -> None:
    bodies = {
        "json text": (b'{"id": 12345, "name": "The quick brown fox", "tags": ["a/b", "c+d"]} ' * 20000)[: 1 << 20],
        "random bytes": os.urandom(1 << 20),
        "base64 text": base64.b64encode(os.urandom(3 << 18)),
    }
    for n in (1, 3):
        guard = LeakGuard(SECRETS[:n])
        for name, data in bodies.items():
            rounds = 8
            started = time.perf_counter()
            for _ in range(rounds):
                s = guard.stream()
                for i in range(0, len(data), 65536):
                    s.feed(data[i : i + 65536])
                s.flush()
            rate = rounds * len(data) / (time.perf_counter() - started) / 1e6
            print(f"scan  {n} secret(s)  {name:12s}  {rate:7.1f} MB/s")


async def through_proxy() -> None:
    up = await RecordingUpstream().start()
    try:
        for mode in ("off", "redact", "block"):
            with tempfile.TemporaryDirectory() as d:
                h = await Harness(Path(d), up.url, {"leak_guard": mode}).start()
                try:
                    async with aiohttp.ClientSession(auto_decompress=False) as s:
                        headers = {"Authorization": f"Bearer {CALLER_TOKEN}"}
                        size = 64 << 20
                        started = time.perf_counter()
                        async with s.get(h.url + f"/demo/big?n={size}", headers=headers) as r:
                            got = 0
                            async for chunk in r.content.iter_any():
                                got += len(chunk)
                        rate = got / (time.perf_counter() - started) / 1e6
                        latencies = []
                        for _ in range(200):
                            t = time.perf_counter()
                            async with s.get(h.url + "/demo/anything/x", headers=headers) as r:
                                await r.read()
                            latencies.append((time.perf_counter() - t) * 1000)
                    p50 = statistics.median(latencies)
                    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
                    print(f"proxy leak_guard={mode:6s}  64 MiB download {rate:7.1f} MB/s   echo request p50 {p50:.2f} ms  p99 {p99:.2f} ms")
                finally:
                    await h.stop()
    finally:
        await up.close()


if __name__ == "__main__":
    scan_throughput()
    asyncio.run(through_proxy())
