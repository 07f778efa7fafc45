"""The forward proxy against hostile callers, on raw sockets: who may CONNECT where, what a tunnel may
carry, and that neither the credential's secret nor the CA key shows up anywhere a caller or an
operator can read."""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import ssl

import pytest
from aiohttp import web

from proxy.store.file import FileStore, load_key
from proxy.config import models as config_mod
from tests.server.forward.support import HOST, SECRET, SHARED_HOST, start, tls_upstream
from tests.helpers import CALLER_TOKENS, Recorder, assert_no_canary


def basic(caller: str = "billing", token: str | None = None) -> str:
    token = CALLER_TOKENS[caller] if token is None else token
    return "Basic " + base64.b64encode(f"{caller}:{token}".encode()).decode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


async def connect(running, target: str, auth: str | None = None, extra: str = ""):
    host, port = running.proxy.bound["forward"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    writer.write((head + extra + "\r\n").encode())
    status, headers, body = await read_head(reader)
    return status, headers, body, reader, writer


async def tunnel(running, tmp, target: str = f"{HOST}:443", auth: str | None = None):
    status, _, _, reader, writer = await connect(running, target, auth or basic())
    assert status == 200
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    await writer.start_tls(ctx, server_hostname=target.rpartition(":")[0])
    return reader, writer


async def inner(reader, writer, request: str, body: bytes = b""):
    writer.write(request.encode() + body)
    return await read_head(reader)


@pytest.fixture
async def upstream(tmp_path):
    up = await tls_upstream(tmp_path)
    yield up
    await up.close()


@pytest.fixture
async def proxy(tmp_path, upstream):
    running = await start(tmp_path, upstream)
    yield running
    await running.proxy.stop()


async def test_connect_without_or_with_wrong_credentials_is_407_with_a_challenge(proxy):
    for auth in (None, basic(token="wrong-token"), basic("reports"), "Bearer wrong-token",
                 "Basic " + base64.b64encode(f"reports:{CALLER_TOKENS['billing']}".encode()).decode(),
                 "Basic !!notbase64"):
        status, headers, body, _, writer = await connect(proxy, f"{HOST}:443", auth)
        writer.close()
        if auth == basic("reports"):
            assert status == 200  # a valid caller: reports' own name and token
            continue
        assert status == 407, auth
        assert headers["proxy-authenticate"] == 'Basic realm="credproxy"'
        assert json.loads(body)["error"] == "unauthenticated"
    status, *_ = await connect(proxy, f"{HOST}:443", f"Bearer {CALLER_TOKENS['billing']}")
    assert status == 200


async def test_unlisted_hosts_ip_literals_and_other_ports_are_403(proxy, tmp_path):
    for target in ("evil.invalid:443", "127.0.0.1:443", "[::1]:443", f"{HOST}:8443", f"{HOST}:80", HOST,
                   f"{HOST.upper()}.:444", "10.0.0.1:443", "user@api.pay.invalid:443"):
        status, _, body, _, writer = await connect(proxy, target, basic())
        writer.close()
        assert status in (400, 403), target
    lines = proxy.audit_lines(tmp_path)
    refused = [line for line in lines if line["method"] == "CONNECT" and line["status"] == 403]
    assert refused and all(line["listener"] == "forward" and line["outcome"] == "denied" for line in refused)
    assert {"evil.invalid:443", f"{HOST}:8443"} <= {line["connect_host"] for line in refused}
    assert len(proxy.proxy.holder.current.credentials) == 1
    # nothing was minted for a refused CONNECT
    metrics = proxy.proxy.holder.current.metrics.render().decode()
    assert "credproxy_forward_leaf_certificates 0.0" in metrics
    assert 'credproxy_forward_connects_total{outcome="refused"}' in metrics


async def test_allow_ips_lock_applies_to_the_connect(tmp_path, upstream):
    from tests.server.forward.support import forward_config
    from tests.helpers import sha, start_proxy

    cfg = forward_config(tmp_path, upstream)
    cfg["callers"]["billing"] = {"token_sha256": sha(CALLER_TOKENS["billing"]), "allow_ips": ["10.9.0.0/16"]}
    running = await start_proxy(cfg)
    try:
        status, _, body, _, writer = await connect(running, f"{HOST}:443", basic())
        writer.close()
        assert status == 403 and json.loads(body)["error"] == "forbidden"
        line = running.audit_lines(tmp_path)[-1]
        assert line["caller"] == "billing" and line["reason"] == "source_ip"
    finally:
        await running.proxy.stop()


async def test_inside_the_tunnel_the_secret_is_injected_and_the_callers_copy_replaced(proxy, upstream, tmp_path):
    reader, writer = await tunnel(proxy, tmp_path)
    status, headers, body = await inner(reader, writer, f"GET /v1/ping HTTP/1.1\r\nHost: {HOST}\r\n"
                                        "Authorization: Bearer sk-placeholder\r\nX-Api-Key: mine\r\n\r\n")
    assert status == 200
    seen = upstream.recorder.seen[-1]
    assert seen.headers.getall("Authorization") == [f"Bearer {SECRET}"]
    assert "sk-placeholder" not in json.dumps(seen.header_items)
    # keep-alive: a second request on the same tunnel
    status, _, _ = await inner(reader, writer, f"GET /v1/again HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n")
    assert status == 200 and upstream.recorder.seen[-1].path_qs == "/v1/again"
    writer.close()
    line = [entry for entry in proxy.audit_lines(tmp_path) if entry["path"] == "/v1/again"][-1]
    assert (line["listener"], line["connect_host"], line["credential"], line["caller"]) == \
        ("forward", f"{HOST}:443", "pay", "billing")


async def test_a_request_inside_the_tunnel_for_another_host_is_refused(proxy, upstream, tmp_path):
    for host_header in ("other.invalid", f"{HOST}:8443", "localhost", ""):
        reader, writer = await tunnel(proxy, tmp_path)
        extra = f"Host: {host_header}\r\n" if host_header else ""
        status, _, body = await inner(reader, writer, f"GET /v1/ping HTTP/1.1\r\n{extra}\r\n")
        writer.close()
        assert status in (400, 403), host_header
    reader, writer = await tunnel(proxy, tmp_path)
    status, _, _ = await inner(reader, writer, f"GET /v1/ping HTTP/1.1\r\nHost: {HOST}\r\nHost: evil.invalid\r\n\r\n")
    assert status in (400, 403)
    reader, writer = await tunnel(proxy, tmp_path)  # absolute-form inside a tunnel: not origin-form
    status, _, _ = await inner(reader, writer, f"GET https://evil.invalid/v1/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status in (400, 403)
    assert not upstream.recorder.seen
    assert any(line.get("reason") == "host_mismatch" for line in proxy.audit_lines(tmp_path))


async def test_smuggling_inside_the_tunnel_is_refused(proxy, upstream, tmp_path):
    attempts = [
        f"POST /v1/a HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
        f"POST /v1/a HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        f"POST /v1/a HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        f"GET /v1/a HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ]
    for raw in attempts:
        reader, writer = await tunnel(proxy, tmp_path)
        writer.write(raw.encode())
        data = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data else 0
        assert status in (0, 400), raw
    assert all(s.path_qs != "/v1/smuggled" for s in upstream.recorder.seen)


async def test_an_echoed_secret_inside_the_tunnel_is_redacted(tmp_path):
    recorder = Recorder()

    async def echo(request, body):
        return web.json_response({"auth": request.headers.get("Authorization")},
                                 headers={"X-Echo": request.headers.get("Authorization", "")})

    recorder.routes["/v1/echo"] = echo
    up = await tls_upstream(tmp_path, recorder)
    running = await start(tmp_path, up)
    try:
        reader, writer = await tunnel(running, tmp_path)
        status, headers, body = await inner(reader, writer, f"GET /v1/echo HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        writer.close()
        assert status == 200 and "[REDACTED]" in body.decode()
        assert_no_canary(body, SECRET, "body")
        assert_no_canary(json.dumps(headers), SECRET, "headers")
    finally:
        await running.proxy.stop()
        await up.close()


async def test_several_credentials_on_one_host_need_a_pick(tmp_path, upstream):
    extra = {
        name: {"upstream": upstream.url, "hosts": [SHARED_HOST], "upstream_tls": {"ca_file": str(upstream.ca_file)},
               "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}", "secret": ref},
               "allow": [{"callers": ["billing"], "paths": ["/v1/**"]}]}
        for name, ref in (("shared-a", "apis/pay#token"), ("shared-b", "apis/other#token"))}
    running = await start(tmp_path, upstream, extra_credentials=extra)
    try:
        target = f"{SHARED_HOST}:443"
        reader, writer = await tunnel(running, tmp_path, target)
        status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {SHARED_HOST}\r\n"
                                   "Authorization: Bearer sk-anything\r\n\r\n")
        assert status == 403
        writer.close()
        reader, writer = await tunnel(running, tmp_path, target)
        status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {SHARED_HOST}\r\n"
                                   "Authorization: Bearer credproxy:shared-b\r\n\r\n")
        assert status == 200
        assert upstream.recorder.seen[-1].headers["Authorization"] == "Bearer sk_other_canary_77aa31"
        status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {SHARED_HOST}\r\n"
                                   "Authorization: credproxy:shared-a\r\n\r\n")
        assert status == 200 and upstream.recorder.seen[-1].headers["Authorization"] == f"Bearer {SECRET}"
        writer.close()
        line = running.audit_lines(tmp_path)[-1]
        assert line["credential"] == "shared-a"
        assert any(entry.get("reason") == "no_credential_pick" for entry in running.audit_lines(tmp_path))
    finally:
        await running.proxy.stop()


