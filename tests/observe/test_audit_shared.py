"""Several writers, one audit file: the chain stays whole (``serve --workers`` appends from
every worker), and no line is lost or doubled."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random

from proxy.observe import audit_sink
from proxy.observe.audit import AuditEvent, AuditLog, verify


def event(n: int, who: str) -> AuditEvent:
    return AuditEvent(request_id=f"{who}-{n:04d}", caller=who, client_ip="127.0.0.1", credential="demo",
                      method="GET", path="/v1/x", status=200, outcome="allowed", reason="allowed", duration_ms=1.0)


def lines(path) -> list[str]:
    import json

    return [json.loads(raw)["request_id"] for raw in open(path) if raw.strip()]


async def test_two_writers_interleaving_batches_keep_one_chain(tmp_path):
    path = str(tmp_path / "audit.log")
    a, b = AuditLog(path), AuditLog(path)
    for n in range(3):
        a.write(event(n, "a"))
        b.write(event(n, "b"))  # chained onto b's view of the tail, which a is about to extend
        a.flush()
        b.flush()
    a.write(event(99, "a"))
    await a.close()
    await b.close()
    assert verify(path) == []
    assert lines(path) == ["a-0000", "b-0000", "a-0001", "b-0001", "a-0002", "b-0002", "a-0099"]


async def test_a_reopened_log_continues_the_chain(tmp_path):
    path = str(tmp_path / "audit.log")
    first = AuditLog(path)
    first.write(event(1, "a"))
    await first.close()
    second = AuditLog(path)
    second.write(event(2, "a"))
    await second.close()
    assert verify(path) == [] and lines(path) == ["a-0001", "a-0002"]


def _writer(path: str, who: str, count: int, seed: int) -> None:
    rnd = random.Random(seed)
    log = AuditLog(path)
    for n in range(count):
        log.write(event(n, who))
        if rnd.random() < 0.1:
            log.flush()
    log.flush()


def test_concurrent_processes_append_one_unbroken_chain(tmp_path):
    path = str(tmp_path / "audit.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, f"w{i}", 400, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert verify(path) == []
    ids = lines(path)
    assert len(ids) == 1200 and len(set(ids)) == 1200
    for who in ("w0", "w1", "w2"):  # each writer's own lines stay in the order it wrote them
        mine = [i for i in ids if i.startswith(who)]
        assert mine == sorted(mine)


class _CutOff:
    """A fault-injecting fake of ``os.write``/``os.ftruncate`` for one writer's flush: it writes the first
    100 bytes, then the disk is "full" (ENOSPC), and cutting the half line back fails too (EIO)."""

    def __init__(self, real_write, real_truncate) -> None:
        self.real_write, self.real_truncate = real_write, real_truncate
        self.wrote = False

    def write(self, fd, data):
        if not self.wrote:
            self.wrote = True
            return self.real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def ftruncate(self, fd, size):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


async def test_a_writer_cut_off_mid_line_leaves_no_half_line_in_the_shared_chain(tmp_path, monkeypatch):
    path = str(tmp_path / "audit.log")
    a, b = AuditLog(path), AuditLog(path)
    a.write(event(0, "a"))
    a.flush()
    a.write(event(1, "a"))
    fake = _CutOff(os.write, os.ftruncate)
    with monkeypatch.context() as m:
        m.setattr(audit_sink.os, "write", fake.write)
        m.setattr(audit_sink.os, "ftruncate", fake.ftruncate)
        assert not a.flush()  # half of a-0001 is in the file; a keeps the line
    b.write(event(0, "b"))
    b.flush()  # b cuts the half line and chains onto a-0000
    assert a.flush()
    await a.close()
    await b.close()
    assert verify(path) == []
    assert lines(path) == ["a-0000", "b-0000", "a-0001"]
