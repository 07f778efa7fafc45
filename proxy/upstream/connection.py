"""One keep-alive connection to an upstream: an ``asyncio.Protocol`` that writes requests and hands the bytes
it receives to the answer being read (``answer.UpstreamResponse``).

A request body that is a stream is pumped by a task of its own while the answer is awaited, one chunk at a
time, waiting whenever the transport's write buffer is full (``pause_writing``), so an upload of any size
holds bounded memory; an upstream that takes no bytes for the read timeout ends it. A connection is given
back to its pool only when the answer arrived whole, both sides said keep-alive and the request was sent
whole; bytes arriving while it is idle (nothing asked for them) close it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

from proxy.errors import BadAnswer
from proxy.upstream.answer import HeadClock, Reader, UpstreamResponse


class UploadFailed(Exception):
    """The request body could not be sent whole (the caller's stream broke off, or the upstream stopped
    taking bytes)."""


class Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, on_idle: Callable[[Connection], None],
                 on_lost: Callable[[Connection], None]) -> None:
        self.loop = loop
        self._on_idle = on_idle
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.answer: UpstreamResponse | None = None
        self.head_clock = HeadClock(loop)
        self.reader = Reader()  # one parser for the answers on this connection
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.key: tuple = ()
        self._pump: asyncio.Task | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:
            self.abort()  # nothing was asked: an upstream that talks unprompted is not reused
            return
        answer.feed(data)
        if answer.done and self.answer is answer:  # usually freed already, by the answer as its head came
            self.answered(answer)

    def answered(self, answer: UpstreamResponse) -> None:
        """``answer`` has arrived whole (its reader may not have read it yet): the connection is free. Back to the
        pool when it may carry another, else closed: answered before the request body was sent whole, not
        keep-alive, or given up while the answer was read (closing)."""
        if self.answer is not answer:
            return
        self.answer = None
        pump = self._pump
        if answer.keep_alive and (pump is None or pump.done()) and not self.transport.is_closing():
            if pump is not None:
                self._pump = None
            self._on_idle(self)
        else:
            self.abort()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost tells the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.head_clock.stop()
        self.reader.close()
        self._wake_writer()
        answer, self.answer = self.answer, None
        if answer is not None:
            answer.connection_lost()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # -- used by the pool and the answer -----------------------------------------------------------------

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def abort_for(self, answer: UpstreamResponse) -> None:
        """Close the connection if it still carries ``answer`` (a finished one may serve another request)."""
        if self.answer is answer:
            self.abort()

    # -- sending -------------------------------------------------------------------------------------------

    def send_head(self, answer: UpstreamResponse, head: bytes) -> None:
        """Write a body-less request (``send`` with no body) and make ``answer`` the one the bytes go to."""
        self.answer = answer
        self.transport.write(head)

    def send(self, answer: UpstreamResponse, head: bytes, body: bytes | AsyncIterator[bytes] | None,
             length: int | None, write_timeout: float) -> None:
        """Write the request (a streamed body by a task) and make ``answer`` the one the bytes go to."""
        self.answer = answer
        if isinstance(body, (bytes, bytearray, memoryview)):
            if len(body) < 16384:
                self.transport.write(head + body)
            else:
                self.transport.writelines((head, body))
            return
        self.transport.write(head)
        if body is not None:
            self._pump = self.loop.create_task(self._send_stream(answer, body, length, write_timeout))

    async def _send_stream(self, answer: UpstreamResponse, body: AsyncIterator[bytes], length: int | None,
                           write_timeout: float) -> None:
        chunked = length is None
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if self.lost:
                    return
                sent += len(chunk)
                if length is not None and sent > length:
                    raise UploadFailed("request body longer than its Content-Length")
                if chunked:
                    self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    self.transport.write(chunk)
                if self._write_paused:
                    await self._drain(write_timeout)
            if length is not None and sent != length:
                raise UploadFailed("request body shorter than its Content-Length")
            if chunked and not self.lost:
                self.transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            if self.lost or self.answer is not answer:
                return  # the connection went away or the answer ended: nothing left to send to
            self._upload_failed(answer)  # the caller's upload stream cancelled itself (abandoned upload)
        except Exception:  # noqa: BLE001 - whatever broke the upload, the request cannot be completed
            self._upload_failed(answer)

    def _upload_failed(self, answer: UpstreamResponse) -> None:
        if self.answer is answer:
            answer._fail(BadAnswer("request body could not be sent whole"))
        self.abort()

    async def _drain(self, timeout: float) -> None:
        while self._write_paused and not self.lost:
            self._drained = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                raise UploadFailed("upstream took no request bytes within the read timeout") from None
            finally:
                self._drained = None

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
