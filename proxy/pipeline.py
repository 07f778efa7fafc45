"""The request path, top to bottom.

request shape -> route -> authenticate -> source lock -> policy -> rate limit
-> material -> inject -> upstream -> (expired? refresh once, replay once)
-> relay with leak guard -> audit -> misuse alerts.

Every step that can refuse raises a ``ProxyError``; ``errors.to_response`` is the
one place that turns it into a status and fixed message. The audit line is
written by ``Exchange.finish`` for allowed, denied and failed requests alike.

Two ways through, one set of steps. ``handle`` runs the checks (``_admit``), then:

- the usual request — a plain head without a body, its material at hand, an
  injector that sets one header, an idle pooled upstream connection — is sent
  at once (``_send_now``) and its answer handled in the upstream connection's
  callback (``_arrived``): a small answer that arrived whole is relayed there
  and then (``relay_raw``, or ``prepare`` + ``relay_now``), with no task or
  coroutine for the request at all;
- anything else, and anything the callback finds that needs waiting (a refusal
  to answer, a stale pooled connection to retry, an expired credential, a
  large, streamed or encoded answer, a caller that is behind), goes on in a
  task: ``_run`` -> ``forward`` -> ``relay``'s strategies, from where the
  callback left it.

The fast steps are the exact ones' own functions or are held to them by
property tests (``tests/upstream/test_plain_request.py``, ``test_relay_raw.py``)
and end-to-end differential tests (``tests/test_pipeline_callbacks.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy import errors

from proxy.server import request_shape as guards
from proxy.observe.audit import AuditEvent, ForwardEvent, strip_query_values
from proxy.observe.metrics import CredentialMetrics
from proxy.observe.request_id import new_request_id
from proxy.server.request import Request
from proxy.server.response import ResponseWriter
from proxy.server.upload import NO_BODY, RequestBody, read_body
from proxy.callers import CALLER_HEADERS, Caller
from proxy.credential import Credential
from proxy.grant import Grant
from proxy.errors import BadAnswer, CredentialUnavailable, Forbidden, ProxyError
from proxy.upstream.outbound import Outbound
from proxy.upstream.relay import Prepared, deliver, drained, prepare, read_upto, relay_now, relay_raw
from proxy.routing import Route, Via, route_forward
from proxy.host_map import pick as pick_credential
from proxy.lifecycle.state import State, StateHolder
from proxy.upstream import plain_request
from proxy.upstream.answer import UpstreamResponse
from proxy.upstream.client import HOP_BY_HOP, IDEMPOTENT, head_failure, strip_hop_by_hop

log = logging.getLogger("credproxy.request")

# Never forwarded from callers: the proxy sets these itself, or they steer the proxy.
_CALLER_DROP = ("Host", "X-Request-Id", "Content-Length", "Expect", "Forwarded", "X-Forwarded-For",
                "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP")
PEEK_MAX = 64 * 1024


@functools.lru_cache(maxsize=64)  # one entry per injector kind: ``removes`` comes from config
def _never_forwarded(removes: tuple[str, ...]) -> frozenset[str]:
    """Lower-case names dropped from every caller's headers: hop-by-hop ones, caller credentials, headers the
    proxy sets or that steer it, spoofable client-address headers, and those the credential's injector owns."""
    return HOP_BY_HOP | {n.lower() for n in (*CALLER_HEADERS, *_CALLER_DROP, *guards.SPOOFABLE, *removes)}


@functools.lru_cache(maxsize=64)
def _never_forwarded_raw(removes: tuple[str, ...]) -> frozenset[bytes]:
    """``_never_forwarded`` as bytes, for ``plain_request.render`` (one cached call per request, not two)."""
    return plain_request.as_bytes(_never_forwarded(removes))


@dataclass(slots=True)
class Trace:
    """What the audit line will say about this request; filled in as the steps run."""

    request_id: str
    started: float
    credential: str | None = None
    caller: str | None = None
    status: int = 0
    outcome: str = "error"
    reason: str = ""
    token_refreshed: bool = False


