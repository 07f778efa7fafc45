"""``credproxy serve --workers N``: N full proxies sharing the caller ports.

The supervisor (this module, in the process ops started) validates the config,
starts N worker processes (each ``credproxy serve`` with every feature, binding
the caller listeners with ``SO_REUSEPORT`` so the kernel spreads connections
across them) and serves the admin listener itself (``proxy.admin.supervisor``),
talking to each worker over a private unix socket.

- SIGTERM/SIGINT: forwarded to every worker, each drains as a single process
  does; the supervisor exits 0 when they all have. SIGHUP: forwarded (each
  worker reloads its config).
- A worker that dies after it was serving is started again (the others keep
  serving the port); one that fails before serving stops the whole service
  (exit 1), as would a single process that cannot start.
- Workers share the audit file (one hash chain, see ``proxy.observe.audit``); each has
  its own token cache and upstream pools, like replicas, and its own metrics
  directory in the supervisor's private run directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from prometheus_client.multiprocess import mark_process_dead

from proxy.config import models as config_mod
from proxy.config.models import Config
from proxy.config.fields import Listen

log = logging.getLogger("credproxy.workers")

RESTART_DELAY = 1.0
MAX_RESTARTS = 5  # within RESTART_WINDOW: past that the supervisor gives up (exit 1) rather than flap
RESTART_WINDOW = 60.0
START_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1


def problems(cfg: Config, workers: int) -> list[str]:
    """Why this config cannot run as several workers (empty when it can)."""
    out = []
    listeners = [("server.listen", cfg.server.listen)]
    listeners += [(f"credentials.{n}.listen", c.listen) for n, c in cfg.credentials.items() if c.listen is not None]
    for where, listen in listeners:
        if listen.unix:
            out.append(f"{where}: --workers needs TCP listeners (SO_REUSEPORT); serve a unix socket with one process")
        elif listen.port == 0:
            out.append(f"{where}: --workers needs a fixed port (every worker binds the same one)")
    if cfg.admin.listen.unix is None and cfg.admin.listen.port == 0:
        out.append("admin.listen: --workers needs a fixed port")
    if cfg.audit.path == "-":
        out.append("audit.path: --workers needs a file (workers append to one hash chain under a lock); "
                   "lines on a shared stdout would interleave")
    if workers < 1:
        out.append("--workers must be at least 1")
    return out


@dataclass
class Worker:
    index: int
    admin_socket: str
    metrics_dir: str  # its PROMETHEUS_MULTIPROC_DIR, kept across restarts (proxy.admin.supervisor merges it)
    process: asyncio.subprocess.Process | None = None
    serving: bool = False  # answered on its admin socket at least once since it was (re)started
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, config_path: str, cfg: Config, count: int, *, log_level: str = "INFO") -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.log_level = log_level
        self.rundir = tempfile.mkdtemp(prefix="credproxy-workers-")  # 0700: only we reach the admin sockets
        self.workers = [Worker(i, os.path.join(self.rundir, f"worker-{i}.sock"),
                               os.path.join(self.rundir, f"metrics-{i}")) for i in range(count)]
        for w in self.workers:
            os.mkdir(w.metrics_dir, 0o700)
        self.stopping = False
        self.failed: str | None = None
        self._done = asyncio.Event()

    def argv(self, worker: Worker) -> list[str]:
        return [sys.executable, "-m", "proxy", "serve", "-c", self.config_path, "--log-level", self.log_level,
                "--worker-index", str(worker.index), "--worker-admin", f"unix:{worker.admin_socket}"]

    async def start_worker(self, worker: Worker) -> None:
        if self.stopping:
            return
        worker.serving = False
        env = dict(os.environ, CREDPROXY_SUPERVISOR_PID=str(os.getpid()), PROMETHEUS_MULTIPROC_DIR=worker.metrics_dir)
        worker.process = await asyncio.create_subprocess_exec(*self.argv(worker), env=env)
        log.info("worker started", extra={"worker": worker.index, "pid": worker.process.pid})
        if self.stopping:  # SIGTERM arrived while it was being started
            worker.process.send_signal(signal.SIGTERM)
        asyncio.get_running_loop().create_task(self._watch(worker, worker.process))

    async def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        mark_process_dead(process.pid, worker.metrics_dir)  # its gauges go; its counters stay in the sums
        if self.stopping:
            log.info("worker exited", extra={"worker": worker.index, "exit_code": code})
            if all(w.process is None or w.process.returncode is not None for w in self.workers):
                self._done.set()
            return
        if not worker.serving:
            self.fail(f"worker {worker.index} exited with {code} before it was serving")
            return
        now = time.monotonic()
        worker.restarts = [t for t in worker.restarts if now - t < RESTART_WINDOW] + [now]
        if len(worker.restarts) > MAX_RESTARTS:
            self.fail(f"worker {worker.index} exited {len(worker.restarts)} times within {RESTART_WINDOW:.0f}s")
            return
        log.error("worker exited; starting it again", extra={"worker": worker.index, "exit_code": code})
        await asyncio.sleep(RESTART_DELAY)
        if not self.stopping:
            await self.start_worker(worker)

    def fail(self, why: str) -> None:
        log.error("stopping all workers: %s", why)
        self.failed = why
        self.stop()

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        if all(w.process is None or w.process.returncode is not None for w in self.workers):
            self._done.set()

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                w.process.send_signal(sig)

    async def run(self) -> int:
        from proxy.admin.supervisor import WorkerAdmin

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.signal_all, signal.SIGHUP)
        admin = None
        try:
            admin = WorkerAdmin(self, self.cfg.admin)
            for w in self.workers:
                await self.start_worker(w)
            await admin.start()
            log.info("credproxy serving", extra={"listen": str(self.cfg.server.listen), "admin": str(self.cfg.admin.listen),
                                                 "workers": len(self.workers), "credentials": len(self.cfg.credentials)})
            await self._done.wait()
        finally:
            self.stop()
            for w in self.workers:
                if w.process is not None and w.process.returncode is None:
                    await w.process.wait()
            if admin is not None:
                await admin.stop()
            shutil.rmtree(self.rundir, ignore_errors=True)
        codes = [w.process.returncode for w in self.workers if w.process is not None]
        if self.failed or any(codes):
            return 1
        return 0


def supervise(config_path: str, count: int, *, log_level: str = "INFO") -> int:
    cfg = config_mod.load(config_path)
    found = problems(cfg, count)
    if found:
        for p in found:
            print(f"{config_path}: {p}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Supervisor(config_path, cfg, count, log_level=log_level).run())
    except OSError as exc:  # the admin port taken, the admin token file unreadable, ...
        log.error("cannot start: %s", exc)
        return 1


def worker_options(index: int, admin: str) -> dict:
    """What ``serve`` needs to run as worker ``index`` of a supervisor (see ``proxy.app.Proxy``)."""
    _die_with_parent()
    tag = _WorkerTag(index)
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    return {"reuse_port": True, "admin_listen": Listen.parse(admin)}


class _WorkerTag(logging.Filter):
    """Every log line of a worker says which one (``"worker": N``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor (killed with SIGKILL, say): have the kernel send SIGTERM."""
    parent = int(os.environ.get("CREDPROXY_SUPERVISOR_PID") or os.getppid())
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers then outlive a killed supervisor
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
