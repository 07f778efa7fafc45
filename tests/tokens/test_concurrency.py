"""Many requests, one token request: cold start, expiry, and an upstream that revokes the
token mid-run — through a real proxy, against the authlib authorization server and a
resource server that accepts only tokens it issued and has not revoked."""

import asyncio
import time

import aiohttp

from tests.tokens_fixtures import (  # noqa: F401 - fixtures
    Client,
    api,
    ca_file,
    call,
    oauth,
    run_proxy,
    tls_ca,
    token_cred,
)

CLIENT_SECRET = "cs-CANARY-9d3e71"
N = 1000


def cc_auth(oauth):
    return {"type": "oauth2_client_credentials", "token_url": oauth.token_url, "client_id": "svc",
            "client_secret": "oauth/svc#client_secret"}


async def start(oauth, api, run_proxy, ca_file, **session):
    oauth.db.clients["svc"] = Client("svc", secret=CLIENT_SECRET)
    return await run_proxy({"api": token_cred(api.url, cc_auth(oauth), ca_file, **session)},
                           {"oauth/svc#client_secret": CLIENT_SECRET})


def inflight(p) -> float:
    return p.proxy.holder.current.metrics.registry.get_sample_value("credproxy_requests_in_flight")


async def burst(p, oauth, n: int) -> list[int]:
    """``n`` requests at once; the token endpoint holds its answer until all ``n`` are inside
    the proxy, so every one of them is waiting for the same token."""
    oauth.db.hold = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.ensure_future(call(p, f"/api/v1/item/{i}", session=s)) for i in range(n)]
        deadline = time.monotonic() + 60
        while inflight(p) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert inflight(p) == n, "not all requests reached the proxy"
        oauth.db.hold.set()
        results = await asyncio.gather(*tasks)
    oauth.db.hold = None
    return [r[0] for r in results]


async def test_a_thousand_requests_cold_and_at_expiry_cause_one_token_request_each(oauth, api, run_proxy, ca_file):
    p = await start(oauth, api, run_proxy, ca_file)
    source = p.proxy.holder.current.credentials["api"].source
    offset = [0.0]
    source.settings.clock = lambda: time.monotonic() + offset[0]

    statuses = await burst(p, oauth, N)
    assert statuses == [200] * N
    assert oauth.db.requests == 1 and oauth.db.arrived == 1
    first = oauth.db.issued[0]
    assert {s.token for s in api.seen} == {first} and len(api.seen) == N

    offset[0] = 3600.0  # the token has expired
    statuses = await burst(p, oauth, N)
    assert statuses == [200] * N
    assert oauth.db.requests == 2 and oauth.db.arrived == 2
    second = oauth.db.issued[1]
    assert {s.token for s in api.seen[N:]} == {second}


async def test_upstream_revokes_the_token_mid_run_callers_still_get_200(oauth, api, run_proxy, ca_file, tmp_path):
    p = await start(oauth, api, run_proxy, ca_file)
    assert (await call(p, "/api/v1/warm"))[0] == 200
    old = oauth.db.issued[0]
    done = 0
    sem = asyncio.Semaphore(50)

    async def one(i: int, s):
        nonlocal done
        async with sem:
            status, headers, _ = await call(p, f"/api/v1/run/{i}", session=s, method="POST", data=b"x" * 512)
        done += 1
        if done == 100:
            oauth.db.revoke_access(old)  # the upstream stops accepting it, mid-run
        return status, headers["X-Request-Id"]

    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(one(i, s) for i in range(400)))
    assert [status for status, _ in results] == [200] * 400
    assert oauth.db.requests == 2  # one refresh
    new = oauth.db.issued[1]
    by_id: dict[str, list] = {}
    for seen in api.seen[1:]:
        by_id.setdefault(seen.request_id, []).append(seen)
    assert set(by_id) == {rid for _, rid in results}
    replayed = [v for v in by_id.values() if len(v) > 1]
    assert replayed, "some requests were in flight with the revoked token"
    for attempts in by_id.values():
        assert len(attempts) <= 2  # one replay at most
        if len(attempts) == 2:
            assert (attempts[0].token, attempts[0].status) == (old, 401)
            assert (attempts[1].token, attempts[1].status, attempts[1].body_len) == (new, 200, 512)
        else:
            assert attempts[0].status == 200
    audit = [a for a in p.audit_lines(tmp_path) if a["path"].startswith("/v1/run/")]
    assert sum(a["token_refreshed"] for a in audit) == len(replayed)


async def test_a_large_streamed_upload_is_not_replayed(oauth, api, run_proxy, ca_file):
    p = await start(oauth, api, run_proxy, ca_file, replay_max_body="64KiB")
    offset = [0.0]
    p.proxy.holder.current.credentials["api"].source.settings.clock = lambda: time.monotonic() + offset[0]
    assert (await call(p, "/api/v1/warm"))[0] == 200
    oauth.db.revoke_access(oauth.db.issued[0])

    async def chunks():
        for _ in range(16):
            yield b"u" * 65536

    status, headers, body = await call(p, "/api/v1/upload", method="POST", data=chunks())
    assert status == 401 and body == api.reject_body  # the upstream's own answer, relayed
    attempts = [s for s in api.seen if s.request_id == headers["X-Request-Id"]]
    assert [(a.status, a.body_len) for a in attempts] == [(401, 16 * 65536)]
    assert oauth.db.requests == 2  # the token was still replaced for the requests after it

    status, headers, _ = await call(p, "/api/v1/upload", method="POST", data=chunks())
    assert status == 200 and oauth.db.requests == 2

    # A body under replay_max_body is buffered, so it is replayed with the new token. (A minute
    # later: a token refused within seconds of the previous refusal would back off instead.)
    offset[0] = 60.0
    oauth.db.revoke_access(oauth.db.issued[1])
    status, headers, _ = await call(p, "/api/v1/small", method="POST", data=b"s" * 4096)
    assert status == 200
    attempts = [s for s in api.seen if s.request_id == headers["X-Request-Id"]]
    assert [(a.status, a.body_len) for a in attempts] == [(401, 4096), (200, 4096)]
    assert oauth.db.requests == 3


async def test_an_admin_refresh_whose_token_request_is_cancelled_says_not_refreshed(oauth, api, run_proxy, ca_file):
    p = await start(oauth, api, run_proxy, ca_file)
    assert (await call(p, "/api/v1/warm"))[0] == 200
    source = p.proxy.holder.current.credentials["api"].source
    oauth.db.hold = asyncio.Event()  # the token endpoint keeps the refresh waiting
    async with aiohttp.ClientSession() as s:
        answer = asyncio.ensure_future(s.post(p.admin_url + "/v1/credentials/api/refresh"))
        deadline = time.monotonic() + 10
        while oauth.db.arrived < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert oauth.db.arrived == 2
        await source.slot("").close()  # the refresh is cancelled (what closing the credential on a reload does)
        r = await answer
        body = await r.json()
        r.release()
    oauth.db.hold.set()
    assert r.status == 503 and body.get("result") != "ok", body
    assert oauth.db.issued.__len__() == 1  # nothing new was issued
