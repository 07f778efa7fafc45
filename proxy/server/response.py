"""The answer to one request, written by the pipeline through a ``ResponseWriter``.

``start(status, headers)`` sends the head (buffered in the transport until the
first ``write``/``end``); ``write(data)`` sends body bytes; ``end()`` finishes the
answer; ``send(status, headers, body)`` is all three for an answer held whole;
``abort()`` cuts the connection (an answer that cannot be finished must never look
whole to the caller). ``write``/``end`` wait while the caller is not taking bytes
(the transport's write buffer is over its high-water mark); a caller that takes
none for ``write_timeout`` raises ``CallerStalled``. A caller gone raises
``ConnectionResetError``.

Framing is the writer's: a ``Content-Length`` among the headers is kept (the
body written must match it); otherwise the body is sent chunked to HTTP/1.1
callers and delimited by closing the connection for HTTP/1.0 ones. Answers to
``HEAD``, ``1xx``, ``204`` and ``304`` carry no body, and a ``2xx`` to ``CONNECT``
no framing headers at all (RFC 9110 §9.3.6: the tunnel follows). ``Connection: close`` is
added when the connection will close after this answer.
"""

from __future__ import annotations

from http import HTTPStatus

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import Answer

CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_CI = (CIMultiDict, CIMultiDictProxy)
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


def _may_frame(lower: str) -> bool:
    """Whether some line may name one of ``_FRAMING`` (a name whose lower() is one is in the text's lower())."""
    return "content-length" in lower or "transfer-encoding" in lower or "connection" in lower \
        or "keep-alive" in lower


class CallerStalled(Exception):
    """The caller took no response bytes within the write timeout."""


