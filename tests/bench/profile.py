"""Where credproxy's time goes under load: py-spy samples one worker while wrk drives it.

    python tests/bench/profile.py [--seconds 15] [--connections 64] [--path /v1/small]

Prints the top frames by own time and by inclusive time (collapsed stacks are
kept in tests/bench/results/profile.txt; a flame graph in profile.svg).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import credproxy_rig  # noqa: E402
from rig import wrk  # noqa: E402
from run import LOAD_CPU, Bench  # noqa: E402


def _where(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy raw frame such as "handle (proxy/pipeline.py:71)"."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3.12/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    if "/proxy/" in where:
        where = "proxy/" + where.split("/proxy/", 1)[1]
    return name, where


def _component(where: str) -> str:
    if where.startswith("proxy/"):
        return where
    return where.split("/", 1)[0].removesuffix(".py") or where


def top(collapsed: str, n: int = 20) -> str:
    own, comp, step, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        frames = [_where(f) for f in stack.split(";")]
        name, where = frames[-1]
        own[f"{name} ({where})"] += k
        comp[_component(where)] += k
        # charge library time to the innermost credproxy function that led to it
        mine = next((f for f in reversed(frames) if f[1].startswith("proxy/") and f[1] != "proxy/__main__.py"
                     and f[0] not in ("run", "main", "cmd_serve")), None)
        step[f"{mine[0]} ({mine[1]})" if mine else "aiohttp/uvloop, outside any credproxy step"] += k
    pct = lambda k: f"{100 * k / total:5.1f}%"  # noqa: E731
    out = [f"{total} samples", "", "own time by component:"]
    out += [f"  {pct(k)}  {c}" for c, k in comp.most_common(n)]
    out += ["", "by credproxy step (library time charged to the innermost credproxy function calling it):"]
    out += [f"  {pct(k)}  {s}" for s, k in step.most_common(n)]
    out += ["", "own time by function:"]
    out += [f"  {pct(k)}  {f}" for f, k in own.most_common(n)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--path", default="/v1/small")
    p.add_argument("--target", choices=("credproxy", "bare"), default="credproxy",
                   help="bare: profile tests/bench/bare_proxy.py instead, to compare where aiohttp's time goes")
    p.add_argument("--idle", action="store_true", help="keep py-spy's idle frames (time waiting in the loop)")
    p.add_argument("--publish", action="store_true", help="also put the result into docs/benchmark.md")
    a = p.parse_args()
    if shutil.which("py-spy") is None:
        print("pip install py-spy", file=sys.stderr)
        return 2
    bench = Bench(argparse.Namespace(skip_big=True, keep=False))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    try:
        bench.start_fixtures()
        if a.target == "bare":
            cp, url = bench.bare, f"http://127.0.0.1:{bench.ports['bare']}/bench{a.path}"
        else:
            cp, base = bench.start_credproxy("profile")
            url = f"{base}/bench{a.path}"
        wrk(url, connections=a.connections, seconds=2, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
        load = threading.Thread(target=wrk, args=(url,), kwargs=dict(
            connections=a.connections, seconds=a.seconds + 2, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN))
        load.start()
        raw = out / f"profile-{a.target}.txt"
        spy = ["py-spy", "record", "-p", str(cp.pid), "-d", str(a.seconds), "-r", "250", "--nonblocking"]
        subprocess.run([*spy, "-f", "raw", "-o", str(raw)] + (["--idle"] if a.idle else []),
                       check=True, capture_output=True)
        load.join()
        report = top(raw.read_text())
        head = (f"py-spy, 250 Hz, {a.seconds} s, {a.target} under wrk -c{a.connections} on {a.path} "
                f"({time.strftime('%Y-%m-%d %H:%M')}; `python tests/bench/profile.py`):")
        (out / f"profile-top-{a.target}.txt").write_text(head + "\n\n" + report + "\n")
        print(report)
        if a.publish:
            page = HERE.parents[1] / "docs" / "benchmark.md"
            block = f"<!-- profile:start -->\n{head}\n\n```\n{report}\n```\n<!-- profile:end -->"
            text = re.sub(r"<!-- profile:start -->.*?<!-- profile:end -->", lambda _m: block, page.read_text(), flags=re.S)
            page.write_text(text)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
