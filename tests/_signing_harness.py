"""Shared by the aws_sigv4 and upstream mTLS tests, on top of ``tests.helpers``: a real
credproxy with its encrypted store, the log lines exactly as written to stderr, and
the canary check (a secret appears nowhere a person could see it)."""

from __future__ import annotations

import logging
from io import StringIO
from pathlib import Path

import aiohttp
import pytest

from proxy.store.file import FileStore, load_key
from tests.helpers import RunningProxy, auth, base_config, canary_forms, start_proxy, write_store

CALLER = "billing"


@pytest.fixture
def json_logs():
    """Every log record written during the test, formatted as credproxy writes them
    (JSON with all extra fields, where a secret could hide in a field caplog does not show)."""
    from proxy.observe.log_setup import JsonFormatter

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
    def __init__(self, running: RunningProxy, store: FileStore, tmp: Path) -> None:
        self.running, self.store, self.tmp = running, store, tmp
        self.proxy = running.proxy
        self.url, self.admin = running.url, running.admin_url
        self.caller_headers = auth(CALLER)

    def audit(self) -> list[dict]:
        return self.running.audit_lines(self.tmp)

    def audit_text(self) -> str:
        self.audit()  # flushes
        return (self.tmp / "audit.log").read_text()

    async def admin_get(self, path: str) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.admin + path) as r:
                return await r.text()


@pytest.fixture
async def signing_proxy(tmp_path, monkeypatch):
    """``await signing_proxy(credentials, {"PATH#FIELD": value})`` -> a started ``Running``
    proxy; the caller ``billing`` presents its token with ``running.caller_headers``."""
    monkeypatch.delenv("CREDPROXY_MASTER_KEY", raising=False)
    started: list[RunningProxy] = []

    async def start(credentials: dict, secrets: dict[str, str]) -> Running:
        write_store(tmp_path, secrets)
        cfg = base_config(tmp_path, "http://127.0.0.1:9", credentials=credentials)
        running = await start_proxy(cfg)
        started.append(running)
        files = running.proxy.cfg.secrets.file
        return Running(running, FileStore(files.path, load_key(files)), tmp_path)

    yield start
    for running in started:
        await running.proxy.stop()


async def assert_nowhere(running: Running, secret: str, *texts: str) -> None:
    """``secret`` (raw, base64, URL-encoded) is in no metric, admin answer, audit line or given text."""
    places = [("metrics", await running.admin_get("/metrics")),
              ("/v1/credentials", await running.admin_get("/v1/credentials")),
              ("audit", running.audit_text())]
    places += [(f"text #{i}", t) for i, t in enumerate(texts)]
    for form in canary_forms(secret):
        for where, text in places:
            assert form not in text, f"secret form {form[:4]}... found in {where}"
