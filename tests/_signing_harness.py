"""Shared by the aws_sigv4 and upstream mTLS tests: a real credproxy on loopback ports,
its log output, and the canary check (a secret appears nowhere a person could see it)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
from io import StringIO
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import yaml

from proxy import config as config_mod
from proxy.app import Proxy
from proxy.logs import JsonFormatter
from proxy.secret import Secret
from proxy.store.file import FileStore, generate_key

CALLER_TOKEN = "caller-token-for-signing-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def logs():
    """Every log record written during the test, formatted as credproxy writes them to stderr."""
    buf = StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)


class Running:
    def __init__(self, proxy: Proxy, url: str, admin: str, store: FileStore, audit_path: Path) -> None:
        self.proxy, self.url, self.admin, self.store, self.audit_path = proxy, url, admin, store, audit_path

    @property
    def caller_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CALLER_TOKEN}"}

    async def admin_get(self, path: str) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.admin + path) as r:
                return await r.text()


@pytest.fixture
async def start_proxy(tmp_path, monkeypatch):
    """``await start_proxy(credentials, {(path, field): value})`` -> a started ``Running`` proxy
    with one caller, ``app``, that presents CALLER_TOKEN."""
    monkeypatch.delenv("CREDPROXY_MASTER_KEY", raising=False)
    started: list[Proxy] = []

    async def start(credentials: dict, secrets: dict[tuple[str, str], str]) -> Running:
        key_file = tmp_path / "master.key"
        key_file.write_text(generate_key())
        key_file.chmod(0o600)
        port, admin_port = free_port(), free_port()
        data = {
            "server": {"listen": f"127.0.0.1:{port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "secrets": {"backend": "file", "file": {"path": str(tmp_path / "secrets.enc"), "key_file": str(key_file)}},
            "audit": {"path": str(tmp_path / "audit.log")},
            "callers": {"app": {"token_sha256": hashlib.sha256(CALLER_TOKEN.encode()).hexdigest()}},
            "credentials": credentials,
        }
        cfg = config_mod.parse(yaml.safe_dump(data))
        store = FileStore.from_config(cfg.secrets.file)
        store.init()
        for (path, field), value in secrets.items():
            store.put_sync(path, field, Secret(value))
        proxy = Proxy(cfg)
        await proxy.start()
        started.append(proxy)
        return Running(proxy, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", store,
                       tmp_path / "audit.log")

    yield start
    for proxy in started:
        await proxy.stop()


def forms(value: str) -> list[str]:
    return [value, base64.b64encode(value.encode()).decode(), quote(value, safe="")]


async def assert_nowhere(running: Running, secret: str, *texts: str) -> None:
    """``secret`` (raw, base64, URL-encoded) is in no metric, admin answer, audit line or given text."""
    await asyncio.sleep(0.3)  # the audit log is flushed every 200 ms
    metrics = await running.admin_get("/metrics")
    described = await running.admin_get("/v1/credentials")
    audit = running.audit_path.read_text() if running.audit_path.exists() else ""
    places = [("metrics", metrics), ("/v1/credentials", described), ("audit", audit)]
    places += [(f"text #{i}", t) for i, t in enumerate(texts)]
    for form in forms(secret):
        for where, text in places:
            assert form not in text, f"secret found in {where}"
