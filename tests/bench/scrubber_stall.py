"""The log scrubber, before and after, in one run: the longest event-loop stall while values are
registered one by one (a ticker task measures it), and the cost of one refused-request INFO line.

    PYTHONPATH=. python tests/bench/scrubber_stall.py [N]      (N values, default 1000)

"before" is the old algorithm, reimplemented here: every registration recompiled one leak-guard
regex over all values seen, on the caller's thread (the event loop), and a record was scrubbed by
the filter (message and each field) and then again as a whole line by the formatter. Registering
all N one by one that way takes minutes (the k-th costs a compile over k values), so "before"
starts with N - 3 values already in its set and measures the last three registrations: the
stalls it shows are what every registration costs once N values have been seen. "after" registers
all N from empty, and its stall covers the background builds until the index covers every value.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import sys
import threading
import time

from proxy.observe.log_setup import JsonFormatter
from proxy.redact import log_filter, value_index
from proxy.redact.leak_guard import MIN_SECRET, LeakGuard
from proxy.redact.scrubber import Scrubber
from proxy.redact.shapes import scrub_shapes


class OldScrubber:
    """The scrubber before this change (proxy/redact/scrubber.py at 747bf71), for comparison."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._guard = LeakGuard(())

    def register(self, *values: str) -> None:
        new = {v for v in values if v and len(v) >= MIN_SECRET} - self._values
        if not new:
            return
        with self._lock:
            self._values |= new
            self._guard = LeakGuard(self._values)

    def scrub(self, text: str) -> str:
        text, _ = self._guard.redact_text(text)
        return scrub_shapes(text)


class OldFormatter(JsonFormatter):
    """The formatter before: the whole line scrubbed again, although the filter had scrubbed every part."""

    def __init__(self, scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def format(self, record):
        line = super().format(record)
        return self.scrubber.scrub(line)


async def longest_stall(register, values: list[str], settle=None) -> tuple[float, float, float]:
    """(longest gap between ticks beyond the 1 ms sleep, wall seconds, the most CPU one ``register`` call took on
    the loop's thread) while ``register`` is called per value. The CPU figure does not depend on how loaded
    the machine is; the stall does."""
    worst = 0.0
    most_cpu = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    for v in values:
        cpu = time.thread_time()
        register(v)
        most_cpu = max(most_cpu, time.thread_time() - cpu)
        await asyncio.sleep(0)  # as token refreshes do: one at a time, with the loop running in between
    if settle is not None:
        while not settle():
            await asyncio.sleep(0.005)
    wall = time.perf_counter() - started
    done = True
    await task
    return worst, wall, most_cpu


def line_cost(scrubber, formatter, n: int = 2000) -> float:
    """Microseconds per refused-request INFO record through the scrubbing filter and the JSON formatter."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(formatter)
    handler.addFilter(log_filter.ScrubFilter(scrubber))
    extra = {"request_id": secrets.token_hex(16), "caller": "billing", "credential": "github", "status": 403,
             "reason": "policy", "method": "GET", "path": "/repos/acme/widgets/issues?state=open",
             "client_ip": "10.1.2.3", "duration_ms": 0.42}
    started = time.perf_counter()
    for _ in range(n):
        record = logging.LogRecord("credproxy.request", logging.INFO, __file__, 1, "request refused", (), None)
        record.__dict__.update(extra)
        handler.handle(record)
    return (time.perf_counter() - started) / n * 1e6


async def main(n: int) -> None:
    values = [secrets.token_urlsafe(32) for _ in range(n)]
    print(f"scrubber with {n} values registered one by one; hyperscan "
          f"{'installed' if value_index.hyperscan is not None else 'missing'}")

    idle, _, _ = await longest_stall(lambda v: None, [""] * 200, settle=_after(1.0))  # the machine's own noise

    old = OldScrubber()
    old._values = set(values[:-3])  # as if registered before (compiling them one by one takes minutes)
    old_stall, old_wall, old_cpu = await longest_stall(old.register, values[-3:])
    old_line = line_cost(old, OldFormatter(old), n=200)

    rows = [("before (one regex, recompiled on the loop)", old_stall, old_wall, old_cpu, old_line)]
    for hs in ([True, False] if value_index.hyperscan is not None else [False]):
        new = Scrubber(use_hyperscan=hs)
        stall, wall, cpu = await longest_stall(lambda v: new.hold(("token", v[:8]), v), values,
                                               settle=lambda: new.settle(0))
        assert new.values == frozenset(values) and new.settle(0)
        rows.append((f"after ({new.engine} index, built off the loop)", stall, wall, cpu,
                     line_cost(new, JsonFormatter())))

    print(f"{'':46} {'longest stall':>14} {'loop CPU/reg.':>14} {'wall':>9} {'INFO line':>10}")
    print(f"{'ticker alone (the machine, no registrations)':46} {idle * 1000:11.1f} ms")
    for name, stall, wall, cpu, line in rows:
        print(f"{name:46} {stall * 1000:11.1f} ms {cpu * 1000:11.3f} ms {wall:7.2f} s {line:7.0f} µs")
    for name, stall, _wall, cpu, line in rows[1:]:
        print(f"{name}: stall {old_stall / stall:,.0f}x shorter, loop CPU per registration "
              f"{old_cpu / max(cpu, 1e-9):,.0f}x less, INFO line {old_line / line:,.1f}x cheaper")


def _after(seconds: float):
    until = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= until


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
