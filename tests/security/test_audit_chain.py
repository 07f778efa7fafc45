"""Tamper-evident audit: ``credproxy audit verify`` passes an intact log and finds an
edited, a deleted and a reordered line — on a log written by a running proxy."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import main as cli
from proxy.observe.audit import AuditEvent, AuditLog

from .harness import CALLER_TOKEN, Harness

ROOT = Path(__file__).resolve().parents[2]


def verify_cli(path: Path) -> tuple[int, str]:
    """``credproxy audit verify FILE`` in this process (the subprocess form is tested once below)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["audit", "verify", str(path)])
    return code, out.getvalue() + err.getvalue()


def verify_subprocess(path: Path) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(path)], capture_output=True, text=True,
                       env=env, timeout=60)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture
async def audit_file(upstream, tmp_path) -> Path:
    """Six real audit lines: allowed, denied and refused requests, across a proxy restart."""
    for run in range(2):
        where = tmp_path / f"run{run}"
        where.mkdir()
        h = Harness(where, upstream.url, {"audit": {"path": str(tmp_path / "audit.log")}})
        h.audit_path = tmp_path / "audit.log"
        await h.start()
        async with aiohttp.ClientSession() as s:
            for path, auth in (("/demo/anything/a", True), ("/demo/admin", True), ("/demo/anything/b", False)):
                headers = {"Authorization": f"Bearer {CALLER_TOKEN}"} if auth else {}
                async with s.get(h.url + path, headers=headers) as r:
                    await r.read()
        await h.stop()
    return tmp_path / "audit.log"


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_intact_log_passes(audit_file):
    assert len(lines_of(audit_file)) == 6
    code, out = verify_cli(audit_file)
    assert code == 0 and "chain intact" in out


def test_the_command_line_tool_itself(audit_file):
    assert verify_subprocess(audit_file)[0] == 0
    lines = lines_of(audit_file)
    del lines[1]
    audit_file.write_text("\n".join(lines) + "\n")
    code, out = verify_subprocess(audit_file)
    assert code == 1 and "line 2: prev_hash does not match" in out


def test_edited_line_is_found(audit_file):
    lines = lines_of(audit_file)
    rec = json.loads(lines[2])
    rec["status"] = 200  # hide a denial
    lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    audit_file.write_text("\n".join(lines) + "\n")
    code, out = verify_cli(audit_file)
    assert code == 1 and "line 3: hash does not match its content" in out


def test_edited_line_with_a_recomputed_hash_is_found_by_the_next_line(audit_file):
    lines = lines_of(audit_file)
    rec = json.loads(lines[1])
    rec.pop("hash")
    rec["caller"] = "someone-else"
    rec["hash"] = hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    audit_file.write_text("\n".join(lines) + "\n")
    code, out = verify_cli(audit_file)
    assert code == 1 and "line 3: prev_hash does not match" in out


def test_deleted_line_is_found(audit_file):
    lines = lines_of(audit_file)
    del lines[3]
    audit_file.write_text("\n".join(lines) + "\n")
    code, out = verify_cli(audit_file)
    assert code == 1 and "line 4: prev_hash does not match the line before (a line was removed or reordered)" in out


def test_reordered_lines_are_found(audit_file):
    lines = lines_of(audit_file)
    lines[1], lines[2] = lines[2], lines[1]
    audit_file.write_text("\n".join(lines) + "\n")
    code, out = verify_cli(audit_file)
    assert code == 1 and "line 2: prev_hash" in out


def test_garbage_line_is_found(audit_file):
    with audit_file.open("a") as fh:
        fh.write("not json\n")
    code, out = verify_cli(audit_file)
    assert code == 1 and "line 7: not an audit record" in out


def test_missing_file_is_an_error(tmp_path):
    code, out = verify_cli(tmp_path / "nope.log")
    assert code == 1 and "cannot be read" in out


def test_cutting_the_tail_is_not_detectable_by_the_chain_alone(audit_file):
    """Documented limit (docs/threat-model.md): the last lines can be cut without a trace
    unless the log is shipped off the host as it is written."""
    lines = lines_of(audit_file)
    audit_file.write_text("\n".join(lines[:-2]) + "\n")
    assert verify_cli(audit_file)[0] == 0


async def test_a_reopened_log_continues_the_chain(tmp_path):
    path = tmp_path / "a.log"
    for _ in range(2):
        log = AuditLog(str(path))
        log.write(AuditEvent.refused("r1", None, 400, "bad_request"))
        await log.close()
    second = json.loads(lines_of(path)[1])
    assert second["prev_hash"] == json.loads(lines_of(path)[0])["hash"]
