"""Shared test parts: a recording upstream, an in-process proxy built from a config
dict with a real encrypted file store, and canary checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus

import yaml
from aiohttp import web

from proxy.config import models as config_mod
from proxy.app import Proxy
from proxy.store.secret import Secret
from proxy.store.file import FileStore, generate_key

REPO = Path(__file__).resolve().parent.parent  # the repository root, wherever under tests/ a test lives

CALLER_TOKENS = {"billing": "tok-billing-7f3a", "reports": "tok-reports-91bc"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict
    header_items: list
    body: bytes


@dataclass
class Recorder:
    """A real aiohttp upstream that records every request it receives."""

    seen: list[Seen] = field(default_factory=list)
    routes: dict = field(default_factory=dict)  # path -> handler(request, body) -> Response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)

        async def handler(request: web.Request) -> web.StreamResponse:
            custom = self.routes.get(request.path)
            if custom is not None and getattr(custom, "streaming", False):
                self.seen.append(Seen(request.method, request.raw_path, request.headers.copy(),
                                      list(request.headers.items()), b""))
                return await custom(request)
            body = await request.read()
            self.seen.append(Seen(request.method, request.raw_path, request.headers.copy(),
                                  list(request.headers.items()), body))
            if custom is not None:
                return await custom(request, body)
            return web.json_response({"ok": True, "path": request.raw_path})

        app.router.add_route("*", "/{tail:.*}", handler)
        return app


class StandInTransport:
    """A stand-in for an asyncio transport that takes writes and flow control and does nothing with them: for
    driving a protocol (``HTTPConnection``, an upstream ``Connection``) by hand, without a socket."""

    def write(self, data) -> None: ...

    def writelines(self, parts) -> None:
        for part in parts:
            self.write(part)

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def can_write_eof(self) -> bool:
        return False


def write_store(directory: Path, secrets: dict[str, str]) -> tuple[Path, Path]:
    """A real encrypted store: {"path#field": value}."""
    key_file = directory / "master.key"
    key_file.write_text(generate_key())
    key_file.chmod(0o600)
    store_path = directory / "secrets.enc"
    store = FileStore(store_path, base64.b64decode(key_file.read_text()))
    store.init()
    for ref, value in secrets.items():
        path, _, fieldname = ref.partition("#")
        store.put_sync(path, fieldname, Secret(value))
    return store_path, key_file


def base_config(tmp: Path, upstream: str, **overrides) -> dict:
    store_path, key_file = tmp / "secrets.enc", tmp / "master.key"
    cfg = {
        "server": {"listen": "127.0.0.1:0", "read_timeout": "5s", "connect_timeout": "2s"},
        "admin": {"listen": "127.0.0.1:0"},
        "secrets": {"backend": "file", "file": {"path": str(store_path), "key_file": str(key_file)}},
        "audit": {"path": str(tmp / "audit.log")},
        "callers": {name: {"token_sha256": sha(tok)} for name, tok in CALLER_TOKENS.items()},
        "credentials": {
            "example": {
                "upstream": upstream,
                "allow_insecure_upstream": True,
                "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                         "secret": "apis/example#token"},
                "allow": [{"callers": ["billing"], "methods": ["GET", "POST", "PUT"], "paths": ["/v1/**"]}],
            }
        },
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


class RunningProxy:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    @property
    def url(self) -> str:
        return "http://" + self.proxy.bound["main"]

    @property
    def admin_url(self) -> str:
        return "http://" + self.proxy.bound["admin"]

    def dedicated(self, name: str, scheme: str = "http") -> str:
        return f"{scheme}://" + self.proxy.bound[f"credential:{name}"]

    def audit_lines(self, tmp: Path) -> list[dict]:
        self.proxy.holder.current.audit.flush()
        path = tmp / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def start_proxy(cfg_dict: dict) -> RunningProxy:
    cfg = config_mod.parse(yaml.safe_dump(cfg_dict), "test.yaml")
    proxy = Proxy(cfg)
    await proxy.start()
    return RunningProxy(proxy)


def auth(caller: str = "billing") -> dict:
    return {"Authorization": f"Bearer {CALLER_TOKENS[caller]}"}


def canary_forms(secret: str) -> list[str]:
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw).decode()
        forms.add(enc[4 if shift else 0 : -4])  # a core that survives any neighbours
    forms.add(base64.b64encode(raw).decode().rstrip("="))
    return sorted(f for f in forms if len(f) >= 6)


def assert_no_canary(text: str | bytes, secret: str, where: str = "") -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for form in canary_forms(secret):
        assert form not in text, f"secret form {form[:4]}... found in {where}"


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
