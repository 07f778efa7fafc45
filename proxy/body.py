"""Request bodies: buffered when small enough to replay, streamed otherwise; ``max_body`` enforced."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.errors import BadRequest, PayloadTooLarge


class BodyTooLarge(Exception):
    """Raised inside the upload stream when a chunked body passes ``max_body``."""


class RequestBody:
    def __init__(self, data: bytes | None, rest: AsyncIterator[bytes] | None = None) -> None:
        self._data = data
        self._rest = rest
        self._used = False
        self.too_large = False

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

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data
        async for chunk in self._rest:
            yield chunk


async def read_body(request: web.BaseRequest, *, max_body: int, buffer_max: int) -> RequestBody:
    if not request.body_exists:
        return RequestBody(None)
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("declared length over max_body")
    content = request.content
    if length is not None and length <= buffer_max:
        data = await content.read(length) if length else b""
        while len(data) < length:
            more = await content.read(length - len(data))
            if not more:
                raise BadRequest("request body shorter than Content-Length")
            data += more
        return RequestBody(data)
    # Unknown length, or longer than we buffer: read a prefix, stream the rest.
    prefix = bytearray()
    while len(prefix) <= buffer_max:
        chunk = await content.readany()
        if not chunk:
            return RequestBody(bytes(prefix))
        prefix += chunk
        if len(prefix) > max_body:  # refused before anything goes upstream
            raise PayloadTooLarge("body over max_body")
    if len(prefix) > max_body:
        raise PayloadTooLarge("body over max_body")
    body = RequestBody(bytes(prefix))
    body._rest = _limited(content, max_body - len(prefix), body)
    return body


async def _limited(content, budget: int, owner: RequestBody) -> AsyncIterator[bytes]:
    seen = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        seen += len(chunk)
        if seen > budget:
            owner.too_large = True
            raise BodyTooLarge()
        yield chunk
