"""Three real credproxy processes (``python -m proxy serve``) sharing tokens through one
real OpenBao (logged in with a token holding exactly deploy/vault/policy.hcl), one real
OAuth2 server (authlib components, TLS) issuing short-lived tokens, and an upstream that
accepts only live tokens of that server (expired ones get 401, as a real API would).

The one fault injected: the authorization server holds its answers on demand
(``db.hold``), so that a replica can be killed (SIGKILL) while it refreshes holding the
lease; no real token endpoint stalls on cue.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.tokens_fixtures import Client, ca_file, oauth, tls_ca  # noqa: F401 - fixtures
from tests.tokens_oauth_server import ResourceServer
from tests.vault_fixture import bao, free_port  # noqa: F401 - fixtures
from tests.vault_harness import assert_nowhere, eventually
from tests.helpers import REPO

ROOT = REPO
POLICY = (ROOT / "deploy" / "vault" / "policy.hcl").read_text()
CLIENT_SECRET = "cs-CANARY-cluster-7f3a91"
LOAD_SECONDS = 60.0
TOKEN_LIFETIME = 2


class LiveTokens:
    """What the upstream asks: is this a token the authorization server issued, not revoked, not expired?"""

    def __init__(self, db) -> None:
        self.db = db

    def valid_access(self, token: str) -> bool:
        tok = self.db.by_access.get(token)
        return tok is not None and not tok.access_revoked and time.time() < tok.issued_at + tok.expires_in


@dataclass
class Replica:
    proc: subprocess.Popen
    base: str
    admin: str
    log: Path
    audit: Path

    def replica_id(self) -> str:
        for line in self.log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("msg") == "cluster: sharing tokens through vault":
                return rec["replica"]
        raise AssertionError("no cluster start line")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


@pytest.fixture
async def cluster(bao, oauth, ca_file, tmp_path):
    """start(n, lease_timeout) -> n replicas serving credential ``api`` with cluster.backend: vault."""
    oauth.db.clients["app"] = Client("app", secret=CLIENT_SECRET)
    oauth.db.expires_in = TOKEN_LIFETIME
    api = await ResourceServer(LiveTokens(oauth.db)).start()
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/shared/app", {"client_secret": CLIENT_SECRET})
    vault_token = bao.token(["credproxy"])
    token_file = tmp_path / "vault-token"
    token_file.write_text(vault_token)
    replicas: list[Replica] = []

    async def start(n: int, lease_timeout: str = "2s") -> list[Replica]:
        for i in range(n):
            port, admin = free_port(), free_port()
            doc = {
                "server": {"listen": f"127.0.0.1:{port}", "read_timeout": "10s"},
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "secrets": {"backend": "vault", "vault": {"address": bao.address, "timeout": "3s",
                                                         "auth": {"method": "token", "token_file": str(token_file)}}},
                "cluster": {"backend": "vault", "lease_timeout": lease_timeout},
                "audit": {"path": str(tmp_path / f"audit-{i}.log")},
                "credentials": {name: credential(api.url, oauth.token_url, ca_file) for name in ("api", "spare")},
            }
            cfg = tmp_path / f"replica-{i}.yaml"
            cfg.write_text(json.dumps(doc))
            log = tmp_path / f"replica-{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(cfg)], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
            replicas.append(Replica(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log,
                                    tmp_path / f"audit-{i}.log"))
        async with aiohttp.ClientSession() as http:
            for r in replicas:
                await eventually(lambda r=r: ready(http, r), timeout=30, interval=0.1)
        return replicas

    yield start, api, [CLIENT_SECRET, vault_token]
    for r in replicas:
        r.stop()
    await api.stop()


def credential(upstream: str, token_url: str, ca_file: str) -> dict:
    return {"upstream": upstream, "allow_insecure_upstream": True, "upstream_tls": {"ca_file": ca_file},
            "auth": {"type": "oauth2_client_credentials", "token_url": token_url, "client_id": "app",
                     "client_secret": "credproxy/shared/app#client_secret"},
            # A 2 s token is refreshed from 0.3 s before its expiry (the mandatory margin is 0.2 s).
            "session": {"refresh_before": "0.3s"},
            "allow": [{"paths": ["/**"]}]}


async def ready(http: aiohttp.ClientSession, r: Replica) -> bool:
    assert r.proc.poll() is None, r.log.read_text()[-2000:]
    try:
        async with http.get(r.admin + "/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def stored_or_none(read):
    try:
        return read()
    except Exception:  # noqa: BLE001 - not written yet
        return None


def grants(oauth) -> int:
    return sum(1 for t in oauth.db.token_requests if t["status"] == 200)


def logs_and_audit(replicas: list[Replica]) -> list[str]:
    return [r.log.read_text() for r in replicas] + [r.audit.read_text() for r in replicas if r.audit.exists()]


@pytest.mark.slow
async def test_three_replicas_under_load_refresh_once_per_expiry(cluster, oauth):
    start, api, canaries = cluster
    replicas = await start(3)
    before = grants(oauth)
    statuses: dict[int, int] = {}
    served = [0, 0, 0]
    slowest = 0.0
    deadline = time.monotonic() + LOAD_SECONDS

    async def worker(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal slowest
        r = replicas[i]
        n = 0
        while time.monotonic() < deadline and n < 20000:  # bounded either way
            n += 1
            t0 = time.monotonic()
            async with http.get(f"{r.base}/api/v1/orders/{n}") as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            slowest = max(slowest, time.monotonic() - t0)
            served[i] += 1
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http, i) for i in range(3) for _ in range(2)))
    issued = grants(oauth) - before
    expiries = LOAD_SECONDS / TOKEN_LIFETIME
    ratio = issued / expiries
    shared_by = [r.log.read_text().count("cluster: refreshed and shared the token") for r in replicas]
    print(f"\ncluster load: {sum(served)} requests in {LOAD_SECONDS:g}s through 3 replicas {served}, "
          f"statuses {statuses}, token grants {issued} for {expiries:g} expiries (ratio {ratio:.2f}), "
          f"refreshes per replica {shared_by}, slowest request {slowest:.3f}s")
    assert statuses == {200: sum(served)}  # every call succeeded
    assert min(served) > 100
    assert issued <= 1.3 * expiries, ratio  # one refresh per expiry across the cluster, not one per replica
    assert sum(1 for r in replicas if r.log.read_text().count("cluster: refreshed and shared the token")) >= 2
    seen = {s.token for s in api.seen}
    assert seen <= set(oauth.db.issued)
    assert_nowhere(oauth.db.issued + canaries, *logs_and_audit(replicas))


async def test_a_refused_token_is_refreshed_once_and_a_killed_refresher_holds_the_others_up_at_most_the_lease(
        cluster, oauth, bao):
    lease_timeout = 2.0
    start, _api, canaries = cluster
    oauth.db.expires_in = 60  # long-lived: only the upstream's refusals cause refreshes here
    replicas = await start(3, lease_timeout=f"{lease_timeout:g}s")
    async with aiohttp.ClientSession() as http:
        async def get(r: Replica, path: str = "/api/v1/x") -> tuple[int, float]:
            t0 = time.monotonic()
            async with http.get(r.base + path) as resp:
                await resp.read()
                return resp.status, time.monotonic() - t0

        assert [s for s, _ in await asyncio.gather(*(get(r) for r in replicas))] == [200, 200, 200]
        assert grants(oauth) == 1  # three replicas, one token
        # The upstream starts refusing the shared token: one new token for the whole cluster.
        oauth.db.revoke_access(oauth.db.issued[-1])
        results = await asyncio.gather(*(get(r) for r in replicas for _ in range(3)))
        assert [s for s, _ in results] == [200] * 9
        assert grants(oauth) == 2

        # Replica 0 takes the lease for credential "spare", and its token request stalls; then it is killed.
        oauth.db.hold = asyncio.Event()
        stalled = asyncio.ensure_future(get(replicas[0], "/spare/v1/x"))
        victim = replicas[0].replica_id()

        def lease():
            data = bao.root().secrets.kv.v2.read_secret_version(path="credproxy/cluster/spare",
                                                                raise_on_deleted_version=False)["data"]["data"]
            return data if data.get("holder") == victim else None

        held = await eventually(lambda: stored_or_none(lease), timeout=10)
        assert set(held) == {"holder", "lease_until"}  # the lease record holds no token
        await eventually(lambda: oauth.db.arrived > 2, timeout=10)
        replicas[0].stop(signal.SIGKILL)
        oauth.db.hold.set()
        oauth.db.hold = None
        results = await asyncio.gather(*(get(r, "/spare/v1/x") for r in replicas[1:] for _ in range(3)))
        stalled.cancel()
        await asyncio.gather(stalled, return_exceptions=True)
    waits = [round(t, 3) for _, t in results]
    print(f"\nkilled refresher: survivors waited {waits}s (lease_timeout {lease_timeout:g}s)")
    assert [s for s, _ in results] == [200] * 6
    assert max(waits) <= lease_timeout + 1.5, waits  # the lease left, then one token request and the replay
    # The dead replica's request reached the endpoint; of the survivors, exactly one took over.
    assert grants(oauth) == 4
    takeovers = [r.log.read_text().count("taking over") for r in replicas[1:]]
    assert sum(takeovers) == 1, takeovers
    assert_nowhere(oauth.db.issued + canaries, *logs_and_audit(replicas))