class Exchange(Trace):
    """One request in flight: its trace (what the audit line will say), and its place among the requests in
    flight on its state (``StateHolder.enter``), which it leaves when its audit line is written. A drain
    deadline ``cancel``s it: its task, or (answered in callbacks) its connections."""

    __slots__ = ("request", "response", "holder", "state", "task", "route", "cred", "who", "grant", "answer",
                 "sent_at", "_done")

    def __init__(self, request: Request, response: ResponseWriter, holder: StateHolder) -> None:
        # ``Trace.__init__(self, new_request_id(), time.monotonic())``, its defaults stored here without the call
        # (tests/test_pipeline_exchange.py holds the two to the same values).
        self.request_id, self.started = new_request_id(), time.monotonic()
        self.credential = self.caller = None
        self.status, self.outcome, self.reason, self.token_refreshed = 0, "error", "", False
        self.request, self.response, self.holder = request, response, holder
        self.task: asyncio.Task | None = None
        self.route: Route | None = None
        self.cred: Credential | None = None  # once looked up (``_admit``): the audit line's metrics go on it
        self.answer: UpstreamResponse | None = None
        self._done = False
        self.state: State = holder.enter(self)

    __hash__ = object.__hash__  # one request is one request (a set of those in flight holds it)
    __eq__ = object.__eq__

    def done(self) -> bool:
        return self._done

    def cancel(self) -> asyncio.Task | None:
        """Stop the request (the drain deadline passed); returns its task, if it has one, to wait for."""
        if self.task is not None:
            self.task.cancel()
            return self.task
        # Waiting in callbacks for its answer's head: both connections are cut and the request ends here, as a
        # cancelled task's does (its audit line as it stands). The head's failure the cut brings is not answered
        # (``arrived``): taken for a stale pooled connection, it would send the request again.
        self.response.abort()
        if self.answer is not None:
            self.answer.close()
        try:
            self.finish()
        except Exception as exc:  # noqa: BLE001 - the drain goes on to cancel the other requests
            log.error("unhandled error in the request path", exc_info=exc,
                      extra={"request_id": self.request_id})
        return None

    def finish(self) -> None:
        """The audit line, metrics and alerts; then the request is no longer in flight."""
        if self._done:
            return
        self._done = True
        try:
            request = self.request
            _record(self.state, request, self.route, self, request.peer_ip, request.context.via, self.cred)
        finally:
            self.holder.leave(self.state, self)

    def arrived(self, answer: UpstreamResponse) -> None:
        """The answer's head to a request sent by ``_send_now`` is in, or failed: called back by the upstream
        connection. Continues in callbacks to the end of a small answer that arrived whole; anything else
        continues in a task, as ``forward`` (a failed head as the error it is, a stale pooled connection
        retried once, an expired credential refreshed, a large or encoded answer streamed)."""
        if self._done:
            return  # cancelled (``cancel``): the request has ended
        try:
            _arrived(self, answer)
        except Exception as exc:  # noqa: BLE001 - a bug: the caller's answer is cut, never left hanging
            log.error("unhandled error in the request path", exc_info=exc,
                      extra={"request_id": self.request_id})
            self.response.abort()
            self.finish()
            self.response.complete()


def handle(request: Request, response: ResponseWriter, holder: StateHolder) -> Awaitable[None] | None:
    """Answer one caller request through ``response``, on the state current now. ``request.context`` is the
    listener's: its routing function (main, dedicated) or the forward proxy's ``Via`` (the CONNECT target and
    its caller). Returns None when the request goes on in callbacks (``_send_now``: a plain body-less request
    whose material is at hand, on an idle pooled connection — the usual one), else the coroutine that answers
    it (``_run``)."""
    ex = Exchange(request, response, holder)
    try:
        cred, caller = _admit(ex)
    except ProxyError as exc:
        return _run(ex, refusal=exc)
    except BaseException:
        ex.finish()
        raise
    try:
        if request.plain_head and request.body is None and _send_now(ex, cred, caller):
            return None
    except BaseException:
        ex.finish()
        raise
    return _run(ex, cred, caller)


