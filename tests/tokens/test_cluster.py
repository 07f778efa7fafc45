"""Cluster token sharing (``cluster.backend: vault``), coordinator level: several
``ClusterTokens`` (one per simulated replica, each with its own VaultStore) against a
real OpenBao, logged in with a token holding exactly deploy/vault/policy.hcl.

The token endpoint is a counting async function here (the provider the coordinator
wraps); the one that hangs is a fault-injecting fake: a refresher stuck or dead while
holding the lease is not something a real token endpoint produces on demand. The
whole path through real processes and a real OAuth2 server is in
tests/tokens/test_cluster_replicas.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from proxy.config import models as config
from proxy.config.models import ClusterConfig, VaultAuthConfig, VaultConfig
from proxy.store.secret import Secret
from proxy.store.vault import VaultStore
from proxy.tokens.answer import TokenAnswer
from proxy.tokens.cluster import ClusterTokens, cluster_for
from tests.tokens_fixtures import Client, ca_file, oauth, tls_ca  # noqa: F401 - fixtures
from tests.vault_fixture import bao, free_port, raw_log  # noqa: F401 - fixtures
from tests.vault_harness import assert_nowhere, eventually
from tests.helpers import REPO

POLICY = (REPO / "deploy" / "vault" / "policy.hcl").read_text()


class Endpoint:
    """Counts fetches; each answers a new token with ``lifetime`` seconds."""

    def __init__(self, lifetime: float = 60.0) -> None:
        self.lifetime = lifetime
        self.issued: list[str] = []

    async def fetch(self) -> TokenAnswer:
        await asyncio.sleep(0.05)  # a token request takes a moment: the others must find the lease
        token = f"at-CANARY-{len(self.issued)}-{time.time_ns()}"
        self.issued.append(token)
        return TokenAnswer(Secret(token), expires_in=self.lifetime)


@pytest.fixture
async def replicas(bao, tmp_path):
    """make(n, lease_timeout=..., path=...) -> n coordinators, each on its own VaultStore."""
    bao.policy("credproxy", POLICY)
    token_file = tmp_path / "vault-token"
    token_file.write_text(bao.token(["credproxy"]))
    stores = []

    async def make(n: int, *, lease_timeout: float = 10.0, path: str = "credproxy/cluster") -> list[ClusterTokens]:
        out = []
        for i in range(n):
            store = VaultStore(VaultConfig(address=bao.address, timeout=2.0,
                                           auth=VaultAuthConfig(method="token", token_file=str(token_file))))
            await store.start()
            stores.append(store)
            out.append(ClusterTokens(store, ClusterConfig(backend="vault", path=path, lease_timeout=lease_timeout),
                                     replica_id=f"replica-{i}"))
        return out

    yield make
    for store in stores:
        await store.close()


def stored(bao, path: str) -> dict:
    return bao.root().secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=False)["data"]["data"]


async def test_config_defaults_and_validation():
    cfg = config.parse("{}")
    assert cfg.cluster == ClusterConfig(backend="none", path="credproxy/cluster", lease_timeout=10.0)
    assert cluster_for(cfg.cluster, store=None) is None
    doc = {"cluster": {"backend": "vault", "lease_timeout": "3s"}}
    with pytest.raises(config.ConfigInvalid) as err:
        config.parse(json.dumps(doc))
    assert [(p.path, p.message) for p in err.value.problems] == [
        ("cluster.backend", "cluster backend vault needs secrets.backend: vault")]
    doc = {"secrets": {"backend": "vault", "vault": {"address": "http://127.0.0.1:8200"}},
           "cluster": {"backend": "vault", "path": "/shared/tokens/", "lease_timeout": "3s"}}
    cfg = config.parse(json.dumps(doc))
    assert (cfg.cluster.path, cfg.cluster.lease_timeout) == ("/shared/tokens/", 3.0)
    for bad, where in (({"lease_timeout": "0s"}, "cluster.lease_timeout"), ({"backend": "redis"}, "cluster.backend"),
                       ({"path": "a/../b"}, "cluster.path"), ({"path": "/"}, "cluster.path")):
        with pytest.raises(config.ConfigInvalid) as err:
            config.parse(json.dumps({**doc, "cluster": {**doc["cluster"], **bad}}))
        assert [p.path for p in err.value.problems] == [where]


async def test_concurrent_replicas_fetch_once_and_share_the_token(bao, replicas, raw_log):
    nodes = await replicas(3)
    endpoint = Endpoint()
    answers = await asyncio.gather(*(n.obtain("crm", "", endpoint.fetch, refresh_before=300) for n in nodes))
    assert len(endpoint.issued) == 1
    assert {a.access.reveal() for a in answers} == {endpoint.issued[0]}
    assert all(50 < a.expires_in <= 60 and a.lifetime in (None, 60) for a in answers)
    record = stored(bao, "credproxy/cluster/crm")
    assert record["access_token"] == endpoint.issued[0] and "holder" not in record
    assert abs(float(record["expires_at"]) - (time.time() + 60)) < 5
    # Later callers, per principal paths: the stored token serves without a fetch; another principal has its own.
    again = await nodes[2].obtain("crm", "", endpoint.fetch, refresh_before=300)
    assert again.access.reveal() == endpoint.issued[0] and len(endpoint.issued) == 1
    await nodes[0].obtain("crm", "reports", endpoint.fetch, refresh_before=300)
    assert len(endpoint.issued) == 2 and stored(bao, "credproxy/cluster/crm/reports")["access_token"] == endpoint.issued[1]
    assert_nowhere(endpoint.issued, raw_log.text)


async def test_a_token_in_its_refresh_window_is_refreshed_by_one_replica(bao, replicas):
    nodes = await replicas(3)
    endpoint = Endpoint(lifetime=60.0)

    def shared(token: str, left: float) -> None:
        bao.put("credproxy/cluster/erp", {"access_token": token, "expires_at": repr(time.time() + left),
                                          "lifetime": "60.0"})

    # 40 s of 60 left, refresh window min(refresh_before, 60/2) = 30 s: still good, used as it is.
    shared("at-CANARY-early", 40)
    answers = await asyncio.gather(*(n.obtain("erp", "", endpoint.fetch, refresh_before=300) for n in nodes))
    assert endpoint.issued == [] and {a.access.reveal() for a in answers} == {"at-CANARY-early"}
    assert all(35 < a.expires_in <= 40 and a.lifetime == 60 for a in answers)  # wall clock -> time left
    # 20 s left: due. Three replicas, one new token.
    shared("at-CANARY-due", 20)
    answers = await asyncio.gather(*(n.obtain("erp", "", endpoint.fetch, refresh_before=300) for n in nodes))
    assert len(endpoint.issued) == 1 and {a.access.reveal() for a in answers} == {endpoint.issued[0]}
    # A shorter refresh_before keeps a token longer: 20 s left is fine with a 10 s window.
    shared("at-CANARY-short", 20)
    answer = await nodes[0].obtain("erp", "", endpoint.fetch, refresh_before=10)
    assert answer.access.reveal() == "at-CANARY-short" and len(endpoint.issued) == 1


async def test_a_refused_token_is_refreshed_once_across_the_cluster(bao, replicas):
    nodes = await replicas(3)
    endpoint = Endpoint()
    first = await nodes[0].obtain("billing", "", endpoint.fetch, refresh_before=300)
    # The upstream refuses the shared token at all three replicas: one new token between them.
    answers = await asyncio.gather(*(n.obtain("billing", "", endpoint.fetch, refresh_before=300,
                                              rejected=first.access) for n in nodes))
    assert len(endpoint.issued) == 2
    assert {a.access.reveal() for a in answers} == {endpoint.issued[1]}
    # A replica that reports the old token late takes the new one, no further fetch.
    late = await nodes[1].obtain("billing", "", endpoint.fetch, refresh_before=300, rejected=first.access)
    assert late.access.reveal() == endpoint.issued[1] and len(endpoint.issued) == 2


async def test_a_refresher_that_hangs_holding_the_lease_delays_the_others_at_most_lease_timeout(bao, replicas,
                                                                                                 raw_log):
    lease_timeout = 1.5
    stuck, survivor = await replicas(2, lease_timeout=lease_timeout)
    never = asyncio.Event()

    async def hangs() -> TokenAnswer:
        await never.wait()
        raise AssertionError("unreachable")

    holder = asyncio.create_task(stuck.obtain("ledger", "", hangs, refresh_before=300))
    try:
        await eventually(lambda: stored_or_none(bao, "credproxy/cluster/ledger"), timeout=10)
        lease = stored(bao, "credproxy/cluster/ledger")
        assert set(lease) == {"holder", "lease_until"} and lease["holder"] == "replica-0"  # no secret in a lease
        endpoint = Endpoint()
        started = time.monotonic()
        answer = await survivor.obtain("ledger", "", endpoint.fetch, refresh_before=300)
        waited = time.monotonic() - started
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    assert answer.access.reveal() == endpoint.issued[0] and len(endpoint.issued) == 1
    assert 0.5 < waited <= lease_timeout + 1.0, waited  # waited for the lease, then took over
    assert stored(bao, "credproxy/cluster/ledger")["access_token"] == endpoint.issued[0]
    assert "lease ran out before its holder stored the token; taking over" in raw_log.text
    assert_nowhere(endpoint.issued, raw_log.text)


def stored_or_none(bao, path: str) -> dict | None:
    try:
        return stored(bao, path)
    except Exception:  # noqa: BLE001 - not written yet
        return None


async def test_a_failed_fetch_releases_the_lease_at_once(bao, replicas):
    nodes = await replicas(2, lease_timeout=30.0)

    async def fails() -> TokenAnswer:
        from proxy.errors import TokenFailure

        raise TokenFailure("http_error", "token endpoint answered HTTP 503")

    with pytest.raises(Exception, match="503"):
        await nodes[0].obtain("flaky", "", fails, refresh_before=300)
    assert stored(bao, "credproxy/cluster/flaky") == {"holder": "", "lease_until": "0"}
    endpoint = Endpoint()
    answer = await asyncio.wait_for(nodes[1].obtain("flaky", "", endpoint.fetch, refresh_before=300), 5)
    assert answer.access.reveal() == endpoint.issued[0]  # no 30 s wait for a lease nobody holds


async def test_vault_unreachable_or_denying_falls_back_to_a_local_refresh(bao, replicas, tmp_path, raw_log):
    # Outside the policy's writable prefix: OpenBao denies the lease write.
    (denied,) = await replicas(1, path="credproxy/elsewhere")
    endpoint = Endpoint()
    answer = await denied.obtain("crm", "", endpoint.fetch, refresh_before=300)
    assert answer.access.reveal() == endpoint.issued[0]
    assert "cluster: vault not usable; this replica refreshes on its own" in raw_log.text
    # Nothing listening: the store cannot log in, the coordinator still answers.
    token_file = tmp_path / "t"
    token_file.write_text("hvs.unused")
    store = VaultStore(VaultConfig(address=f"http://127.0.0.1:{free_port()}", timeout=0.5,
                                   auth=VaultAuthConfig(method="token", token_file=str(token_file))))
    await store.start()
    try:
        offline = ClusterTokens(store, ClusterConfig(backend="vault"))
        answer = await offline.obtain("crm", "", endpoint.fetch, refresh_before=300)
    finally:
        await store.close()
    assert answer.access.reveal() == endpoint.issued[1] and len(endpoint.issued) == 2
    assert_nowhere(endpoint.issued, raw_log.text)


async def test_a_damaged_record_is_replaced(bao, replicas):
    (node,) = await replicas(1)
    bao.put("credproxy/cluster/odd", {"access_token": "x", "expires_at": "soon", "lifetime": "nan"})
    endpoint = Endpoint()
    answer = await node.obtain("odd", "", endpoint.fetch, refresh_before=300)
    assert answer.access.reveal() == endpoint.issued[0]
    assert stored(bao, "credproxy/cluster/odd")["access_token"] == endpoint.issued[0]


async def test_operator_refresh_and_revoke_are_not_undone_by_the_shared_record(bao, oauth, ca_file, tmp_path,
                                                                                raw_log):
    """Two in-process proxies on one credential: an admin refresh fetches a new token (and shares
    it) instead of re-reading the stored one; after a revoke the dropped token is not taken back."""
    from proxy.app import Proxy
    from tests.tokens_oauth_server import ResourceServer

    oauth.db.clients["app"] = Client("app", secret="cs-CANARY-cluster-admin")
    api = await ResourceServer(oauth.db).start()
    bao.policy("credproxy", POLICY)
    bao.put("credproxy/shared/app", {"client_secret": "cs-CANARY-cluster-admin"})
    token_file = tmp_path / "vault-token"
    token_file.write_text(bao.token(["credproxy"]))
    proxies, bases = [], []
    try:
        for i in range(2):
            port = free_port()
            doc = {"server": {"listen": f"127.0.0.1:{port}"}, "admin": {"listen": f"127.0.0.1:{free_port()}"},
                   "secrets": {"backend": "vault", "vault": {"address": bao.address, "auth": {
                       "method": "token", "token_file": str(token_file)}}},
                   "cluster": {"backend": "vault"}, "audit": {"path": str(tmp_path / f"audit-{i}.log")},
                   "credentials": {"admintest": {
                       "upstream": api.url, "allow_insecure_upstream": True, "upstream_tls": {"ca_file": ca_file},
                       "auth": {"type": "oauth2_client_credentials", "token_url": oauth.token_url,
                                "client_id": "app", "client_secret": "credproxy/shared/app#client_secret"},
                       "allow": [{"paths": ["/**"]}]}}}
            proxy = Proxy(config.parse(json.dumps(doc)))
            await proxy.start()
            proxies.append(proxy)
            bases.append(f"http://127.0.0.1:{port}/admintest/v1/x")
        async with aiohttp.ClientSession() as http:
            async def used(i: int) -> str:
                async with http.get(bases[i]) as r:
                    assert r.status == 200
                return api.seen[-1].token

            assert await used(0) == await used(1) == oauth.db.issued[0]
            sources = [p.holder.current.credentials["admintest"].source for p in proxies]
            await sources[0].refresh()  # the admin "refresh": a new token, shared
            assert len(oauth.db.issued) == 2 and await used(0) == oauth.db.issued[1]
            await sources[1].revoke()  # drops its old token; the stored one is newer and is taken
            assert await used(1) == oauth.db.issued[1] and len(oauth.db.issued) == 2
            await sources[0].revoke()  # drops the stored one: the next request fetches anew
            assert await used(0) == oauth.db.issued[2] and len(oauth.db.issued) == 3
    finally:
        for proxy in proxies:
            await proxy.stop()
        await api.stop()
    assert_nowhere(oauth.db.issued + ["cs-CANARY-cluster-admin"], raw_log.text,
                   *(p.read_text() for p in tmp_path.glob("audit-*.log")))


async def test_a_shared_token_naming_a_server_this_credential_would_refuse_is_not_used(bao, replicas, tmp_path):
    """A record read from Vault names the server (instance_url) as another replica saw it: it is checked as
    this replica checks its own token answers, so a tampered record cannot steer requests to http:// or
    to a URL with userinfo."""
    from yarl import URL

    from proxy.auth_types import build_source
    from proxy.errors import CredentialUnavailable
    from proxy.store.cache import SecretCache

    (node,) = await replicas(1)
    expires = repr(time.time() + 3600)
    records = {"plainhttp": "http://attacker.test", "userinfo": "https://user:pw@eu1.api.test",
               "good": "https://eu1.api.test"}
    for name, server in records.items():
        bao.put(f"credproxy/cluster/{name}", {"access_token": f"at-CANARY-shared-{name}-0123456789",
                                              "expires_at": expires, "lifetime": "3600", "upstream": server})
    auth = {"type": "oauth2_jwt_bearer", "token_url": "https://login.api.test/token", "client_id": "app",
            "subject": "svc@example.com", "audience": "https://login.api.test", "private_key": "jwt/app#key",
            "use_instance_url": True}
    doc = {"secrets": {"backend": "vault", "vault": {"address": bao.address,
                                                     "auth": {"method": "token", "token_file": str(tmp_path / "t")}}},
           "cluster": {"backend": "vault"}, "audit": {"path": str(tmp_path / "audit.log")},
           "credentials": {name: {"upstream": "https://api.test/base", "auth": auth, "allow": [{"paths": ["/**"]}]}
                           for name in records}}
    cfg = config.parse(json.dumps(doc))
    cache = SecretCache(node.store, refresh_interval=0)
    for name in ("plainhttp", "userinfo"):
        source = build_source(cfg.credentials[name], cache, name=name, cluster=node)
        try:
            with pytest.raises(CredentialUnavailable):
                await source.grant("")
        finally:
            await source.close()
    source = build_source(cfg.credentials["good"], cache, name="good", cluster=node)
    try:
        assert (await source.grant("")).upstream == URL("https://eu1.api.test/base")
    finally:
        await source.close()
