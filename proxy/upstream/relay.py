"""Relay the upstream answer to the caller: status, headers and body, streamed,
through the leak guard.

``redact``: echoed secrets become ``[REDACTED]`` — in header values, header
names, the reason phrase and the body (Content-Length is dropped since the
length may change). ``block``: the first ``BLOCK_BUFFER`` bytes are held
before anything is sent, so a leak there answers 502; a leak found later
aborts the connection (the caller sees a truncated answer, never the secret).
A compressed body (an upstream that ignored ``Accept-Encoding: identity``) is
decoded for the scan by ``proxy.redact.encoding`` and sent decoded, without
``Content-Encoding``, by ``relay_whole``, or refused with 502 when it cannot be
decoded — never passed on unscanned.

An upstream answer whose framing credproxy would have to guess at never gets
here: the client refuses it (``proxy.upstream.answer``) and the caller gets 502.
A caller that takes no bytes for ``write_timeout`` (a slow reader holding an
upstream connection open) is disconnected: the ``ResponseWriter`` raises
``CallerStalled`` (``proxy.server.response``).

Three strategies, chosen by ``relay``. ``relay_whole``: answers with a
``Content-Length`` up to ``WHOLE_BODY_MAX`` (64 KiB, typical of JSON APIs) are read whole, scanned once and sent with their (new) length: no
chunked framing, one write, the upstream connection released before the caller
reads, and a failure while reading them is a clean 502/504. So are answers up
to ``WHOLE_ANSWER_MAX`` (1 MiB, the line SPEC draws for buffering request
bodies) while the ``AnswerBudget`` — the bytes of such answers held at once in
this process, ``ANSWER_BUDGET`` — has room (``relay_held``); the rest are streamed
(``relay_streamed``) with backpressure both ways: the upstream connection reads
no further than the caller takes.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from functools import partial

from multidict import CIMultiDict

from proxy.errors import BodyFailed, LeakBlocked, UpstreamError, UpstreamTimeout
from proxy.redact import encoding
from proxy.redact.leak_guard import LeakGuard, StreamRedactor
from proxy.server.request import Request
from proxy.server.response import CallerStalled, ResponseWriter
from proxy.upstream.answer import UpstreamResponse

log = logging.getLogger("credproxy.relay")

BLOCK_BUFFER = 1 << 20
WHOLE_BODY_MAX = 64 * 1024
WHOLE_ANSWER_MAX = 1 << 20
ANSWER_BUDGET = 8 << 20  # 8 x 1 MiB answers at once; more stream, so memory stays bounded under any load
_NO_BODY = {204, 304}
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class AnswerBudget:
    """Bytes of answers between ``WHOLE_BODY_MAX`` and ``WHOLE_ANSWER_MAX`` held whole at once, bounded."""

    def __init__(self, limit: int = ANSWER_BUDGET) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class _BodyRead:
    """``with BODY_READ:`` — an upstream body read failing before anything went to the caller answers 504
    (timeout) or 502. A class, not a generator context manager: it runs on every small answer."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, TimeoutError):
            raise UpstreamTimeout("upstream body timed out") from None
        if kind is not None and issubclass(kind, BodyFailed):
            raise UpstreamError(f"bad upstream body: {kind.__name__}", reason="upstream_body_failed") from None
        return False


BODY_READ = _BodyRead()


def _head_text(reason: str | None, headers: CIMultiDict[str]) -> bytes:
    """The reason phrase and all names and values as one text, for one quick check before scanning part by part."""
    return "\n".join([reason or "", *map("\n".join, headers.items())]).encode("utf-8", "surrogateescape")


def _guard_headers(headers: CIMultiDict[str], guard: LeakGuard) -> tuple[CIMultiDict[str], int]:
    found = 0
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        _, hits = guard.redact_text(key)
        if hits:  # a header named after the secret cannot be renamed meaningfully: drop it
            found += hits
            continue
        value, hits = guard.redact_text(value)
        found += hits
        out.add(key, value)
    return out, found


class Prepared:
    """The answer's head as it will go to the caller, and how its body is to be relayed (``prepare``)."""

    __slots__ = ("headers", "reason", "body", "whole", "has_body", "length", "redactor", "decoder", "scan_body")

    def __init__(self, headers, reason, body, whole, has_body, length, decoder, scan_body) -> None:
        self.headers: CIMultiDict[str] = headers
        self.reason: str | None = reason
        self.body: bytes | None = body  # a small answer that arrived whole: all of its body, read already
        self.whole, self.has_body, self.length = whole, has_body, length
        self.decoder: encoding.Decoder | None = decoder
        self.scan_body = scan_body

    @property
    def at_hand(self) -> bool:
        """Whether ``relay_now`` can send it: small, unencoded, arrived whole (the usual JSON answer)."""
        return self.body is not None and self.decoder is None


