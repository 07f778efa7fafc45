"""Fixtures: a recording upstream and a credproxy in front of it, both on loopback."""

from __future__ import annotations

import pytest

from .harness import Harness, RecordingUpstream


@pytest.fixture
async def upstream():
    up = await RecordingUpstream().start()
    yield up
    await up.close()


@pytest.fixture
async def make_proxy(tmp_path):
    """``await make_proxy(upstream_url, extra_config)``: a started credproxy, stopped after the test."""
    started: list[Harness] = []

    async def make(upstream_url: str, extra: dict | None = None) -> Harness:
        where = tmp_path / f"proxy{len(started)}"
        where.mkdir()
        h = Harness(where, upstream_url, extra)
        started.append(h)
        return await h.start()

    yield make
    for h in reversed(started):
        await h.stop()


@pytest.fixture
async def proxy(upstream, make_proxy):
    return await make_proxy(upstream.url)
