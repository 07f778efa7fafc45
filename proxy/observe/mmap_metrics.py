"""Metrics the request path moves on every request, under ``serve --workers``: written straight into
this process's prometheus_client multiprocess files.

prometheus_client's multiprocess values take a process-wide lock, check the pid and look the sample's
key up in the file's dict on every update (a histogram also walks its buckets in Python): ~1 µs per
counter update, ~2 µs per histogram observe. Its ``MmapedDict`` appends each key once and never moves
it, so the value of a bound child stays at one offset of the file: a child here keeps that offset, and
an update is one 8-byte write there, as it happens (a worker killed right after a request has it
counted; nothing is batched). The metrics and their children are prometheus_client's own (``labels()``
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
import struct

from prometheus_client import CollectorRegistry, Counter, Histogram

_pack_double = struct.Struct("d").pack  # a sample is (value, timestamp) doubles; only the value moves


def _offset(value) -> int:
    """Where prometheus_client's ``MmapedValue`` keeps its value in its file."""
    return value._file._positions[value._key]


class CounterSlot:
    __slots__ = ("_value", "_file", "_pos")

    def __init__(self, child) -> None:
        self._value = child._value
        self._file = self._value._file
        self._pos = _offset(self._value)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value = self._value
        value._value += amount
        pos = self._pos
        # slice assignment, as prometheus_client writes (struct.pack_into zeroes the bytes first); _m is
        # read each time since the file is remapped when it grows
        self._file._m[pos:pos + 8] = _pack_double(value._value)


class HistogramSlot:
    __slots__ = ("_sum", "_buckets", "_bounds", "_file", "_sum_pos", "_bucket_pos")

    def __init__(self, child) -> None:
        self._sum = child._sum
        self._buckets = tuple(child._buckets)
        self._bounds = tuple(child._upper_bounds)  # ends with +Inf
        self._file = self._sum._file
        if any(b._file is not self._file for b in self._buckets):
            raise AttributeError("histogram values in different files")
        self._sum_pos = _offset(self._sum)
        self._bucket_pos = tuple(_offset(b) for b in self._buckets)

    def observe(self, amount: float) -> None:
        total = self._sum
        total._value += amount
        i = bisect.bisect_left(self._bounds, amount)  # the first bucket whose bound >= amount, as prometheus_client
        bucket = self._buckets[i]
        bucket._value += 1
        m, pos, at = self._file._m, self._sum_pos, self._bucket_pos[i]
        m[pos:pos + 8] = _pack_double(total._value)
        m[at:at + 8] = _pack_double(bucket._value)


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
