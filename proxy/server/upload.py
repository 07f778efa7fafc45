"""Request bodies: buffered when small enough to replay, streamed otherwise; ``max_body`` enforced.

A caller that sends no body bytes for ``body_timeout`` while credproxy waits for
them (``proxy.server.upload_clock``) is answered ``400 bad_request`` (audit reason
``caller_body_timeout``) — before anything went upstream when the body is being
buffered. A streamed body that stalls, overflows ``max_body`` or whose caller goes
away abandons the upstream request:
the upload stream ends with an error, on which the upstream client's body writer closes that
connection (it is never reused half-written), and ``RequestBody.fault`` holds the
caller's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


from proxy.server.request import Request
from proxy.server.upload_clock import BodyClock
from proxy.errors import BadRequest, PayloadTooLarge, ProxyError
from proxy.upstream.answer import UpstreamResponse


class RequestBody:
    def __init__(self, data: bytes | None, rest: AsyncIterator[bytes] | None = None) -> None:
        self._data = data
        self._rest = rest
        self._used = False
        self.too_large = False
        # Set when the caller broke the streamed upload (over max_body, stalled, went away): what the caller
        # is answered (and the audit says) instead of the upstream failure the abandoned upload causes.
        self.fault: ProxyError | None = None
        self._answer: UpstreamResponse | None = None

    @property
    def replayable(self) -> bool:
        return self._rest is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self._rest is None:
            return self._data
        if self._used:
            raise RuntimeError("a streamed body can be sent once")
        self._used = True
        return self._stream()

    def answered(self, upstream: UpstreamResponse) -> None:
        """The upstream's answer has begun while the body may still be on its way: if the caller breaks the
        upload off, the answer is ended too (closing it wakes whoever reads it), or it would wait forever."""
        if self._rest is None:
            return  # held whole: nothing can break it off (and NO_BODY, shared, keeps no answer)
        self._answer = upstream
        if self.fault is not None:
            upstream.close()

    def _abandon(self, fault: ProxyError) -> None:
        self.fault = fault
        if self._answer is not None:
            self._answer.close()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data
        async for chunk in self._rest:
            yield chunk


# A request without a body: nothing in a RequestBody held whole changes once it is made, so one serves all.
NO_BODY = RequestBody(None)


async def read_body(request: Request, *, max_body: int, buffer_max: int, body_timeout: float = 60.0) -> RequestBody:
    content = request.body
    if content is None:
        return NO_BODY
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("declared length over max_body")
    if length is not None and length <= buffer_max:
        data = content.read_nowait(length) if length else b""  # usually all of it, sent with the head
        if len(data) < length:
            data = await _read_rest(BodyClock(content, body_timeout), data, length)
        return RequestBody(data)
    # Unknown length, or longer than we buffer: read a prefix, stream the rest.
    clock = BodyClock(content, body_timeout)
    prefix = bytearray()
    try:
        while len(prefix) <= buffer_max:
            chunk = await clock.read()
            if not chunk:
                clock.stop()
                return RequestBody(bytes(prefix))
            prefix += chunk
            if len(prefix) > max_body:  # refused before anything goes upstream
                raise PayloadTooLarge("body over max_body")
    except BaseException:
        clock.stop()
        raise
    body = RequestBody(bytes(prefix))
    body._rest = _limited(clock, max_body - len(prefix), body)
    return body


async def _read_rest(clock: BodyClock, data: bytes, length: int) -> bytes:
    parts, got = [data], len(data)
    try:
        while got < length:
            more = await clock.read(length - got)
            if not more:
                raise BadRequest("request body shorter than Content-Length")
            parts.append(more)
            got += len(more)
    finally:
        clock.stop()
    return b"".join(parts)


async def _limited(clock: BodyClock, budget: int, owner: RequestBody) -> AsyncIterator[bytes]:
    seen = 0
    try:
        while True:
            try:
                chunk = await clock.read()
            except ProxyError as exc:  # stalled, or the caller went away
                owner._abandon(exc)
                break
            if not chunk:
                return
            seen += len(chunk)
            if seen > budget:
                owner.too_large = True
                owner._abandon(PayloadTooLarge("streamed body over max_body"))
                break
            yield chunk
    finally:
        clock.stop()
    # The upload is abandoned: the upstream client's body writer closes that connection (never reused
    # half-written) on any exception from the stream; CancelledError is what aiohttp's writer needed.
    raise asyncio.CancelledError()