async def relay(request: Request, response: ResponseWriter, upstream: UpstreamResponse, head: bytes,
                guard: LeakGuard, mode: str, trace, leak_counter, *, budget: AnswerBudget | None = None) -> None:
    """Check and redact the head, then hand the answer to one of the three strategies. ``head``: body bytes
    already read (the expired-answer peek), sent first."""
    ready = prepare(request, upstream, head, guard, mode, trace, leak_counter)
    await deliver(response, upstream, head, ready, guard, mode, trace, leak_counter, budget=budget)


def prepare(request: Request, upstream: UpstreamResponse, head: bytes, guard: LeakGuard, mode: str, trace,
            leak_counter) -> Prepared:
    """The head checked and redacted (``LeakBlocked`` under ``block``), and the body read when it is small and
    has arrived whole. Waits for nothing. Releases ``upstream`` when it raises."""
    try:
        headers = upstream.forward_headers  # this answer's own copy, without the hop-by-hop fields
        scanning = mode != "off" and guard.active
        # ``encoded`` first: nearly every answer has no Content-Encoding. The upstream's own headers: one it named in
        # Connection is stripped from ``headers`` but its body is still encoded.
        compressed = upstream.encoded and bool(encoding.content_codings(upstream.headers))
        reason = upstream.reason  # sent if it is plain printable text, else the standard phrase (None)
        if not (reason and reason.isascii() and reason.isprintable()):
            reason = None
        has_body = request.method != "HEAD" and upstream.status not in _NO_BODY
        length = upstream.content_length
        whole = has_body and length is not None and length <= WHOLE_BODY_MAX
        body = None
        if whole and not compressed and upstream.done:
            # A small answer that has arrived whole (the usual one) is read now: one quick check covers its head
            # and body together, and relay_whole neither waits nor scans again when nothing can match.
            body = head + upstream.take_whole()
        clean = False
        if scanning:
            text = _head_text(reason, headers)
            if not guard.may_match(text if body is None else text + body):
                clean = body is not None
            else:
                found = 0
                if reason is not None:
                    reason, found = guard.redact_text(reason)
                headers, in_headers = _guard_headers(headers, guard)
                found += in_headers
                if found:
                    leak_counter.inc(found)
                    if mode == "block":
                        raise LeakBlocked("secret echoed in the response head", reason="leak_blocked")
        decoder = encoding.decoder_for(upstream.headers) if scanning and compressed and has_body else None
        scan_body = scanning and not clean and not (compressed and decoder is None)
        headers["X-Request-Id"] = trace.request_id
        if scan_body and has_body:
            headers.popall("Content-Length", None)
    except BaseException:
        upstream.release()
        raise
    if decoder is not None:
        headers.popall("Content-Encoding", None)  # sent decoded
    return Prepared(headers, reason, body, whole, has_body, length, decoder, scan_body)


async def deliver(response: ResponseWriter, upstream: UpstreamResponse, head: bytes, ready: Prepared,
                  guard: LeakGuard, mode: str, trace, leak_counter, *, budget: AnswerBudget | None = None) -> None:
    """Relay the body of a ``prepare``d answer by one of the three strategies."""
    headers, reason = ready.headers, ready.reason
    if ready.decoder is not None:  # held whole, decoded (bounded), scanned, sent decoded
        return await relay_whole(response, upstream, head, headers, reason, guard, mode, leak_counter, trace,
                                 ready.decoder)
    if ready.whole:
        return await relay_whole(response, upstream, head, headers, reason, guard if ready.scan_body else None,
                                 mode, leak_counter, trace, body=ready.body)
    redactor = guard.stream() if ready.scan_body else None
    length = ready.length
    if ready.has_body and length is not None and length <= WHOLE_ANSWER_MAX and budget is not None \
            and budget.take(length):
        try:
            return await relay_held(response, upstream, head, headers, reason, redactor, mode, leak_counter,
                                    trace)
        finally:
            budget.give(length)
    return await relay_streamed(response, upstream, head, headers, reason, redactor, mode, leak_counter,
                                trace, has_body=ready.has_body)


