"""Audit trail (SPEC §8, §11): one typed event per request, JSON lines, each hash-chained to the one before.

``hash = sha256(canonical JSON of the line without "hash")``; the line carries the previous line's
hash as ``prev_hash`` (64 zeros for the first line of a file).

``AuditLog.write`` is the one way anything writes an audit line, and it takes typed events only
(``AuditEvent``, ``AlertEvent``), so no field can carry a secret by accident (``write_request`` is
the request path's ``write(AuditEvent(...))``: the same typed fields, without the event object). The
request path only encodes the line once (without its ``prev_hash``) and buffers it; lines are chained
onto the file's real tail when their batch is written (``proxy.observe.audit_sink``), which costs a
concatenation and a hash per line: at least every ``audit.flush_interval``, as soon as a batch
is full, and at shutdown. A retried or re-chained line is never encoded again.

A write that fails keeps its lines, in order, and is retried with a short backoff. While it fails
the log is *failing*: each failed attempt counts in ``credproxy_audit_write_errors_total``,
/readyz answers 503, and with ``audit.on_failure: refuse`` (the default) ``admit`` refuses new
requests with ``503 credential_unavailable``. The buffer holds at most
``audit.max_buffered_lines``; a line that does not fit is dropped and counted in
``credproxy_audit_lines_dropped_total`` (with ``continue`` that is where an outage ends up).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
from json.encoder import encode_basestring  # the C escaping the encoder itself uses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import islice
from operator import attrgetter
from typing import NamedTuple

from proxy.errors import AppendFailed, AuditUnavailable
from proxy.observe.audit_sink import GENESIS, FileSink, StdoutSink
from proxy.tasks import stop_task

log = logging.getLogger("credproxy.audit")

FLUSH_LINES = 256  # a batch: written as soon as this many lines wait, and the most one write carries
RETRY_FIRST = 0.05  # after a failed write: retried after 50 ms, doubling ...
RETRY_MAX = 1.0  # ... up to once a second
SHUTDOWN_RETRIES = (0.05, 0.2, 0.5)  # at shutdown there is no next attempt: a few more, then the loss is counted


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__ (~1 us per request for
# eleven fields). An event is built once, then only read and encoded.
@dataclass(slots=True)
class AuditEvent:
    request_id: str
    caller: str | None
    client_ip: str | None
    credential: str | None
    method: str
    path: str  # query values removed
    status: int
    outcome: str  # allowed | denied | error | alert
    reason: str
    duration_ms: float
    token_refreshed: bool = False

    @classmethod
    def refused(cls, request_id: str, client_ip: str | None, status: int, reason: str) -> AuditEvent:
        """A request or connection refused before anything about it (caller, credential, path) could be trusted."""
        return cls(request_id=request_id, caller=None, client_ip=client_ip, credential=None, method="-", path="-",
                   status=status, outcome="error", reason=reason, duration_ms=0.0)


@dataclass(slots=True)
class AlertEvent(AuditEvent):
    """A misuse alert (``outcome: alert``, ``reason`` = its kind) with what raised it."""

    addresses: tuple[str, ...] = ()
    count: int = 0
    window_s: float = 0.0


@dataclass(slots=True)
class ForwardEvent(AuditEvent):
    """A request through the forward-proxy listener (SPEC §10): a CONNECT, or a request inside its tunnel
    (``connect_host``), or an absolute-form one (``connect_host`` None). Opaque tunnels add their byte counts."""

    listener: str = "forward"
    connect_host: str | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None


_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in (AuditEvent, AlertEvent, ForwardEvent)}

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # built once, used per line


def _canonical(obj: dict) -> bytes:
    return _ENCODER.encode(obj).encode()


_TS = "ts"


class _Plan(NamedTuple):
    """One event class's line as two %-templates (keys in canonical, sorted, order, JSON-escaped once), split
    around the ``prev_hash`` value, and getters of the fields that fill them: a line is then two formats,
    without a dict or a sort per line."""

    head: str  # '{"caller":%s,...,"prev_hash":"'
    tail: str  # '","reason":%s,...}'
    head_fields: tuple[str, ...]
    tail_fields: tuple[str, ...]  # without "ts", which goes in at ``ts_at``
    ts_at: int
    head_values: Callable
    tail_values: Callable


def _plan(cls) -> _Plan:
    keys = sorted([*_FIELDS[cls], _TS, "prev_hash"])
    cut = keys.index("prev_hash")
    head, tail = keys[:cut], keys[cut + 1:]
    ts_at = tail.index(_TS)  # "ts" sorts after "prev_hash"
    tail_fields = tail[:ts_at] + tail[ts_at + 1:]
    assert len(head) > 1 and len(tail_fields) > 1  # attrgetter of one name would not return a tuple
    return _Plan("{" + ",".join(_ENCODER.encode(k) + ":%s" for k in head) + ',"prev_hash":"',
                 '"' + "".join("," + _ENCODER.encode(k) + ":%s" for k in tail) + "}",
                 tuple(head), tuple(tail_fields), ts_at, attrgetter(*head), attrgetter(*tail_fields))


_PLANS = {cls: _plan(cls) for cls in _FIELDS}
_INF = float("inf")


def _values(values) -> list[str]:
    """Each value as the canonical encoder writes it (its own C string escaping; anything but a plain scalar
    is left to the encoder itself). One loop, not a call per value."""
    out = []
    for v in values:
        cls = v.__class__
        if cls is str:
            out.append(encode_basestring(v))
        elif v is None:
            out.append("null")
        elif cls is bool:
            out.append("true" if v else "false")
        elif cls is int:
            out.append(int.__repr__(v))
        elif cls is float and -_INF < v < _INF:
            out.append(float.__repr__(v))
        else:
            out.append(_ENCODER.encode(v))
    return out


# The per-request line (an ``AuditEvent``) is written from the request's values as they are, without an event
# object or the general loop's look at each value's type: its types are fixed (texts str or None, status int,
# times float). The key order is the plan's (checked here at import), and so is the text between the values:
# the plan's templates cut at each value, joined around the values (a join costs half a %-format here).
_REQUEST = _PLANS[AuditEvent]
assert (_REQUEST.head_fields, _REQUEST.tail_fields, _REQUEST.ts_at) == (
    ("caller", "client_ip", "credential", "duration_ms", "method", "outcome", "path"),
    ("reason", "request_id", "status", "token_refreshed"), 4)
_H0, _H1, _H2, _H3, _H4, _H5, _H6, _H7 = _REQUEST.head.split("%s")
_T0, _T1, _T2, _T3, _T4, _T5 = _REQUEST.tail.split("%s")


# The line's text around the values that differ per request (duration, path, request id, time), for the values
# that repeat (caller, address, credential, method, outcome, reason, status, refreshed): a few of each, so a line
# is one lookup and two joins instead of eight escapes. Bounded: emptied when full.
_PARTS: dict[tuple, tuple[str, str, str, str]] = {}
_PARTS_MAX = 4096


def _parts(key: tuple) -> tuple[str, str, str, str]:
    caller, client_ip, credential, method, outcome, reason, status, token_refreshed = key
    parts = ("".join((_H0, "null" if caller is None else encode_basestring(caller),
                      _H1, "null" if client_ip is None else encode_basestring(client_ip),
                      _H2, "null" if credential is None else encode_basestring(credential), _H3)),
             "".join((_H4, encode_basestring(method), _H5, encode_basestring(outcome), _H6)),
             "".join((_T0, encode_basestring(reason), _T1)),
             "".join((_T2, int.__repr__(status), _T3, "true" if token_refreshed else "false", _T4)))
    if len(_PARTS) >= _PARTS_MAX:
        _PARTS.clear()
    _PARTS[key] = parts
    return parts


def request_line(ts: float, request_id: str, caller: str | None, client_ip: str | None, credential: str | None,
                 method: str, path: str, status: int, outcome: str, reason: str, duration_ms: float,
                 token_refreshed: bool) -> tuple[bytes, bytes]:
    """``encode(round(ts, 3), AuditEvent(..., duration_ms=round(duration_ms, 3), ...))``, byte for byte."""
    if -1e12 < ts < 1e12 and -1e12 < duration_ms < 1e12:
        # ``float.__repr__(round(x, 3))`` at about half its cost: ``round`` turns the same correctly rounded
        # 3-decimal text back into a float, whose shortest repr is that text without its trailing zeros
        # (below 2**42 floats are closer together than 0.001).
        duration, now = ("%.3f" % duration_ms).rstrip("0"), ("%.3f" % ts).rstrip("0")
        if duration[-1] == ".":
            duration += "0"
        if now[-1] == ".":
            now += "0"
    else:
        duration, now = _values((round(duration_ms, 3), round(ts, 3)))
    key = (caller, client_ip, credential, method, outcome, reason, status, token_refreshed)
    parts = _PARTS.get(key)
    if parts is None:  # (equal keys make the same text: the types are fixed, status int and the flag bool)
        parts = _parts(key)
    return "".join((parts[0], duration, parts[1], encode_basestring(path), _H7)).encode(), \
        "".join((parts[2], encode_basestring(request_id), parts[3], now, _T5)).encode()


def encode(ts: float, event: AuditEvent) -> tuple[bytes, bytes]:
    """The line's canonical JSON in two parts, before and after the ``prev_hash`` value: the one encoding
    of a line (byte for byte what ``_canonical`` makes of it: ``verify`` checks it so). Chaining it onto
    the line before is then a concatenation and a hash."""
    plan = _PLANS[type(event)]
    tail = list(plan.tail_values(event))
    tail.insert(plan.ts_at, ts)
    return (plan.head % tuple(_values(plan.head_values(event)))).encode(), (plan.tail % tuple(_values(tail))).encode()


def _chain(batch: list[tuple[bytes, bytes]], prev: str) -> list[tuple[bytes, str]]:
    """The batch as chained lines (each with its newline and its hash), the first chained onto ``prev``."""
    out = []
    sha256 = hashlib.sha256
    prev_bytes = prev.encode()
    for head, tail in batch:
        canonical = b"".join((head, prev_bytes, tail))
        prev = sha256(canonical).hexdigest()
        prev_bytes = prev.encode()
        # The line is the canonical text with "hash" appended (``verify`` parses the line, drops "hash" and
        # re-canonicalizes, so key order is free).
        out.append((b"".join((canonical[:-1], b',"hash":"', prev_bytes, b'"}\n')), prev))
    return out


def strip_query_values(query: str) -> str:
    return "&".join(p.split("=", 1)[0] for p in query.split("&") if p)


def _describe(exc: Exception) -> str:
    """Why a write failed, for /readyz and the log: the errno's name and text, never a path or a line."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return type(exc).__name__


