"""Where credproxy's time goes under load: py-spy samples one worker while wrk drives it.

    python tests/bench/profile.py [--seconds 15] [--connections 64] [--path /v1/small]

Prints the top frames by own time and by inclusive time (collapsed stacks are
kept in tests/bench/results/profile.txt; a flame graph in profile.svg).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import credproxy_rig  # noqa: E402
from rig import wrk  # noqa: E402
from run import LOAD_CPU, Bench  # noqa: E402


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "handle (proxy/pipeline.py:71)"; drop the line number
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/proxy/"):
        if marker in where:
            where = ("proxy/" if marker == "/proxy/" else "") + where.split(marker, 1)[1]
    return f"{name} ({where})"


def top(collapsed: str, n: int = 25) -> str:
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * k / total:5.1f}%  {f}" for f, k in own.most_common(n)]
    out += ["", "inclusive time (proxy/ and aiohttp frames):"]
    out += [f"  {100 * k / total:5.1f}%  {f}" for f, k in incl.most_common(400)
            if ("proxy/" in f or "aiohttp/" in f or "prometheus" in f)][:n]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--path", default="/v1/small")
    p.add_argument("--idle", action="store_true", help="keep py-spy's idle frames (time waiting in the loop)")
    a = p.parse_args()
    if shutil.which("py-spy") is None:
        print("pip install py-spy", file=sys.stderr)
        return 2
    bench = Bench(argparse.Namespace(skip_big=True, keep=False, duration=a.seconds, warmup=2))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    try:
        bench.start_fixtures()
        cp = bench.start_credproxy()
        url = f"http://127.0.0.1:{bench.ports['cp']}/bench{a.path}"
        wrk(url, connections=a.connections, seconds=2, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
        load = threading.Thread(target=wrk, args=(url,), kwargs=dict(
            connections=a.connections, seconds=a.seconds + 2, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN))
        load.start()
        raw = out / "profile.txt"
        spy = ["py-spy", "record", "-p", str(cp.pid), "-d", str(a.seconds), "-r", "250", "--nonblocking"]
        subprocess.run([*spy, "-f", "raw", "-o", str(raw)] + (["--idle"] if a.idle else []),
                       check=True, capture_output=True)
        load.join()
        report = top(raw.read_text())
        (out / "profile-top.txt").write_text(report + "\n")
        print(report)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
