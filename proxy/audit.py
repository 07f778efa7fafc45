"""Audit trail: one typed event per request, JSON lines, each hash-chained to the one before.

``hash = sha256(canonical JSON of the line without "hash")``; the line carries the
previous line's hash as ``prev_hash`` (64 zeros for the first). Lines are buffered
and flushed on a short timer, when the buffer fills, and at shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_line(record: dict, prev_hash: str) -> tuple[str, str]:
    body = dict(record, prev_hash=prev_hash)
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    body["hash"] = digest
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False), digest


def strip_query_values(query: str) -> str:
    return "&".join(p.split("=", 1)[0] for p in query.split("&") if p)


def _last_hash(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            lines = fh.read().splitlines()
        for raw in reversed(lines):
            if raw.strip():
                return json.loads(raw)["hash"]
    except (FileNotFoundError, ValueError, KeyError):
        pass
    return GENESIS


def _open_private(path: str):
    # Created 0600 from the start: no window in which the umask's mode lets others read it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


class AuditLog:
    def __init__(self, path: str, *, clock=time.time) -> None:
        self.path = path
        self._clock = clock
        self._stdout = path == "-"
        self._prev = GENESIS if self._stdout else _last_hash(Path(path))
        self._buffer: list[str] = []
        self._fh = None if self._stdout else _open_private(path)
        if self._fh is not None:
            os.chmod(path, 0o600)  # an existing file keeps its mode on open: tighten it too
        self._task: asyncio.Task | None = None

    def write(self, event: AuditEvent, **details) -> None:
        """One line for ``event``; ``details`` are extra typed fields (alerts: addresses, count)."""
        record = {"ts": round(self._clock(), 3), **asdict(event), **details}
        self.write_record(record)

    def write_record(self, record: dict) -> None:
        line, self._prev = chain_line(record, self._prev)
        self._buffer.append(line)
        if len(self._buffer) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = "\n".join(self._buffer) + "\n"
        self._buffer.clear()
        if self._stdout:
            sys.stdout.write(data)
            sys.stdout.flush()
        else:
            self._fh.write(data)
            self._fh.flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
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