def relay_raw(request: Request, response: ResponseWriter, upstream: UpstreamResponse, guard: LeakGuard,
              mode: str, trace) -> bool | None:
    """The usual answer — small, unencoded, arrived whole, nothing in it the leak guard could match — sent on
    as the bytes it came in, with no decoding: what ``prepare`` and ``relay_now`` make of it, byte for byte
    (a property test holds them to it). True: the caller is behind (see ``relay_now``). None: not such an
    answer, and nothing was done (``prepare`` takes it)."""
    length = upstream.content_length
    status = upstream.status
    if length is None or length > WHOLE_BODY_MAX or not upstream.done or upstream.encoded \
            or request.method == "HEAD" or status in _NO_BODY:
        return None
    reason = upstream.raw_reason
    line = _RAW_LINES.get((status, reason))
    if line is None:
        line = _raw_line(status, reason)
    fields = upstream.forward_raw
    body = upstream.peek_whole()
    # The check covers what prepare's does (the reason, the fields and the body), or more: the bytes the whole
    # answer came in hold each of them whole, and a needle absent from them is absent from every part.
    if mode != "off" and guard.active and \
            guard.may_match(upstream.arrived_in or b"\n".join([reason, *map(b"\n".join, fields), body])):
        return None
    at = upstream.length_at
    if at < -1 or upstream.own_request_id:
        return None  # rare: the exact path replaces the upstream's X-Request-Id in its place
    kept = [*map(b": ".join, fields)]
    if at >= 0:
        del kept[at]  # the writer frames the answer itself
    # Joined at C speed (no hop-by-hop field is among them, and llhttp allows one Content-Length only).
    head = b"".join((line, b"\r\n".join(kept), b"\r\n" if kept else b"", b"X-Request-Id: ",
                     trace.request_id.encode(), b"\r\n"))
    lines = len(kept) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        return None  # never split an answer (llhttp let no CR or LF into a field: the exact path refuses it)
    upstream.release()  # body holds it whole (peek_whole)
    try:
        return response.send_raw(status, head, body)
    except ConnectionError as exc:
        _abort(response, trace, exc)
        return False


_RAW_LINES: dict[tuple[int, bytes], bytes] = {}  # (status, reason as received) -> relay_raw's status line
_RAW_LINES_MAX = 256


def _raw_line(status: int, reason: bytes) -> bytes:
    """The status line ``relay_raw`` sends: the reason as received if it is plain printable text, else the
    standard phrase (as ``prepare`` chooses), kept for the next answer (bounded: upstreams choose their phrases)."""
    if reason and reason.isascii() and reason.decode("ascii").isprintable():
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    else:
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
    if len(_RAW_LINES) < _RAW_LINES_MAX:
        _RAW_LINES[(status, reason)] = line
    return line


def relay_now(response: ResponseWriter, upstream: UpstreamResponse, ready: Prepared, guard: LeakGuard, mode: str,
              trace, leak_counter) -> bool:
    """Send an answer that is ``ready.at_hand``, waiting for nothing: what ``relay_whole`` does with it. True
    when the caller's connection is not keeping up (the writes are buffered: wait for ``drain`` before the
    next). ``LeakBlocked`` (``block``) before anything is sent; a caller gone is aborted and recorded."""
    upstream.release()
    data = ready.body
    if ready.scan_body:
        data, found = guard.redact(data)
        _count_body_leaks(found, leak_counter, mode)
    try:
        return response.send_now(upstream.status, ready.headers, (data,), ready.reason)
    except ConnectionError as exc:
        _abort(response, trace, exc)
        return False


async def relay_streamed(response: ResponseWriter, upstream: UpstreamResponse, head: bytes,
                         headers: CIMultiDict[str], reason: str | None, redactor: StreamRedactor | None, mode: str,
                         leak_counter, trace, *, has_body: bool) -> None:
    """An answer too long (or of unknown length) to hold: sent on chunk by chunk as the caller takes it.
    Under ``block`` the first ``BLOCK_BUFFER`` bytes are held and scanned before anything is sent."""
    try:
        held = b""
        if redactor is not None and mode == "block" and has_body:
            # The held bytes go through the answer's own redactor once (not a probe first and then again):
            # what it decided and its undecided tail together are all of them.
            held = redactor.feed(await read_upto(upstream, head, BLOCK_BUFFER))
            head = b""
            found = redactor.count + redactor.tail_count()
            if found:
                leak_counter.inc(found)
                raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")
    except BaseException:
        upstream.release()
        raise
    try:
        response.start(upstream.status, headers, reason)
        if not has_body:
            await response.end()
            return
        if held:
            await response.write(held)
        await _write(response, redactor, head, mode)
        while chunk := await upstream.read_chunk():
            await _write(response, redactor, chunk, mode)
        if redactor is not None:
            tail = redactor.flush()
            if redactor.count and mode == "block":
                raise LeakBlocked("secret echoed late in the response body", reason="leak_blocked")
            await _write(response, None, tail, mode)
            if redactor.count:
                leak_counter.inc(redactor.count)
        await response.end()
    except (BodyFailed, LeakBlocked, ConnectionError, CallerStalled) as exc:
        _abort(response, trace, exc)
    finally:
        upstream.release()


