"""Audit trail: one typed event per request, JSON lines, each hash-chained to the one before.

``hash = sha256(canonical JSON of the line without "hash")``; the line carries the
previous line's hash as ``prev_hash`` (64 zeros for the first). Lines are buffered
and flushed on a short timer, when the buffer fills, and at shutdown.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, fields

from proxy.tasks import stop_task

GENESIS = "0" * 64
FLUSH_INTERVAL = 0.2
FLUSH_LINES = 256


@dataclass(frozen=True, slots=True)
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


_EVENT_FIELDS = tuple(f.name for f in fields(AuditEvent))


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # built once, used per line


def _canonical(obj: dict) -> bytes:
    return _ENCODER.encode(obj).encode()


def chain_line(record: dict, prev_hash: str) -> tuple[str, str]:
    body = dict(record, prev_hash=prev_hash)
    canonical = _canonical(body).decode()
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    # The line is the canonical text with "hash" appended: one encoding per line instead of two
    # (``verify`` parses the line, drops "hash" and re-canonicalizes, so key order is free).
    return f'{canonical[:-1]},"hash":"{digest}"}}', digest


def strip_query_values(query: str) -> str:
    return "&".join(p.split("=", 1)[0] for p in query.split("&") if p)


def _tail_hash(fd: int) -> str:
    """The hash on the last line of the file open at ``fd`` (GENESIS for an empty or unreadable tail)."""
    size = os.fstat(fd).st_size
    start = max(0, size - 65536)
    for raw in reversed(os.pread(fd, size - start, start).splitlines()):
        if raw.strip():
            try:
                return json.loads(raw)["hash"]
            except (ValueError, KeyError):
                break
    return GENESIS


class _FileLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _open_private(path: str):
    # Created 0600 from the start: no window in which the umask's mode lets others read it.
    # Readable too: a writer re-reads the tail when another process appended (serve --workers).
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "a+b")


class AuditLog:
    """Buffered, hash-chained JSON lines.

    Lines are chained as they are written (a few microseconds each, spread over
    requests) and written out in batches. Several processes may append to one
    file (``serve --workers``): each batch is written under an ``flock``, and a
    batch chained onto a tail another process has since extended is re-chained
    onto the file's real tail first, so the file stays one unbroken chain.
    """

    def __init__(self, path: str, *, clock=time.time) -> None:
        self.path = path
        self._clock = clock
        self._stdout = path == "-"
        self._pending: list[tuple[dict, str]] = []  # (record, its chained line)
        self._base = GENESIS  # the hash the first pending line is chained onto: the file's tail at our last write
        self._size = 0  # the file's size after our last write; any other size means another writer appended
        self._fh = None if self._stdout else _open_private(path)
        if self._fh is not None:
            os.chmod(path, 0o600)  # an existing file keeps its mode on open: tighten it too
            with _FileLock(self._fh.fileno()):
                self._base = _tail_hash(self._fh.fileno())
                self._size = os.fstat(self._fh.fileno()).st_size
        self._prev = self._base
        self._task: asyncio.Task | None = None

    def write(self, event: AuditEvent, **details) -> None:
        """One line for ``event``; ``details`` are extra typed fields (alerts: addresses, count)."""
        record = {"ts": round(self._clock(), 3)}
        for name in _EVENT_FIELDS:  # not dataclasses.asdict: it deep-copies, and this runs on every request
            record[name] = getattr(event, name)
        if details:
            record.update(details)
        self.write_record(record)

    def write_record(self, record: dict) -> None:
        line, self._prev = chain_line(record, self._prev)
        self._pending.append((record, line))
        if len(self._pending) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._stdout:
            sys.stdout.write("".join(line + "\n" for _, line in pending))
            sys.stdout.flush()
        else:
            fd = self._fh.fileno()
            with _FileLock(fd):
                if os.fstat(fd).st_size != self._size:
                    tail = _tail_hash(fd)
                    if tail != self._base:
                        pending = self._rechain(pending, tail)
                data = memoryview("".join(line + "\n" for _, line in pending).encode())
                while data:
                    data = data[os.write(fd, data):]
                self._size = os.fstat(fd).st_size
        self._base = self._prev

    def _rechain(self, pending: list[tuple[dict, str]], prev: str) -> list[tuple[dict, str]]:
        out = []
        for record, _ in pending:
            line, prev = chain_line(record, prev)
            out.append((record, line))
        self._prev = prev
        return out

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
