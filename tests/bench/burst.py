"""Concurrent bursts for the token-expiry scenario: N keep-alive connections, one request
on each at the same moment, at given times; every request's latency is recorded.

    python tests/bench/burst.py URL TOKEN N T1 [T2 ...]
        Ti: CLOCK_MONOTONIC times (comparable across processes) to fire a burst at;
        a first, unreported burst opens the N connections.
    -> JSON [{"at": t, "latencies": [...], "statuses": {status: count}}, ...]
"""

import asyncio
import collections
import json
import sys
import time

import aiohttp


async def burst(session: aiohttp.ClientSession, url: str, headers: dict, n: int) -> tuple[list, dict]:
    async def one() -> tuple[float, int]:
        t = time.monotonic()
        try:
            async with session.get(url, headers=headers) as r:
                await r.read()
                return time.monotonic() - t, r.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return time.monotonic() - t, 0

    done = await asyncio.gather(*(one() for _ in range(n)))
    return [d[0] for d in done], dict(collections.Counter(d[1] for d in done))


async def main(url: str, token: str, n: int, times: list[float]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    out = []
    connector = aiohttp.TCPConnector(limit=n, keepalive_timeout=300)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await burst(s, url, headers, n)  # opens the connections
        for at in times:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            latencies, statuses = await burst(s, url, headers, n)
            out.append({"at": at, "latencies": latencies, "statuses": statuses})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), [float(t) for t in sys.argv[4:]]))
