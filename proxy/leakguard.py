"""Streaming redaction of injected secrets echoed back by an upstream.

Each secret is searched raw, base64 (standard and URL-safe, at every 3-byte
alignment) and URL-encoded, also when split across chunk boundaries: the last
``longest - 1`` bytes of each chunk are held back until the next one arrives.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from proxy.needles import may_match, needles

REDACTED = b"[REDACTED]"
MIN_B64_CORE = 4  # shorter base64 cores would match ordinary text


class LeakDetected(Exception):
    pass


def _forms(secret: bytes) -> set[bytes]:
    forms = {secret}
    text = secret.decode("utf-8", "surrogateescape")
    forms.add(quote(text, safe="").encode())
    forms.add(quote_plus(text, safe="").encode())
    forms.add(quote(text).encode())
    for shift in range(3):
        # base64 of the secret as it appears after ``shift`` unknown leading bytes:
        # drop the output characters that depend on the unknown neighbours.
        enc_std = base64.b64encode(b"\0" * shift + secret)
        enc_url = base64.urlsafe_b64encode(b"\0" * shift + secret)
        lead = {0: 0, 1: 2, 2: 3}[shift]
        tail_bits = (shift + len(secret)) % 3
        trail = {0: 0, 1: 3, 2: 2}[tail_bits]  # characters touched by padding/next bytes
        for enc in (enc_std, enc_url):
            core = enc[lead : len(enc) - trail] if trail else enc[lead:]
            core = core.rstrip(b"=")
            if len(core) >= MIN_B64_CORE:
                forms.add(core)
        forms.add(base64.b64encode(secret))
    return {f for f in forms if f}


class LeakGuard:
    """Compiled patterns for one set of secrets (per credential and principal)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[bytes] = set()
        for s in secrets:
            if s:
                forms |= _forms(s.encode("utf-8", "surrogateescape"))
        ordered = sorted(forms, key=len, reverse=True)
        self.longest = len(ordered[0]) if ordered else 0
        self._re = re.compile(b"|".join(re.escape(f) for f in ordered)) if ordered else None
        self._needles = needles(self._re)

    def may_match(self, data: bytes) -> bool:
        """False only when ``data`` certainly holds no secret form (checked at memory speed)."""
        return self._needles is None or may_match(self._needles, data)

    @property
    def active(self) -> bool:
        return self._re is not None

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
    def __init__(self, guard: LeakGuard) -> None:
        self._re = guard._re
        self._may_match = guard.may_match
        self._keep = max(guard.longest - 1, 0)
        self._tail = b""
        self.count = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._re is None:
            return chunk
        buf = self._tail + chunk
        if not self._may_match(buf):
            cut = max(len(buf) - self._keep, 0)
            self._tail = buf[cut:]
            return buf[:cut]
        out = []
        pos = 0
        for m in self._re.finditer(buf):
            out.append(buf[pos : m.start()])
            out.append(REDACTED)
            self.count += 1
            pos = m.end()
        cut = max(pos, len(buf) - self._keep)
        out.append(buf[pos:cut])
        self._tail = buf[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        if self._re is None or not self._tail:
            return b""
        out, n = self._re.subn(REDACTED, self._tail)
        self.count += n
        self._tail = b""
        return out
