"""``Exchange`` stores its trace's starting values itself (no ``Trace.__init__`` call per request): the same ones."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import types

from proxy.lifecycle.state import StateHolder
from proxy.pipeline import Exchange, Trace


def test_an_exchange_starts_with_the_values_a_trace_starts_with():
    holder = StateHolder(current=types.SimpleNamespace(in_flight=0, _idle=asyncio.Event()))
    ex = Exchange(None, None, holder)
    fresh = Trace(ex.request_id, ex.started)
    assert re.fullmatch(r"[0-9a-f]{32}", ex.request_id)
    for f in dataclasses.fields(Trace):
        assert getattr(ex, f.name) == getattr(fresh, f.name), f.name
    assert ex.cred is None and ex.route is None and ex.task is None and not ex.done()
    holder.leave(ex.state, ex)
    assert holder.in_flight == 0