async def relay_whole(response: ResponseWriter, upstream: UpstreamResponse, head: bytes, headers: CIMultiDict[str],
                      reason: str | None, guard: LeakGuard | None, mode: str, leak_counter, trace,
                      decoder: encoding.Decoder | None = None, *, body: bytes | None = None) -> None:
    """A small answer of known length, or a compressed one to decode (``decoder``): read it whole, scan it once,
    send it with its (new) length. ``body``: the whole body, when it was read already (``head`` included)."""
    try:
        if body is not None:
            data = body
        else:
            with BODY_READ:
                if decoder is None:
                    data = head + await upstream.read()
                else:
                    decoder.feed(head)
                    while chunk := await upstream.read_chunk():
                        decoder.feed(chunk)
                    data = decoder.finish()
    finally:
        upstream.release()
    if guard is not None:
        data, found = guard.redact(data)
        _count_body_leaks(found, leak_counter, mode)
    try:  # a Content-Length still among the headers is the body's own: relay drops it when the body is scanned
        await response.send_pieces(upstream.status, headers, (data,), reason)  # send is this, one call deeper
    except (ConnectionError, CallerStalled) as exc:
        _abort(response, trace, exc)


async def relay_held(response: ResponseWriter, upstream: UpstreamResponse, head: bytes,
                     headers: CIMultiDict[str], reason: str | None, redactor: StreamRedactor | None, mode: str,
                     leak_counter, trace) -> None:
    """An answer of known length up to ``WHOLE_ANSWER_MAX``: every chunk read and scanned, and held, before
    anything is sent, so it goes out with its (new) length and a failed read is still a clean 502/504.

    The chunks are kept as they arrive (not joined into one buffer) and written one by one: the answer is
    held once, not twice, and goes out in writes of the size it came in (~256 KiB; measured cheaper than one
    write of the whole answer, and than smaller ones)."""
    pieces: list[bytes | memoryview] = []
    take = partial(redactor.feed_held, pieces) if redactor is not None else pieces.append
    try:
        with BODY_READ:
            if head:
                take(head)
            while chunk := await upstream.read_chunk():
                take(chunk)  # scanned as it arrives: the unscanned chunk is not kept as well
    finally:
        upstream.release()
    if redactor is not None:
        pieces.append(redactor.flush())
        _count_body_leaks(redactor.count, leak_counter, mode)
    try:  # as in relay_whole, a Content-Length still among the headers is the body's own
        response.start(upstream.status, headers, reason, length=sum(map(len, pieces)))
        for piece in pieces:
            await response.write(piece)
        await response.end()
    except (ConnectionError, CallerStalled) as exc:
        _abort(response, trace, exc)


async def drained(response: ResponseWriter, trace) -> None:
    """After ``relay_now`` said the caller is behind: wait until it has taken the answer (``write_timeout``)."""
    try:
        await response.drain()
    except (ConnectionError, CallerStalled) as exc:
        _abort(response, trace, exc)


def _count_body_leaks(found: int, leak_counter, mode: str) -> None:
    """A held body's echoes are counted; under ``block`` any echo refuses the answer (nothing was sent yet)."""
    if found:
        leak_counter.inc(found)
        if mode == "block":
            raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")


def _abort(response: ResponseWriter, trace, exc: BaseException) -> None:
    """The answer cannot be finished: record why and cut the caller's connection (never a body that looks whole)."""
    trace.outcome, trace.reason = "error", _abort_reason(exc)
    log.warning("response aborted mid-stream", extra={"request_id": trace.request_id, "reason": trace.reason,
                                                      "error": type(exc).__name__})
    response.abort()


def _abort_reason(exc: BaseException) -> str:
    if isinstance(exc, LeakBlocked):
        return exc.reason
    if isinstance(exc, CallerStalled):
        return "caller_write_timeout"
    if isinstance(exc, ConnectionError):
        return "caller_disconnected"
    return "upstream_body_failed"


async def _write(response: ResponseWriter, redactor: StreamRedactor | None, chunk: bytes, mode: str) -> None:
    if redactor is not None:
        before = redactor.count
        chunk = redactor.feed(chunk)
        if mode == "block" and redactor.count > before:
            raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")
    if chunk:
        await response.write(chunk)


async def read_upto(upstream: UpstreamResponse, head: bytes, limit: int) -> bytes:
    """At least ``limit`` bytes of the body when it has them (perhaps one chunk more), or all of it."""
    parts, got = [head], len(head)
    with BODY_READ:
        while got < limit:
            chunk = await upstream.read_chunk()
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts)
