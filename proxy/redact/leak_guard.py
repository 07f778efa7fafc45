"""Streaming redaction of injected secrets echoed back by an upstream.

Each secret is searched

- as text, where every character other than an ASCII letter or digit may also
  appear percent-encoded (either hex case), as ``+`` for a space, or
  JSON-escaped (``\\/``, ``\\"``, ``\\uXXXX``) — so a URL-encoded, form-encoded
  or JSON-echoed copy is found, however much of it was escaped;
- base64-encoded (standard and URL-safe, with or without padding, at each of
  the three byte alignments the secret can have inside a longer encoded text).

Every pattern has a fixed maximum length, so the stream redactor can decide
each position once the ``longest - 1`` bytes after it have arrived: its output
is the same as redacting the whole body at once, however the body is chunked.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

from proxy.redact.prefilter import NeedleSet, needles

REDACTED = b"[REDACTED]"
MIN_SECRET = 4  # shorter values would redact ordinary text; no real secret is this short
MIN_B64_CORE = 4  # shorter base64 cores would match ordinary text

# JSON's two-character escapes: the character after the backslash.
_JSON_SHORT = {"\b": b"b", "\f": b"f", "\n": b"n", "\r": b"r", "\t": b"t", '"': b'"', "\\": b"\\", "/": b"/"}


def _hex_any_case(value: int, width: int) -> bytes:
    out = b""
    for ch in b"%0*X" % (width, value):
        c = bytes([ch])
        out += b"[" + c + c.lower() + b"]" if c.isalpha() else c
    return out


def _char_pattern(c: str) -> tuple[bytes, int]:
    """A regex for one character of a secret and every escaped form of it, with its longest length."""
    raw = c.encode("utf-8", "surrogateescape")
    if c.isascii() and c.isalnum():
        return raw, 1
    alts = {re.escape(raw): len(raw), b"".join(b"%" + _hex_any_case(b, 2) for b in raw): 3 * len(raw)}
    if c == " ":
        alts[rb"\+"] = 1
    if c in _JSON_SHORT:
        alts[rb"\\" + re.escape(_JSON_SHORT[c])] = 2
    cp = ord(c)
    if not 0xDC80 <= cp <= 0xDCFF:  # a lone undecodable byte has no JSON form
        if cp < 0x10000:
            alts[rb"\\u" + _hex_any_case(cp, 4)] = 6
        else:
            cp -= 0x10000
            alts[rb"\\u" + _hex_any_case(0xD800 + (cp >> 10), 4) + rb"\\u" + _hex_any_case(0xDC00 + (cp & 0x3FF), 4)] = 12
    return b"(?:" + b"|".join(alts) + b")", max(alts.values())


def _text_pattern(secret: str) -> tuple[bytes, int]:
    parts = [_char_pattern(c) for c in secret]
    return b"".join(p for p, _ in parts), sum(n for _, n in parts)


def _base64_forms(secret: bytes) -> set[bytes]:
    forms = set()
    for shift in range(3):
        # base64 of the secret as it appears after ``shift`` unknown leading bytes:
        # drop the output characters that depend on the unknown neighbours.
        lead = (0, 2, 3)[shift]
        trail = (0, 3, 2)[(shift + len(secret)) % 3]  # characters touched by padding or the next bytes
        for enc in (base64.b64encode(b"\0" * shift + secret), base64.urlsafe_b64encode(b"\0" * shift + secret)):
            core = (enc[lead : len(enc) - trail] if trail else enc[lead:]).rstrip(b"=")
            if len(core) >= MIN_B64_CORE:
                forms.add(core)
    forms.add(base64.b64encode(secret))
    forms.add(base64.urlsafe_b64encode(secret))
    return forms


def patterns(secret: str) -> list[tuple[bytes, int]]:
    """(regex, longest match) for every form of one secret."""
    out = [_text_pattern(secret)]
    out += [(re.escape(f), len(f)) for f in _base64_forms(secret.encode("utf-8", "surrogateescape"))]
    return out


def compile_patterns(secrets: Iterable[str]) -> tuple[re.Pattern[bytes] | None, int]:
    """One regex for every form of ``secrets`` (longest alternatives first), and its longest match."""
    found: dict[bytes, int] = {}
    for s in secrets:
        if s and len(s) >= MIN_SECRET:
            found.update(patterns(s))
    ordered = sorted(found.items(), key=lambda kv: kv[1], reverse=True)
    if not ordered:
        return None, 0
    return re.compile(b"|".join(p for p, _ in ordered)), ordered[0][1]


class LeakGuard:
    """Compiled patterns for one set of secrets (per credential and principal)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._re, self.longest = compile_patterns(secrets)
        self.active = self._re is not None  # a plain attribute, not a property: read on every answer
        found = needles(self._re)
        self._needles = NeedleSet(found) if found else None

    def may_match(self, data: bytes) -> bool:
        """False only when ``data`` certainly holds no secret form (checked at memory speed)."""
        return self._needles is None or self._needles.may_match(data)

    def redact(self, data: bytes) -> tuple[bytes, int]:
        if self._re is None or not self.may_match(data):
            return data, 0
        return self._re.subn(REDACTED, data)

    def redact_text(self, text: str) -> tuple[str, int]:
        out, n = self.redact(text.encode("utf-8", "surrogateescape"))
        return out.decode("utf-8", "surrogateescape"), n

    def stream(self) -> "StreamRedactor":
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a body fed in chunks; ``feed`` holds back at most ``longest - 1`` bytes.

    ``feed_pieces`` gives what is decided as one or two pieces (the held-back tail of the chunk before, then
    this chunk up to its own tail), so a clean chunk goes on without being copied; ``feed`` joins them.
    ``feed_held`` is for a body held whole before anything is sent: a clean chunk goes on whole."""

    def __init__(self, guard: LeakGuard) -> None:
        self._re = guard._re
        self._may_match = guard.may_match
        self._keep = max(guard.longest - 1, 0)
        self._tail = b""
        self._placed = False  # feed_held: the undecided tail is the end of the last piece, not in ``_tail``
        self.count = 0

    def feed(self, chunk: bytes) -> bytes | memoryview:
        pieces = self.feed_pieces(chunk)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def feed_pieces(self, chunk: bytes) -> tuple[bytes | memoryview, ...]:
        if self._re is None:
            return (chunk,)
        keep, tail = self._keep, self._tail
        if len(chunk) > keep:
            # tail + chunk holds a needle only if the chunk does or one starts in the tail (a needle is at most
            # ``keep + 1`` bytes long): the same answer as checking tail + chunk, without copying the chunk.
            if not self._may_match(chunk) and not (tail and self._may_match(tail + chunk[:keep])):
                cut = len(chunk) - keep
                self._tail = chunk[cut:]
                clean = memoryview(chunk)[:cut]
                return (tail, clean) if tail else (clean,)
        return (self._feed_joined(tail + chunk if tail else chunk),)

    def feed_held(self, pieces: list[bytes | memoryview], chunk: bytes) -> None:
        """Put what is decided of ``chunk`` onto ``pieces``, for a body held whole before it is sent. While
        nothing can match, each chunk goes on whole: its undecided tail stays at its end rather than being split
        off (the body is as many pieces as it arrived in); it is decided with the next chunk, or at ``flush``.
        Not mixed with ``feed`` on one redactor."""
        if self._re is None:
            pieces.append(chunk)
            return
        keep = self._keep
        tail = pieces[-1][len(pieces[-1]) - keep :] if self._placed else self._tail
        if len(chunk) > keep and not self._may_match(chunk) and not (tail and self._may_match(tail + chunk[:keep])):
            if not self._placed and tail:
                pieces.append(tail)  # only after a chunk that held a match: its tail was split off then
                self._tail = b""
            pieces.append(chunk)
            self._placed = True  # every position of the tail before this chunk's own is decided: no match
            return
        if self._placed:  # take the tail back off the last piece: it is decided together with this chunk
            last = pieces[-1]
            pieces[-1] = memoryview(last)[: len(last) - keep]
            self._placed = False
        pieces.append(self._feed_joined(tail + chunk if tail else chunk))

    def _feed_joined(self, buf: bytes) -> bytes | memoryview:
        """Decide ``buf`` (the held-back tail and the new chunk, as one buffer)."""
        # A match may start at a position only once every pattern fits after it;
        # later positions wait for more bytes, so chunking never changes a decision.
        decided = len(buf) - self._keep
        if not self._may_match(buf):
            cut = max(decided, 0)
            self._tail = buf[cut:]
            return memoryview(buf)[:cut]  # the clean (usual) case: no copy of the chunk on its way out
        out = []
        pos = 0
        for m in self._re.finditer(buf):
            if m.start() >= decided:
                break
            out.append(buf[pos : m.start()])
            out.append(REDACTED)
            self.count += 1
            pos = m.end()
        cut = max(pos, decided)
        out.append(buf[pos:cut])
        self._tail = buf[cut:]
        return b"".join(out)

    def tail_count(self) -> int:
        """The echoes ``flush`` would find in the undecided tail now, without deciding it."""
        if self._placed or self._re is None or not self._tail:
            return 0
        return len(self._re.findall(self._tail))

    def flush(self) -> bytes:
        if self._placed:  # a tail left in place was part of a chunk with no needle: nothing in it can match
            self._placed = False
            return b""
        if self._re is None or not self._tail:
            return b""
        out, n = self._re.subn(REDACTED, self._tail)
        self.count += n
        self._tail = b""
        return out
