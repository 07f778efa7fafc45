"""credproxy benchmark: one command, one run, on loopback.

    python tests/bench/run.py [--duration 15] [--rounds 3] [--publish]

Measures requests/s, p50/p99 latency, peak RSS and CPU per request for
  (a) wrk -> nginx upstream directly,
  (b) nginx as a header-injecting reverse proxy,
  (c) a bare aiohttp reverse proxy (tests/bench/bare_proxy.py),
  (d) credproxy with caller auth, policy, header injection, audit log, leak guard
      (redact) and metrics,
  (e) the llhttp floor: a minimal header-injecting proxy on httptools both sides
      (tests/bench/llhttp_floor.py), what a Python proxy must at least spend,
for small JSON answers at 10 and 64 connections and for 1 MiB bodies; then
credproxy --workers 2 against one worker, a 1 GiB streamed body each way, and
5,000 concurrent connections across a token expiry (when ``proxy.tokens`` exists).

Layout (2 cores): the proxy under test on core 0; wrk, the nginx upstream and the
helper servers on core 1. (a) therefore runs entirely on core 1. ``--workers 2``
runs on cores 0-1, sharing core 1 with wrk and the upstream.

Every process is started once; a cell's time is split into ``--rounds`` rounds and
the targets of a load are measured round-robin, so that a slow spell of the
(shared, virtual) machine hits them alike; a cell reports the median round. Each
round also records the proxy's CPU time per request and the CPU other processes
on the machine took meanwhile, plus the time the hypervisor took from this VM's
vCPUs (steal: the host running other tenants); a round during which they took
more than ``--quiet`` cores is measured again.

Writes tests/bench/results/latest.{md,json,png}; ``--publish`` also refreshes
docs/benchmark.png and the results block in docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import credproxy_rig  # noqa: E402
import nginx  # noqa: E402
import report  # noqa: E402
from rig import (Proc, RssSampler, busy_seconds, children, cpu_seconds, free_port, loadavg,  # noqa: E402
                 reaped_children_seconds, rss_kib, start, stolen_seconds, wait_port, wrk)

SUT_CPU, LOAD_CPU, BOTH = "0", "1", "0,1"
MiB = 1 << 20
LOADS = {"small@10": ("/v1/small", 10), "small@64": ("/v1/small", 64), "1MiB@10": ("/v1/files/1m.json", 10)}
TOKEN_LIFETIME_S = 16.0
# proxy.tokens treats a token as expired (every request waits for the one refresh) from this long before its end
EXPIRY_MARGIN_S = min(10.0, TOKEN_LIFETIME_S * 0.1)
BURST = 5000
QUIET = {"threshold": 0.15, "retries": 2}  # set from the command line


@dataclass
class Round:
    rps: float
    p50_ms: float
    p99_ms: float
    mib_s: float
    rss_mib: float
    cpu_us: float  # CPU time of the process(es) under test per request: robust to a busy machine
    errors: int
    # CPU used by processes outside the benchmark meanwhile, plus what the hypervisor took from this VM (steal):
    # 0 = a quiet machine
    others_cores: float


@dataclass
class Cell:
    target: str
    load: str
    rps: float
    p50_ms: float
    p99_ms: float
    mib_s: float
    rss_mib: float
    cpu_us: float
    errors: int
    others_cores: float
    rounds: list


@dataclass
class Target:
    name: str
    url: str
    pids: object  # () -> list of pids under test
    token: str | None = None


def body_1mib() -> bytes:
    """Realistic JSON text (what the leak guard has to scan), exactly 1 MiB."""
    import random

    rnd = random.Random(7)
    recs, size = [], 0
    while size < MiB:
        rec = json.dumps({"id": "cus_%016x" % rnd.getrandbits(64), "email": f"user{len(recs)}@example.com",
                          "balance": rnd.randint(0, 10**6), "currency": "eur", "tags": ["vip", "eu"]})
        recs.append(rec)
        size += len(rec) + 1
    return ("[" + ",".join(recs))[: MiB - 1].encode() + b"]"


def make_files(workdir: Path, big: bool) -> None:
    files = workdir / "www" / "v1" / "files"
    files.mkdir(parents=True)
    one = body_1mib()
    (files / "1m.json").write_bytes(one)
    if big:
        with open(files / "1g.bin", "wb") as fh:
            for _ in range(1024):
                fh.write(one)
    for p in [workdir, *workdir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def give_to_nobody(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    nobody = pwd.getpwnam("nobody")
    for p in [path, *path.rglob("*")]:
        os.chown(p, nobody.pw_uid, nobody.pw_gid)


def http_get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def measure_round(t: Target, load: str, *, seconds: float, warmup: float, rig) -> Round:
    """``rig``: the pids of the rest of the benchmark (upstream, helpers), so that CPU used by anything
    else on the machine during the measurement can be told apart."""
    path, conns = LOADS[load]
    if warmup:
        wrk(t.url + path, connections=conns, seconds=warmup, cpus=LOAD_CPU, token=t.token)
    cpu0 = sum(cpu_seconds(p) for p in t.pids())
    rig0 = sum(cpu_seconds(p) for p in rig())
    busy0, stolen0, wrk0, t0 = busy_seconds(), stolen_seconds(), reaped_children_seconds(), time.monotonic()
    with RssSampler(t.pids) as rss:
        r = wrk(t.url + path, connections=conns, seconds=seconds, cpus=LOAD_CPU, token=t.token)
    sut = sum(cpu_seconds(p) for p in t.pids()) - cpu0
    ours = sum(cpu_seconds(p) for p in rig()) - rig0 + reaped_children_seconds() - wrk0
    elapsed = time.monotonic() - t0
    others = max(0.0, (busy_seconds() - busy0 - sut - ours) / elapsed) + (stolen_seconds() - stolen0) / elapsed
    return Round(r.rps, r.p50_ms, r.p99_ms, r.mib_s, rss.max_mib, sut / max(r.requests, 1) * 1e6, r.errors, others)


def summarize(t: Target, load: str, rounds: list[Round]) -> Cell:
    med = lambda key: statistics.median(getattr(r, key) for r in rounds)  # noqa: E731
    cell = Cell(t.name, load, med("rps"), med("p50_ms"), med("p99_ms"), med("mib_s"), max(r.rss_mib for r in rounds),
                med("cpu_us"), sum(r.errors for r in rounds), max(r.others_cores for r in rounds),
                [asdict(r) for r in rounds])
    print(f"  {cell.target:<18} {load:<9} {cell.rps:8.0f} req/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms"
          f"  {cell.mib_s:7.1f} MiB/s  rss {cell.rss_mib:5.1f} MiB  cpu {cell.cpu_us:6.0f} us/req  errors "
          f"{cell.errors}  (others <= {cell.others_cores:.2f} cores)", flush=True)
    return cell


def interleaved(targets: list[Target], load: str, *, duration: float, rounds: int, warmup: float, rig) -> list[Cell]:
    """The targets measured round-robin, ``rounds`` times each, ``duration / rounds`` seconds a round."""
    per = {t.name: [] for t in targets}
    for n in range(rounds):
        for t in targets:
            best = None
            for attempt in range(1 + QUIET["retries"]):
                r = measure_round(t, load, seconds=max(1, round(duration / rounds)), warmup=warmup if n == 0 else 1,
                                  rig=rig)
                if best is None or r.others_cores < best.others_cores:
                    best = r
                if r.others_cores <= QUIET["threshold"]:
                    break
                if attempt < QUIET["retries"]:
                    print(f"    (busy machine during {t.name} {load}: measuring that round again)", flush=True)
            per[t.name].append(best)
    return [summarize(t, load, per[t.name]) for t in targets]


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="credproxy-bench-"))
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir()
        self.procs: list[Proc] = []
        self.ports = {k: free_port() for k in ("upstream", "nginxproxy", "bare", "floor", "aux")}
        self.results: dict = {"cells": [], "extra": {}, "notes": []}

    # -- processes ---------------------------------------------------------------------------------

    def _start(self, *a, **kw) -> Proc:
        p = start(*a, **kw)
        self.procs.append(p)
        return p

    def start_fixtures(self) -> None:
        make_files(self.workdir, big=not getattr(self.args, "skip_big", True))
        ngx = self.workdir / "nginx"  # owned by the unprivileged user nginx runs as
        ngx.mkdir()
        up = nginx.upstream_config(ngx, self.ports["upstream"], www=self.workdir / "www")
        px = nginx.proxy_config(ngx, self.ports["nginxproxy"], self.ports["upstream"])
        give_to_nobody(ngx)
        self.upstream = self._start("nginx-upstream", nginx.command(up, ngx), LOAD_CPU, self.logdir, unprivileged=True)
        self.nginxproxy = self._start("nginx-proxy", nginx.command(px, ngx), SUT_CPU, self.logdir, unprivileged=True)
        self.upstream_url = f"http://127.0.0.1:{self.ports['upstream']}"
        self.bare = self._start("bare-proxy", [sys.executable, str(HERE / "bare_proxy.py"), str(self.ports["bare"]),
                                               self.upstream_url], SUT_CPU, self.logdir)
        self.floor = self._start("llhttp-floor", [sys.executable, str(HERE / "llhttp_floor.py"),
                                                  str(self.ports["floor"]), self.upstream_url], SUT_CPU, self.logdir)
        self.aux = self._start("aux", [sys.executable, str(HERE / "aux_server.py"), str(self.ports["aux"]),
                                       str(TOKEN_LIFETIME_S)], LOAD_CPU, self.logdir)
        for name, proc in (("upstream", self.upstream), ("nginxproxy", self.nginxproxy), ("bare", self.bare),
                           ("floor", self.floor), ("aux", self.aux)):
            wait_port(self.ports[name], proc=proc.popen)
        self.with_tokens = credproxy_rig.tokens_available()
        credproxy_rig.write_store(self.workdir)

    def start_credproxy(self, tag: str, workers: int = 1, token_session: dict | None = None) -> tuple[Proc, str]:
        """A credproxy with its own ports and audit file; returns it and its base URL."""
        port, admin = free_port(), free_port()
        config = credproxy_rig.config(self.workdir, tag, port=port, admin_port=admin, upstream=self.upstream_url,
                                      aux=f"http://127.0.0.1:{self.ports['aux']}", with_tokens=self.with_tokens,
                                      token_session=token_session)
        argv = [sys.executable, "-m", "proxy", "serve", "-c", str(config)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = self._start(f"credproxy-{tag}", argv, SUT_CPU if workers == 1 else BOTH, self.logdir, env=env,
                           cwd=str(self.workdir))
        wait_port(port, proc=proc.popen)
        deadline = time.monotonic() + 30
        while True:  # ready = every worker answers
            try:
                http_get(f"http://127.0.0.1:{admin}/readyz")
                break
            except Exception:
                if time.monotonic() > deadline or proc.popen.poll() is not None:
                    raise
                time.sleep(0.1)
        return proc, f"http://127.0.0.1:{port}"

    def stop(self, proc: Proc) -> None:
        rc = proc.stop()
        if rc not in (0, -15, None):
            self.results["notes"].append(f"{proc.name} exited with {rc}; see {proc.log}")
        self.procs.remove(proc)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def rig_pids(self) -> list[int]:
        return [self.upstream.pid, self.aux.pid]

    # -- scenarios ---------------------------------------------------------------------------------

    def matrix(self, cp: Proc, cp_url: str) -> None:
        a = self.args
        targets = [
            Target("a: nginx direct", self.upstream_url, lambda: [self.upstream.pid]),
            Target("b: nginx proxy", f"http://127.0.0.1:{self.ports['nginxproxy']}/bench", lambda: [self.nginxproxy.pid]),
            Target("c: bare aiohttp", f"http://127.0.0.1:{self.ports['bare']}/bench", lambda: [self.bare.pid]),
            Target("d: credproxy", cp_url + "/bench", lambda: [cp.pid], credproxy_rig.CALLER_TOKEN),
            Target("e: llhttp floor", f"http://127.0.0.1:{self.ports['floor']}/bench", lambda: [self.floor.pid]),
        ]
        targets = [t for t in targets if not a.targets or t.name[0] in a.targets]
        print(f"matrix (one process each; {a.rounds} rounds of {a.duration / a.rounds:.0f} s per cell, round-robin):",
              flush=True)
        for load in LOADS:
            if a.loads and load not in a.loads:
                continue
            self.results["cells"] += [asdict(c) for c in interleaved(
                targets, load, duration=a.duration, rounds=a.rounds, warmup=a.warmup, rig=self.rig_pids)]

    def workers(self, one: Proc, one_url: str) -> None:
        print("credproxy: one worker (core 0) and --workers 2 (cores 0-1), round-robin:", flush=True)
        two, two_url = self.start_credproxy("x2", workers=2)
        pids2 = lambda: children(two.pid)  # noqa: E731 - the workers, not the supervisor
        targets = [Target("d: credproxy x1", one_url + "/bench", lambda: [one.pid], credproxy_rig.CALLER_TOKEN),
                   Target("d: credproxy x2", two_url + "/bench", pids2, credproxy_rig.CALLER_TOKEN)]
        for load in ("small@64", "small@10"):
            self.results["cells"] += [asdict(c) for c in interleaved(
                targets, load, duration=self.args.duration, rounds=self.args.rounds, warmup=self.args.warmup,
                rig=self.rig_pids)]
        with RssSampler(pids2) as rss:
            wrk(two_url + "/bench/v1/small", connections=64, seconds=3, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
        self.results["extra"]["workers"] = {"rss_per_worker_mib": [round(v / 1024, 1) for v in rss.peak.values()],
                                            "supervisor_rss_mib": round(rss_kib(two.pid) / 1024, 1)}
        self.stop(two)

    def big_body(self) -> None:
        print("1 GiB streamed through a fresh credproxy (leak guard redact):", flush=True)
        cp, url = self.start_credproxy("big")
        # warmed the way a service is (small calls, a 1 MiB answer), so the baseline is a serving process
        wrk(url + "/bench/v1/small", connections=10, seconds=2, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
        http_get(url + "/bench/v1/files/1m.json", credproxy_rig.CALLER_TOKEN)
        time.sleep(0.5)
        out = {}
        big = self.workdir / "www" / "v1" / "files" / "1g.bin"
        auth = f"Authorization: Bearer {credproxy_rig.CALLER_TOKEN}"
        for name, argv in (
            ("download", ["curl", "-sS", "-o", "/dev/null", "-H", auth, "-w", "%{size_download} %{speed_download}",
                          f"{url}/bench/v1/files/1g.bin"]),
            ("upload", ["curl", "-sS", "-o", "/dev/null", "-H", auth, "-T", str(big), "-X", "POST",
                        "-w", "%{size_upload} %{speed_upload}", f"{url}/sink/v1/upload"]),
        ):
            base = rss_kib(cp.pid) / 1024
            with RssSampler(lambda: [cp.pid]) as rss:
                done = subprocess.run(["taskset", "-c", LOAD_CPU, *argv], capture_output=True, text=True, timeout=600)
            size, speed = (float(x) for x in done.stdout.split())
            out[name] = {"bytes": int(size), "mib_s": round(speed / MiB, 1), "rss_before_mib": round(base, 1),
                         "rss_peak_mib": round(rss.max_mib, 1), "rss_growth_mib": round(rss.max_mib - base, 1)}
            print(f"  {name:<8} {size / MiB:7.0f} MiB at {speed / MiB:6.1f} MiB/s  rss {base:.1f} -> peak "
                  f"{rss.max_mib:.1f} MiB (growth {rss.max_mib - base:.1f} MiB)", flush=True)
        self.results["extra"]["big_body"] = out
        self.stop(cp)

    def token_expiry(self) -> None:
        """5,000 requests at once on open keep-alive connections, first while the token is valid, then just
        after it has run out (``refresh_before: 0s``: no refresh ahead of expiry, so every one of them
        waits for the refresh). The token endpoint records when it is called."""
        if not self.with_tokens:
            self.results["extra"]["token_expiry"] = {"measured": False,
                                                     "why": "proxy.tokens (token types) is not on this branch yet"}
            print("token expiry: not measured (proxy.tokens not present)", flush=True)
            return
        print(f"5,000 concurrent requests, with a valid token and when it has just run out (lifetime "
              f"{TOKEN_LIFETIME_S:.0f} s, token endpoint answers in 20 ms):", flush=True)
        cp, base = self.start_credproxy("tokens", token_session={"refresh_before": "0s"})
        url, tok = base + "/tokbench/v1/small", credproxy_rig.CALLER_TOKEN
        stats = lambda: json.loads(http_get(f"http://127.0.0.1:{self.ports['aux']}/stats"))  # noqa: E731
        http_get(url, tok)  # first use: the token is fetched now
        t0 = time.monotonic()
        expired = t0 + TOKEN_LIFETIME_S - EXPIRY_MARGIN_S
        normal_at, expiry_at = t0 + TOKEN_LIFETIME_S / 2, expired + 0.05
        done = subprocess.run(["taskset", "-c", LOAD_CPU, sys.executable, str(HERE / "burst.py"), url, tok,
                               str(BURST), str(normal_at), str(expiry_at)], capture_output=True, text=True,
                              timeout=TOKEN_LIFETIME_S + 300)
        normal, expiry = json.loads(done.stdout)
        times = stats()["token_times"]
        self.stop(cp)

        def p99(b: dict) -> float:
            lat = sorted(b["latencies"])
            return lat[int(len(lat) * 0.99)] * 1000

        late = normal["at"] + max(normal["latencies"]) > expired  # the normal burst ran into the expiry
        out = {"measured": True, "requests": BURST, "normal_p99_ms": round(p99(normal), 1),
               "expiry_p99_ms": round(p99(expiry), 1), "p99_ratio": round(p99(expiry) / p99(normal), 2),
               "token_requests_normal": sum(1 for t in times if normal["at"] <= t < expired),
               "token_requests_at_expiry": sum(1 for t in times if t >= expired - 0.5),
               "statuses_normal": normal["statuses"], "statuses_expiry": expiry["statuses"], "overlap": late}
        print(f"  p99 with a valid token {out['normal_p99_ms']:.0f} ms, just after it ran out "
              f"{out['expiry_p99_ms']:.0f} ms (x{out['p99_ratio']}); token requests for the burst at expiry: "
              f"{out['token_requests_at_expiry']}; answers {normal['statuses']} / {expiry['statuses']}", flush=True)
        self.results["extra"]["token_expiry"] = out

    def run(self) -> None:
        a = self.args
        self.results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.results["load_start"] = loadavg()
        self.results["machine"] = report.machine()
        self.results["method"] = {"duration_s": a.duration, "rounds": a.rounds, "warmup_s": a.warmup,
                                  "quiet_cores": QUIET["threshold"]}
        self.start_fixtures()
        one, one_url = self.start_credproxy("x1")
        self.matrix(one, one_url)
        if not a.skip_workers:
            self.workers(one, one_url)
        self.stop(one)
        if not a.skip_big:
            self.big_body()
        if not a.skip_tokens:
            self.token_expiry()
        self.results["load_end"] = loadavg()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=15, help="seconds of measurement per cell (default 15)")
    p.add_argument("--rounds", type=int, default=3, help="rounds each cell's time is split into (default 3)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of warm-up before a cell's first round")
    p.add_argument("--skip-big", action="store_true", help="skip the 1 GiB streamed bodies")
    p.add_argument("--skip-workers", action="store_true", help="skip --workers 2")
    p.add_argument("--skip-tokens", action="store_true", help="skip the token expiry scenario")
    p.add_argument("--targets", default="", help="only these targets, e.g. cde (default: abcde)")
    p.add_argument("--loads", type=lambda v: v.split(","), default=None,
                   help="only these loads, comma-separated: " + ",".join(LOADS))
    p.add_argument("--quiet", type=float, default=QUIET["threshold"],
                   help="measure a round again when other processes took more than this many cores during it")
    p.add_argument("--retries", type=int, default=QUIET["retries"], help="at most this many times (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, audit logs)")
    p.add_argument("--publish", action="store_true", help="also refresh docs/benchmark.png and docs/benchmark.md")
    args = p.parse_args(argv)
    QUIET.update(threshold=args.quiet, retries=args.retries)
    if (os.cpu_count() or 1) < 2:
        print("needs at least 2 cores for the documented layout", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(bench.results, indent=2))
    md = report.markdown(bench.results)
    (out / "latest.md").write_text(md)
    report.chart(bench.results, out / "latest.png")
    print()
    print(report.summary(bench.results))
    print(f"\nwrote {out / 'latest.md'}, {out / 'latest.json'}, {out / 'latest.png'}")
    if args.publish:
        report.publish(md, out / "latest.png", ROOT / "docs")
        print(f"published to {ROOT / 'docs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
