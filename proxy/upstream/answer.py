"""One upstream answer as llhttp parses it: the head, then the body as a stream of chunks.

The parser (``httptools.HttpResponseParser``, llhttp in strict mode; one per
connection, ``Reader``) calls back as bytes arrive, filling in the answer read. What it refuses, and what is
refused here on top of it, becomes a ``BadAnswer`` before the head is handed on
(the caller then gets 502), or a ``BodyFailed`` from the body reader after it:

- anything llhttp refuses: a garbage status line, bad header syntax (NUL, bare
  CR, obs-fold, space before the colon), duplicate or conflicting
  ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, bad chunk
  framing;
- a transfer coding other than one ``chunked`` (a body credproxy would have to
  guess the end of), ``101`` (never asked for), more than ``MAX_INTERIM``
  other ``1xx`` answers (skipped, as RFC 9110 §15.2 lets a client do);
- a status line or header field over ``MAX_FIELD`` bytes, more than
  ``MAX_HEADERS`` fields, a head over ``MAX_HEAD`` bytes;
- a body that ends before its length or last chunk (early close).

An answer with neither length nor chunked coding is read until the upstream
closes. HEAD answers and 204/304 have no body, whatever they declare.

Backpressure: received body chunks wait here until the relay takes them; past
``HIGH_WATER`` buffered bytes the connection stops reading, and below
``LOW_WATER`` it reads again, so a body of any size holds bounded memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

import httptools
from multidict import CIMultiDict

from proxy.deadline import Deadline
from proxy.errors import BadAnswer, BodyFailed, BodyTimeout, HeadTimeout
from proxy.upstream.hop_by_hop import HOP_BY_HOP


class AnswerConnection(Protocol):
    """What an answer needs of the connection it arrives on (``proxy.upstream.connection``, which
    imports this module)."""

    loop: asyncio.AbstractEventLoop
    head_clock: HeadClock

    def abort(self) -> None: ...
    def abort_for(self, answer: UpstreamResponse) -> None: ...
    def answered(self, answer: UpstreamResponse) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


MAX_FIELD = 8190  # status line, or one header name + value (aiohttp's client limits, kept)
MAX_HEADERS = 128
MAX_HEAD = 256 * 1024  # all bytes before the body, 1xx answers included
MAX_INTERIM = 16
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
# Lower-case names of the fields ``on_headers_complete`` looks at; those not kept (hop-by-hop) have a kind
# other than _LENGTH and _ENCODING. Header names are tokens, so bytes.lower() is str.lower() here.
_LENGTH, _ENCODING, _CODING, _CONNECTION, _HOP, _REQUEST_ID = ("length", "encoding", "coding", "connection", "hop",
                                                               "request_id")
_ANSWER_FIELDS = {name.encode(): _HOP for name in HOP_BY_HOP} | {
    b"content-length": _LENGTH, b"content-encoding": _ENCODING, b"transfer-encoding": _CODING,
    b"connection": _CONNECTION, b"x-request-id": _REQUEST_ID}
_TEXT = bytes(range(0x20, 0x7F)) + b"\t" + bytes(range(0x80, 0x100))  # what a reason phrase may hold
# The kind of each header name as received (None: a field the answer simply carries), so that a name seen before
# costs one lookup and no lower(). Whether a name is one of the above never changes, so this cannot go stale;
# bounded, since upstreams choose their header names.
_KINDS: dict[bytes, str | None] = {}
_KINDS_MAX = 4096


class _Finished:
    """The parser of an answer received whole (``feed``): bytes fed to it are bytes after the answer's end."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        raise httptools.HttpParserError("bytes after the answer's end")


_FINISHED = _Finished()
_TRAILERS = deque(maxlen=0)  # where the fields after a head go (trailers; a later message's): appended, kept nowhere


