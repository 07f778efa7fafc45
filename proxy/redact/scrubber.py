"""The log scrubber: active secret values and token shapes never reach a log line.

Values are registered by what holds them — ``hold(owner, *values)``, where the owner is a token
slot (credential and principal), a secret reference, credproxy's own Vault token — and are
forgotten when their owner holds something else: the previous value stays for ``GRACE`` seconds,
so log lines about requests still in flight with it stay clean, then leaves. The set is bounded
by the owners, not by how many refreshes have happened.

Matching stays off the event loop's critical path: a new value is checked at once by its plain
literal forms (``PlainForms``), while a background thread compiles its full leak-guard forms and
rebuilds the ``ValueIndex`` (hyperscan or the pure-Python gram index) over all values; the new
index replaces the old one in one reference swap. Until then the old index plus the plain check
of the new values scrub every line (fail closed); a value whose forms cannot be compiled keeps its
plain check. Shape rules (``proxy.redact.shapes``) catch what was never registered.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable

from proxy.redact.leak_guard import MIN_SECRET, REDACTED, compile_patterns
from proxy.redact.shapes import scrub_shapes
from proxy.redact.value_index import PlainForms, ValueForms, ValueIndex

GRACE = 300.0  # seconds a replaced value is still scrubbed: longer than a request lives, short enough to forget


def secret_owner(ref) -> tuple:
    """The owner of a secret reference's value (every source that reads ``ref`` holds it under this one)."""
    return ("secret", str(ref))


def rotated_owner(ref) -> tuple:
    """The owner of a rotated refresh token not yet saved at ``ref``."""
    return ("rotated refresh token", str(ref))


def client_key_owner(credential: str) -> tuple:
    """The owner of a credential's upstream client key (the one in the store and the last one loaded)."""
    return ("upstream client key", credential)


def forward_key_owner(which: str) -> tuple:
    """The owner of one of the forward proxy's private keys: ``"ca"`` (from the store) or ``"leaf"`` (minted)."""
    return ("forward proxy key", which)


def pem_values(pem: str) -> tuple[str, ...]:
    """What of a PEM private key to scrub: the whole block and each of its base64 lines (a log line
    may hold one line of it, or the block with its newlines escaped)."""
    lines = [line.strip() for line in pem.splitlines()]
    return (pem.strip(), *(line for line in lines if line and not line.startswith("-----") and len(line) >= 16))


