"""Real parts for the security tests: a credproxy on loopback with its encrypted
file store, a recording upstream (an aiohttp server that keeps every request it
received and can echo it back, like httpbin's ``/anything``), and a raw-socket
HTTP client that sends exactly the bytes a test gives it."""

from __future__ import annotations

import asyncio
import base64
import copy
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml
from aiohttp import web

from proxy.config import models as config_mod
from proxy.app import Proxy
from proxy.store.secret import Secret
from proxy.store.file import FileStore, generate_key
from tests.helpers import free_port, sha  # noqa: F401 - also used by the security tests through this module

# The canary: a secret with characters that change under every encoding we search.
CANARY = "cAnArY-s3cr3t/+=v4lue~!_Zq9 x"
CALLER_TOKEN = "cp_billing-caller-token-0123456789abcdefghij"
OTHER_TOKEN = "cp_other-caller-token-0123456789abcdefghijkl"


def canary_forms(secret: str = CANARY) -> list[bytes]:
    raw = secret.encode()
    return [raw, quote(secret, safe="").encode(), quote(secret).encode(), json.dumps(secret)[1:-1].encode(),
            base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")]


def assert_clean(data: bytes | str, secret: str = CANARY, where: str = "output") -> None:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    for form in canary_forms(secret):
        assert form not in data, f"secret form {form!r} found in {where}"


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --- the recording upstream ----------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str  # raw path with query, as received
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class RecordingUpstream:
    """Records every request; answers by path:

    ``/anything/...`` echoes the request as JSON (httpbin-like);
    ``/redirect`` 302 to another host with the received Authorization in the Location query;
    ``/reason`` puts the received Authorization in the reason phrase and a header name;
    ``/gzip`` a gzip-compressed echo; ``/big?n=BYTES`` a long streamed body;
    ``/forms`` every encoding of the received token in small writes; ``/late?n=BYTES`` the token after filler;
    anything else: ``200 ok``.
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RecordingUpstream":
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), body))
        path = request.path
        auth = request.headers.get("Authorization", "")
        if path.startswith("/anything"):
            return web.json_response(_echo(request, body))
        if path == "/redirect":
            token = auth.partition(" ")[2]
            return web.Response(status=302, headers={"Location": f"https://elsewhere.example/cb?token={quote(token, safe='')}"})
        if path == "/reason":
            token = auth.partition(" ")[2]
            name = "X-Echo-" + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
            return web.Response(text="ok", reason=f"OK {token}", headers={name: "1"})
        if path == "/gzip":
            data = gzip.compress(json.dumps(_echo(request, body)).encode())
            return web.Response(body=data, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if path == "/negotiated":  # as most servers do: gzip only when the request accepts it
            data = json.dumps(_echo(request, body)).encode()
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip",
                                                                       "Content-Type": "application/json"})
            return web.Response(body=data, content_type="application/json")
        if path == "/forms":  # every encoding of the received token, written a few bytes at a time
            token = auth.partition(" ")[2]
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for form in canary_forms(token):
                data = b"<" + form + b">"
                for i in range(0, len(data), 3):
                    await resp.write(data[i : i + 3])
            await resp.write_eof()
            return resp
        if path == "/late":  # the token after ``n`` bytes of filler
            token = auth.partition(" ")[2]
            resp = web.StreamResponse()
            await resp.prepare(request)
            n = int(request.query.get("n", "0"))
            for i in range(0, n, 65536):
                await resp.write(b"f" * min(65536, n - i))
            await resp.write(token.encode())
            await resp.write_eof()
            return resp
        if path == "/big":
            n = int(request.query.get("n", str(1 << 20)))
            resp = web.StreamResponse()
            resp.content_length = n
            await resp.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            while sent < n:
                part = chunk[: min(len(chunk), n - sent)]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp
        return web.Response(text="ok")


def _echo(request: web.Request, body: bytes) -> dict:
    return {"method": request.method, "url": request.raw_path, "headers": dict(request.headers),
            "args": dict(request.query), "data": body.decode("utf-8", "replace")}


# --- a raw upstream for answers no real server gives on demand -----------------------------


class RawUpstream:
    """A TCP server that answers every request with fixed bytes (bad framing and the like).

    A fault-injecting fake on purpose: aiohttp's server cannot produce malformed answers.
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- credproxy ------------------------------------------------------------------------


class Harness:
    """A running credproxy with one credential, ``demo``, whose secret is ``CANARY``."""

    def __init__(self, tmp: Path, upstream_url: str, extra: dict | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        key_file = tmp / "master.key"
        key_file.write_text(generate_key())
        key_file.chmod(0o600)
        store = FileStore(tmp / "secrets.enc", base64.b64decode(key_file.read_text()))
        store.init()
        store.put_sync("apis/demo", "token", Secret(CANARY))
        self.audit_path = tmp / "audit.log"
        base = {
            "server": {"listen": f"127.0.0.1:{self.port}",
                       "limits": {"max_body": "64KiB", "header_timeout": "10s"}},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "secrets": {"backend": "file", "file": {"path": str(tmp / "secrets.enc"), "key_file": str(key_file)}},
            "audit": {"path": str(self.audit_path)},
            "callers": {"billing": {"token_sha256": sha(CALLER_TOKEN)}, "other": {"token_sha256": sha(OTHER_TOKEN)}},
            "credentials": {"demo": {
                "upstream": upstream_url, "allow_insecure_upstream": True,
                "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                         "secret": "apis/demo#token"},
                "allow": [{"callers": ["billing"], "paths": ["/anything/**", "/v1/**", "/redirect", "/reason",
                                                              "/gzip", "/negotiated", "/big", "/forms", "/late", "/"]}],
            }},
        }
        self.config_dict = merge(base, extra or {})
        for cred in self.config_dict["credentials"].values():  # "{proxy}", "{admin}": credproxy itself
            cred["upstream"] = cred["upstream"].format(proxy=self.url, admin=self.admin_url)
        self.cfg = config_mod.parse(yaml.safe_dump(self.config_dict), "test.yaml")
        self.proxy = Proxy(self.cfg)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def state(self):
        return self.proxy.holder.current

    async def start(self) -> "Harness":
        await self.proxy.start()
        return self

    async def stop(self) -> None:
        await self.proxy.stop()

    def audit(self) -> list[dict]:
        self.state.audit.flush()
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def audit_text(self) -> str:
        self.state.audit.flush()
        return self.audit_path.read_text()


# --- raw HTTP over a socket ---------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json(self) -> dict:
        return json.loads(self.body)


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send ``data`` as is; read one response (or until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return RawResponse(None, raw=exc.partial)
    except ConnectionError:
        return RawResponse(None)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += (await reader.readexactly(size + 2))[:-2]  # no trailers: the last chunk ends with CRLF
            if size == 0:
                break
    return RawResponse(status, headers, body, head + body)


class EchoingBadUpstream(RawUpstream):
    """Answers with a malformed head that quotes the request's Authorization header, so the
    client library's parse error (and anything that prints it) carries the secret.
    A fault-injecting fake: no real server answers like this on demand."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            auth = next((line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization:")), b"")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Echo: " + auth + b"\x00\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class SilentUpstream(RawUpstream):
    """Accepts the request and never answers (an upstream timeout)."""

    def __init__(self) -> None:
        super().__init__(b"")
        self._waiting: set[asyncio.Task] = set()

    async def close(self) -> None:
        for task in self._waiting:
            task.cancel()
        await super().close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._waiting.add(asyncio.current_task())
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