async def test_opaque_tunnel_relays_bytes_and_audits_their_counts(tmp_path, upstream):
    async def echo_server(reader, writer):
        data = await reader.read()  # until the caller's half-close comes through the tunnel
        writer.write(b"pong:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    running = await start(tmp_path, upstream, tunnel_hosts=[f"localhost:{port}"])
    try:
        status, _, _, reader, writer = await connect(running, f"localhost:{port}", basic())
        assert status == 200
        writer.write(b"ping")
        writer.write_eof()  # half-close: the answer still comes back
        assert await asyncio.wait_for(reader.read(), 5) == b"pong:ping"
        writer.close()
        for _ in range(50):
            lines = [entry for entry in running.audit_lines(tmp_path) if entry.get("reason") == "tunnel"]
            if lines:
                break
            await asyncio.sleep(0.05)
        assert lines[-1]["bytes_up"] == 4 and lines[-1]["bytes_down"] == 9
        assert lines[-1]["connect_host"] == f"localhost:{port}" and lines[-1]["credential"] is None
        # unauthenticated tunnels are refused too
        status, *_ = await connect(running, f"localhost:{port}")
        assert status == 407
    finally:
        await running.proxy.stop()
        server.close()


async def test_an_idle_opaque_tunnel_is_closed_and_audited_while_a_busy_one_stays_open(tmp_path, upstream):
    """Bytes either way keep a tunnel open; one silent both ways for ``tunnel_idle_timeout`` is closed (both
    sides) and gets its audit line. (The timeout is shortened here; the margins are wide: what is asserted is
    that activity keeps it and silence ends it, not how fast.)"""
    async def echo_server(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    running = await start(tmp_path, upstream, tunnel_hosts=[f"localhost:{port}"])
    running.proxy.forward_context.tunnel_idle_timeout = 1.0
    try:
        status, _, _, reader, writer = await connect(running, f"localhost:{port}", basic())
        assert status == 200
        for _ in range(12):  # 2.4 s of traffic, each gap a fifth of the idle timeout
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
            await asyncio.sleep(0.2)
        assert not reader.at_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # silent now: the proxy closes the tunnel
        lines = [entry for entry in running.audit_lines(tmp_path) if entry.get("reason") == "tunnel"]
        assert len(lines) == 1 and lines[0]["bytes_up"] == 12 and lines[0]["bytes_down"] == 12
        writer.close()
    finally:
        await running.proxy.stop()
        server.close()


async def test_absolute_form_http_only_for_insecure_credentials_that_name_the_port(tmp_path, upstream):
    recorder = Recorder()
    runner = web.AppRunner(recorder.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    extra = {"plain": {"upstream": f"http://127.0.0.1:{port}", "allow_insecure_upstream": True,
                       "hosts": ["plain.invalid:80"],
                       "auth": {"type": "header", "header": "X-Key", "value": "{secret}", "secret": "apis/pay#token"},
                       "allow": [{"callers": ["billing"], "paths": ["/v1/**"]}]}}
    cfg_running = await start(tmp_path, upstream, extra_credentials=extra)
    try:
        host, fport = cfg_running.proxy.bound["forward"].split(":")
        reader, writer = await asyncio.open_connection(host, int(fport))
        writer.write(f"GET http://plain.invalid/v1/hi?x=1 HTTP/1.1\r\nHost: plain.invalid\r\n"
                     f"Proxy-Authorization: {basic()}\r\nX-Key: caller-copy\r\n\r\n".encode())
        status, _, _ = await read_head(reader)
        assert status == 200 and recorder.seen[-1].path_qs == "/v1/hi?x=1"
        assert recorder.seen[-1].headers.getall("X-Key") == [SECRET]
        assert "Proxy-Authorization" not in recorder.seen[-1].headers
        writer.write(b"GET http://plain.invalid/v1/hi HTTP/1.1\r\nHost: plain.invalid\r\n\r\n")
        status, headers, _ = await read_head(reader)
        assert status == 407 and headers["proxy-authenticate"].startswith("Basic")
        writer.close()
        reader, writer = await asyncio.open_connection(host, int(fport))
        writer.write(f"GET http://{HOST}/v1/hi HTTP/1.1\r\nHost: {HOST}\r\nProxy-Authorization: {basic()}\r\n\r\n"
                     .encode())
        status, _, _ = await read_head(reader)  # port 80 is not what pay's hosts entry names
        assert status == 403
        writer.close()
    finally:
        await cfg_running.proxy.stop()
        await runner.cleanup()


async def test_the_ca_key_and_the_secret_are_in_no_output(proxy, upstream, tmp_path, capfd, caplog):
    caplog.set_level("DEBUG")
    store = FileStore(tmp_path / "secrets.enc", load_key(config_mod.FileStoreConfig(
        path=str(tmp_path / "secrets.enc"), key_file=str(tmp_path / "master.key"))))
    ca_key = store.get_sync("credproxy/ca").fields["key"].reveal()
    key_body = "".join(ca_key.splitlines()[1:-1])
    outputs = []
    for target, auth in ((f"{HOST}:443", None), ("evil.invalid:443", basic()), (f"{HOST}:443", basic())):
        status, headers, body, reader, writer = await connect(proxy, target, auth)
        outputs.append(json.dumps(headers) + body.decode())
        if status == 200:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            await writer.start_tls(ctx, server_hostname=HOST)
            status, headers, body = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
            outputs.append(json.dumps(headers) + body.decode())
        writer.close()
    proxy.proxy.holder.current.audit.flush()
    outputs += [(tmp_path / "audit.log").read_text(), proxy.proxy.holder.current.metrics.render().decode(),
                caplog.text, "".join(capfd.readouterr()), repr(proxy.proxy.holder.current.config)]
    for text in outputs:
        assert key_body[20:60] not in text and "PRIVATE KEY" not in text
        assert_no_canary(text, SECRET, "output")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_ten_thousand_distinct_hosts_leave_the_cache_bounded_and_memory_flat(proxy):
    leaves = proxy.proxy.forward_leaves
    host, port = proxy.proxy.bound["forward"].split(":")
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> int:
        async with sem:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"CONNECT h{i}.random{i % 97}.invalid:443 HTTP/1.1\r\nProxy-Authorization: {basic()}\r\n\r\n"
                         .encode())
            data = await reader.read(4096)
            writer.close()
            return int(data.split(b" ", 2)[1])

    await asyncio.gather(*(one(i) for i in range(500)))  # warm up allocator and caches
    before = _rss_kib()
    statuses = await asyncio.gather(*(one(i) for i in range(500, 10_500)))
    after = _rss_kib()
    assert set(statuses) == {403}
    assert after - before < 20 * 1024, (before, after)
    metrics = proxy.proxy.holder.current.metrics.render().decode()
    assert "credproxy_forward_leaf_certificates 0.0" in metrics
    assert len(leaves) == 0 and leaves.minted == 0


async def test_refused_connects_raise_the_denied_attempts_alert(tmp_path, upstream):
    from tests.server.forward.support import forward_config
    from tests.helpers import start_proxy

    cfg = forward_config(tmp_path, upstream)
    cfg["alerts"] = {"denied_threshold": 3, "denied_window": "60s"}
    running = await start_proxy(cfg)
    try:
        for i in range(4):
            status, *_, writer = await connect(running, f"probe{i}.invalid:443", basic())
            writer.close()
            assert status == 403
        alerts = [line for line in running.audit_lines(tmp_path) if line["outcome"] == "alert"]
        assert alerts, "no alert after repeated refused CONNECTs"
        metrics = running.proxy.holder.current.metrics.render().decode()
        assert "credproxy_alerts_total{" in metrics
    finally:
        await running.proxy.stop()


async def test_a_reload_changes_which_hosts_are_intercepted_without_a_restart(tmp_path, upstream):
    import yaml

    from proxy.app import Proxy
    from proxy.config import models as config_mod
    from tests.server.forward.support import forward_config
    from tests.helpers import RunningProxy

    cfg = forward_config(tmp_path, upstream)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(config_mod.load(path), str(path), watch_interval=None)
    await proxy.start()
    running = RunningProxy(proxy)
    try:
        cfg["credentials"]["pay"]["hosts"] = ["api.moved.invalid"]
        path.write_text(yaml.safe_dump(cfg))
        result = await proxy.reload()
        assert result.result == "ok" and "forward_proxy.listen" not in result.restart_required
        status, *_, writer = await connect(running, f"{HOST}:443", basic())
        writer.close()
        assert status == 403
        reader, writer = await tunnel(running, tmp_path, "api.moved.invalid:443")
        status, _, _ = await inner(reader, writer, "GET /v1/moved HTTP/1.1\r\nHost: api.moved.invalid\r\n\r\n")
        writer.close()
        assert status == 200 and upstream.recorder.seen[-1].path_qs == "/v1/moved"
    finally:
        await proxy.stop()


async def test_a_pick_of_a_credential_the_host_does_not_have_is_refused(proxy, upstream, tmp_path):
    reader, writer = await tunnel(proxy, tmp_path)
    status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {HOST}\r\n"
                               "Authorization: Bearer credproxy:pay-test\r\n\r\n")
    assert status == 403 and not upstream.recorder.seen
    status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {HOST}\r\n"
                               "Authorization: Bearer credproxy:pay\r\n\r\n")
    writer.close()
    assert status == 200 and upstream.recorder.seen[-1].headers["Authorization"] == f"Bearer {SECRET}"