def _admit(ex: Exchange) -> tuple[Credential, Caller]:
    """The checks before any material is touched: audit, request shape, route, caller, source address,
    policy, the credential's state, the rate limit. Raises ``ProxyError``."""
    request, state, trace = ex.request, ex.state, ex
    ip = request.peer_ip
    via: Via | None = request.context.via
    audit = state.audit
    if audit.failure is not None:  # healthy, nothing to check (nearly always): ``admit`` is the rule
        audit.admit()  # SPEC §11: with audit.on_failure refuse, nothing is served while its line cannot be written
    guards.check_request(request)
    if via is not None:
        caller, route = _forward_route(request, state, via, trace)
        ex.route = route
    else:
        route = ex.route = request.context.route(request.target)
        trace.credential = route.credential
        caller = state.authenticator.authenticate(request.lookup, ip, request.peercert)
    trace.caller = caller.name
    if state.authenticator.sources_locked:
        state.authenticator.check_source(caller, ip)
    cred = ex.cred = state.credentials.get(route.credential)
    if cred is None:
        raise Forbidden("unknown credential", reason="unknown_credential")
    if via is not None and via.connect is None and not cred.cfg.allow_insecure_upstream:
        raise Forbidden("plain http:// needs allow_insecure_upstream", reason="insecure_refused")
    if not state.policy.allowed(caller.name, cred.name, request.method, route.path, ip):
        raise Forbidden("no allow rule matches", reason="policy")
    if cred.disabled:
        raise CredentialUnavailable("credential disabled by an operator", reason="disabled", retry_after=30)
    if state.limiter is not None:
        state.limiter.acquire(caller.name, cred.name)
    cred.touch()
    return cred, caller


def _send_now(ex: Exchange, cred: Credential, caller: Caller) -> bool:
    """Send a plain body-less request without a coroutine, when everything it needs is at hand: the material
    (``AuthSource.ready``), an injector that sets one header, a fixed upstream target and an idle pooled
    connection. The head is rendered from the caller's bytes (``plain_request``). False: ``forward`` sends it."""
    if cred.needs_body_peek:
        return False
    grant = cred.source.ready(cred.principal(caller.name))
    if grant is None:
        return False
    injected = cred.injector.header_line(grant.values)
    if injected is None:
        return False
    target = cred.client.target(grant.upstream or cred.base)
    if target is None:
        return False
    request, route = ex.request, ex.route
    head = plain_request.render(request.method, target, route.path, route.query, request.raw_headers,
                                _never_forwarded_raw(cred.injector.removes),
                                ex.request_id, cred.leak_guard != "off", injected)
    if head is None:
        return False
    ex.cred, ex.who, ex.grant, ex.sent_at = cred, caller, grant, time.monotonic()
    ex.answer = cred.client.send_now(target, request.method, head, ex.arrived)
    return ex.answer is not None


def _arrived(ex: Exchange, answer: UpstreamResponse) -> None:
    """``Exchange.arrived``: what ``forward`` and ``relay`` do with an answer, for the one that needs no waiting."""
    response, cred, trace = ex.response, ex.cred, ex
    failure = answer.failure
    if failure is not None:
        if isinstance(failure, BadAnswer) and failure.stale and ex.request.method in IDEMPOTENT:
            # The pooled connection had been closed by the upstream: once more, on another (as client.send does).
            response.resume(_run(ex, cred, ex.who, stale_retry=False))
        else:
            response.resume(_run(ex, refusal=head_failure(failure)))
        return
    bound = cred.metrics or CredentialMetrics(ex.state.metrics, cred.name)
    bound.upstream_duration.observe(time.monotonic() - ex.sent_at)
    sent = (ex.grant, answer)
    if answer.status in cred.expired_statuses:
        response.resume(_run(ex, cred, ex.who, sent=sent))
        return
    guard = ex.grant.guard
    trace.status, trace.outcome = answer.status, "allowed"  # relay downgrades to error if it aborts
    behind = relay_raw(ex.request, response, answer, guard, cred.leak_guard, trace)
    if behind is None:  # not the usual answer: through the exact path, as relay does
        try:
            ready = prepare(ex.request, answer, b"", guard, cred.leak_guard, trace, bound.leaks)
            if not ready.at_hand:
                response.resume(_run(ex, cred, ex.who, sent=sent, ready=ready))
                return
            behind = relay_now(response, answer, ready, guard, cred.leak_guard, trace, bound.leaks)
        except ProxyError as exc:  # the leak guard's block, before anything was sent
            response.resume(_run(ex, refusal=exc))
            return
    if behind:  # the caller is not keeping up: the next request waits until it has taken this answer
        response.resume(_drained(ex))
        return
    ex.finish()
    response.complete()


