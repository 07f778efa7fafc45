"""What the audit trail costs the event loop (a benchmark, not a test).

    PYTHONPATH=. python tests/bench/audit_write.py [LINES]

Prints the cost of ``AuditLog.write`` (what a request pays: the event is only buffered), of
writing a full batch (encode, chain, one write: what the flush task pays every second or 256
lines), and the longest single loop slice while a backlog of LINES lines (after an outage) is
written out batch by batch.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from proxy.observe.audit import FLUSH_LINES, AuditEvent, AuditLog

EVENT = AuditEvent(request_id="5f0c" * 8, caller="billing", client_ip="127.0.0.1", credential="example",
                   method="GET", path="/v1/customers?limit", status=200, outcome="allowed", reason="allowed",
                   duration_ms=1.234)


async def main(backlog: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(os.path.join(tmp, "audit.log"))
        rounds = 200
        write = flush = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(FLUSH_LINES):
                log.write(EVENT)
            write += time.perf_counter() - started
            started = time.perf_counter()
            log.flush()
            flush += time.perf_counter() - started
        lines = rounds * FLUSH_LINES
        print(f"write() per request:       {write / lines * 1e6:7.2f} us")
        print(f"batch of {FLUSH_LINES} written:      {flush / rounds * 1e3:7.2f} ms ({flush / lines * 1e6:.2f} us a line)")

        for _ in range(backlog):
            log.write(EVENT)
        longest, started_all = 0.0, time.perf_counter()
        while log.buffered:
            started = time.perf_counter()
            log._write_batch()  # what the flush task does between two yields to the loop
            longest = max(longest, time.perf_counter() - started)
            await asyncio.sleep(0)
        print(f"backlog of {backlog} lines:   {time.perf_counter() - started_all:7.2f} s in all, "
              f"longest loop slice {longest * 1e3:.2f} ms")
        await log.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