async def test_http2_is_not_offered_inside_the_tunnel(proxy, tmp_path):
    status, _, _, reader, writer = await connect(proxy, f"{HOST}:443", basic())
    assert status == 200
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    await writer.start_tls(ctx, server_hostname=HOST)
    tls = writer.get_extra_info("ssl_object")
    assert tls.selected_alpn_protocol() == "http/1.1"
    leaf = tls.getpeercert()
    assert leaf["subjectAltName"] == (("DNS", HOST),)
    writer.close()


async def test_forward_connections_count_under_max_connections(tmp_path, upstream):
    from tests.server.forward.support import forward_config
    from tests.helpers import start_proxy

    cfg = forward_config(tmp_path, upstream)
    cfg["server"]["limits"] = {"max_connections": 2}
    running = await start_proxy(cfg)
    try:
        held = [await tunnel(running, tmp_path), await tunnel(running, tmp_path)]  # two intercepted tunnels
        host, port = running.proxy.bound["forward"].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        status, _, body = await read_head(reader)
        assert status == 503 and json.loads(body)["error"] == "overloaded"
        writer.close()
        held[0][1].close()
        await held[0][1].wait_closed()
        for _ in range(100):  # the slot comes back when the tunnel closes
            if "credproxy_caller_connections 1.0" in running.proxy.holder.current.metrics.render().decode():
                break
            await asyncio.sleep(0.02)
        reader, writer = await tunnel(running, tmp_path)
        status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        assert status == 200
        writer.close()
        held[1][1].close()
    finally:
        await running.proxy.stop()