async def _drained(ex: Exchange) -> None:
    ex.task = asyncio.current_task()
    try:
        await drained(ex.response, ex)
    finally:
        ex.finish()


async def _run(ex: Exchange, cred: Credential | None = None, caller: Caller | None = None, *,
               refusal: ProxyError | None = None, sent: tuple[Grant, UpstreamResponse] | None = None,
               ready: Prepared | None = None, stale_retry: bool = True) -> None:
    """The request in a task of its own: read its body, ``forward`` it (``sent``: the answer to the request
    ``_send_now`` sent, and its grant; ``ready``: that answer ``prepare``d), and answer any ``ProxyError``
    (``refusal``: one raised before) with its status. The audit line is written however it ends."""
    ex.task = asyncio.current_task()
    request, response, state, trace = ex.request, ex.response, ex.state, ex
    body: RequestBody | None = None
    try:
        if refusal is not None:
            raise refusal
        if request.body is None:
            body = NO_BODY  # nothing to read: what read_body returns, without a coroutine for it
        else:
            limits = state.config.server.limits
            body = await read_body(request, max_body=limits.max_body, buffer_max=cred.cfg.session.replay_max_body,
                                   body_timeout=limits.body_timeout)
        await forward(request, response, state, cred, caller.name, ex.route, body, trace, sent=sent, ready=ready,
                      stale_retry=stale_retry)
    except ProxyError as exc:
        if body is not None and body.fault is not None:
            exc = body.fault  # the caller overfilled or stalled its streamed upload: not the upstream's 502/504
        trace.status, trace.reason = exc.status, exc.reason
        trace.outcome = "denied" if exc.status in (401, 403, 407, 429) else "error"
        if log.isEnabledFor(logging.DEBUG):  # the audit line says what matters; the detail is for debugging
            log.debug("request refused", extra={"request_id": trace.request_id, "status": exc.status,
                                                "reason": exc.reason, "detail": exc.detail})
        await response.answer(errors.to_response(exc, trace.request_id))
    finally:
        if body is not None and body.fault is not None and trace.outcome == "error":
            trace.reason = body.fault.reason  # the answer had started, so it was aborted; the cause was the upload
        ex.finish()


def _forward_route(request: Request, state: State, via: Via, trace: Trace) -> tuple[Caller, Route]:
    """Forward proxy: the caller of the tunnel (or of this absolute-form request), then the credential the
    host names. The caller comes first so an unauthenticated one learns nothing about which hosts exist."""
    caller = via.caller
    if caller is None:
        try:
            caller = state.authenticator.authenticate_proxy(request.headers.get("Proxy-Authorization"))
        except errors.Unauthenticated as exc:
            raise errors.ProxyAuthRequired(exc.detail, reason=exc.reason) from None
    trace.caller = caller.name
    creds = state.credentials

    def injected(name: str) -> tuple[str, ...]:
        return creds[name].injector.removes if name in creds else ()

    route = route_forward(request.target, request.headers.getall("Host", []), via, state.forward_hosts,
                          lambda candidates: pick_credential(candidates, request.headers, injected))
    trace.credential = route.credential
    return caller, route


