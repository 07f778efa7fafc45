"""The C heap of the serving process: freed memory is kept for the next answer rather than given back.

A relayed answer's body arrives as ~256 KiB chunks (one per socket read) and an answer up to 1 MiB is
held whole before it is sent (``proxy.upstream.relay``). glibc's defaults then return the top of the heap
to the kernel after nearly every such answer (``brk`` down, ~3 times per 1 MiB answer) and take it back
for the next one, page by page: ~15% of the CPU of a 1 MiB answer went to page faults (~110 per answer).
Keeping up to ``TRIM_THRESHOLD`` bytes of freed heap, ``TOP_PAD`` of it even when trimming, and serving
blocks up to ``MMAP_THRESHOLD`` from the heap rather than from a fresh mapping each, removes that (~0 faults
per answer, measured). The process's peak memory is unchanged (only pages once used stay resident); it
gives back less of it between answers. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
TRIM_THRESHOLD = 8 << 20  # ANSWER_BUDGET: what answers held whole may take at once
TOP_PAD = 8 << 20
MMAP_THRESHOLD = 1 << 20  # larger blocks (a decoded answer, a 1 MiB block buffer) still get their own mapping


def keep_freed_heap() -> bool:
    """Set the thresholds (True), or leave the allocator as it is where ``mallopt`` is not glibc's (False)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Setting one threshold turns off glibc's adjusting of the others, so all are set.
    return all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                mallopt(M_TOP_PAD, TOP_PAD)])
