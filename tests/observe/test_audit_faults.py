"""The audit trail never loses a line silently (SPEC §11): a full disk, a removed directory, a
rotated file and interrupted writes, driven through a real proxy and checked with
``credproxy audit verify`` and by counting request IDs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import io
import json
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import main as cli
from proxy.config import models as config_mod
from proxy.observe import audit_sink
from proxy.observe.audit import AuditEvent, AuditLog, verify
from proxy.observe.metrics import Metrics
from tests.conftest import SECRET
from tests.fullfs import fill, small_fs  # noqa: F401 - small_fs: a fixture
from tests.helpers import auth, base_config

FAST = {"flush_interval": "50ms"}  # the tests wait on what a user sees (readyz, answers), not on this interval


def verify_cli(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["audit", "verify", str(path)])
    return code, out.getvalue()


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines() if line.strip()]


async def until(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)
    return result


class Client:
    """Requests through the proxy, remembering every request ID it was answered with."""

    def __init__(self, proxy, session: aiohttp.ClientSession) -> None:
        self.proxy, self.s = proxy, session
        self.ids: list[str] = []

    async def get(self) -> tuple[int, dict]:
        async with self.s.get(self.proxy.url + "/example/v1/x", headers=auth()) as r:
            self.ids.append(r.headers["X-Request-Id"])
            return r.status, await r.json()

    async def admin(self, path: str) -> tuple[int, str]:
        async with self.s.get(self.proxy.admin_url + path) as r:
            return r.status, await r.text()

    async def readyz(self) -> tuple[int, dict]:
        status, text = await self.admin("/readyz")
        return status, json.loads(text)

    async def metric(self, name: str) -> float:
        _, text = await self.admin("/metrics")
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
        return values[0]


async def test_a_full_disk_refuses_requests_and_loses_no_line(proxy_factory, upstream, tmp_path, small_fs):
    path = small_fs / "audit.log"
    p = await proxy_factory(base_config(tmp_path, upstream.url, audit={"path": str(path), **FAST}))
    async with aiohttp.ClientSession() as s:
        c = Client(p, s)
        assert (await c.get())[0] == 200
        filler = fill(small_fs)

        async def refused():
            status, body = await c.get()
            return (status, body) if status == 503 else None

        status, body = await until(refused, "a request refused while the audit file is full")
        assert body == {"error": "credential_unavailable", "message": "credential unavailable",
                        "request_id": c.ids[-1]}
        status, ready = await c.readyz()
        assert status == 503 and "audit" in ready["waiting"]
        assert ready["audit"]["error"] == "ENOSPC: No space left on device" and ready["audit"]["buffered"] > 0
        assert await c.metric("credproxy_audit_write_errors_total") >= 1
        assert (await c.get())[0] == 503  # still refusing: the disk is still full
        _, metrics_text = await c.admin("/metrics")

        filler.unlink()
        await until(lambda: _ready(c), "/readyz 200 once the disk has room again")
        assert (await c.get())[0] == 200
        assert await c.metric("credproxy_audit_lines_dropped_total") == 0
    await p.proxy.stop()

    code, out = verify_cli(path)
    assert code == 0 and "chain intact" in out
    assert collections.Counter(ids_in(path)) == collections.Counter(c.ids)  # every request once, none missing
    reasons = {json.loads(line)["request_id"]: json.loads(line)["reason"] for line in path.read_text().splitlines()}
    assert reasons[c.ids[-2]] == "audit_unavailable"
    for text in (path.read_text(), json.dumps(ready), metrics_text):
        assert SECRET not in text


async def _ready(c: Client) -> bool:
    return (await c.readyz())[0] == 200


async def test_continue_serves_on_a_full_disk_and_counts_the_lines_that_do_not_fit(proxy_factory, upstream, tmp_path,
                                                                                 small_fs):
    path = small_fs / "audit.log"
    audit = {"path": str(path), "on_failure": "continue", "max_buffered_lines": 5, **FAST}
    p = await proxy_factory(base_config(tmp_path, upstream.url, audit=audit))
    async with aiohttp.ClientSession() as s:
        c = Client(p, s)
        assert (await c.get())[0] == 200
        filler = fill(small_fs)

        async def dropping():
            assert (await c.get())[0] == 200  # served throughout
            return await c.metric("credproxy_audit_lines_dropped_total") >= 3

        await until(dropping, "lines over audit.max_buffered_lines dropped and counted")
        status, ready = await c.readyz()
        assert status == 503 and ready["audit"]["buffered"] == 5
        dropped = await c.metric("credproxy_audit_lines_dropped_total")
        filler.unlink()
        await until(lambda: _ready(c), "/readyz 200 once the disk has room again")
    await p.proxy.stop()
    assert verify_cli(path)[0] == 0
    found = ids_in(path)
    assert len(found) == len(set(found)) and set(found) <= set(c.ids)
    assert len(found) + dropped == len(c.ids)  # each line written or counted as dropped


async def test_the_audit_directory_removed_then_recreated(proxy_factory, upstream, tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    path = folder / "audit.log"
    p = await proxy_factory(base_config(tmp_path, upstream.url, audit={"path": str(path), **FAST}))
    async with aiohttp.ClientSession() as s:
        c = Client(p, s)
        assert (await c.get())[0] == 200
        await until(lambda: _async(path.exists() and len(ids_in(path)) == 1), "the first line written")
        shutil.rmtree(folder)
        before = len(c.ids)

        async def refused():
            return (await c.get())[0] == 503

        await until(refused, "requests refused while the audit directory is gone")
        status, ready = await c.readyz()
        assert status == 503 and ready["audit"]["error"] == "ENOENT: No such file or directory"
        folder.mkdir()
        await until(lambda: _ready(c), "/readyz 200 once the directory is back")
        assert (await c.get())[0] == 200
    await p.proxy.stop()
    assert verify_cli(path)[0] == 0  # the new file starts a new chain
    assert collections.Counter(ids_in(path)) == collections.Counter(c.ids[before:])


async def _async(value):
    return value


async def test_a_rotated_file_is_followed_and_both_files_verify(proxy_factory, upstream, tmp_path):
    path = tmp_path / "audit.log"
    p = await proxy_factory(base_config(tmp_path, upstream.url, audit={"path": str(path), **FAST}))
    async with aiohttp.ClientSession() as s:
        c = Client(p, s)
        for _ in range(3):
            assert (await c.get())[0] == 200
        await until(lambda: _async(path.exists() and len(ids_in(path)) == 3), "three lines written")
        path.rename(tmp_path / "audit.log.1")  # what logrotate does
        for _ in range(3):
            assert (await c.get())[0] == 200
    await p.proxy.stop()
    old = tmp_path / "audit.log.1"
    assert verify_cli(old)[0] == 0 and verify_cli(path)[0] == 0
    assert ids_in(old) + ids_in(path) == c.ids


def event(n: int) -> AuditEvent:
    return AuditEvent(request_id=f"r{n:03d}", caller="billing", client_ip="127.0.0.1", credential="example",
                      method="GET", path="/v1/x", status=200, outcome="allowed", reason="allowed", duration_ms=1.0)


_REAL_WRITE, _REAL_FTRUNCATE = os.write, os.ftruncate


class ShortWrites:
    """A fault-injecting fake of ``os.write`` for the audit sink: the first ``failures`` calls write half
    of what they are given and the next call raises ENOSPC (what a disk that fills mid-batch does); the
    first ``truncate_failures`` calls of ``os.ftruncate`` raise EIO."""

    def __init__(self, failures: int, truncate_failures: int) -> None:
        self.failures = failures
        self.truncate_failures = truncate_failures
        self._half_written = False

    def write(self, fd: int, data) -> int:
        if self.failures <= 0:
            return _REAL_WRITE(fd, data)
        if not self._half_written:
            self._half_written = True
            return _REAL_WRITE(fd, bytes(data[: len(data) // 2 + 7]))  # not on a line boundary
        self._half_written = False
        self.failures -= 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def ftruncate(self, fd: int, size: int) -> None:
        if self.truncate_failures > 0:
            self.truncate_failures -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        _REAL_FTRUNCATE(fd, size)


@pytest.mark.parametrize("truncate_failures", [0, 1], ids=["cut-back", "cut-on-next-write"])
async def test_a_write_cut_off_mid_line_leaves_a_whole_chain(tmp_path, monkeypatch, caplog, truncate_failures):
    fake = ShortWrites(failures=2, truncate_failures=truncate_failures)
    monkeypatch.setattr(audit_sink.os, "write", fake.write)
    monkeypatch.setattr(audit_sink.os, "ftruncate", fake.ftruncate)
    path = tmp_path / "audit.log"
    metrics = Metrics()
    log = AuditLog.open(config_mod.AuditConfig(path=str(path)), metrics)
    for n in range(10):
        log.write(event(n))
    assert not log.flush() and log.failure == "ENOSPC: No space left on device"
    with pytest.raises(Exception) as refused:
        log.admit()
    assert refused.value.status == 503 and refused.value.code == "credential_unavailable"
    log.write(event(10))
    assert not log.flush()
    assert log.flush() and log.failure is None
    log.admit()
    await log.close()
    assert verify_cli(path)[0] == 0
    assert ids_in(path) == [f"r{n:03d}" for n in range(11)]
    assert metrics.audit_write_errors._value.get() == 2
    assert ("ended in half a line" in caplog.text) == bool(truncate_failures)


async def test_lines_that_cannot_be_written_at_shutdown_are_counted(small_fs):
    metrics = Metrics()
    log = AuditLog.open(config_mod.AuditConfig(path=str(small_fs / "audit.log")), metrics)
    fill(small_fs)
    for n in range(200):  # more than the audit file's last block holds
        log.write(event(n))
    await log.close()
    written = len(ids_in(small_fs / "audit.log"))
    assert written < 200 and metrics.audit_lines_dropped._value.get() == 200 - written
    assert verify_cli(small_fs / "audit.log")[0] == 0


def test_audit_settings_and_their_defaults():
    cfg = config_mod.AuditConfig()
    assert (cfg.flush_interval, cfg.on_failure, cfg.max_buffered_lines) == (1.0, "refuse", 50_000)
    with pytest.raises(ValueError):
        config_mod.AuditConfig(on_failure="ignore")
    with pytest.raises(ValueError):
        config_mod.AuditConfig(flush_interval="0s")


@settings(max_examples=200, deadline=None)
@given(text=st.text(), tricky=st.sampled_from(['","prev_hash":"' + "0" * 64 + '"', '\\"', "\\", '"', "\u2028"]))
def test_any_field_text_makes_a_line_that_verifies_and_reads_back(tmp_path_factory, text, tricky):
    """Each line is encoded once and its prev_hash spliced in: whatever a field holds, even the
    placeholder's own text, the chain verifies and the line reads back as written."""
    path = tmp_path_factory.mktemp("prop") / "audit.log"
    log = AuditLog(str(path))
    value = text + tricky + text
    log.write(AuditEvent(request_id="r1", caller=value, client_ip=None, credential=value, method="GET", path=value,
                         status=200, outcome="allowed", reason=value, duration_ms=0.5))
    log.write(event(2))
    assert log.flush()
    log._sink.close()
    assert verify(str(path)) == []
    first = json.loads(path.read_text(encoding="utf-8").split("\n")[0])  # not splitlines: U+2028 is in a line
    assert (first["caller"], first["path"], first["reason"]) == (value, value, value)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), number=st.floats(allow_nan=True, allow_infinity=True), count=st.integers(-2**70, 2**70),
       maybe=st.one_of(st.none(), st.text()), flag=st.booleans(), ts=st.floats(0, 4e9),
       kind=st.sampled_from(["audit", "alert", "forward"]))
