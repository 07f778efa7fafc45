"""A fast necessary condition for a leak-guard regex: literal "needles".

Python's ``re`` tries every alternative at almost every position of a body
(~100 MB/s for a handful of secrets); ``bytes in bytes`` runs at memory speed.
From the compiled pattern we take, for each alternative, a run of literal bytes
that every match of that alternative must contain. A buffer that contains none
of these needles cannot match, so the regex only runs on the rare buffer that
does. Deriving the needles from the pattern itself (rather than from the
secrets) keeps this correct whatever forms the leak guard learns to search.

``bytes in bytes`` is one pass per needle (a secret has four to eight: its text
and its base64 forms), about 1 ms per MiB of JSON for one secret. When the
optional ``hyperscan`` package (Intel's multi-literal matcher; the ``fast``
extra on x86-64) is installed, buffers from ``HYPERSCAN_MIN`` bytes on are
checked in one pass over all needles at once (~0.15 ms per MiB); shorter ones,
such as a response head, stay with ``in``, which costs less than a call into
the library there. Both answer the same question exactly (literal matching, no
approximation), and the tests run both.
"""

from __future__ import annotations

import re
from re import _constants as sre  # noqa: PLC2701 - the parser is the only way to read a compiled pattern's structure
from re import _parser

try:
    import hyperscan
except ImportError:  # optional (x86-64 only): the ``in`` loop is the fallback
    hyperscan = None

MIN_NEEDLE = 3  # shorter literals occur everywhere; such a pattern is simply not prefiltered
HYPERSCAN_MIN = 4096  # below this, a few ``in`` passes cost less than one call into hyperscan (~1.3 µs)


def _literal_run(items) -> bytes:
    """The longest run of consecutive literal bytes in one sequence of pattern items."""
    best = run = b""
    for op, arg in items:
        if op is sre.LITERAL:
            run += bytes([arg])
            if len(run) > len(best):
                best = run
        else:
            run = b""
    return best


def _needles(items) -> set[bytes] | None:
    """Literals such that every match of ``items`` contains at least one; None if there are none."""
    run = _literal_run(items)
    if len(run) >= MIN_NEEDLE:
        return {run}
    for op, arg in items:
        if op is sre.BRANCH:
            found: set[bytes] = set()
            for alternative in arg[1]:
                sub = _needles(alternative.data if hasattr(alternative, "data") else alternative)
                if sub is None:
                    break
                found |= sub
            else:
                return found
        elif op is sre.SUBPATTERN and not arg[1] and not arg[2]:  # a group without inline flags
            sub = _needles(arg[3].data)
            if sub is not None:
                return sub
    return None


def needles(pattern: re.Pattern[bytes] | None) -> tuple[bytes, ...] | None:
    """Needles for ``pattern``, shortest first and without redundant ones; None when it cannot be prefiltered."""
    if pattern is None or not isinstance(pattern.pattern, bytes) or pattern.flags & ~re.DEBUG & ~re.ASCII:
        return None
    try:
        found = _needles(_parser.parse(pattern.pattern).data)
    except Exception:  # noqa: BLE001 - an unreadable pattern is simply run in full
        return None
    if not found:
        return None
    # A needle containing another is redundant: the shorter one is present whenever it is.
    ordered = sorted(found, key=len)
    kept: list[bytes] = []
    for n in ordered:
        if not any(k in n for k in kept):
            kept.append(n)
    return tuple(kept)


def may_match(needles_: tuple[bytes, ...], data: bytes) -> bool:
    for n in needles_:
        if n in data:
            return True
    return False


class NeedleSet:
    """``may_match(data)``: does ``data`` contain one of ``needles``? One pass for long buffers when it can."""

    def __init__(self, needles_: tuple[bytes, ...], *, use_hyperscan: bool = True,
                 hyperscan_min: int = HYPERSCAN_MIN) -> None:
        self.needles = needles_
        self._db = _compile(needles_) if use_hyperscan else None
        self._min = hyperscan_min

    @property
    def engine(self) -> str:
        return "hyperscan" if self._db is not None else "bytes.find"

    def may_match(self, data: bytes) -> bool:
        if self._db is None or len(data) < self._min:
            for n in self.needles:  # ``may_match`` inlined: this runs on every answer head
                if n in data:
                    return True
            return False
        try:
            self._db.scan(data, match_event_handler=_stop)
        except hyperscan.ScanTerminated:  # the first needle found stops the scan
            return True
        except hyperscan.HyperscanError:  # e.g. the scratch in use by another thread (the log scrubber's)
            return may_match(self.needles, data)
        return False


def _stop(*_args) -> bool:
    return True


def _compile(needles_: tuple[bytes, ...]):
    if hyperscan is None or not needles_:
        return None
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=list(needles_), ids=list(range(len(needles_))), elements=len(needles_),
                   flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(needles_), literal=True)
        # One scratch per database; a scan from a second thread at the same moment falls back (above).
        db.scratch = hyperscan.Scratch(db)
    except hyperscan.HyperscanError:  # e.g. a CPU without SSSE3: the fallback is exact too
        return None
    return db
