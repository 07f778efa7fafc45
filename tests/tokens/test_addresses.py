"""Token, login and revocation calls are checked by the same address policy as upstreams: the
committed config's (``server.deny_private_upstreams``, ``deny_upstream_networks``, credproxy's own
listeners), also after a reload changes the rules, and not after a rejected reload.

Real servers on loopback: the token endpoint listens on 127.0.0.2 (loopback too), so a config can
deny it with ``deny_upstream_networks: [127.0.0.2/32]`` while the upstream on 127.0.0.1 stays
reachable.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiohttp import web

from tests.helpers import free_port
from tests.ops_support import (Admin, CANARY, audit_lines, base_config, call, credential, make_store, running,
                               upstream, write_config)

__all__ = ["upstream"]  # the ops upstream fixture

TOKEN_HOST = "127.0.0.2"


class TokenEndpoint:
    """An OAuth2 token endpoint (plain HTTP, keep-alive) on 127.0.0.2 that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.app = web.Application()
        self.app.router.add_post("/token", self.token)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        return web.json_response({"access_token": f"tok-{self.calls}-0123456789abcdef", "token_type": "Bearer",
                                  "expires_in": 3600})

    async def __aenter__(self) -> "TokenEndpoint":
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, TOKEN_HOST, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{TOKEN_HOST}:{port}/token"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def token_endpoint():
    async with TokenEndpoint() as endpoint:
        yield endpoint


def oauth_config(tmp_path: Path, upstream_url: str, token_url: str, *, deny: list[str] | None = None,
                 **extra) -> dict:
    secrets = make_store(tmp_path, {"oauth/app": {"client_secret": CANARY}})
    cred = credential(upstream_url, auth={"type": "oauth2_client_credentials", "token_url": token_url,
                                          "client_id": "app", "client_secret": "oauth/app#client_secret"},
                      **extra)
    cfg = base_config(tmp_path, secrets, {"api": cred})
    if deny is not None:
        cfg["server"]["deny_upstream_networks"] = deny
    return cfg


async def test_denied_networks_cover_the_token_endpoint(tmp_path, upstream, token_endpoint):
    path = write_config(tmp_path / "config.yaml",
                        oauth_config(tmp_path, upstream.url, token_endpoint.url, deny=[f"{TOKEN_HOST}/32"]))
    async with running(path) as proxy:
        status, body = await call(proxy, "/api/v1/things")
    assert status == 503, body
    assert token_endpoint.calls == 0  # the client secret never left for a denied address
    assert upstream.seen == []


async def test_a_token_url_at_credproxy_itself_is_refused(tmp_path, upstream):
    cfg = oauth_config(tmp_path, upstream.url, "")
    main = cfg["server"]["listen"]
    cfg["credentials"]["api"]["auth"]["token_url"] = f"http://{main}/token"
    path = write_config(tmp_path / "config.yaml", cfg)
    async with running(path) as proxy:
        status, _ = await call(proxy, "/api/v1/things")
    assert status == 503
    # One audit line: the caller's request. The token call never came back in as a request of its own.
    lines = audit_lines(tmp_path / "audit.log")
    assert [line["path"] for line in lines] == ["/v1/things"]


async def test_a_reload_that_denies_the_token_endpoint_applies_to_the_next_token_call(tmp_path, upstream,
                                                                                    token_endpoint):
    cfg = oauth_config(tmp_path, upstream.url, token_endpoint.url)
    path = write_config(tmp_path / "config.yaml", cfg)
    async with running(path) as proxy:
        admin = Admin(proxy.cfg.admin.listen)
        assert (await call(proxy, "/api/v1/things"))[0] == 200
        assert token_endpoint.calls == 1  # and its keep-alive connection is pooled

        cfg["server"]["deny_upstream_networks"] = [f"{TOKEN_HOST}/32"]
        write_config(path, cfg)
        status, result, _ = await admin.call("POST", "/v1/reload")
        assert status == 200, result
        # The token source was kept (its auth did not change), yet the new rules hold for its calls,
        # pooled connection included.
        status, answer, _ = await admin.call("POST", "/v1/credentials/api/refresh")
        assert status == 503, answer
        assert token_endpoint.calls == 1


async def test_a_rejected_reload_does_not_loosen_the_token_endpoint_rules(tmp_path, upstream, token_endpoint):
    cfg = oauth_config(tmp_path, upstream.url, token_endpoint.url, deny=[f"{TOKEN_HOST}/32"])
    path = write_config(tmp_path / "config.yaml", cfg)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with running(path) as proxy:
            admin = Admin(proxy.cfg.admin.listen)
            assert (await call(proxy, "/api/v1/things"))[0] == 503
            # Loosened, and a dedicated listener that cannot bind: rejected whole.
            cfg["server"]["deny_upstream_networks"] = []
            cfg["credentials"]["api"]["listen"] = "127.0.0.1:%d" % taken.getsockname()[1]
            write_config(path, cfg)
            status, result, _ = await admin.call("POST", "/v1/reload")
            assert status == 422, result
            assert (await call(proxy, "/api/v1/things"))[0] == 503
            status, answer, _ = await admin.call("POST", "/v1/credentials/api/refresh")
            assert status == 503, answer
    assert token_endpoint.calls == 0


async def test_a_reload_that_allows_the_token_endpoint_again_reaches_it(tmp_path, upstream, token_endpoint):
    cfg = oauth_config(tmp_path, upstream.url, token_endpoint.url, deny=[f"{TOKEN_HOST}/32"])
    path = write_config(tmp_path / "config.yaml", cfg)
    async with running(path) as proxy:
        admin = Admin(proxy.cfg.admin.listen)
        assert (await call(proxy, "/api/v1/things"))[0] == 503
        cfg["server"]["deny_upstream_networks"] = []
        write_config(path, cfg)
        assert (await admin.call("POST", "/v1/reload"))[0] == 200
        status, answer, _ = await admin.call("POST", "/v1/credentials/api/refresh")
        assert status == 200, answer
        assert (await call(proxy, "/api/v1/things"))[0] == 200
    assert token_endpoint.calls == 1


async def test_a_token_host_that_also_resolves_to_a_denied_address_is_refused(token_endpoint):
    """As for upstreams: one refused address refuses the name, though another one it names is allowed."""
    import ipaddress

    from proxy.errors import TokenFailure
    from proxy.tokens.http import TokenHttp
    from proxy.upstream.address_policy import AddressPolicy

    port = int(token_endpoint.url.rsplit(":", 1)[1].split("/", 1)[0])

    async def two_addresses(host, port_):  # a fake DNS answer (fault injection): the allowed address first
        return [(socket.AF_INET, ("127.0.0.2", port_)), (socket.AF_INET, ("127.0.0.3", port_))]

    rules = AddressPolicy(deny=[ipaddress.ip_network("127.0.0.3/32")])
    http = TokenHttp(address_policy=rules, resolver=two_addresses)
    try:
        with pytest.raises(TokenFailure):
            await http.send("POST", f"http://token.test:{port}/token", headers={}, body=b"grant_type=x")
        allowed = TokenHttp(address_policy=AddressPolicy(), resolver=two_addresses)
        try:  # the same name with nothing denied reaches the endpoint
            assert (await allowed.send("POST", f"http://token.test:{port}/token", headers={}, body=b"")).status == 200
        finally:
            await allowed.close()
    finally:
        await http.close()
    assert token_endpoint.calls == 1
