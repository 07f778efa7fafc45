"""A raw upstream for the upstream client's tests: answers with the bytes a test scripts.

A fault-injecting fake on purpose: no real server misbehaves on demand.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from multidict import CIMultiDict
from yarl import URL

from proxy.upstream.client import UpstreamClient
from proxy.upstream.outbound import Outbound

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE = "close"  # the script's answer: hang up without answering
SILENT = "silent"  # read the request, never answer


class ScriptedUpstream:
    """Answers request number N with ``script(N, head)`` (or what it returns to await): bytes,
    ``(bytes, "close")`` to hang up after them, ``CLOSE`` or ``SILENT``. Counts connections and keeps each
    request's head and body."""

    def __init__(self, script: Callable[[int, bytes], object]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "ScriptedUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_body(reader, head)
                n = len(self.requests)
                self.requests.append((head, body))
                answer = self.script(n, head)
                if inspect.isawaitable(answer):  # a script that holds its answer until the test lets it go
                    answer = await answer
                if answer == CLOSE:
                    break
                if answer == SILENT:
                    await asyncio.sleep(3600)
                close = isinstance(answer, tuple)
                writer.write(answer[0] if close else answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def always(answer) -> Callable[[int, bytes], object]:
    return lambda n, head: answer


def client(**kw) -> UpstreamClient:
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("read_timeout", 5.0)
    return UpstreamClient(**kw)


def outbound(url: str, method: str = "GET", body=None, headers: dict | None = None) -> Outbound:
    return Outbound(method, URL(url), "/x", "", CIMultiDict(headers or {}), body)


async def fetch(c: UpstreamClient, url: str, method: str = "GET", body=None, headers=None) -> tuple[int, bytes]:
    answer = await c.send(outbound(url, method, body, headers))
    try:
        return answer.status, await answer.read()
    finally:
        answer.release()
