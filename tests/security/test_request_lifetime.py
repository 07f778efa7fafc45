"""A request answered in callbacks (the usual one) leaves no reference cycle behind: its ``Exchange`` and the
upstream answer are freed as soon as it is done, not left to the cyclic GC (whose work grows with each request's
garbage). Here beside the harness, whose proxy runs in this process."""

from __future__ import annotations

import asyncio
import gc

from proxy.pipeline import Exchange
from proxy.upstream.answer import UpstreamResponse

from .harness import read_response
from .test_caller_protocol import req


def _alive(kind) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


async def test_requests_leave_no_cycles(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for i in range(3):  # the pooled upstream connection, and whatever is made once
            writer.write(req(f"/demo/anything/{i}"))
            assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        gc.collect()
        gc.disable()
        try:
            before = _alive(Exchange), _alive(UpstreamResponse)
            for i in range(20):
                writer.write(req(f"/demo/anything/{i}"))
                assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
            await asyncio.sleep(0.05)
            after = _alive(Exchange), _alive(UpstreamResponse)
        finally:
            gc.enable()
    finally:
        writer.close()
    # the upstream connection's head clock keeps its latest answer until the next one
    assert after[0] <= before[0] + 1 and after[1] <= before[1] + 1, (before, after)
