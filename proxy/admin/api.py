"""The admin listener: health, readiness, metrics, credential operations, reload.

Never reachable through a caller listener. With ``admin.token_file`` every
endpoint except /healthz and /readyz needs ``Authorization: Bearer <admin token>``
(its SHA-256 compared in constant time). Answers are JSON, built from
``Credential.describe()`` and fixed messages only, and pass the log scrubber on
the way out as a second line of defence. Every operation is audited (caller
``admin``; probes as ``admin-probe``, see ``proxy.admin.probe``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from proxy.observe.audit import AuditEvent
from proxy.credential import Credential
from proxy.errors import AdminTokenError, ProxyError
from proxy.server.peer import transport_ip
from proxy.admin.probe import probe
from proxy.redact.scrubber import SCRUBBER
from proxy.lifecycle.state import State, StateHolder

log = logging.getLogger("credproxy.admin")

HOLDER = web.AppKey("holder", StateHolder)
AUTH = web.AppKey("admin_auth", object)
RELOAD = web.AppKey("reload", object)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
ADMIN_CALLER = "admin"


class AdminAuth:
    """The admin token's SHA-256, replaceable on reload (token rotation)."""

    def __init__(self) -> None:
        self.digest: bytes | None = None

    @staticmethod
    def read(token_file: str | None) -> bytes | None:
        if not token_file:
            return None
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AdminTokenError(token_file, f"cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
                                  ) from None
        if not token:
            # An empty token would make "Authorization: Bearer " a valid admin credential.
            raise AdminTokenError(token_file, "is empty")
        return hashlib.sha256(token.encode()).digest()

    def load(self, token_file: str | None) -> None:
        self.digest = self.read(token_file)

    def allows(self, header: str) -> bool:
        if self.digest is None:
            return True
        scheme, _, token = header.partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = hmac.compare_digest(digest, self.digest)  # always compared: timing says nothing about the scheme
        return ok and scheme.lower() == "bearer" and bool(token.strip())


def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, text=SCRUBBER.scrub(json.dumps(data)), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    return _json({"error": code, "message": message, **extra}, status)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@web.middleware
async def require_token(request: web.Request, handler):
    if request.path not in OPEN_PATHS and not request.app[AUTH].allows(request.headers.get("Authorization", "")):
        return _error(401, "unauthenticated", "missing or invalid admin token")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, _HTTP_CODES.get(exc.status, "bad_request"), "no such admin endpoint or method")
    except ProxyError as exc:
        return _error(exc.status, exc.code, exc.message)
    except Exception as exc:  # noqa: BLE001 - an admin bug answers 500 JSON; the detail goes to the scrubbed log
        log.error("admin request failed", exc_info=exc, extra={"path": request.path[:200], "error": type(exc).__name__})
        return _error(500, "internal_error", "internal error")


def readiness(holder: StateHolder) -> dict:
    """What /readyz answers: ``waiting`` names credentials whose secrets are not yet read, ``draining``, and
    ``audit`` while audit lines cannot be written (then ``audit`` says why, SPEC §11)."""
    if holder.draining:
        return {"ready": False, "waiting": ["draining"]}
    state = holder.current
    waiting = [name for name, cred in state.credentials.items()
               if any(not state.cache.cached(ref.path) for ref in cred.refs())]
    answer = {"ready": True, "waiting": waiting}
    if state.audit.failure is not None:
        waiting.append("audit")
        answer["audit"] = {"error": state.audit.failure, "buffered": state.audit.buffered}
    answer["ready"] = not waiting
    return answer


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    answer = readiness(request.app[HOLDER])
    return _json(answer, 200 if answer["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[HOLDER].current
    state.metrics.observe_credentials([c.describe() for c in state.credentials.values()])
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def list_credentials(request: web.Request) -> web.Response:
    state = request.app[HOLDER].current
    return _json({"credentials": [c.describe() for c in state.credentials.values()]})


def _audit(request: web.Request, state: State, started: float, credential: str | None, status: int,
           reason: str) -> None:
    ip = transport_ip(request.transport)
    state.audit.write(AuditEvent(
        request_id=uuid.uuid4().hex, caller=ADMIN_CALLER, client_ip=str(ip) if ip else None, credential=credential,
        method=request.method, path=request.path[:512], status=status,
        outcome="allowed" if status < 400 else "error", reason=reason,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
    ))


def _lookup(request: web.Request) -> Credential | None:
    return request.app[HOLDER].current.credentials.get(request.match_info["name"])


_NOT_FOUND = (404, "not_found", "no such credential")


async def credential_action(request: web.Request) -> web.Response:
    started = time.monotonic()
    holder = request.app[HOLDER]
    action = request.match_info["action"]
    cred = _lookup(request)
    if cred is None:
        _audit(request, holder.current, started, None, 404, f"admin_{action}_unknown")
        return _error(*_NOT_FOUND)
    if action == "probe":
        if holder.draining:
            return _error(503, "draining", "the proxy is shutting down")
        with holder.use() as state:
            return _json(await probe(state, cred))
    state = holder.current
    changed = None
    try:
        if action == "refresh":
            await cred.source.refresh()
        elif action == "revoke":
            await cred.source.revoke()
        else:
            disable = action == "disable"
            changed = cred.disabled != disable
            cred.disabled = disable
            log.warning("credential %s by an operator", "disabled" if disable else "enabled",
                        extra={"credential": cred.name})
    except ProxyError as exc:
        _audit(request, state, started, cred.name, exc.status, f"admin_{action}_failed")
        log.warning("admin %s failed", action, extra={"credential": cred.name, "reason": exc.reason,
                                                      "detail": exc.detail})
        return _error(exc.status, exc.code, exc.message, name=cred.name, action=action, credential=cred.describe())
    _audit(request, state, started, cred.name, 200, f"admin_{action}")
    answer = {"name": cred.name, "action": action, "result": "ok", "credential": cred.describe()}
    if changed is not None:
        answer["changed"] = changed
    return _json(answer)


async def reload_config(request: web.Request) -> web.Response:
    started = time.monotonic()
    result = await request.app[RELOAD]("api")
    _audit(request, request.app[HOLDER].current, started, None, result.status, f"admin_reload_{result.result}")
    return _json(result.as_dict(), result.status)


def build_admin_app(holder: StateHolder, auth: AdminAuth,
                    reload: Callable[[str], Awaitable] | None = None) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[HOLDER] = holder
    app[AUTH] = auth
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/credentials", list_credentials)
    app.router.add_post(r"/v1/credentials/{name}/{action:refresh|revoke|disable|enable|probe}", credential_action)
    if reload is not None:
        app[RELOAD] = reload
        app.router.add_post("/v1/reload", reload_config)
    return app
