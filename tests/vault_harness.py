"""Running the whole proxy on the Vault backend in a test: config, start, requests,
readiness, and the checks the Vault tests share."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.config import models as config
from proxy.app import Proxy
from tests.vault_fixture import free_port


@dataclass
class Running:
    proxy: Proxy
    base: str
    admin: str
    audit: Path
    http: aiohttp.ClientSession
    bodies: list[str] = field(default_factory=list)

    async def get(self, path: str) -> tuple[int, dict, dict]:
        async with self.http.get(self.base + path) as r:
            text = await r.text()
            self.bodies.append(text + json.dumps(dict(r.headers)))
            return r.status, json.loads(text), dict(r.headers)

    async def ready(self) -> tuple[int, dict]:
        async with self.http.get(self.admin + "/readyz") as r:
            return r.status, await r.json()

    async def metrics(self) -> str:
        async with self.http.get(self.admin + "/metrics") as r:
            return await r.text()


def vault_section(address: str, auth: dict, **extra) -> dict:
    return {"address": address, "auth": auth, "timeout": "2s", **extra}


@asynccontextmanager
async def running(tmp_path: Path, vault: dict, credentials: dict):
    port, admin = free_port(), free_port()
    audit = tmp_path / "audit.log"
    doc = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "secrets": {"backend": "vault", "vault": vault},
        "audit": {"path": str(audit)},
        "credentials": credentials,
    }
    proxy = Proxy(config.parse(json.dumps(doc)))
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Running(proxy, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", audit, http)
    finally:
        await proxy.stop()


async def eventually(check, timeout: float = 15.0, interval: float = 0.05):
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def assert_nowhere(values: list[str], *texts: str) -> None:
    for value in values:
        for form in (value, base64.b64encode(value.encode()).decode(), urllib.parse.quote(value, safe="")):
            for text in texts:
                assert form not in text
