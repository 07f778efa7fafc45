"""Metrics the request path moves on every request, under ``serve --workers``: written straight into
this process's prometheus_client multiprocess files.

prometheus_client's multiprocess values take a process-wide lock, check the pid and look the sample's
key up in the file's dict on every update (a histogram also walks its buckets in Python): ~1 µs per
counter update, ~2 µs per histogram observe. Its ``MmapedDict`` appends each key once and never moves
it, so the value of a bound child stays at one offset of the file: a child here keeps that offset, and
an update is one 8-byte store there (through a memoryview of the mapping), as it happens (a worker
killed right after a request has it counted; nothing is batched). The metrics and their children are prometheus_client's own (``labels()``
makes the child, which writes its key), so the files, this worker's own render and the supervisor's
merge are what they would be with prometheus_client updating them.

What makes skipping prometheus_client's lock and pid check sound here: these children are moved only
from the worker's event loop thread (as ``proxy.observe.loop_metrics`` relies on), and a worker is a
fresh ``exec``'d process (``proxy.lifecycle.workers``), never forked with metrics made. prometheus_client's
own view of the value (``MmapedValue._value``) is kept in step, so its updates and reads stay right. A
prometheus_client whose internals differ leaves the child to prometheus_client (correct, only slower).
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Histogram


def _view_and_index(value) -> tuple[memoryview, int]:
    """This process's file of prometheus_client's ``MmapedValue`` as doubles, and where its value is.

    Keys are padded so each value starts 8-byte aligned. The view keeps the mapping it was made on alive:
    when the file grows prometheus_client maps it again, and the old mapping still reaches the same pages
    (the file only grows, so the offset stays inside it). A view also keeps ``MmapedDict.close`` from
    unmapping, which only prometheus_client's fork handling and ``close_all_multiprocess_files`` do."""
    pos = value._file._positions[value._key]
    if pos % 8:
        raise KeyError("unaligned value")
    return memoryview(value._file._m).cast("d"), pos // 8


class CounterSlot:
    __slots__ = ("_value", "_view", "_at")

    def __init__(self, child) -> None:
        self._value = child._value
        self._view, self._at = _view_and_index(self._value)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value = self._value
        value._value += amount
        # one 8-byte store (struct.pack_into would zero the bytes first, which a reader could see)
        self._view[self._at] = value._value


class HistogramSlot:
    __slots__ = ("_sum", "_buckets", "_bounds", "_view", "_sum_at", "_bucket_at")

    def __init__(self, child) -> None:
        self._sum = child._sum
        self._buckets = tuple(child._buckets)
        self._bounds = tuple(child._upper_bounds)  # ends with +Inf
        if any(b._file is not self._sum._file for b in self._buckets):
            raise AttributeError("histogram values in different files")
        self._view, self._sum_at = _view_and_index(self._sum)
        self._bucket_at = tuple(_view_and_index(b)[1] for b in self._buckets)

    def observe(self, amount: float) -> None:
        total = self._sum
        total._value += amount
        i = bisect.bisect_left(self._bounds, amount)  # the first bucket whose bound >= amount, as prometheus_client
        bucket = self._buckets[i]
        bucket._value += 1
        view = self._view
        view[self._sum_at] = total._value
        view[self._bucket_at[i]] = bucket._value


class _Family:
    """A prometheus_client metric whose children ``labels()`` hands out bound to their file offsets."""

    def __init__(self, metric, slot) -> None:
        self._metric, self._slot = metric, slot
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            try:
                child = self._slot(child)
            except (AttributeError, KeyError):  # another prometheus_client layout: its own child, slower
                pass
            self._children[values] = child
        return child


def mmap_counter(name: str, doc: str, labelnames=(), *, registry: CollectorRegistry) -> _Family:
    return _Family(Counter(name, doc, labelnames, registry=registry), CounterSlot)


def mmap_histogram(name: str, doc: str, labelnames=(), *, registry: CollectorRegistry, buckets) -> _Family:
    return _Family(Histogram(name, doc, labelnames, registry=registry, buckets=buckets), HistogramSlot)
