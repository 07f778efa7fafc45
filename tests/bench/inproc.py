"""credproxy's own CPU per request, without sockets: the request path driven in one process.

A real ``Proxy`` (the benchmark's config: five callers, allow rules, header injection from the encrypted file
store, audit to a file, leak guard, metrics) serves requests handed straight to a caller connection
(``HTTPConnection.data_received``) over a stand-in transport; the upstream is a pooled ``Connection`` whose
stand-in transport answers each request with nginx's small answer. No system calls, no wrk, no nginx: what is
measured is the Python work per request, which the machine's noise hardly moves (min of several runs).
``--floor`` measures the llhttp floor's (tests/bench/llhttp_floor.py) the same way, for the ratio.

    python tests/bench/inproc.py [--requests 20000] [--runs 5] [--floor] [--prof] [--big]
"""

from __future__ import annotations

import sys

_script_dir = sys.path.pop(0)  # it holds a profile.py of its own: cProfile needs the standard library's
import argparse  # noqa: E402
import asyncio  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import credproxy_rig  # noqa: E402
from nginx import SMALL_JSON  # noqa: E402
from tests.helpers import StandInTransport  # noqa: E402
from rig import free_port  # noqa: E402

REQUEST = (b"GET /bench/v1/small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"Authorization: Bearer " + credproxy_rig.CALLER_TOKEN.encode() + b"\r\n\r\n")
BODY = SMALL_JSON.encode()
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
          % (len(BODY), BODY))


def big_answer() -> list[bytes]:
    """The benchmark's 1 MiB JSON answer, in the 256 KiB reads a socket gives."""
    from run import body_1mib

    body = body_1mib()
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    return [data[i:i + 262144] for i in range(0, len(data), 262144)]


class Wire(StandInTransport):
    """A stand-in transport: counts what is written; the upstream one answers each request it is sent."""

    def __init__(self, answer: bytes | list[bytes] | None = None) -> None:
        self.answer = [answer] if isinstance(answer, bytes) else answer
        self.protocol = None
        self.pending = 0
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)
        if self.answer is not None:
            self.pending += 1

    def deliver(self) -> None:
        while self.pending:
            self.pending -= 1
            for piece in self.answer:
                self.protocol.data_received(piece)


async def started_proxy():
    """A started ``Proxy`` on the benchmark's config (its upstream unreachable: the tests hand it connections)."""
    from proxy.config import models as config_mod
    from proxy.app import Proxy

    workdir = Path(tempfile.mkdtemp(prefix="inproc-"))
    credproxy_rig.write_store(workdir)
    cfg = credproxy_rig.config(workdir, "inproc", port=free_port(), admin_port=free_port(), upstream="http://127.0.0.1:9",
                               aux="http://127.0.0.1:9", with_tokens=False)
    proxy = Proxy(config_mod.load(cfg), str(cfg), watch_interval=None)
    await proxy.start()
    return proxy


async def credproxy(requests: int, runs: int, prof: bool, big: bool = False) -> list[float]:
    from proxy.routing import route_prefixed
    from proxy.server.connection import HTTPConnection
    from proxy.upstream.connection import Connection

    proxy = await started_proxy()
    try:
        cred = proxy.holder.current.credentials["bench"]
        client = cred.client
        await cred.source.grant("")  # warm the material, as the first request would
        target = client.target(cred.base)
        loop = asyncio.get_running_loop()
        pool = client._pool
        upstream = Wire(big_answer() if big else ANSWER)
        size = sum(map(len, upstream.answer)) - 100
        conn = Connection(loop, pool.put, pool.lost)
        conn.connection_made(upstream)
        upstream.protocol = conn
        conn.key = target.key
        pool.open += 1
        pool.put(conn)
        caller = Wire()
        http = HTTPConnection(proxy._context("main", set(), route=route_prefixed, counted=False))
        http.connection_made(caller)
        times = []
        profile = cProfile.Profile() if prof else None
        for _ in range(runs):
            await asyncio.sleep(0.05)  # the audit's flush and anything else the loop has to do
            start = time.perf_counter()
            if profile:
                profile.enable()
            for i in range(requests):
                before = caller.written
                http.data_received(REQUEST)
                upstream.deliver()
                while big and caller.written - before < size:
                    await asyncio.sleep(0)  # a large answer is relayed by a task
                if i % 256 == 255:
                    await asyncio.sleep(0)
            if profile:
                profile.disable()
            times.append((time.perf_counter() - start) / requests)
        if caller.written < requests * (size if big else len(BODY)):
            raise SystemExit(f"answers did not reach the caller ({caller.written} bytes written)")
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return times
    finally:
        await proxy.stop()


async def floor(requests: int, runs: int) -> list[float]:
    import llhttp_floor

    f = llhttp_floor.Floor("http://127.0.0.1:9")
    upstream = Wire(ANSWER)
    up = llhttp_floor.Upstream(f.pool)
    up.transport = upstream
    upstream.protocol = up
    f.pool.append(up)
    caller = Wire()
    c = llhttp_floor.Caller(f)
    c.transport = caller
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(requests):
            c.data_received(REQUEST)
            await asyncio.sleep(0)  # its forward() is a task
            upstream.deliver()
        times.append((time.perf_counter() - start) / requests)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--prof", action="store_true")
    ap.add_argument("--big", action="store_true", help="1 MiB answers (the leak guard scans each)")
    a = ap.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    times = run(credproxy(a.requests, a.runs, a.prof, a.big))
    print(f"credproxy: {min(times) * 1e6:.1f} us/request (min of {a.runs}; all: "
          + " ".join(f"{t * 1e6:.1f}" for t in times) + ")")
    if a.floor:
        ft = run(floor(a.requests, a.runs))
        print(f"floor:     {min(ft) * 1e6:.1f} us/request (min of {a.runs}); ratio {min(times) / min(ft):.2f}")


if __name__ == "__main__":
    main()
