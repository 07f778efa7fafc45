"""The admin listener: health, readiness, metrics, credential operations, reload.

Never reachable through a caller listener. With ``admin.token_file`` every
endpoint except /healthz and /readyz needs ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from aiohttp import web

from proxy.state import StateHolder

HOLDER = web.AppKey("holder", StateHolder)
ADMIN_TOKEN = web.AppKey("admin_token_sha256", bytes)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status)


@web.middleware
async def require_token(request: web.Request, handler):
    expected = request.app.get(ADMIN_TOKEN)
    if expected and request.path not in OPEN_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
            return _error(401, "unauthenticated", "missing or invalid admin token")
    return await handler(request)


def is_ready(holder: StateHolder) -> tuple[bool, list[str]]:
    if holder.draining:
        return False, ["draining"]
    state = holder.current
    missing = []
    for name, cred in state.credentials.items():
        if any(not state.cache.cached(ref.path) for ref in cred.refs()):
            missing.append(name)
    return not missing, missing


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    ready, waiting = is_ready(request.app[HOLDER])
    return _json({"ready": ready, "waiting": waiting}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[HOLDER].current.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def list_credentials(request: web.Request) -> web.Response:
    state = request.app[HOLDER].current
    return _json({"credentials": [c.describe() for c in state.credentials.values()]})


def build_admin_app(holder: StateHolder, token_file: str | None) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[HOLDER] = holder
    if token_file:
        token = Path(token_file).read_text().strip()
        app[ADMIN_TOKEN] = hashlib.sha256(token.encode()).digest()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/credentials", list_credentials)
    return app