class Scrubber:
    def __init__(self, *, grace: float = GRACE, clock: Callable[[], float] = time.monotonic,
                 background: bool = True, use_hyperscan: bool = True) -> None:
        self.grace = grace
        self._clock = clock
        self._background = background
        self._use_hyperscan = use_hyperscan
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._held: dict[Hashable, frozenset[str]] = {}
        self._holders: Counter[str] = Counter()
        self._retiring: dict[str, float] = {}  # value -> when it is forgotten
        self._next_expiry = math.inf
        self._compiled: dict[str, ValueForms] = {}  # only the builder thread writes this
        self._index = ValueIndex((), use_hyperscan=use_hyperscan)
        self._pending: dict[str, PlainForms] = {}
        self._view: tuple[ValueIndex, tuple[PlainForms, ...]] = (self._index, ())  # what scrub reads, swapped whole
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.builds = 0

    # --- what is held ---------------------------------------------------------------------

    def hold(self, owner: Hashable, *values: str) -> None:
        """``owner`` now holds exactly ``values``; what it held before is forgotten after the grace period."""
        new = frozenset(v for v in values if v and len(v) >= MIN_SECRET)
        if self._held.get(owner, frozenset()) == new:  # the usual call: nothing changed, no lock
            return
        with self._lock:
            old = self._held.get(owner, frozenset())
            if new:
                self._held[owner] = new
            else:
                self._held.pop(owner, None)
            now = self._clock()
            for v in new - old:
                self._holders[v] += 1
                self._retiring.pop(v, None)
                if v not in self._index.values and v not in self._pending:
                    self._pending[v] = PlainForms(v)
            for v in old - new:
                self._holders[v] -= 1
                if self._holders[v] <= 0:
                    del self._holders[v]
                    self._retiring[v] = now + self.grace
            self._expire(now)
            self._publish()
        self._kick()

    def release(self, owner: Hashable) -> None:
        """``owner`` is gone (a credential removed by a reload): its values are forgotten after the grace period."""
        self.hold(owner)

    @property
    def values(self) -> frozenset[str]:
        """Every value scrubbed now or until its grace period ends."""
        with self._lock:
            return self._live()

    def _live(self) -> frozenset[str]:
        return frozenset(self._holders) | frozenset(self._retiring)

    def _expire(self, now: float) -> bool:
        gone = [v for v, until in self._retiring.items() if until <= now]
        for v in gone:
            del self._retiring[v]
            self._pending.pop(v, None)
        self._next_expiry = min(self._retiring.values(), default=math.inf)
        return bool(gone)

    def _publish(self) -> None:
        self._view = (self._index, tuple(self._pending.values()))

    # --- the matcher, rebuilt in the background -----------------------------------------------

    def _kick(self) -> None:
        if not self._background:
            return
        self._wake.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="credproxy-scrubber", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.rebuild()
            except Exception:  # noqa: BLE001 - the old index and the plain checks keep scrubbing; retry later
                time.sleep(1.0)
                self._wake.set()

    def rebuild(self) -> None:
        """Compile what is new, build an index over every live value, swap it in (called by the builder
        thread; tests without a background thread call it themselves)."""
        with self._build_lock:  # one build at a time: an older index must never replace a newer one
            self._rebuild()

    def _rebuild(self) -> None:
        with self._lock:
            live = self._live()
        forms: dict[str, ValueForms] = {}
        for v in live:
            f = self._compiled.get(v)
            if f is None:
                try:
                    f = ValueForms.compile(v)
                except Exception:  # noqa: BLE001 - stays pending: its plain check keeps scrubbing it
                    continue
                time.sleep(0)  # let the event loop's thread take the GIL between values
            forms[v] = f
        index = ValueIndex(forms.values(), use_hyperscan=self._use_hyperscan)
        with self._lock:
            self._compiled = forms
            self._index = index
            live_now = self._live()
            # Whatever is live and not in the new index (held again meanwhile, or not compilable) keeps
            # or gets its plain check.
            self._pending = {v: self._pending.get(v) or PlainForms(v) for v in live_now - index.values}
            self._publish()
            self.builds += 1
            if live_now != live:  # held or forgotten meanwhile: those wait in pending; build again
                self._kick_locked()

    def _kick_locked(self) -> None:
        if self._background:
            self._wake.set()

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until the index covers exactly the live values (benchmarks, tests)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending and self._index.values == self._live():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    @property
    def engine(self) -> str:
        return self._view[0].engine

    # --- scrubbing ---------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        if len(text) < MIN_SECRET:  # shorter than any value or shape
            return text
        if self._next_expiry <= self._clock():
            self._expire_due()
        index, pending = self._view
        data = text.encode("utf-8", "surrogateescape")
        hits = index.candidates(data)
        if pending:
            hits = sorted([*hits, *pending], key=lambda f: len(f.value), reverse=True)
        if hits:
            compiled = [f for f in hits if isinstance(f, ValueForms)]
            if len(compiled) > 1:
                # Values whose occurrences overlap in the text ("0001" + "1111"): one pass of one alternation,
                # as one leak guard over all of them would do. Redacting them one after another would leave
                # the first value's start readable once a later one took its tail.
                data = _joint(tuple(sorted(f.value for f in compiled))).sub(REDACTED, data)
                hits = [f for f in hits if not isinstance(f, ValueForms)]
            for forms in hits:
                data = forms.redact(data)
            text = data.decode("utf-8", "surrogateescape")
        return scrub_shapes(text)

    def _expire_due(self) -> None:
        with self._lock:
            gone = self._expire(self._clock())
            self._publish()
        if gone:
            self._kick()  # the values stay in the index (still scrubbed) until the rebuild drops them


@functools.lru_cache(maxsize=256)  # a line holding several values is rare; the same few sets recur
def _joint(values: tuple[str, ...]) -> re.Pattern[bytes]:
    pattern, _ = compile_patterns(values)
    assert pattern is not None  # every compiled value has a pattern
    return pattern


SCRUBBER = Scrubber()
