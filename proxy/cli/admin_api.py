"""A small synchronous client of the admin API, for the CLI: TCP or unix socket, optional token.

Failures become ``AdminUnreachable`` (nothing answers at the address) or
``AdminUnauthorized`` (the admin token is missing or wrong); the messages name
the address and the token file, never the token.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import yaml
from pydantic import ValidationError

from proxy.config import models as config_mod
from proxy.config.models import AdminConfig
from proxy.config.fields import Listen
from proxy.errors import AdminConfigError, AdminUnauthorized, AdminUnreachable, ConfigInvalid

TIMEOUT = 120.0  # a probe waits for the upstream (read_timeout defaults to 60 s)


def admin_settings(config_path: str) -> AdminConfig:
    """The ``admin`` section. The rest of the file may be invalid — ``reload`` must still reach the
    proxy to hear why — so only this section has to validate."""
    try:
        return config_mod.load(config_path).admin
    except ConfigInvalid as exc:
        whole = exc
    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        return AdminConfig.model_validate(data.get("admin") or {}) if isinstance(data, dict) else AdminConfig()
    except (OSError, yaml.YAMLError, ValidationError, UnicodeDecodeError):
        raise AdminConfigError("; ".join(str(p) for p in whole.problems)) from None


def _connect_host(listen: Listen) -> str:
    # A wildcard listener is reached on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host or "", listen.host)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class AdminClient:
    def __init__(self, listen: Listen, token_file: str | None = None, *, timeout: float = TIMEOUT) -> None:
        self.listen = listen
        self.token_file = token_file
        self.timeout = timeout
        self._token: str | None = None
        if token_file:
            try:
                self._token = Path(token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise AdminConfigError(f"admin.token_file {token_file} cannot be read "
                                       f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
            if not self._token:
                raise AdminConfigError(f"admin.token_file {token_file} is empty")

    @classmethod
    def from_config(cls, config_path: str) -> "AdminClient":
        admin = admin_settings(config_path)
        return cls(admin.listen, admin.token_file)

    def _connection(self) -> http.client.HTTPConnection:
        if self.listen.unix:
            return _UnixConnection(self.listen.unix, self.timeout)
        return http.client.HTTPConnection(_connect_host(self.listen), self.listen.port, timeout=self.timeout)

    def call(self, method: str, path: str) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        conn = self._connection()
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise AdminUnreachable(f"credproxy is not answering on its admin listener {self.listen} ({reason}); "
                                   "is it running?") from None
        finally:
            conn.close()
        try:
            body = json.loads(raw)
        except ValueError:
            raise AdminUnreachable(f"something at {self.listen} answered, but not as credproxy's admin API") from None
        if status == 401 and isinstance(body, dict) and body.get("error") == "unauthenticated":
            where = f"the token in {self.token_file}" if self.token_file else \
                "no admin token (admin.token_file is not set)"
            raise AdminUnauthorized(f"the proxy refused {where}: missing or wrong admin token")
        return status, body
