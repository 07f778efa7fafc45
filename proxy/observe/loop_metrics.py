"""Metrics the request path moves on every request, kept as plain numbers.

prometheus_client's metric children take a lock per update (a histogram two, after walking its
buckets in Python); on this path that was five locked operations per request. A worker moves these
only from its event loop thread and its admin listener reads them on the same loop, so plain
attributes suffice: ``collect`` turns them into the same families (names, labels, ``_created``) at
scrape time. Label values come from config (see ``proxy.observe.metrics``), so children are few and
are never removed. Under ``serve --workers`` values must reach prometheus_client's multiprocess files,
so ``proxy.observe.metrics`` uses these only when one process serves (``proxy.observe.mmap_metrics``
under ``--workers``).
"""

from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

INF = float("inf")


class _Collector:
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def labels(self, *values: str):
        """The child for these label values, made on first use (cache it: this is a dict lookup and a check)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[values] = self._child()
        return child

    def describe(self):
        return [self._family()]


class CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopCounter(_Collector):
    def _child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self):
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        yield family


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; the last bound is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound >= amount


def count_and_observe(counter: CounterChild, histogram: HistogramChild, amount: float) -> None:
    """``counter.inc()`` and ``histogram.observe(amount)`` in one call: a finished request's two updates."""
    counter.value += 1
    histogram.sum += amount
    histogram.counts[bisect_left(histogram.bounds, amount)] += 1


class LoopHistogram(_Collector):
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], registry: CollectorRegistry, *,
                 buckets: tuple[float, ...]) -> None:
        self._bounds = tuple(float(b) for b in buckets) + ((INF,) if buckets[-1] != INF else ())
        self._le = tuple(floatToGoString(b) for b in self._bounds)
        super().__init__(name, doc, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self):
        family = self._family()
        for values, child in list(self._children.items()):
            running, buckets = 0, []
            for le, n in zip(self._le, child.counts):
                running += n
                buckets.append((le, running))
            family.add_metric(values, buckets, child.sum)
            family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, values)), child.created))
        yield family


class LoopGauge:
    """An unlabelled gauge whose value a function gives when it is collected (0 until one is set)."""

    __slots__ = ("name", "doc", "_fn")

    def __init__(self, name: str, doc: str, registry: CollectorRegistry) -> None:
        self.name, self.doc, self._fn = name, doc, None
        registry.register(self)

    def set_function(self, fn) -> None:
        self._fn = fn

    def update(self) -> None:
        """Nothing to store before rendering (``ScrapeTimeGauge`` does, for the multiprocess files): read in ``collect``."""

    def describe(self):
        return [GaugeMetricFamily(self.name, self.doc)]

    def collect(self):
        yield GaugeMetricFamily(self.name, self.doc, value=float(self._fn()) if self._fn is not None else 0.0)
