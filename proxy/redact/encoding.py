"""Compressed answers under the leak guard: decoded for the scan, or refused — never passed unscanned.

With the guard on, credproxy asks upstreams for ``Accept-Encoding: identity``; an upstream that
compresses anyway (``Content-Encoding: gzip | x-gzip | deflate``, and ``br`` where the optional
``brotli`` package is importable) has its answer decoded here, so the relay can scan the decoded
body and send it without ``Content-Encoding``. Anything credproxy cannot decode with certainty is
refused with 502 ``upstream_error``: an unknown coding (``compress``, ``zstd``, ...), stacked
codings (``gzip, br`` or two headers), a corrupt or truncated stream, data after its end.

Decoding is bounded: ``DECODED_MAX`` decoded bytes per answer (a gzip bomb of a few KiB expands
to gigabytes), zlib asked for at most the room left at each step, brotli fed 64 bytes at a time
(not tested here: ``brotli`` is not installed in CI; the br tests skip or check the 502).
"""

from __future__ import annotations

import zlib

from proxy.errors import UpstreamError

try:
    import brotli
except ImportError:  # optional: without it a ``br`` answer under the leak guard is refused
    brotli = None

DECODED_MAX = 8 << 20  # per answer; a compressed answer is held whole (decoded) before it is sent
# Input bytes per brotli step. Its ``process`` has no output limit (before brotli 1.2), so what one step
# can expand to is bounded by feeding little at a time; the limit is checked after every step.
_BROTLI_SLICE = 64


def Undecodable(detail: str) -> UpstreamError:  # noqa: N802 - reads as the exception it makes
    """502 ``upstream_error``; the audit reason ``upstream_encoding`` says why."""
    return UpstreamError(detail, reason="upstream_encoding")


def content_codings(headers) -> list[str]:
    """The ``Content-Encoding`` codings of an answer, in order, without ``identity``."""
    return [c for v in headers.getall("Content-Encoding", []) for c in (t.strip().lower() for t in v.split(","))
            if c and c != "identity"]


def decoder_for(headers, limit: int = DECODED_MAX) -> Decoder | None:
    """A decoder for the answer's body; None when it is not encoded. Raises ``UpstreamError`` (502)."""
    codings = content_codings(headers)
    if not codings:
        return None
    if len(codings) > 1:
        raise Undecodable("stacked content codings")
    coding = codings[0]
    if coding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, limit, members=True)
    if coding == "deflate":  # RFC 9110 §8.4.1.2: the zlib format
        return _Zlib(zlib.MAX_WBITS, limit, members=False)
    if coding == "br" and brotli is not None:
        return _Brotli(limit)
    raise Undecodable(f"content coding {coding!r} cannot be decoded for the leak guard")


class Decoder:
    """``feed`` compressed bytes, then ``finish``: the whole decoded body (at most ``limit`` bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out = bytearray()

    def _room(self) -> int:
        return self.limit - len(self.out)

    def _add(self, data: bytes) -> None:
        if len(data) > self._room():
            raise Undecodable("decoded answer over the size limit")
        self.out += data

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> bytes:
        raise NotImplementedError


class _Zlib(Decoder):
    def __init__(self, wbits: int, limit: int, *, members: bool) -> None:
        super().__init__(limit)
        self._wbits = wbits
        self._members = members  # gzip: members may follow one another (RFC 1952 §2.2)
        self._d = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> None:
        try:
            while data:
                if self._d.eof:
                    data, self._d = self._next_member(data)
                    continue
                self._add(self._d.decompress(data, self._room() + 1))
                data = self._d.unconsumed_tail
                if self._d.eof:
                    data = self._d.unused_data + data
        except zlib.error:
            raise Undecodable("corrupt compressed answer") from None

    def _next_member(self, data: bytes):
        if not self._members:
            raise Undecodable("data after the end of the compressed answer")
        return data, zlib.decompressobj(self._wbits)

    def finish(self) -> bytes:
        try:
            self._add(self._d.flush())
        except zlib.error:
            raise Undecodable("corrupt compressed answer") from None
        if not self._d.eof:
            raise Undecodable("truncated compressed answer")
        return bytes(self.out)


class _Brotli(Decoder):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> None:
        try:
            for i in range(0, len(data), _BROTLI_SLICE):
                self._add(self._d.process(data[i:i + _BROTLI_SLICE]))
        except brotli.error:
            raise Undecodable("corrupt compressed answer") from None

    def finish(self) -> bytes:
        if not self._d.is_finished():
            raise Undecodable("truncated compressed answer")
        return bytes(self.out)
