"""Forward proxy benchmark: requests/s through the forward-proxy listener (CONNECT, TLS to the caller)
against the main listener (plain HTTP, and HTTPS with ``server.tls``), same run, same load generator.

    python tests/bench/forward.py [--duration 10] [--rounds 3] [--connections 10]

wrk cannot speak through a proxy, so the load comes from ``loadgen`` below (asyncio streams, uvloop
when installed): each connection opens once — for the forward proxy a CONNECT, then TLS with the
minted leaf — and then sends GET /v1/small with keep-alive, one request at a time. credproxy runs
on core 0, the load generator and the nginx upstream on core 1. Targets are measured round-robin,
each cell reports the median round. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import nginx  # noqa: E402
import rig  # noqa: E402
import yaml  # noqa: E402

TOKEN = "cp_bench_forward_caller_1"
HOST = "api.bench.invalid"
SECRET = "sk_bench_forward_secret_0123456789"


def setup(workdir: Path) -> tuple[Path, dict]:
    import trustme

    from proxy.server.forward.ca import generate_ca
    from proxy.store.file import FileStore, generate_key
    from proxy.store.secret import Secret

    key_file = workdir / "master.key"
    key_file.write_text(generate_key())
    key_file.chmod(0o600)
    store = FileStore(workdir / "secrets.enc", base64.b64decode(key_file.read_text()))
    store.init()
    store.put_sync("apis/bench", "token", Secret(SECRET))
    cert_pem, key = generate_ca()
    (workdir / "ca.pem").write_bytes(cert_pem)
    store.put_sync("credproxy/ca", "key", key)
    server_ca = trustme.CA()
    server_cert = server_ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    server_ca.cert_pem.write_to_path(str(workdir / "server-ca.pem"))
    ports = {name: rig.free_port() for name in ("main", "tls", "forward", "admin", "upstream")}
    cred = {"upstream": f"http://127.0.0.1:{ports['upstream']}", "allow_insecure_upstream": True,
            "hosts": [HOST],
            "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": "apis/bench#token"},
            "allow": [{"callers": ["agent"], "methods": ["GET"], "paths": ["/v1/**"]}]}
    cfg = {
        "server": {"listen": f"127.0.0.1:{ports['main']}"},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
        "secrets": {"backend": "file", "file": {"path": str(workdir / "secrets.enc"), "key_file": str(key_file)}},
        "audit": {"path": str(workdir / "audit.log")},
        "leak_guard": "redact",
        "callers": {"agent": {"token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}},
        "forward_proxy": {"listen": f"127.0.0.1:{ports['forward']}",
                          "ca": {"cert_file": str(workdir / "ca.pem"), "key": "credproxy/ca#key"}},
        "credentials": {
            "bench": cred,
            # the same credential on a dedicated HTTPS listener: TLS to the caller without the forward proxy
            "benchtls": dict(cred, hosts=[], listen=f"127.0.0.1:{ports['tls']}",
                             tls={"cert_file": str(workdir / "server.pem"), "key_file": str(workdir / "server.pem")}),
        },
    }
    path = workdir / "credproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, ports


# --- load generator (runs as its own process on core 1) ----------------------------------------------

async def _open(kind: str, ports: dict, workdir: str):
    if kind == "main":
        return await asyncio.open_connection("127.0.0.1", ports["main"])
    if kind == "tls":
        ctx = ssl.create_default_context(cafile=f"{workdir}/server-ca.pem")
        return await asyncio.open_connection("127.0.0.1", ports["tls"], ssl=ctx, server_hostname="127.0.0.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["forward"])
    auth = base64.b64encode(f"agent:{TOKEN}".encode()).decode()
    writer.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=f"{workdir}/ca.pem")
    await writer.start_tls(ctx, server_hostname=HOST)
    return reader, writer


def _request(kind: str) -> bytes:
    if kind == "main":
        return f"GET /bench/v1/small HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    if kind == "tls":
        return f"GET /v1/small HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    return f"GET /v1/small HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


async def _worker(kind, ports, workdir, deadline, latencies, errors):
    reader, writer = await _open(kind, ports, workdir)
    request = _request(kind)
    clock = time.perf_counter  # not loop.time(): uvloop's has millisecond resolution
    while clock() < deadline:
        started = clock()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            errors.append(head[:40])
        latencies.append(clock() - started)
    writer.close()


async def _load(kind, ports, workdir, connections, seconds):
    latencies, errors = [], []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(_worker(kind, ports, workdir, deadline, latencies, errors) for _ in range(connections)))
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "rps": n / seconds, "p50_ms": latencies[n // 2] * 1000,
            "p99_ms": latencies[int(n * 0.99)] * 1000, "errors": len(errors)}


def loadgen_main(argv: list[str]) -> None:
    kind, ports, workdir, connections, seconds = argv[0], json.loads(argv[1]), argv[2], int(argv[3]), float(argv[4])
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(_load(kind, ports, workdir, connections, seconds))))


# --- the run ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per target per cell, split into rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, nargs="+", default=[10, 64])
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="credproxy-fwd-bench-"))
    config, ports = setup(workdir)
    www = workdir / "www"
    www.mkdir()
    upstream = rig.start("nginx", nginx.command(nginx.upstream_config(workdir, ports["upstream"], www), workdir),
                         "1", workdir)
    proxy = rig.start("credproxy", [sys.executable, "-m", "proxy", "serve", "-c", str(config), "--log-level",
                                    "WARNING"], "0", workdir, cwd=str(ROOT))
    try:
        for port in (ports["upstream"], ports["main"], ports["tls"], ports["forward"]):
            rig.wait_port(port, proc=proxy.popen if port != ports["upstream"] else None)
        rows = []
        kinds = [("main", "main listener, plain HTTP"), ("tls", "dedicated listener, HTTPS (server TLS)"),
                 ("forward", "forward proxy: CONNECT + TLS (minted leaf)")]
        for connections in args.connections:
            results = {kind: [] for kind, _ in kinds}
            for _ in range(args.rounds):
                for kind, _ in kinds:
                    cpu0 = rig.cpu_seconds(proxy.pid)
                    out = subprocess.run(["taskset", "-c", "1", sys.executable, __file__, "--loadgen", kind,
                                          json.dumps(ports), str(workdir), str(connections),
                                          str(args.duration / args.rounds)],
                                         capture_output=True, text=True, check=True, cwd=str(ROOT)).stdout
                    result = json.loads(out)
                    result["cpu_us"] = (rig.cpu_seconds(proxy.pid) - cpu0) / max(1, result["requests"]) * 1e6
                    results[kind].append(result)
            for kind, label in kinds:
                cell = sorted(results[kind], key=lambda r: r["rps"])[len(results[kind]) // 2]
                rows.append((connections, label, cell))
        base = {c: cell["rps"] for c, label, cell in rows if label.startswith("main")}
        print("| connections | target | req/s | vs main | p50 ms | p99 ms | proxy CPU µs/req | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for connections, label, cell in rows:
            print(f"| {connections} | {label} | {cell['rps']:.0f} | {cell['rps'] / base[connections]:.2f} x | "
                  f"{cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | {cell['cpu_us']:.0f} | {cell['errors']} |")
        print(f"\n(one run, {time.strftime('%Y-%m-%d %H:%M')}; {args.duration:.0f} s per target and cell in "
              f"{args.rounds} rounds; proxy on core 0, load generator and nginx on core 1)")
    finally:
        proxy.stop()
        upstream.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()
