"""Which of the scrubber's registered values may occur in a text: one literal pass over all of them.

The scrubber holds hundreds of values (tokens, secrets). One leak-guard regex over all of them costs
seconds to compile (~1.3 ms per value), and running every value's own regex over every log line
costs milliseconds per line. Instead each value is compiled once, on its own (``ValueForms``: the
regex the leak guard uses and the literal needles every match of it contains, from
``proxy.redact.prefilter``), and a ``ValueIndex`` over all needles answers in one pass which values'
regexes need to run on a text — almost always none.

Two engines give the same answer (exact literal matching, no approximation; the tests run both):
hyperscan (the ``fast`` extra), one scan for all needles, with a scratch per thread since logging
happens on several; and, where it is missing, a pure-Python index keyed on each needle's first
``MIN_NEEDLE`` bytes — the text's grams (one set) intersected with the keys, then ``needle in text``
for the few candidates. A value without needles (its text form has no run of three literal bytes,
e.g. ``a-b-c-d``) has its regex run on every text.

``PlainForms`` is the check used for a value whose ``ValueForms`` are not built yet: its raw text,
percent-, form- and JSON-encoded and base64 forms, found with ``in`` — no compile needed.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

from proxy.redact.leak_guard import REDACTED, _base64_forms, compile_patterns
from proxy.redact.prefilter import MIN_NEEDLE, needles

try:
    import hyperscan
except ImportError:  # optional (x86-64 only): the gram index is the fallback
    hyperscan = None


@dataclass(frozen=True, eq=False)
class ValueForms:
    """One value's leak-guard regex and the needles that every match of it contains (None: none)."""

    value: str
    pattern: re.Pattern[bytes]
    needles: tuple[bytes, ...] | None

    @classmethod
    def compile(cls, value: str) -> ValueForms:
        rx, _ = compile_patterns([value])
        if rx is None:
            raise ValueError("value too short to scrub")
        return cls(value, rx, needles(rx))

    def redact(self, data: bytes) -> bytes:
        return self.pattern.sub(REDACTED, data)


class PlainForms:
    """A value not compiled yet: its common literal forms, each replaced where ``in`` finds it."""

    def __init__(self, value: str) -> None:
        self.value = value
        raw = value.encode("utf-8", "surrogateescape")
        forms = {raw, *_base64_forms(raw)}
        for encoded in (quote(value, safe="", errors="surrogateescape"),
                        quote_plus(value, safe="", errors="surrogateescape")):
            forms.add(encoded.encode())
            forms.add(re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), encoded).encode())
        try:
            forms.add(json.dumps(value)[1:-1].encode())
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:  # a lone surrogate: the raw and encoded forms above still apply
            pass
        self.forms = tuple(sorted(forms, key=len, reverse=True))

    def redact(self, data: bytes) -> bytes:
        for form in self.forms:
            if form in data:
                data = data.replace(form, REDACTED)
        return data


class ValueIndex:
    """An immutable matcher over compiled values; ``redact`` runs only the regexes of values that may occur."""

    def __init__(self, forms: Iterable[ValueForms], *, use_hyperscan: bool = True) -> None:
        # Longer values first: one that contains another must be redacted before the shorter one breaks it.
        self.forms = tuple(sorted(forms, key=lambda f: len(f.value), reverse=True))
        self.values = frozenset(f.value for f in self.forms)
        self._always = tuple(i for i, f in enumerate(self.forms) if not f.needles)
        pairs = [(n, i) for i, f in enumerate(self.forms) for n in (f.needles or ())]
        self._owner = [i for _, i in pairs]
        self._db = _compile([n for n, _ in pairs]) if use_hyperscan else None
        self._local = threading.local()
        self._grams: dict[bytes, list[tuple[bytes, int]]] = {}
        if self._db is None:
            for needle, i in pairs:
                self._grams.setdefault(needle[:MIN_NEEDLE], []).append((needle, i))
        self._gram_keys = frozenset(self._grams)

    @property
    def engine(self) -> str:
        return "hyperscan" if self._db is not None else "grams"

    def candidates(self, data: bytes) -> list[ValueForms]:
        """The values whose regex must run on ``data``, longest first (a superset of those present)."""
        if not self.forms:
            return []
        found = set(self._always)
        if self._db is not None:
            found |= self._scan(data)
        elif len(data) >= MIN_NEEDLE:
            present = {data[i:i + MIN_NEEDLE] for i in range(len(data) - MIN_NEEDLE + 1)}
            for gram in present.intersection(self._gram_keys):
                for needle, i in self._grams[gram]:
                    if i not in found and needle in data:
                        found.add(i)
        return [self.forms[i] for i in sorted(found)]

    def _scan(self, data: bytes) -> set[int]:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        hits: set[int] = set()
        owner = self._owner
        try:
            self._db.scan(data, match_event_handler=lambda nid, *_: hits.add(owner[nid]), scratch=scratch)
        except hyperscan.HyperscanError:  # cannot tell: every value's regex runs (slow, still exact)
            return set(range(len(self.forms)))
        return hits


def _compile(needles_: list[bytes]):
    if hyperscan is None or not needles_:
        return None
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=needles_, ids=list(range(len(needles_))), elements=len(needles_),
                   flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(needles_), literal=True)
    except hyperscan.HyperscanError:  # e.g. a CPU without SSSE3: the gram index is exact too
        return None
    return db