class Reader:
    """The llhttp parser of the answers on one connection, and the callbacks it calls, which fill in the answer
    being read (``answer``). One parser serves one answer after another: making one costs more than feeding it a
    small answer. It is renewed only when it may not stand at the start of a message: after an answer whose end
    llhttp did not see (a HEAD answer that declared a body). A connection is reused only after an answer that
    arrived whole, with no byte after it and no fault, so nothing else can be left in it.

    No reference cycle through an answer: ``answer`` is let go once the answer is received whole or its
    connection is gone (the answer refers to its connection, which refers to its reader)."""

    __slots__ = ("parser", "answer", "fields", "at_start", "own")

    def __init__(self, own: bool = False) -> None:
        self.answer: UpstreamResponse | None = None
        self.fields: list[tuple[bytes, bytes]] | deque = _TRAILERS  # the head being parsed: its fields
        self.at_start = True  # the parser stands at the start of a message
        self.own = own  # one answer's own (no connection reader): the parser goes with the answer
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def renew(self) -> None:
        """A new parser: the old one may not stand at the start of a message (``UpstreamResponse`` binds an
        answer to this reader, as ``answer``)."""
        self.parser = httptools.HttpResponseParser(self)
        self.at_start = True

    def close(self) -> None:
        """The connection is gone: no parser kept (its callbacks refer back to this reader)."""
        self.answer = None
        self.parser = None

    # -- llhttp callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.at_start = False
        answer = self.answer
        if answer.done:
            answer.keep_alive = False  # bytes after its end; its fields stay (``headers`` decodes them)
        else:
            self.fields = []

    def on_status(self, reason: bytes) -> None:
        answer = self.answer
        answer.raw_reason += reason
        if len(answer.raw_reason) > MAX_FIELD:
            raise answer._refuse("status line over the limit")
        if reason.translate(None, _TEXT):
            raise answer._refuse("control character in the reason phrase")  # llhttp lets NUL through there

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))  # checked once the head is complete: this runs per field

    def on_headers_complete(self) -> None:
        answer = self.answer
        if answer.done:
            answer.keep_alive = False  # bytes after its end: the connection cannot be trusted again
            return
        fields, self.fields = self.fields, _TRAILERS  # after the head: trailer fields, not forwarded
        if len(fields) > MAX_HEADERS:
            raise answer._refuse("too many header fields")
        status = self.parser.get_status_code()
        # Every field is among the bytes fed so far: within MAX_FIELD of them (the usual small answer) no limit
        # can be reached, so the sizes are summed only past that, and for 1xx answers (whose fields count too).
        if fields and (answer._head_bytes > MAX_FIELD or status < 200 or answer._interim):
            sizes = [len(n) + len(v) for n, v in fields]
            answer._field_bytes += sum(sizes)
            if max(sizes) > MAX_FIELD:
                raise answer._refuse("header field over the limit")
            if answer._field_bytes > MAX_HEAD:  # the fields of 1xx answers count too
                raise answer._refuse("answer head over the limit")
        if status < 200:
            if status == 101:
                raise answer._refuse("unrequested 101 answer", "upstream_bad_framing")
            answer._interim += 1
            if answer._interim > MAX_INTERIM:
                raise answer._refuse("too many 1xx answers", "upstream_bad_framing")
            answer.raw_reason = b""  # the final answer's phrase follows
            return
        # One pass over the fields: the framing facts, and the fields the caller's answer carries (decoded, without
        # the hop-by-hop ones), so neither the relay nor anyone else copies or searches a header set for them.
        forward = []
        te: list[bytes] = []
        connection: list[bytes] = []
        length = None
        kinds = _KINDS
        for field in fields:
            name = field[0]
            if name in kinds:
                kind = kinds[name]
            else:
                kind = _ANSWER_FIELDS.get(name.lower())  # llhttp (strict) let only token characters into a name
                if len(kinds) < _KINDS_MAX:
                    kinds[name] = kind
            if kind is not None:
                if kind is _LENGTH:
                    if length is None:
                        length = field[1]
                        answer.length_at = len(forward)
                elif kind is _ENCODING:
                    answer.encoded = True
                elif kind is _REQUEST_ID:
                    answer.own_request_id = True
                else:
                    if kind is _CODING:
                        te.append(field[1])
                    elif kind is _CONNECTION:
                        connection.append(field[1])
                    continue
            forward.append(field)
        if te and (len(te) > 1 or te[0].decode("utf-8", "surrogateescape").strip().lower() != "chunked"):
            raise answer._refuse("transfer coding other than a single chunked", "upstream_bad_framing")
        # Names Connection lists are hop-by-hop too; a lone "keep-alive" (the usual one) names none else.
        if connection and (len(connection) > 1 or connection[0].lower() != b"keep-alive"):
            named = {t.strip().lower() for v in connection for t in v.decode("utf-8", "surrogateescape").split(",")}
            if not named <= HOP_BY_HOP:
                forward = [(k, v) for k, v in forward if k.decode("utf-8", "surrogateescape").lower() not in named]
                answer.length_at = -2  # where it was is not known any more
        answer._fields = fields
        answer.forward_raw = forward
        answer.status = status
        answer.keep_alive = self.parser.should_keep_alive()
        if answer._head_only or status in _NO_BODY_STATUS:
            answer.content_length = None if answer._head_only else 0
            answer.done = True  # llhttp would wait for a HEAD answer's declared body: it ends here
        elif te:
            pass  # chunked: no length, read to the last chunk
        elif length is not None:
            answer.content_length = int(length)  # llhttp checked the digits
        else:
            answer._until_close = True  # neither length nor chunked: the answer ends with the connection
            answer.keep_alive = False
        answer._in_head = False

    def on_body(self, chunk: bytes) -> None:
        answer = self.answer
        if answer.done:
            answer.keep_alive = False  # bytes after its end: the connection cannot be trusted again
            return
        answer._chunks.append(chunk)
        answer._buffered += len(chunk)
        if answer._buffered > HIGH_WATER and not answer._paused:
            answer._paused = True
            answer._conn.pause_reading()
        if answer._waiter is not None:
            answer._wake()

    def on_message_complete(self) -> None:
        self.at_start = True
        answer = self.answer
        if answer._in_head or answer.done:
            return  # a 1xx answer ended (the final one follows), or the end of a HEAD answer's body
        answer.done = True
        if answer._waiter is not None:
            answer._wake()


