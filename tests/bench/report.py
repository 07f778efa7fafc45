"""Benchmark results: ratios against the targets, the markdown table, the chart."""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path

BARE, NGINX, CP, CP1, CP2 = "c: bare aiohttp", "b: nginx proxy", "d: credproxy", "d: credproxy x1", "d: credproxy x2"
FLOOR = "e: llhttp floor"


def machine() -> dict:
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    import aiohttp

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "loop": loop, "kernel": platform.release()}


def _cell(results: dict, target: str, load: str) -> dict | None:
    return next((c for c in results["cells"] if c["target"] == target and c["load"] == load), None)


def checks(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met is None when not measured. The targets are issue 14's."""
    out = []
    for load in ("small@10", "small@64"):
        d, c, e = _cell(results, CP, load), _cell(results, BARE, load), _cell(results, FLOOR, load)
        if d and c:
            r = d["rps"] / c["rps"]
            out.append((f"{load}: credproxy req/s >= 2.0 x bare", f"{r:.2f} x", r >= 2.0))
            r = d["p99_ms"] / c["p99_ms"]
            out.append((f"{load}: credproxy p99 <= 0.7 x bare", f"{r:.2f} x", r <= 0.7))
        if d and e:
            r = d["cpu_us"] / e["cpu_us"]
            out.append((f"{load}: credproxy CPU per request <= 2 x the llhttp floor", f"{r:.2f} x "
                        f"({d['cpu_us']:.0f} vs {e['cpu_us']:.0f} µs)", r <= 2.0))
    d, c = _cell(results, CP, "1MiB@10"), _cell(results, BARE, "1MiB@10")
    if d and c:
        r = d["mib_s"] / c["mib_s"]
        out.append(("1 MiB bodies: throughput >= 1.2 x bare (leak guard on)", f"{r:.2f} x", r >= 1.2))
    for load in ("small@64", "small@10"):
        one, two = _cell(results, CP1, load) or _cell(results, CP, load), _cell(results, CP2, load)
        if one and two:
            r = two["rps"] / one["rps"]
            out.append((f"{load}: --workers 2 >= 1.7 x one worker", f"{r:.2f} x", r >= 1.7))
    rss = [c["rss_mib"] for c in results["cells"] if c["target"] in (CP, CP1)]
    rss += results["extra"].get("workers", {}).get("rss_per_worker_mib", [])
    if rss:
        out.append(("RSS under load <= 80 MiB per worker", f"max {max(rss):.1f} MiB", max(rss) <= 80))
    for name, big in results["extra"].get("big_body", {}).items():
        out.append((f"1 GiB streamed ({name}): RSS growth < 20 MiB", f"{big['rss_growth_mib']:.1f} MiB",
                    big["rss_growth_mib"] < 20))
    tok = results["extra"].get("token_expiry", {})
    if tok.get("measured"):
        out.append(("5,000 concurrent requests at token expiry: one token request", str(tok["token_requests_at_expiry"]),
                    tok["token_requests_at_expiry"] == 1))
        out.append(("... and their p99 < 3 x that of the same burst with a valid token", f"{tok['p99_ratio']:.2f} x "
                    f"({tok['expiry_p99_ms']:.0f} vs {tok['normal_p99_ms']:.0f} ms)", tok["p99_ratio"] < 3))
    else:
        out.append(("5,000 requests at token expiry", "not measured: " + tok.get("why", "skipped"), None))
    return out


def quietness(results: dict) -> str:
    others = [r["others_cores"] for c in results["cells"] for r in c.get("rounds", [c])]
    mean = sum(others) / len(others) if others else 0.0
    return (f"machine before the run: load average {results['load_start'][0]:.2f}; CPU taken by other processes "
            f"and by the hypervisor (steal) during the measurements: mean {mean:.2f}, max {max(others, default=0):.2f} cores of "
            f"{results['machine']['cores']} (the benchmark itself keeps both cores busy)")


def summary(results: dict) -> str:
    lines = ["targets:"]
    for what, measured, met in checks(results):
        mark = {True: "met", False: "NOT MET", None: "-"}[met]
        lines.append(f"  [{mark:^7}] {what}: {measured}")
    for load in ("small@10", "small@64", "1MiB@10"):
        d, b = _cell(results, CP, load), _cell(results, NGINX, load)
        if d and b:
            lines.append(f"  credproxy / nginx proxy at {load}: {d['rps'] / b['rps']:.2f} x req/s, "
                         f"{d['p99_ms'] / b['p99_ms']:.2f} x p99")
    lines.append(quietness(results))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, how = results["machine"], results["method"]
    out = [f"Run {results['started']} on {m['cores']} x {m['cpu']}, Python {m['python']}, aiohttp {m['aiohttp']}, "
           f"{m['loop']}; {how['duration_s']:g} s of measurement per cell in {how['rounds']} rounds, the targets of a load "
           f"measured round-robin, the median round shown. "
           f"{quietness(results)}.", "",
           "| target | load | req/s | p50 ms | p99 ms | MiB/s | peak RSS MiB | CPU µs/req | vs bare req/s | vs bare p99 "
           "| errors | others' CPU, cores |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["cells"]:
        base = _cell(results, BARE, c["load"])
        vs = (f"{c['rps'] / base['rps']:.2f}", f"{c['p99_ms'] / base['p99_ms']:.2f}") if base else ("", "")
        out.append(f"| {c['target']} | {c['load']} | {c['rps']:.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                   f"{c['mib_s']:.1f} | {c['rss_mib']:.1f} | {c['cpu_us']:.0f} | {vs[0]} | {vs[1]} | {c['errors']} | "
                   f"{c.get('others_cores', 0):.2f} |")
    extra = results["extra"]
    if "workers" in extra:
        w = extra["workers"]
        out += ["", f"`--workers 2`: peak RSS per worker under load {w['rss_per_worker_mib']} MiB; "
                    f"supervisor {w['supervisor_rss_mib']} MiB."]
    if "big_body" in extra:
        out += ["", "| 1 GiB streamed | MiB/s | RSS before MiB | peak RSS MiB | growth MiB |", "|---|---:|---:|---:|---:|"]
        for name, b in extra["big_body"].items():
            out.append(f"| {name} | {b['mib_s']} | {b['rss_before_mib']} | {b['rss_peak_mib']} | {b['rss_growth_mib']} |")
    tok = extra.get("token_expiry", {})
    if tok.get("measured"):
        out += ["", f"Token expiry: {tok['requests']:,} requests at once on open connections, p99 "
                    f"{tok['normal_p99_ms']:.0f} ms with a valid token and {tok['expiry_p99_ms']:.0f} ms just after it "
                    f"ran out ({tok['p99_ratio']:.2f} x); token requests for the second burst: "
                    f"{tok['token_requests_at_expiry']}; answers {tok['statuses_normal']} and {tok['statuses_expiry']}."]
    elif tok:
        out += ["", f"Token expiry: not measured ({tok.get('why')})."]
    out += ["", "| target | measured | met |", "|---|---|---|"]
    for what, measured, met in checks(results):
        out.append(f"| {what} | {measured} | {({True: 'yes', False: '**no**', None: '-'})[met]} |")
    for note in results.get("notes", []):
        out.append(f"\nNote: {note}")
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no chart")
        return
    loads = ["small@10", "small@64", "1MiB@10"]
    targets = ["a: nginx direct", "b: nginx proxy", "c: bare aiohttp", "e: llhttp floor", "d: credproxy",
               "d: credproxy x2"]
    colors = ["#9e9e9e", "#607d8b", "#8fb3d9", "#c9a227", "#1f5fa8", "#0b3466"]  # x1 (back-to-back rerun) is in the table only
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for col, load in enumerate(loads):
        for row, (key, label) in enumerate((("mib_s" if load.startswith("1MiB") else "rps",
                                             "MiB/s" if load.startswith("1MiB") else "requests/s"),
                                            ("p99_ms", "p99 latency, ms"))):
            ax = axes[row][col]
            names, values, cols = [], [], []
            for t, colr in zip(targets, colors):
                c = _cell(results, t, load)
                if c:
                    names.append(t.split(": ")[1])
                    values.append(c[key])
                    cols.append(colr)
            bars = ax.bar(range(len(values)), values, color=cols)
            ax.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{load} - {label}", fontsize=10)
            ax.bar_label(bars, fmt="%.0f" if key != "p99_ms" else "%.1f", fontsize=7)
            if row == 0 and values:  # a partial run (--loads) leaves some panels empty
                ax.set_yscale("log")  # nginx is an order of magnitude ahead: on a linear scale the rest is flat
                ax.set_title(f"{load} - {label} (log scale)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("credproxy vs nginx, a bare aiohttp proxy and the llhttp floor (loopback, proxy pinned to one core)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(md: str, png: Path, docs: Path) -> None:
    docs.mkdir(exist_ok=True)
    if png.exists():
        shutil.copy(png, docs / "benchmark.png")
    page = docs / "benchmark.md"
    text = page.read_text() if page.exists() else "# Benchmark\n\n<!-- results:start -->\n<!-- results:end -->\n"
    block = "<!-- results:start -->\n" + md + "<!-- results:end -->"
    page.write_text(re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _m: block, text, flags=re.S))


if __name__ == "__main__":  # re-render the table and chart of a saved run: python report.py results/latest.json
    import json
    import sys

    saved = Path(sys.argv[1])
    data = json.loads(saved.read_text())
    saved.with_suffix(".md").write_text(markdown(data))
    chart(data, saved.with_suffix(".png"))
    print(summary(data))
