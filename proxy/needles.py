"""A fast necessary condition for a leak-guard regex: literal "needles".

Python's ``re`` tries every alternative at almost every position of a body
(~100 MB/s for a handful of secrets); ``bytes in bytes`` runs at memory speed.
From the compiled pattern we take, for each alternative, a run of literal bytes
that every match of that alternative must contain. A buffer that contains none
of these needles cannot match, so the regex only runs on the rare buffer that
does. Deriving the needles from the pattern itself (rather than from the
secrets) keeps this correct whatever forms the leak guard learns to search.
"""

from __future__ import annotations

import re
from re import _constants as sre  # noqa: PLC2701 - the parser is the only way to read a compiled pattern's structure
from re import _parser

MIN_NEEDLE = 3  # shorter literals occur everywhere; such a pattern is simply not prefiltered


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
