"""Shared pieces for the ops tests (admin API, reload, drain, admin CLI).

Everything here is real: an AES-GCM file store on disk, config files that go
through ``config.load``, an aiohttp upstream on loopback that records what it
received, and a ``Proxy`` listening on loopback ports (or a unix socket).
"""

from __future__ import annotations

import pytest

import asyncio
import json
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from proxy.config import models as config_mod
from proxy.app import Proxy
from proxy.auth_types import build_source
from proxy.grant import AuthSource, Grant
from proxy.redact.scrubber import SCRUBBER
from proxy.store.secret import Secret
from proxy.store.file import FileStore
from tests.helpers import assert_no_canary, free_port, sha, write_store

CANARY = "cnry-Zq8VxT1uW4pK7sR2mN5bH9dF"  # a secret value that must never be seen outside the upstream
ROOT = Path(__file__).resolve().parent.parent


def assert_no_secret(text: str | bytes, secret: str = CANARY) -> None:
    """Raw, base64 (at any alignment) and URL-encoded forms: none may appear."""
    assert_no_canary(text, secret)


def make_store(tmp_path: Path, values: dict[str, dict[str, str]]) -> dict:
    """A real encrypted file store holding ``values`` (path -> field -> value); returns the secrets section."""
    flat = {f"{p}#{f}": v for p, fields in values.items() for f, v in fields.items()}
    store_path, key_file = write_store(tmp_path, flat)
    return {"backend": "file", "file": {"path": str(store_path), "key_file": str(key_file)}}


def put_secret(secrets_section: dict, path: str, field: str, value: str) -> None:
    FileStore.from_config(config_mod.FileStoreConfig(**secrets_section["file"])).put_sync(path, field, Secret(value))


def write_config(path: Path, data: dict) -> Path:
    # Write then rename, as editors and config management do; the watcher must see a whole file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


CALLER_TOKEN = "caller-token-for-app"
CALLER_SHA = sha(CALLER_TOKEN)
ADMIN_TOKEN = "admin-token-0123456789"


def credential(upstream: str, secret: str = "api/demo#token", **extra) -> dict:
    cred = {"upstream": upstream, "allow_insecure_upstream": True,
            "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": secret},
            "allow": [{"callers": ["app"], "methods": ["GET", "POST"], "paths": ["/**"]}]}
    cred.update(extra)
    return cred


def base_config(tmp_path: Path, secrets: dict, credentials: dict, *, admin_listen: str | None = None,
                admin_token: bool = False, drain_timeout: str = "5s") -> dict:
    cfg = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "drain_timeout": drain_timeout},
        "admin": {"listen": admin_listen or f"127.0.0.1:{free_port()}"},
        "secrets": secrets,
        "audit": {"path": str(tmp_path / "audit.log")},
        "callers": {"app": {"token_sha256": CALLER_SHA}},
        "credentials": credentials,
    }
    if admin_token:
        token_file = tmp_path / "admin.token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        cfg["admin"]["token_file"] = str(token_file)
    return cfg


class Upstream:
    """A loopback API that records every request it gets. ``/slow`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "authorization": request.headers.get("Authorization"), "host": request.host})
        if request.path.endswith("/slow"):
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            await resp.write(b"first part;")
            self.slow_started.set()
            await self.release.wait()
            await resp.write(b"second part")
            await resp.write_eof()
            return resp
        if request.path.endswith("/echo"):  # an upstream that echoes the credential back
            return web.json_response({"you_sent": request.headers.get("Authorization")})
        if request.path.endswith("/status/500"):
            return web.json_response({"oops": True}, status=500)
        return web.json_response({"ok": True, "path": request.path})


class CountingTokenSource(AuthSource):
    """Stands in for a token type (OAuth2 etc., built on another branch): each ``fetch`` is what a
    token-endpoint call would be, so tests can see whether a reload kept the token cache."""

    def __init__(self, name: str, counter: dict) -> None:
        self.name = name
        self.counter = counter
        self._token: Secret | None = None

    async def _fetch(self) -> Grant:
        self.counter[self.name] = self.counter.get(self.name, 0) + 1
        self._token = Secret(f"{CANARY}-{self.name}-{self.counter[self.name]}")
        SCRUBBER.hold(("test token", self.name), self._token.reveal())  # as real token sources do
        return Grant({"secret": self._token})

    async def grant(self, principal: str) -> Grant:
        return Grant({"secret": self._token}) if self._token is not None else await self._fetch()

    async def expired(self, principal: str, used: Grant) -> bool:
        await self._fetch()
        return True

    async def refresh(self) -> None:
        await self._fetch()

    async def revoke(self) -> None:
        self._token = None

    def state(self) -> dict:
        return {"state": "fresh" if self._token else "expired", "expires_in_s": 3600.0 if self._token else None,
                "last_refresh": None, "last_error": None}


def counting_factory(counter: dict, prefix: str = "tok"):
    def factory(cfg, cache, **deps):
        if deps["name"].startswith(prefix):
            return CountingTokenSource(deps["name"], counter)
        return build_source(cfg, cache, **deps)

    return factory


@asynccontextmanager
async def running(config_path: Path, **kw):
    proxy = Proxy(config_mod.load(config_path), str(config_path), **{"watch_interval": None, **kw})
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def main_url(proxy: Proxy) -> str:
    return "http://" + proxy.bound["main"]


class Admin:
    """A plain HTTP client of the admin listener (TCP or unix socket)."""

    def __init__(self, listen, token: str | None = None) -> None:
        self.listen = listen
        self.token = token

    async def call(self, method: str, path: str, token: str | None = "default") -> tuple[int, dict | str, str]:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.listen.unix:
            connector = aiohttp.UnixConnector(path=self.listen.unix)
            base = "http://admin"
        else:
            connector = aiohttp.TCPConnector()
            base = f"http://{self.listen}"
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.request(method, base + path, headers=headers) as r:
                text = await r.text()
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
                return r.status, body, text


async def call(proxy: Proxy, path: str, *, method: str = "GET", token: str | None = CALLER_TOKEN,
               base: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, (base or main_url(proxy)) + path, headers=headers) as r:
            return r.status, await r.text()


def audit_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text output (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


PYTHON = sys.executable


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("CREDPROXY_MASTER_KEY", None)
    return env


@pytest.fixture
async def upstream(aiohttp_server):
    """The ops tests' upstream (shadows conftest's recorder in the modules that import it)."""
    up = Upstream()
    server = await aiohttp_server(up.app)
    up.url = str(server.make_url("/api"))
    return up
