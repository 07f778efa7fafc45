"""CPU per request of credproxy from two or more checkouts, side by side (A/B):

    python tests/bench/ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--secs 4] [--conn 10] [--path /v1/small]
    python tests/bench/ab.py CHECKOUT --prof      # cProfile: calls and own time per request, by function

Starts the nginx upstream once, then one credproxy per checkout (its own PYTHONPATH) on the benchmark's
config, and measures them in alternating rounds, so a slow spell of the machine hits them alike. ``--floor``
adds the llhttp floor. cProfile times are inflated (~2x); its call counts are exact.
"""
import argparse
import os
import pstats
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
import credproxy_rig  # noqa: E402
from rig import wrk, cpu_seconds, wait_port, free_port  # noqa: E402
from run import Bench, LOAD_CPU, SUT_CPU  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--prof", action="store_true", help="cProfile each tree; per-request table")
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--conn", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--path", default="/v1/small")
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--top", type=int, default=60)
    a = ap.parse_args()
    b = Bench(argparse.Namespace(skip_big=True, keep=False))
    try:
        b.start_fixtures()
        procs = []
        served = {}
        for i, tree in enumerate(a.trees):
            port, admin = free_port(), free_port()
            cfg = credproxy_rig.config(b.workdir, f"t{i}", port=port, admin_port=admin, upstream=b.upstream_url,
                                       aux=f"http://127.0.0.1:{b.ports['aux']}", with_tokens=False)
            argv = [sys.executable] + (["-m", "cProfile", "-o", f"/tmp/prof-{os.getpid()}-{i}.out"] if a.prof else []) + ["-m", "proxy", "serve", "-c", str(cfg)]
            p = b._start(f"cp{i}", argv, SUT_CPU, b.logdir, env=dict(os.environ, PYTHONPATH=tree), cwd=str(b.workdir))
            wait_port(port, proc=p.popen)
            time.sleep(1.0)
            w0 = wrk(f"http://127.0.0.1:{port}/bench{a.path}", connections=a.conn, seconds=1, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
            served[tree] = w0.requests
            procs.append((tree, p, port))
        if a.floor:
            procs.append(("floor", b.floor, b.ports["floor"]))
        res = {t: [] for t, _, _ in procs}
        for r in range(a.rounds):
            for tree, p, port in procs:
                c0 = cpu_seconds(p.pid)
                w = wrk(f"http://127.0.0.1:{port}/bench{a.path}", connections=a.conn, seconds=a.secs, cpus=LOAD_CPU, token=credproxy_rig.CALLER_TOKEN)
                c1 = cpu_seconds(p.pid)
                served[tree] = served.get(tree, 0) + w.requests
                res[tree].append(((c1 - c0) / w.requests * 1e6, w.rps, w.errors, w.raw.get("status_errors")))
        for tree, rows in res.items():
            print(tree, " ".join(f"{c:.1f}us/{rps:.0f}rps/e{e}" for c, rps, e, _ in rows), "median cpu", sorted(r[0] for r in rows)[len(rows)//2])
        if a.prof:
            for i, (tree, p, port) in enumerate(procs):
                if tree == "floor": continue
                p.popen.send_signal(signal.SIGINT); p.popen.wait(30)
                st = pstats.Stats(f"/tmp/prof-{os.getpid()}-{i}.out")
                N = served[tree]
                rows = []
                for (f, l, fn), (cc, nc, tt, ct, callers) in st.stats.items():
                    if nc >= N * 0.5:
                        rows.append((nc / N, tt / N * 1e6, ct / N * 1e6, f.replace(tree + "/", "")[-45:], l, fn))
                rows.sort(key=lambda r: -r[1])
                print(f"== {tree}: {N} requests; per request: calls, own us, cumulative us (cProfile, inflated ~2x)")
                for r in rows[:a.top]:
                    print("%5.1f calls  %6.2f tt  %7.2f ct  %s:%d %s" % r)
                print("python+builtin calls per request ~ %.0f, own time per request ~ %.1f us (profiled)" % (
                    sum(r[0] for r in rows), sum(r[1] for r in rows)))
    finally:
        for p in b.procs:
            try: p.stop()
            except Exception: pass


if __name__ == "__main__":
    main()
