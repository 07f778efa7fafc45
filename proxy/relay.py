"""Relay the upstream answer to the caller: status, headers and body, streamed,
through the leak guard.

``redact``: echoed secrets become ``[REDACTED]`` (Content-Length is dropped since
the length may change). ``block``: the first ``BLOCK_BUFFER`` bytes are held
before anything is sent, so a leak there answers 502; a leak found later aborts
the connection (the caller sees a truncated answer, never the secret).
Compressed bodies are not decompressed: ``redact`` passes them on unscanned,
``block`` refuses them (502), since it cannot prove them clean.

Small answers (a ``Content-Length`` up to ``WHOLE_BODY_MAX``, typical of JSON
APIs) are read whole, scanned once and sent with their (new) length: no chunked
framing, one write, and a failure while reading them is a clean 502/504.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.leakguard import LeakGuard, StreamRedactor
from proxy.upstream import strip_hop_by_hop

log = logging.getLogger("credproxy.relay")

BLOCK_BUFFER = 1 << 20
WHOLE_BODY_MAX = 64 * 1024
_NO_BODY = {204, 304}


class LeakBlocked(UpstreamError):
    pass


def _header_text(headers: CIMultiDict[str]) -> bytes:
    """All names and values as one text, for one quick check before scanning header by header."""
    return "\n".join(map("\n".join, headers.items())).encode("utf-8", "surrogateescape")


def _guard_headers(headers: CIMultiDict[str], guard: LeakGuard, mode: str) -> int:
    if not guard.may_match(_header_text(headers)):
        return 0
    found = 0
    for key in list(headers.keys()):
        values = headers.getall(key)
        new = []
        for v in values:
            red, n = guard.redact_text(v)
            found += n
            new.append(red)
        if any(a != b for a, b in zip(values, new)):
            headers.popall(key)
            for v in new:
                headers.add(key, v)
    if found and mode == "block":
        raise LeakBlocked("secret echoed in a response header", reason="leak_blocked")
    return found


async def relay(request: web.BaseRequest, upstream: aiohttp.ClientResponse, head: bytes, guard: LeakGuard,
                mode: str, trace, leak_counter) -> web.StreamResponse:
    try:
        headers = strip_hop_by_hop(upstream.headers)
        scanning = mode != "off" and guard.active
        compressed = upstream.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
        if scanning:
            found = _guard_headers(headers, guard, mode)
            if found:
                leak_counter.inc(found)
            if compressed and mode == "block" and request.method != "HEAD":
                raise LeakBlocked("compressed body cannot be scanned under block", reason="leak_unscannable")
        scan_body = scanning and not compressed
        has_body = request.method != "HEAD" and upstream.status not in _NO_BODY and upstream.status >= 200
        headers["X-Request-Id"] = trace.request_id
        if scan_body and has_body:
            headers.popall("Content-Length", None)
        redactor = guard.stream() if scan_body else None
        length = upstream.content_length
        if has_body and length is not None and length <= WHOLE_BODY_MAX:
            return await _relay_whole(upstream, head, headers, guard if scan_body else None, mode, leak_counter)

        held = b""
        if redactor is not None and mode == "block" and has_body:
            held = await _read_upto(upstream, head, BLOCK_BUFFER)
            head = b""
            probe = guard.stream()
            probe.feed(held)
            probe.flush()
            if probe.count:
                leak_counter.inc(probe.count)
                raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    except BaseException:
        upstream.release()
        raise
    try:
        await response.prepare(request)
        if not has_body:
            await response.write_eof()
            return response
        for chunk in _chain(held, head):
            await _write(response, redactor, chunk, mode, trace)
        async for chunk in upstream.content.iter_any():
            await _write(response, redactor, chunk, mode, trace)
        if redactor is not None:
            tail = redactor.flush()
            if redactor.count and mode == "block":
                raise LeakBlocked("secret echoed late in the response body", reason="leak_blocked")
            if tail:
                await response.write(tail)
            if redactor.count:
                leak_counter.inc(redactor.count)
        await response.write_eof()
        return response
    except (aiohttp.ClientError, TimeoutError, LeakBlocked, ConnectionError) as exc:
        trace.outcome, trace.reason = "error", getattr(exc, "reason", None) or "upstream_body_failed"
        log.warning("response aborted mid-stream", extra={"request_id": trace.request_id,
                                                          "error": type(exc).__name__})
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        upstream.release()


async def _relay_whole(upstream: aiohttp.ClientResponse, head: bytes, headers: CIMultiDict[str],
                       guard: LeakGuard | None, mode: str, leak_counter) -> web.Response:
    """A small answer of known length: read it whole, scan it once, send it with its (new) length."""
    try:
        data = head + await upstream.read()
    except TimeoutError:
        raise UpstreamTimeout("upstream body timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"bad upstream body: {type(exc).__name__}", reason="upstream_body_failed") from None
    finally:
        upstream.release()
    if guard is not None:
        data, found = guard.redact(data)
        if found:
            leak_counter.inc(found)
            if mode == "block":
                raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")
    headers.popall("Content-Length", None)
    return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=data)


def _chain(*parts: bytes):
    return [p for p in parts if p]


async def _write(response: web.StreamResponse, redactor: StreamRedactor | None, chunk: bytes, mode: str, trace) -> None:
    if redactor is not None:
        before = redactor.count
        chunk = redactor.feed(chunk)
        if mode == "block" and redactor.count > before:
            raise LeakBlocked("secret echoed in the response body", reason="leak_blocked")
    if chunk:
        await response.write(chunk)


async def _read_upto(upstream: aiohttp.ClientResponse, head: bytes, limit: int) -> bytes:
    buf = bytearray(head)
    while len(buf) < limit:
        chunk = await upstream.content.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
