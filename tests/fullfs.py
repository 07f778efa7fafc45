"""A real full disk for tests: a 64 KiB tmpfs of the test's own (mounting needs root; the tests that
use it are skipped, saying why, where it is not permitted)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs of our own, to fill up: a real full disk."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small tmpfs to fill")
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last block (the audit file may still have room at the end of its own last block)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return filler
