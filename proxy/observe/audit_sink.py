"""Where audit lines go: a file that several processes may append to, or stdout.

A sink appends one batch at a time. It asks the caller to chain the batch onto the hash
of the line the batch follows (``chain(prev_hash)``), so a line is encoded once, when it is
written, and always onto the real tail of the file.

The file (``FileSink``):

- Every append holds an ``flock``: ``serve --workers`` append to one file, one chain. When the
  file's size is not what our last append left, another writer appended (or an append of ours
  failed): the tail is read again under the lock.
- An append that fails part-way (disk full, I/O error, a short write) is cut back to its last
  whole line, and the caller is told how many lines made it (``AppendFailed.written``); the rest
  stay with the caller for the next attempt. If even the cut fails, the next append (ours or
  another writer's) cuts the half line first. No half line is ever chained onto.
- When the path no longer names the open file (removed, rotated away, its directory deleted),
  the path is opened again; a new file starts a new chain (``prev_hash`` 64 zeros), logged with
  the hash the old file ended on, so the two can be linked. Until it can be opened, appends fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator

from proxy.errors import AppendFailed

log = logging.getLogger("credproxy.audit")

GENESIS = "0" * 64
TAIL_WINDOW = 65536  # a line is far shorter than this: its end is always within the file's last TAIL_WINDOW bytes

Chain = Callable[[str], list[tuple[bytes, str]]]  # prev_hash -> [(line with its "\n", its hash)]


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _cut_partial_line(fd: int, size: int) -> int:
    """The file's size once a half line at its end (from an interrupted append) is cut off."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start = max(0, size - TAIL_WINDOW)
    end = os.pread(fd, size - start, start).rfind(b"\n")
    if end < 0 and start > 0:
        return size  # not a line we wrote: leave it, the chain will show it
    whole = start + end + 1
    os.ftruncate(fd, whole)
    log.warning("audit file ended in half a line (an interrupted write); cut back to the last whole line",
                extra={"bytes_cut": size - whole})
    return whole


def tail_hash(fd: int, size: int) -> str:
    """The hash on the last line of the file (GENESIS for an empty file or an unreadable tail)."""
    start = max(0, size - TAIL_WINDOW)
    for raw in reversed(os.pread(fd, size - start, start).splitlines()):
        if raw.strip():
            try:
                return json.loads(raw)["hash"]
            except (ValueError, KeyError):
                break
    return GENESIS


class FileSink:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._size = -1  # the file's size after our last append; -1: unknown, read the tail first
        self._tail = GENESIS  # the hash our last append ended on
        self._open()  # at start an unusable path is an error the operator sees at once

    def _open(self) -> None:
        # Created 0600 from the start (no window in which the umask's mode lets others read it), an existing
        # file tightened too. Readable: the tail is re-read when another process appended.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), -1

    def _current(self) -> int:
        """The open file, opened again first when the path names another file or none."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            self._open()
            log.warning("audit file missing or replaced: writing to a new file, which starts a new chain",
                        extra={"previous_file_ended_on": self._tail})
        return self._fd

    def append(self, chain: Chain) -> int:
        fd = self._current()
        with _locked(fd):
            size = os.fstat(fd).st_size
            if size != self._size:  # another writer appended, or our last append failed
                size = _cut_partial_line(fd, size)
                self._tail = tail_hash(fd, size)
            lines = chain(self._tail)
            data = memoryview(b"".join(line for line, _ in lines))
            done = 0
            try:
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError as exc:
                raise self._cut_back(fd, size, lines, done, exc) from exc
            self._size = size + len(data)
            self._tail = lines[-1][1]
            return len(lines)

    def _cut_back(self, fd: int, size: int, lines: list[tuple[bytes, str]], done: int, exc: OSError) -> AppendFailed:
        written = kept = 0
        for line, digest in lines:
            if kept + len(line) > done:
                break
            kept += len(line)
            written += 1
            self._tail = digest
        self._size = -1
        with contextlib.suppress(OSError):  # if even this fails, the next append cuts the half line
            if done > kept:
                os.ftruncate(fd, size + kept)
            self._size = size + kept
        return AppendFailed(exc, written)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StdoutSink:
    """``audit.path: "-"``: one chain on stdout, for a log collector. A write that fails is sent again
    whole, so a collector may see the start of that batch twice."""

    def __init__(self) -> None:
        self._tail = GENESIS

    def append(self, chain: Chain) -> int:
        lines = chain(self._tail)
        sys.stdout.write(b"".join(line for line, _ in lines).decode())
        sys.stdout.flush()
        self._tail = lines[-1][1]
        return len(lines)

    def close(self) -> None:
        pass