async def test_absolute_form_https_or_with_userinfo_is_refused(proxy):
    host, port = proxy.proxy.bound["forward"].split(":")
    for target in (f"https://{HOST}/v1/x", f"http://user@{HOST}/v1/x", "/v1/x"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nProxy-Authorization: {basic()}\r\n\r\n".encode())
        status, _, _ = await read_head(reader)
        writer.close()
        assert status in (400, 403), target


async def test_the_connect_caller_holds_for_the_whole_tunnel(proxy, upstream, tmp_path):
    """Credentials sent inside the tunnel neither switch the caller nor reach the upstream."""
    reader, writer = await tunnel(proxy, tmp_path, auth=basic("reports"))
    status, _, _ = await inner(reader, writer, f"GET /v1/x HTTP/1.1\r\nHost: {HOST}\r\n"
                               f"Proxy-Authorization: {basic('billing')}\r\n"
                               f"Authorization: Bearer {CALLER_TOKENS['billing']}\r\n\r\n")
    writer.close()
    assert status == 403  # reports has no allow rule on pay; billing's token inside changes nothing
    line = proxy.audit_lines(tmp_path)[-1]
    assert line["caller"] == "reports" and line["reason"] == "policy"
    assert not upstream.recorder.seen


async def test_the_ca_and_leaf_keys_in_a_log_record_or_exception_never_reach_the_log(proxy, tmp_path):
    import io
    import logging

    from proxy.observe.log_setup import JsonFormatter

    store = FileStore(tmp_path / "secrets.enc", load_key(config_mod.FileStoreConfig(
        path=str(tmp_path / "secrets.enc"), key_file=str(tmp_path / "master.key"))))
    ca_lines = store.get_sync("credproxy/ca").fields["key"].reveal().splitlines()[1:-1]
    leaf_lines = proxy.proxy.forward_leaves._key_pem.decode().splitlines()[1:-1]
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("credproxy.test.forward")
    log.addHandler(handler)
    try:
        for line in ca_lines + leaf_lines:  # one line of a key: only its registration with the scrubber hides it
            try:
                raise ValueError(line)
            except ValueError:
                log.error("near %s", line, exc_info=True)
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    assert out.count("near ") == len(ca_lines + leaf_lines)
    for line in ca_lines + leaf_lines:
        assert line not in out


async def test_a_tunnel_host_with_one_refused_address_is_refused_whole(tmp_path, upstream):
    """Same rule as upstream connections: a name resolving to a loopback echo server and to the metadata
    address is not trusted with either. The resolver is a fault-injecting fake (no DNS answers this on demand)."""
    import socket

    accepted = []

    async def echo_server(reader, writer):
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(echo_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def mixed(host, port_):
        return [(socket.AF_INET, ("127.0.0.1", port_)), (socket.AF_INET, ("169.254.169.254", port_))]

    running = await start(tmp_path, upstream, tunnel_hosts=[f"mixed.invalid:{port}"])
    running.proxy.forward_context.resolver = mixed
    try:
        status, _, body, _reader, writer = await connect(running, f"mixed.invalid:{port}", basic())
        writer.close()
        assert status == 502 and b"upstream" in body
        assert accepted == []
        running.proxy.holder.current.audit.flush()
        assert any(entry.get("reason") == "address_refused" for entry in running.audit_lines(tmp_path))
    finally:
        await running.proxy.stop()
        server.close()
