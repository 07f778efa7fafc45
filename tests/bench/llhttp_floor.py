"""The Python floor: a minimal header-injecting reverse proxy on llhttp (httptools) on both sides.

``/<anything>/<rest>`` goes to ``UPSTREAM/<rest>`` with hop-by-hop headers dropped and one injected
``Authorization`` header, over a keep-alive pool of upstream connections; the answer is streamed back with
backpressure (a caller that reads slowly pauses the upstream connection). No features, no error handling
beyond closing: what any Python proxy on asyncio and llhttp must at least spend per request. Same event loop
as credproxy (uvloop when installed).

    python tests/bench/llhttp_floor.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import socket
import sys
from urllib.parse import urlsplit

import httptools

HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                 b"upgrade", b"host", b"authorization", b"content-length"})
INJECT = b"Authorization: Bearer bench-upstream-key\r\n"


class Upstream(asyncio.Protocol):
    """One pooled upstream connection; relays the answer to ``self.caller``."""

    def __init__(self, pool: list) -> None:
        self.pool, self.caller, self.transport = pool, None, None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.caller is not None:
            self.caller.transport.abort()

    def on_message_begin(self) -> None:
        self.headers, self.chunked = [], False

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"transfer-encoding":
            self.chunked = True
        if low not in HOP or low == b"content-length":
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        framing = b"Transfer-Encoding: chunked\r\n" if self.chunked else b""
        self.caller.transport.write(b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (self.parser.get_status_code(), self.reason,
                                                                      b"".join(self.headers), framing))

    def on_body(self, body: bytes) -> None:
        out = self.caller.transport
        out.writelines((b"%x\r\n" % len(body), body, b"\r\n")) if self.chunked else out.write(body)

    def on_message_complete(self) -> None:
        caller, self.caller = self.caller, None
        if self.chunked:
            caller.transport.write(b"0\r\n\r\n")
        if self.parser.should_keep_alive():
            self.pool.append(self)
        else:
            self.transport.close()
        caller.answered()


class Caller(asyncio.Protocol):
    def __init__(self, proxy: "Floor") -> None:
        self.proxy, self.transport, self.queue, self.busy, self.upstream = proxy, None, [], False, None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.queue.clear()

    def pause_writing(self) -> None:  # the caller reads slowly: so does the upstream connection
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        rest = self.url.split(b"/", 2)[2] if self.url.count(b"/") >= 2 else b""
        body = b"".join(self.body)
        head = b"%s /%s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: %d\r\n\r\n" % (
            self.parser.get_method(), rest, self.proxy.host, b"".join(self.headers), INJECT, len(body))
        self.queue.append(head + body)
        if not self.busy:
            self.busy = True
            asyncio.ensure_future(self.forward())

    async def forward(self) -> None:
        request = self.queue.pop(0)
        pool = self.proxy.pool
        if pool:
            up = pool.pop()
        else:
            _, up = await asyncio.get_running_loop().create_connection(lambda: Upstream(pool), *self.proxy.addr)
        self.upstream, up.caller = up, self
        up.transport.write(request)

    def answered(self) -> None:
        self.upstream = None
        if self.queue:
            asyncio.ensure_future(self.forward())
        else:
            self.busy = False


class Floor:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.addr, self.host, self.pool = (u.hostname, u.port or 80), u.netloc.encode(), []


async def main(port: int, upstream: str) -> None:
    floor = Floor(upstream)
    server = await asyncio.get_running_loop().create_server(lambda: Caller(floor), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    else:
        uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