class _NoCount:
    def inc(self, amount: float = 1) -> None:
        pass


class AuditLog:
    def __init__(self, path: str, *, flush_interval: float = 1.0, on_failure: str = "refuse",
                 max_buffered_lines: int = 50_000, write_errors=_NoCount(), lines_dropped=_NoCount(),
                 clock=time.time) -> None:
        self.path = path
        self._sink = StdoutSink() if path == "-" else FileSink(path)
        self._interval = flush_interval
        self._refuse = on_failure == "refuse"
        self._max = max_buffered_lines
        self._room = min(max_buffered_lines, FLUSH_LINES - 1)  # below it, a line is just appended (write_request)
        self._write_errors = write_errors
        self._lines_dropped = lines_dropped
        self._clock = clock
        self._pending: deque[tuple[bytes, bytes]] = deque()  # encoded lines, not yet chained (see ``encode``)
        self.failure: str | None = None  # why the last write failed; None while lines are being written
        self._dropping = False  # a line was dropped since the log was last healthy (logged once per outage)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def open(cls, cfg, metrics) -> AuditLog:
        """The log ``audit`` config (``proxy.config.models.AuditConfig``) asks for, counted in ``metrics``."""
        audit = cls(cfg.path, flush_interval=cfg.flush_interval, on_failure=cfg.on_failure,
                    max_buffered_lines=cfg.max_buffered_lines, write_errors=metrics.audit_write_errors,
                    lines_dropped=metrics.audit_lines_dropped)
        metrics.audit_lines_buffered.set_function(lambda: len(audit._pending))
        return audit

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def write(self, event: AuditEvent) -> None:
        """Encode the line for ``event`` and buffer it (it is chained when its batch is written)."""
        self._buffer(encode(round(self._clock(), 3), event))

    def write_request(self, request_id: str, caller: str | None, client_ip: str | None, credential: str | None,
                      method: str, path: str, status: int, outcome: str, reason: str, duration_ms: float,
                      token_refreshed: bool) -> None:
        """``write(AuditEvent(...))`` from a request's values (``duration_ms`` not yet rounded): ``request_line``.
        Buffered as ``_buffer`` does, without the call for it when there is room (every request)."""
        line = request_line(self._clock(), request_id, caller, client_ip, credential, method, path, status,
                            outcome, reason, duration_ms, token_refreshed)
        pending = self._pending
        if len(pending) < self._room:
            pending.append(line)
        else:  # full, or the line completes a batch
            self._buffer(line)

    def _buffer(self, line: tuple[bytes, bytes]) -> None:
        pending = self._pending
        if len(pending) >= self._max:
            self._lines_dropped.inc()
            if not self._dropping:
                self._dropping = True
                log.error("audit buffer full: lines are dropped (counted in credproxy_audit_lines_dropped_total)",
                          extra={"buffered": len(pending), "error": self.failure})
            return
        pending.append(line)
        if len(pending) >= FLUSH_LINES and self.failure is None:
            self._wake.set()

    def admit(self) -> None:
        """Raise ``AuditUnavailable`` while the audit cannot be written and ``audit.on_failure`` is refuse."""
        if self.failure is not None and self._refuse:
            raise AuditUnavailable(f"audit trail cannot be written ({self.failure})", reason="audit_unavailable",
                                   retry_after=1)

    def flush(self) -> bool:
        """Write out every buffered line; False when a write failed (what was not written stays buffered)."""
        while self._pending:
            if not self._write_batch():
                return False
        return True

    def _write_batch(self) -> bool:
        batch = list(islice(self._pending, FLUSH_LINES))
        try:
            written = self._sink.append(lambda prev: _chain(batch, prev))
        except AppendFailed as exc:
            self._forget(exc.written)
            self._failed(exc.cause)
            return False
        except OSError as exc:  # opening the file again, taking its lock, reading its tail
            self._failed(exc)
            return False
        self._forget(written)
        if self.failure is not None:
            log.warning("audit lines are written again", extra={"buffered": len(self._pending)})
            self.failure, self._dropping = None, False
        return True

    def _forget(self, written: int) -> None:
        for _ in range(written):
            self._pending.popleft()

    def _failed(self, exc: Exception) -> None:
        self._write_errors.inc()
        if self.failure is None:
            log.error("audit lines cannot be written; they stay buffered and the write is retried",
                      extra={"error": _describe(exc), "buffered": len(self._pending),
                             "on_failure": "refuse" if self._refuse else "continue"})
        self.failure = _describe(exc)

    async def _flush_forever(self) -> None:
        delay, retry = self._interval, RETRY_FIRST
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                # A backlog (after an outage) goes batch by batch, requests running between. A part batch
                # waits for the next one to fill or for the interval: written at once, it made a write (and
                # its lock and stats) per loop turn under steady load, a few lines each.
                while self._pending and self._write_batch() and len(self._pending) >= FLUSH_LINES:
                    await asyncio.sleep(0)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the writer: fail closed and keep trying
                log.exception("audit write failed unexpectedly")
                self._failed(exc)
            if self.failure is None:
                delay, retry = self._interval, RETRY_FIRST
            else:
                delay, retry = retry, min(retry * 2, RETRY_MAX)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        for delay in SHUTDOWN_RETRIES:
            if self.flush():
                break
            await asyncio.sleep(delay)
        else:
            if not self.flush():
                self._lines_dropped.inc(len(self._pending))
                log.error("audit lines lost at shutdown: they could not be written",
                          extra={"lines": len(self._pending), "error": self.failure})
                self._pending.clear()
        self._sink.close()


def verify(path: str) -> list[str]:
    """Problems in the chain (empty when intact): edited, removed or reordered lines."""
    problems = []
    prev = GENESIS
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                claimed = rec.pop("hash")
            except (ValueError, KeyError):
                problems.append(f"line {n}: not an audit record")
                prev = None
                continue
            if prev is not None and rec.get("prev_hash") != prev:
                problems.append(f"line {n}: prev_hash does not match the line before (a line was removed or reordered)")
            if hashlib.sha256(_canonical(rec)).hexdigest() != claimed:
                problems.append(f"line {n}: hash does not match its content (the line was edited)")
            prev = claimed
    return problems