class HeadClock:
    """The head deadline of the answers on one connection, on one ``Deadline`` that outlives them (a timer
    about once per read timeout on a busy connection, not one per answer). An answer that has its head is not
    told when its deadline passes."""

    __slots__ = ("_deadline", "_answer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deadline = Deadline(loop, self._expired)
        self._answer: UpstreamResponse | None = None

    def start(self, answer: UpstreamResponse, timeout: float) -> None:
        """``answer``'s head is due within ``timeout`` from now (the one answer awaited on the connection)."""
        self._answer = answer
        self._deadline.set(timeout)

    def stop(self) -> None:
        """The connection is gone: no timer, no answer kept."""
        self._deadline.stop()
        self._answer = None

    def _expired(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            answer._head_timed_out()  # nothing, if it has its head


class UpstreamResponse:
    """What the relay reads: ``status``, ``reason``, ``headers``, ``content_length``, the body through
    ``read_chunk`` / ``iter_chunks`` / ``read``; then ``release()`` (a connection whose answer was read to its
    end goes back to its pool by itself; one that was not is closed) or ``close()``."""

    status: int
    content_length: int | None
    # Starting values shared by every answer (class attributes, set per answer only when they change): most of
    # an answer's state, made per request, would otherwise be two dozen stores before a byte arrives.
    status, content_length = 0, None
    forward_raw: list[tuple[bytes, bytes]] | tuple = ()  # the fields the caller's answer carries, as received
    length_at = -1  # the index of its Content-Length among them (-1: none; -2: not known)
    own_request_id = False  # the upstream sent an X-Request-Id (the caller's answer carries credproxy's instead)
    arrived_in = b""  # the bytes the whole answer came in, when it came in one read (all of it is in them)
    raw_reason = b""  # the final answer's reason phrase, as received (on_status fills it in)
    _forward: CIMultiDict[str] | None = None
    encoded = False
    _full: CIMultiDict[str] | None = None
    _fields: list[tuple[bytes, bytes]] | tuple = ()  # on_message_begin gives each head its list
    _head_bytes = 0  # bytes fed while the head is incomplete (a line that never ends); none: a stale connection
    _field_bytes = 0
    _refusal: BadAnswer | None = None
    _interim = 0
    _in_head = True
    _until_close = False
    # Both sides said keep-alive, and nothing since gave the connection up (a fault; bytes after the answer's end):
    # once ``done``, its connection may carry another request.
    keep_alive = False
    done = False  # the whole answer was received (not necessarily read)
    _buffered = 0
    _paused = False
    _error: BaseException | None = None
    _waiter: asyncio.Future[None] | None = None
    _timed = False  # ``wait_head`` put its deadline on the connection's HeadClock
    _settled = False  # the head arrived, or never will (failure says why)
    _head_only = False  # a HEAD answer: no body, whatever it declares
    _on_head: Callable[[UpstreamResponse], None] | None = None
    _head: asyncio.Future[None] | None = None  # without ``on_head``: what ``wait_head`` hands out
    failure: BaseException | None = None  # with ``on_head``: why there is no head (BadAnswer, HeadTimeout)

    def __init__(self, conn: AnswerConnection, method: str, read_timeout: float,
                 on_head: Callable[[UpstreamResponse], None] | None = None, reader: Reader | None = None) -> None:
        """``on_head``: called once, from the connection's callbacks, when the head has arrived (with the bytes
        that came with it parsed) or has failed (``failure``), instead of settling the future ``wait_head``
        hands out; its head deadline starts at once. ``reader``: the connection's (else the answer has its own)."""
        self._conn = conn
        self._read_timeout = read_timeout
        if method == "HEAD":
            self._head_only = True
        if reader is None:
            reader = Reader(own=True)
        elif not reader.at_start:
            reader.renew()
        reader.answer = self  # the one the next bytes belong to
        self._reader = reader
        self._parser = reader.parser
        self._chunks: deque[bytes] = deque()
        if on_head is None:
            self._head = conn.loop.create_future()
        else:
            self._on_head = on_head
            conn.head_clock.start(self, read_timeout)

    @property
    def forward_headers(self) -> CIMultiDict[str]:
        """The fields the caller's answer carries (without the hop-by-hop ones), decoded: this answer's own copy,
        for the relay to change (made when first asked for: ``forward_raw`` serves an answer relayed as bytes)."""
        if self._forward is None:
            self._forward = CIMultiDict([(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                                         for n, v in self.forward_raw])
        return self._forward

    @property
    def reason(self) -> str:
        """The reason phrase, decoded (``raw_reason``: as received)."""
        return self.raw_reason.decode("utf-8", "surrogateescape")

    @property
    def headers(self) -> CIMultiDict[str]:
        """All header fields of the final answer, hop-by-hop ones included (decoded when first asked for: the
        relay takes ``forward_headers``)."""
        if self._full is None:
            self._full = CIMultiDict([(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                                      for n, v in (self._fields if not self._in_head else ())])
        return self._full

    # -- fed by the connection ------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        first = not self._head_bytes  # no byte yet (every byte fed before the end of the head is counted there)
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except BadAnswer as exc:
            self._fail(exc)
        except httptools.HttpParserCallbackError:
            self._fail(self._refusal or BadAnswer("answer refused"))  # what a callback below raised
        except httptools.HttpParserUpgrade:
            self._fail(BadAnswer("unrequested protocol upgrade", "upstream_bad_framing"))
        except httptools.HttpParserError as exc:
            # llhttp's messages are fixed texts (no bytes of the answer in them); the type names the fault
            self._fail(BadAnswer(f"unparseable answer: {type(exc).__name__}"))
        else:
            if self._in_head:
                if self._head_bytes > MAX_HEAD:
                    self._fail(BadAnswer("answer head over the limit"))
                return  # more of the head to come
        if self.done:
            if self._parser is not _FINISHED:
                # Received whole: no byte comes after this. Its reader lets go of it first (a request the news
                # below starts may take the connection, and its reader, at once), so no cycle runs through it: it is
                # freed as soon as its reader drops it, not left to the cyclic GC (whose work grows with each
                # request's garbage).
                self._let_go()
            if not self._settled:  # free again before anyone hears of it: a request the news starts can have it
                if first:
                    self.arrived_in = data
                self._conn.answered(self)
                self._settle(None)
        elif not self._in_head and not self._settled:
            # The head is handed on only once the bytes that came with it are parsed: a fault found in them
            # (a bad first chunk, say) is still a clean 502 rather than an answer cut off.
            self._settle(None)

    def _let_go(self) -> None:
        """Nothing more to parse: the reader is free for the connection's next answer (its own one goes)."""
        self._parser = _FINISHED
        reader = self._reader
        if reader.answer is self:
            reader.answer = None
        if reader.own:
            reader.parser = None  # its callbacks refer back to the reader: no cycle left

    def _settle(self, failure: BaseException | None) -> None:
        """The head is in (``failure`` None) or never will be: the one place its waiter is told."""
        self._settled = True  # the head clock, when it fires, finds nothing to do
        on_head = self._on_head
        if on_head is not None:
            self._on_head = None
            if failure is not None:
                self.failure = failure
            on_head(self)
        elif self._head.done():
            pass  # its waiter stopped waiting (cancelled): nobody to tell
        elif failure is None:
            self._head.set_result(None)
        else:
            self._head.set_exception(failure)
            self._head.exception()  # retrieved here: a failed head nobody awaits any more is not an error

    def connection_lost(self) -> None:
        if self._parser is not _FINISHED:
            self._let_go()
        if self._in_head:
            self._fail(BadAnswer("connection closed before the answer", stale=not self._head_bytes))
        elif not self.done:
            if self._until_close and self._error is None:
                self.done = True  # this answer's end is the end of the connection
                self._wake()
            else:
                self._fail(BodyFailed("upstream closed the connection before the answer's end"))

    def _fail(self, exc: BaseException) -> None:
        self.keep_alive = False  # the connection cannot be trusted again
        if self.done:
            return  # garbage after a complete answer: that answer stands, the connection does not
        self._conn.abort()  # first: whoever learns of the failure below finds the connection given up
        if not self._settled:
            self._settle(exc)
        elif self._error is None:
            self._error = exc if isinstance(exc, BodyFailed) else BodyFailed(str(exc))
            self._wake()

    def _refuse(self, why: str, reason: str = "upstream_failed") -> BadAnswer:
        # httptools wraps what a callback raises in HttpParserCallbackError: ``feed`` reports this one
        self._refusal = BadAnswer(why, reason)
        return self._refusal

    # -- read by the relay ------------------------------------------------------------------------------

    def wait_head(self) -> asyncio.Future[None]:
        """The head, to await: fails with ``BadAnswer``, or ``HeadTimeout`` past the read timeout (counted from
        this call). A future, not a coroutine (one frame fewer per request): the deadline is on the connection's
        ``HeadClock``, which ignores an answer that has its head, and a caller that stops waiting aborts the connection
        (``_fail`` settles the head)."""
        head = self._head
        if not self._settled and not self._timed:
            self._timed = True
            self._conn.head_clock.start(self, self._read_timeout)
        return head

    def _head_timed_out(self) -> None:
        if not self._settled:
            self._conn.abort()
            self._settle(HeadTimeout("no answer head within the read timeout"))

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises ``BodyFailed`` (``BodyTimeout``)."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= LOW_WATER:
            self._paused = False
            self._conn.resume_reading()
        return chunk

    async def iter_chunks(self):
        while chunk := await self.read_chunk():
            yield chunk

    def peek_whole(self) -> bytes:
        """The whole body of an answer that has arrived whole, left in place (``take_whole`` still gives it)."""
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        data = b"".join(chunks)
        chunks.clear()
        chunks.append(data)
        return data

    def take_whole(self) -> bytes:
        """The whole body of an answer that has arrived whole (``done``, no error): no waiting."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The whole body (the caller knows it is small)."""
        if self.done and self._error is None:
            return self.take_whole()
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    async def _wait(self) -> None:
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, self._body_timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _body_timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done() and self._error is None and not self.done:
            self._error = BodyTimeout("no body bytes within the read timeout")
            self.keep_alive = False
            waiter.set_result(None)
            self._conn.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def release(self) -> None:
        """Done with this answer: an unfinished one closes its connection (it cannot be reused half-read)."""
        if not self.done:
            self.close()
        self._chunks.clear()
        self._buffered = 0

    def close(self) -> None:
        """Abandon the answer: its connection is closed and a waiting reader gets ``BodyFailed``."""
        if not self.done and self._error is None:
            self._error = BodyFailed("answer closed before its end")
            self.keep_alive = False
            self._wake()
        self._conn.abort_for(self)