class ResponseWriter:
    __slots__ = ("_conn", "_head_only", "_connect", "_version", "started", "finished", "status", "_chunked", "close",
                 "_length")

    def __init__(self, connection, method: str, version: tuple[int, int], keep_alive: bool) -> None:
        self._conn = connection
        self._head_only = method == "HEAD"
        self._connect = method == "CONNECT"  # a 2xx to CONNECT has no body: the tunnel follows
        self._version = version
        self.started = False
        self.finished = False
        self.status = 0
        self._chunked = False
        self._length: int | None = None
        self.close = not keep_alive  # the connection closes after this answer

    def start(self, status: int, headers, reason: str | None = None, *, length: int | None = None) -> None:
        """Send the head. ``headers``: a multidict or (name, value) pairs; framing headers in it other than
        ``Content-Length`` are ignored. ``length``: the body's length, when the caller of ``start`` knows it."""
        self._conn.send(self._head(status, headers, reason, length))

    def _head(self, status: int, headers, reason: str | None, length: int | None) -> bytes:
        """The head ``start`` sends (and the state it sets: chunked, close, length)."""
        if self.started:
            raise RuntimeError("answer already started")
        self.started = True
        self.status = status
        if self._conn.closing:
            self.close = True
        items = headers.items() if hasattr(headers, "items") else headers
        if not isinstance(items, (list, tuple)) and not hasattr(headers, "items"):
            items = tuple(items)  # a one-shot iterable: the exact pass below may need a second look
        # Every answer: the lines joined at C speed, and one search of their lower-case text for the framing
        # names (a hit, rare, takes the exact pass below), rather than a lower() and a set lookup per header.
        try:
            text = "\r\n".join(map(": ".join, items))
        except TypeError:  # a value that is not a str: the exact pass formats it
            text = None
        if text is None:
            framed = True
        elif text.isascii() and isinstance(headers, _CI):  # ASCII: the multidict folds case as str.lower() does
            framed = "Content-Length" in headers or "Transfer-Encoding" in headers or "Connection" in headers \
                or "Keep-Alive" in headers
        else:
            framed = _may_frame(text.lower())
        if framed:
            lines = []
            for name, value in items:
                lower = name.lower()
                if lower in _FRAMING:
                    if lower == "content-length" and length is None:
                        length = int(value)
                    continue
                lines.append(f"{name}: {value}")
            text = "\r\n".join(lines)
            count = len(lines)
        else:
            count = len(items) if text else 0
        if count and (text.count("\n") != count - 1 or text.count("\r") != count - 1):
            raise ValueError("CR or LF in a response header")  # never split an answer
        if reason:
            if "\r" in reason or "\n" in reason:
                raise ValueError("CR or LF in a response header")
            parts = [f"HTTP/1.1 {status} {reason}\r\n"]
        else:
            parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"]
        if text:
            parts.append(text)
            parts.append("\r\n")
        framing = self._framing(status, length)
        return "".join(parts).encode("utf-8", "surrogateescape") + framing

    def _framing(self, status: int, length: int | None) -> bytes:
        """The head's last lines — its framing and connection fields, and the blank line — and the state they
        set (chunked, close, length). Called once per answer (``started`` guards it)."""
        if status < 200 or status in (204, 304) or (status < 300 and self._connect):
            framing = b""  # no body (a 2xx to CONNECT: the tunnel follows)
        elif length is not None:
            self._length = length
            framing = b"Content-Length: %d\r\n" % length
        elif self._head_only:
            framing = b""
        elif self._version >= (1, 1):
            self._chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""
            self.close = True  # the end of the body is the end of the connection
        if self.close:
            return framing + b"Connection: close\r\n\r\n"
        if self._version < (1, 1):
            return framing + b"Connection: keep-alive\r\n\r\n"
        return framing + CRLF

    async def write(self, data: bytes) -> None:
        if not data or self._head_only:
            return
        conn = self._conn
        if self._chunked:
            conn.send_parts((b"%x\r\n" % len(data), data, CRLF))
        else:
            conn.send(data)
        await conn.drain()

    async def end(self, data: bytes = b"") -> None:
        if not self.started:
            self.start(200, ())
        if data:
            await self.write(data)
        if self._chunked:
            self._conn.send(_LAST_CHUNK)
        self.finished = True
        await self._conn.drain()

    async def send(self, status: int, headers, body: bytes, reason: str | None = None) -> None:
        """A whole answer of known length: head and body in one write."""
        await self.send_pieces(status, headers, (body,), reason)

    async def send_pieces(self, status: int, headers, pieces, reason: str | None = None) -> None:
        """A whole answer held as pieces (``pieces``: a sequence of bytes-like objects): its length is theirs,
        and the head and every piece go out in one write (one system call for a small answer, not one each)."""
        if self._conn.closing:
            # The caller half-closed (or this is the connection's last answer): the head goes first, so a caller
            # that is gone altogether answers it with a reset the writes after it find (audited as disconnected).
            conn = self._conn
            conn.send(self._head(status, headers, reason, sum(map(len, pieces))))
            if not self._head_only:
                for piece in pieces:
                    if piece:
                        conn.send(piece)
                        await conn.drain()
            self.finished = True
        elif self.send_now(status, headers, pieces, reason):  # the usual small answer: no drain coroutine
            await self._conn.drain()

    def send_now(self, status: int, headers, pieces, reason: str | None = None) -> bool:
        """``send_pieces`` without waiting: the answer is written (buffered by the transport), and True says the
        caller is not keeping up — ``drain()`` before writing more (it applies ``write_timeout``). On a
        connection that closes after this answer, the head goes first and then each piece."""
        conn = self._conn
        head = self._head(status, headers, reason, sum(map(len, pieces)))
        if self._head_only:
            conn.send(head)
        elif conn.closing:
            conn.send(head)
            for piece in pieces:
                if piece:
                    conn.send(piece)
        elif len(pieces) == 1 and len(pieces[0]) < 16384:
            conn.send(head + pieces[0])  # a copy of a small body is cheaper than a scatter write
        else:
            conn.send_parts([head, *(p for p in pieces if p)])
        self.finished = True
        return conn.must_drain

    def send_raw(self, status: int, lines: bytes, body: bytes) -> bool:
        """``send_now`` of an answer whose head is rendered already: ``lines``, its status line and fields as
        bytes, none of them framing or connection fields (``relay.relay_raw`` makes them); this adds those and
        the body. True: the caller is not keeping up (see ``send_now``)."""
        if self.started:
            raise RuntimeError("answer already started")
        self.started = True
        self.status = status
        conn = self._conn
        if conn.closing or self._head_only:
            if conn.closing:
                self.close = True
            conn.send(lines + self._framing(status, len(body)))
            if body and not self._head_only:
                conn.send(body)
        elif len(body) < 16384:
            conn.send(b"".join((lines, self._framing(status, len(body)), body)))
        else:
            conn.send_parts((lines + self._framing(status, len(body)), body))
        self.finished = True
        return conn.must_drain

    def complete(self) -> None:
        """The handler answered without a coroutine (``HTTPConnection``: its handler returned None): the
        connection may serve its next request."""
        self._conn.handled(self)

    def resume(self, run) -> None:
        """A handler that returned None goes on in a task after all: ``run``, an awaitable that ends the answer
        (the connection serves its next request once it returns)."""
        self._conn.adopt(self, run)

    async def drain(self) -> None:
        """Until the caller has taken what was written (``write_timeout``: ``CallerStalled``)."""
        await self._conn.drain()

    async def answer(self, answer: Answer) -> None:
        """An answer credproxy made itself; cuts the connection instead when another answer already began."""
        if self.started:
            self.abort()
            return
        if answer.close:
            self.close = True
        await self.send(answer.status, answer.headers, answer.body)

    def abort(self) -> None:
        self.close = True
        self._conn.abort()