def test_a_line_is_the_canonical_json_of_its_event(text, number, count, maybe, flag, ts, kind):
    """The line is built by concatenation in a fixed key order; byte for byte it is what the canonical encoder
    (the one ``verify`` re-checks with) makes of the event, whatever the field values."""
    from dataclasses import fields

    from proxy.observe.audit import GENESIS, AlertEvent, ForwardEvent, _canonical, encode

    common = dict(request_id=text, caller=maybe, client_ip=maybe, credential=text, method=text, path=text,
                  status=count, outcome=text, reason=text, duration_ms=number, token_refreshed=flag)
    if kind == "alert":
        ev = AlertEvent(**common, addresses=(text, "10.0.0.1"), count=count, window_s=number)
    elif kind == "forward":
        ev = ForwardEvent(**common, listener=text, connect_host=maybe, bytes_up=count, bytes_down=None)
    else:
        ev = AuditEvent(**common)
    record = {"ts": ts, "prev_hash": GENESIS, **{f.name: getattr(ev, f.name) for f in fields(ev)}}
    head, tail = encode(ts, ev)
    assert head + GENESIS.encode() + tail == _canonical(record)


TIMES = st.one_of(st.floats(0, 1e7), st.floats(1e9, 4e9), st.floats(allow_nan=True, allow_infinity=True),
                  st.floats(-2e12, 2e12), st.integers(0, 10**9).map(lambda n: n / 2000))  # n/2000: the ties of round(., 3)


@settings(max_examples=500, deadline=None)
@given(text=st.text(), tricky=st.sampled_from(['","prev_hash":"' + "0" * 64 + '"', '\\"', "\\", '"', "\u2028", "é"]),
       maybe=st.one_of(st.none(), st.text()), status=st.integers(-2**70, 2**70), flag=st.booleans(), ts=TIMES,
       duration=TIMES)
def test_a_request_line_is_the_line_of_its_event(tmp_path_factory, text, tricky, maybe, status, flag, ts, duration):
    """``write_request`` (the request path's line, written from its values with its own rounding) buffers byte
    for byte what ``write`` of the same ``AuditEvent`` does, for any values of the event's types."""
    log = AuditLog(str(tmp_path_factory.mktemp("req") / "audit.log"), clock=lambda: ts)
    value = text + tricky
    log.write_request(value, maybe, maybe, value, value, value, status, value, text, duration, flag)
    log.write(AuditEvent(request_id=value, caller=maybe, client_ip=maybe, credential=value, method=value, path=value,
                         status=status, outcome=value, reason=text, duration_ms=round(duration, 3),
                         token_refreshed=flag))
    assert log._pending[0] == log._pending[1]
