"""``CredentialMetrics.record`` moves loop_metrics' plain children itself (one process): the same numbers as
their own ``inc`` and ``observe``."""

from __future__ import annotations

from hypothesis import given, strategies as st

from proxy.observe.metrics import MULTIPROCESS, CredentialMetrics, Metrics


def _values(metrics: Metrics) -> dict:
    out = {}
    for family in metrics.registry.collect():
        if family.name in ("credproxy_requests", "credproxy_request_duration_seconds"):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@given(st.lists(st.tuples(st.sampled_from(["billing", "-", "anonymous"]), st.sampled_from([200, 403, 502]),
                          st.one_of(st.floats(0, 40, allow_nan=False), st.sampled_from([0.0, 0.001, 0.0025, 30.0]))),
                max_size=30))
def test_record_moves_the_children_as_their_own_updates_do(requests):
    fast, exact = Metrics(), Metrics()
    bound_fast, bound_exact = CredentialMetrics(fast, "bench"), CredentialMetrics(exact, "bench")
    assert bound_fast._plain is not MULTIPROCESS
    bound_exact._plain = False
    for caller, status, seconds in requests:
        bound_fast.record(caller, status, seconds)
        bound_exact.record(caller, status, seconds)
    assert _values(fast) == _values(exact)
