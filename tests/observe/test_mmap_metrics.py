"""``serve --workers``: the request path's counters and histograms write their values straight into
prometheus_client's multiprocess files (``proxy.observe.mmap_metrics``). The files must hold what
prometheus_client's own updates would have written, and the supervisor's merge must show the same."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict

from proxy.admin.supervisor import _Merged, merge_metrics

WORKER = textwrap.dedent("""
    import sys
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from proxy.observe import metrics, mmap_metrics
    fast = sys.argv[1] == "fast"
    r = CollectorRegistry()
    if fast:
        requests = mmap_metrics.mmap_counter("t_requests_total", "Requests", ["credential", "code"], registry=r)
        duration = mmap_metrics.mmap_histogram("t_duration_seconds", "Duration", ["credential"], registry=r,
                                               buckets=metrics.LATENCY_BUCKETS)
    else:
        requests = Counter("t_requests_total", "Requests", ["credential", "code"], registry=r)
        duration = Histogram("t_duration_seconds", "Duration", ["credential"], registry=r,
                             buckets=metrics.LATENCY_BUCKETS)
    bound = requests.labels("a", "200"), duration.labels("a")  # bound first, as a credential's are at load
    if fast:
        assert isinstance(bound[0], mmap_metrics.CounterSlot) and isinstance(bound[1], mmap_metrics.HistogramSlot)
    other = Counter("t_other_total", "Another counter in the same file, its keys added in between", ["n"], registry=r)
    for i in range(300):  # enough new keys in between that the file grows (and is remapped) while bound
        requests.labels("a", "200").inc()
        requests.labels("b", str(200 + i % 3)).inc(2.5)
        for n in range(4):
            other.labels(f"{i}-{n}").inc()
        for seconds in (0.0005, 0.001, 0.02, 0.3, 7.0, 100.0, i / 1000):
            duration.labels("a" if i % 2 else "b").observe(seconds)
    try:
        requests.labels("a", "200").inc(-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a counter went down")
    assert r.get_sample_value("t_requests_total", {"credential": "a", "code": "200"}) == 300
    assert r.get_sample_value("t_duration_seconds_count", {"credential": "a"}) == 150 * 7
""")


def run(directory, mode: str) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    subprocess.run([sys.executable, "-c", WORKER, mode], env=env, check=True)


def values(directory) -> dict[str, list]:
    out = {}
    for name in sorted(os.listdir(directory)):
        typ = name.rsplit("_", 1)[0]
        out[typ] = list(MmapedDict.read_all_values_from_file(os.path.join(directory, name)))
    return out


def render(directory) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    families = sorted(merge_metrics({0: str(directory)}), key=lambda f: f.name)  # files are read in directory order
    registry.register(_Merged(families))
    return generate_latest(registry)


def test_the_files_and_the_merge_are_what_prometheus_client_would_have_written(tmp_path):
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    run(fast, "fast")
    run(slow, "slow")
    assert values(fast) == values(slow)
    [counters] = [n for n in os.listdir(fast) if n.startswith("counter_")]
    assert os.path.getsize(fast / counters) > 1 << 16  # grown (remapped) while the first children were bound
    assert render(fast) == render(slow)
    assert b't_requests_total{code="200",credential="a",worker="0"} 300.0' in render(fast)
