"""``serve --workers`` metrics: each worker writes prometheus_client's multiprocess files, the
supervisor merges them per worker. Real worker-like processes write the files here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, generate_latest

from proxy.admin.supervisor import _Merged, merge_metrics
from tests.ops_support import metric

WORKER = textwrap.dedent("""
    import sys
    from proxy.observe.metrics import Metrics
    m = Metrics()
    for _ in range(int(sys.argv[1])):
        m.requests.labels("demo", "billing", "200").inc()
    m.duration.labels("demo").observe(0.02)
    m.observe_credentials([{"name": "demo", "state": "fresh", "expires_in_s": 60.0},
                           {"name": "gone", "state": "fresh", "expires_in_s": 30.0}])
    m.observe_credentials([{"name": "demo", "state": "fresh", "expires_in_s": 60.0}])  # a reload removed "gone"
    m.inflight.set_function(lambda: 1)  # one request in flight, stored when the worker renders
    m.render()
""")


def run_worker(directory, requests: int) -> int:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(requests)], env=env, check=True)
    return proc.returncode


def render(directories) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge_metrics(directories)))
    return generate_latest(registry).decode()


def test_each_workers_counters_and_gauges_carry_its_label(tmp_path):
    dirs = {0: tmp_path / "w0", 1: tmp_path / "w1"}
    for d in dirs.values():
        d.mkdir()
    run_worker(dirs[0], 3)
    run_worker(dirs[1], 5)
    text = render({i: str(d) for i, d in dirs.items()})
    assert metric(text, "credproxy_requests_total", credential="demo", code="200", worker="0") == 3
    assert metric(text, "credproxy_requests_total", credential="demo", code="200", worker="1") == 5
    assert metric(text, "credproxy_request_duration_seconds_count", credential="demo", worker="1") == 1
    assert metric(text, "credproxy_token_expires_in_seconds", credential="demo", worker="0") == 60.0
    # a series the worker dropped (its credential went in a reload) is not shown
    assert "gone" not in text and "NaN" not in text


def test_a_restarted_workers_counters_carry_on_and_the_dead_ones_gauges_go(tmp_path):
    from prometheus_client.multiprocess import mark_process_dead

    d = tmp_path / "w0"
    d.mkdir()
    run_worker(d, 3)
    for name in os.listdir(d):  # what the supervisor does when a worker exits
        if name.startswith("gauge_live"):
            mark_process_dead(int(name.rsplit("_", 1)[1].split(".")[0]), str(d))
    run_worker(d, 2)
    text = render({0: str(d)})
    assert metric(text, "credproxy_requests_total", credential="demo", code="200", worker="0") == 5
    assert metric(text, "credproxy_requests_in_flight", worker="0") == 1  # the live one only
