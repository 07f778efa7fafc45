"""Probe a credential the way a caller's request would use it, without a caller.

Obtains the material (``source.grant``: a token fetch for token types, a secret
read for static ones) and, when the credential sets ``probe: {method, path,
expect_status}``, sends that call upstream through the pipeline's own steps
(``_outbound`` builds and injects, the credential's client sends, ``_record`` audits and
counts it as caller ``admin-probe``), so a probe exercises exactly the request
path callers get. The report says what happened and never carries material:
the upstream body is not read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy import pipeline
from proxy.observe.request_id import new_request_id
from proxy.server.upload import RequestBody
from proxy.credential import Credential
from proxy.errors import ProxyError
from proxy.routing import Route, canonical_path, split_target
from proxy.lifecycle.state import State

PROBE_CALLER = "admin-probe"


@dataclass(frozen=True)
class ProbeRequest:
    """The parts of a caller request that the pipeline steps read."""

    method: str
    target: str
    content_length: int | None = None


def _token(cred: Credential) -> dict:
    st = cred.source.state()
    return {"state": st.get("state"), "expires_in_s": st.get("expires_in_s"), "last_refresh": st.get("last_refresh")}


async def probe(state: State, cred: Credential, *, clock: Callable[[], float] = time.monotonic) -> dict:
    spec = cred.cfg.probe
    report: dict = {"name": cred.name, "ok": False, "disabled": cred.disabled, "token": None, "call": None,
                    "error": None}
    trace = pipeline.Trace(new_request_id(), time.monotonic(), credential=cred.name, caller=PROBE_CALLER)
    report["request_id"] = trace.request_id
    # A token-only probe is audited too (method PROBE): it read secret material.
    request = ProbeRequest(spec.method.upper(), spec.path) if spec else ProbeRequest("PROBE", "/")
    route = Route(cred.name, "/", "")
    stage = "config"
    try:
        if spec is not None:
            path, query = split_target(spec.path)
            route = Route(cred.name, canonical_path(path), query)
        stage = "token"
        started = clock()
        try:
            grant = await cred.source.grant("")
        finally:
            report["token"] = dict(_token(cred), obtain_ms=round((clock() - started) * 1000, 3))
        if spec is None:
            trace.status, trace.outcome, trace.reason = 200, "allowed", "probe_token_only"
            report["ok"] = True
            return report
        stage = "upstream"
        body = RequestBody(None)
        out = pipeline._outbound(request, cred, grant, route, CIMultiDict(), body, trace.request_id)
        started = clock()
        upstream = await cred.client.send(out)
        latency = clock() - started
        state.metrics.upstream_duration.labels(cred.name).observe(latency)
        upstream.release()  # the body is not read: nothing the upstream sent reaches the report
        ok = upstream.status == spec.expect_status
        trace.status, trace.outcome = upstream.status, "allowed" if ok else "error"
        trace.reason = "probe" if ok else "probe_unexpected_status"
        report["call"] = {"method": request.method, "path": route.path, "status": upstream.status,
                          "expect_status": spec.expect_status, "latency_ms": round(latency * 1000, 3)}
        report["ok"] = ok
        return report
    except ProxyError as exc:
        trace.status, trace.outcome, trace.reason = exc.status, "error", exc.reason
        report["error"] = {"stage": stage, "code": exc.code, "message": exc.message}
        return report
    finally:
        pipeline._record(state, request, route, trace, None)
