"""The serving process keeps freed heap for the next answer (``proxy.heap``); where the C library is not
glibc the call changes nothing and says so."""

from __future__ import annotations

import platform

import pytest

from proxy import heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_thresholds_are_set_on_glibc():
    assert heap.keep_freed_heap() is True


def test_without_mallopt_nothing_changes(monkeypatch):
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: object())
    assert heap.keep_freed_heap() is False
