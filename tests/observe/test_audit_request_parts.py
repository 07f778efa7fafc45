"""``request_line`` keeps the text around a request's repeating values (``_PARTS``): a line made from the kept
text is byte for byte the line of its event, as one made afresh is."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from proxy.observe import audit
from proxy.observe.audit import AuditEvent, AuditLog

FEW = st.sampled_from(["billing", "bench", "GET", "allowed", "denied", '"', "\\u2028", "é", ""])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), FEW), st.one_of(st.none(), FEW), FEW, FEW, st.text(max_size=8), FEW,
                          FEW, st.sampled_from([200, 403, 502, 0]), st.booleans(),
                          st.floats(0, 4e9), st.floats(0, 1e5)), min_size=1, max_size=6),
       st.booleans())
def test_a_line_from_kept_parts_is_the_line_of_its_event(tmp_path_factory, requests, small):
    if small:
        audit._PARTS.clear()
    for caller, client_ip, credential, method, path, outcome, reason, status, flag, ts, duration in requests:
        log = AuditLog(str(tmp_path_factory.mktemp("parts") / "audit.log"), clock=lambda: ts)
        for _ in range(2):  # the second from what the first kept
            log.write_request("r1", caller, client_ip, credential, method, path, status, outcome, reason, duration,
                              flag)
        log.write(AuditEvent(request_id="r1", caller=caller, client_ip=client_ip, credential=credential,
                             method=method, path=path, status=status, outcome=outcome, reason=reason,
                             duration_ms=round(duration, 3), token_refreshed=flag))
        assert log._pending[0] == log._pending[1] == log._pending[2]


def test_the_kept_parts_are_bounded(monkeypatch):
    monkeypatch.setattr(audit, "_PARTS_MAX", 3)
    audit._PARTS.clear()
    for n in range(10):
        audit.request_line(1.0, "r", f"c{n}", None, "bench", "GET", "/", 200, "allowed", "allowed", 0.5, False)
        assert len(audit._PARTS) <= 3