async def forward(request: Request, response: ResponseWriter, state: State, cred: Credential, caller: str,
                  route: Route, body: RequestBody, trace: Trace, *, sent: tuple[Grant, UpstreamResponse] | None = None,
                  ready: Prepared | None = None, stale_retry: bool = True) -> None:
    """Send (``sent``: the first attempt was sent already, and this is its grant and answer), refresh and
    replay once if the upstream says the material expired, relay the answer."""
    principal = cred.principal(caller)
    source = cred.source
    drop = _never_forwarded(cred.injector.removes)
    bound = cred.metrics or CredentialMetrics(state.metrics, cred.name)
    for attempt in (1, 2):
        if sent is not None:
            (grant, upstream), sent = sent, None
        else:
            grant = source.ready(principal) or await source.grant(principal)  # awaited only when it needs I/O
            # The one copy of the caller's headers (per attempt: the injector changes it).
            headers = strip_hop_by_hop(request.headers, drop)
            out = _outbound(request, cred, grant, route, headers, body, trace.request_id)
            started = time.monotonic()
            # An upload over max_body breaks this off; _run answers body.fault (413) rather than the upstream error.
            upstream = await cred.client.send(out, stale_retry=stale_retry)
            body.answered(upstream)  # a streamed upload the caller breaks off from here on ends this answer too
            bound.upstream_duration.observe(time.monotonic() - started)
        head = b""
        if attempt == 1 and upstream.status in cred.expired_statuses:
            if cred.needs_body_peek:
                head = await _peek(upstream)
            if cred.is_expired(upstream.status, head):
                trace.token_refreshed = True
                renewed = await source.expired(principal, grant)
                if renewed and body.replayable:
                    upstream.release()
                    log.info("upstream rejected the credential; replaying once",
                             extra={"request_id": trace.request_id, "credential": cred.name})
                    continue
        trace.status, trace.outcome = upstream.status, "allowed"  # relay downgrades to error if it aborts
        if ready is None:
            ready = prepare(request, upstream, head, grant.guard, cred.leak_guard, trace, bound.leaks)
        await deliver(response, upstream, head, ready, grant.guard, cred.leak_guard, trace, bound.leaks,
                      budget=state.answer_budget)
        return
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns on attempt 2


def _outbound(request: Request, cred: Credential, grant: Grant, route: Route, headers: CIMultiDict[str],
              body: RequestBody, request_id: str) -> Outbound:
    """``headers`` becomes the outbound request's own (the injector changes it)."""
    out = Outbound(request.method, grant.upstream or cred.base, route.path, route.query, headers, body.payload())
    if request.content_length is not None and not body.replayable:
        out.headers["Content-Length"] = str(request.content_length)
    out.headers["X-Request-Id"] = request_id
    if cred.leak_guard != "off":  # a compressed answer could not be scanned: ask for one the guard can read
        out.headers["Accept-Encoding"] = "identity"
    cred.injector.inject(out, grant.values)
    return out


async def _peek(upstream: UpstreamResponse) -> bytes:
    """Read the start of the answer to look for ``body_contains``; relay sends it on first."""
    return await read_upto(upstream, b"", PEEK_MAX)


def _record(state: State, request: Request, route: Route | None, trace: Trace, ip,
            via: Via | None = None, cred: Credential | None = None) -> None:
    """``cred``: the credential the trace names, when the caller has it at hand (else looked up by name)."""
    duration = time.monotonic() - trace.started
    if route is not None:
        path, query, credential = route.path, route.query, trace.credential
    else:
        path, _, query = request.target.partition("?")
        path, credential = path[:512], None
    if query:
        path += "?" + strip_query_values(query)
    request_id, caller, status, outcome = trace.request_id, trace.caller, trace.status, trace.outcome
    method = request.method
    client_ip = str(ip) if ip else None
    if via is None:
        state.audit.write_request(request_id, caller, client_ip, credential, method, path, status, outcome,
                                  trace.reason or outcome, duration * 1000, trace.token_refreshed)
    else:
        state.audit.write(ForwardEvent(
            request_id, caller, client_ip, credential, method, path, status, outcome, trace.reason or outcome,
            round(duration * 1000, 3), trace.token_refreshed, listener=via.listener,
            connect_host=_host_port(via.connect)))
        state.metrics.forward_requests.labels(credential if route else "-", str(status)).inc()
    if state.alerts is not None:
        state.alerts.observe_request(request_id, caller, client_ip, credential, method, path, status, outcome)
    if cred is None and credential:
        cred = state.credentials.get(credential)
    caller_label = caller or "-"
    if cred is not None and cred.metrics is not None:
        cred.metrics.record(caller_label, status, duration)
    else:
        state.metrics.child(state.metrics.requests, "-", caller_label, str(status)).inc()
        state.metrics.child(state.metrics.duration, "-").observe(duration)


def _host_port(hp: tuple[str, int] | None) -> str | None:
    return f"{hp[0]}:{hp[1]}" if hp else None


def record_refused(state: State, ip, exc: ProxyError, request_id: str) -> None:
    """Audit a request the HTTP parser refused before any handler ran: nothing about it is trustworthy."""
    state.audit.write(AuditEvent.refused(request_id, str(ip) if ip else None, exc.status, exc.reason))
    state.metrics.child(state.metrics.requests, "-", "-", str(exc.status)).inc()
