"""Process plumbing for the benchmark: pinned processes, port waits, RSS sampling, wrk."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "report.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _unprivileged():
    """preexec for nginx: drop root to nobody (nginx refuses nothing, but a benchmark needs no privileges)."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return drop


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start(name: str, argv: list[str], cpus: str, logdir: Path, *, env: dict | None = None,
          unprivileged: bool = False, cwd: str | None = None) -> Proc:
    log = logdir / f"{name}.log"
    popen = subprocess.Popen(["taskset", "-c", cpus, *argv], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, preexec_fn=_unprivileged() if unprivileged else None)
    return Proc(name, popen, log)


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> list[int]:
    """The first line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal, ... (all cores)."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]] + [0]  # (steal: 0 where the kernel has no column)


def busy_seconds() -> float:
    """CPU time spent by the whole machine so far (all cores, user + system + interrupts)."""
    user, nice, system, _idle, _iowait, irq, softirq = _machine_ticks()[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others while this machine's vCPUs wanted to run (steal), all cores."""
    return _machine_ticks()[7] / os.sysconf("SC_CLK_TCK")


def reaped_children_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class RssSampler:
    """Peak RSS of each process in ``pids()`` (re-evaluated, so forked workers are seen), every 50 ms."""

    pids: callable
    peak: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids():
                self.peak[pid] = max(self.peak.get(pid, 0), rss_kib(pid))
            self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total_mib(self) -> float:
        return sum(self.peak.values()) / 1024

    @property
    def max_mib(self) -> float:
        return max(self.peak.values(), default=0) / 1024


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    mib_s: float
    raw: dict

    @classmethod
    def parse(cls, out: str) -> "WrkResult":
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError("wrk printed no result line:\n" + out[-2000:])
        d = json.loads(line[len("BENCH_JSON "):])
        secs = d["duration_us"] / 1e6
        errors = d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["status_errors"] + d["timeouts"]
        return cls(rps=d["requests"] / secs, p50_ms=d["p50_us"] / 1000, p99_ms=d["p99_us"] / 1000,
                   requests=d["requests"], errors=errors, mib_s=d["bytes"] / secs / (1 << 20), raw=d)


def wrk(url: str, *, connections: int, seconds: float, cpus: str, token: str | None = None,
        timeout_s: int = 10) -> WrkResult:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y nginx wrk")
    env = dict(os.environ, BENCH_TOKEN=token or "")
    argv = ["taskset", "-c", cpus, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s}s",
            "-s", str(LUA), url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return WrkResult.parse(done.stdout)


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()
