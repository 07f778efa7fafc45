"""``credproxy status|refresh|revoke|disable|enable|probe|reload`` against a real proxy, and ``credproxy schema``.

Most commands run in a worker thread (``cli.main``, the same code the console script runs) while the proxy
serves on this test's event loop; a few run as real ``python -m proxy`` processes.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import jsonschema
import pytest
import yaml

from proxy.cli.main import main
from tests.ops_support import (CANARY, PYTHON, ROOT, Upstream, upstream, assert_no_secret, base_config, call, credential,
                               free_port, make_store, running, subprocess_env, write_config)


@pytest.fixture
def setup(tmp_path, upstream):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}, "api/second": {"token": CANARY + "-2"}})
    creds = {"demo": credential(upstream.url, probe={"path": "/health"}),
             "flaky": credential(upstream.url, probe={"path": "/status/500"})}
    data = base_config(tmp_path, secrets, creds, admin_token=True)
    return data, write_config(tmp_path / "config.yaml", data)


class CLI:
    def __init__(self, capsys) -> None:
        self.capsys = capsys
        self.seen: list[str] = []

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(args))
        out, err = self.capsys.readouterr()
        self.seen += [out, err]
        return code, out, err


@pytest.fixture
def cli(capsys):
    runner = CLI(capsys)
    yield runner
    for text in runner.seen:
        assert_no_secret(text)


async def test_status_shows_readiness_and_a_table_or_json(setup, cli):
    data, path = setup
    async with running(path) as proxy:
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        code, out, err = await cli("status", "-c", str(path))
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert lines[0] == f"credproxy on {data['admin']['listen']}: ready"
        assert lines[1].split() == ["NAME", "STATE", "AUTH", "EXPIRES", "IN", "LAST", "REFRESH", "LAST", "USED",
                                    "REQUESTS", "LAST", "ERROR"]
        demo = lines[2].split()
        assert demo[:4] == ["demo", "static", "header", "-"] and demo[-2:] == ["1", "-"]
        code, out, _ = await cli("status", "-c", str(path), "--json")
        body = json.loads(out)
        assert code == 0 and body["ready"] is True and body["waiting"] == []
        assert [(c["name"], c["requests"]) for c in body["credentials"]] == [("demo", 1), ("flaky", 0)]


async def test_disable_enable_refresh_revoke(setup, cli):
    data, path = setup
    async with running(path) as proxy:
        code, out, _ = await cli("disable", "demo", "-c", str(path))
        assert (code, out) == (0, "demo: disabled; state now disabled\n")
        assert (await call(proxy, "/demo/v1/x"))[0] == 503
        code, out, _ = await cli("disable", "demo", "-c", str(path))
        assert (code, out) == (0, "demo: disabled (it already was); state now disabled\n")
        code, out, _ = await cli("enable", "demo", "-c", str(path), "--json")
        assert code == 0 and json.loads(out)["credential"]["state"] == "static"
        assert (await call(proxy, "/demo/v1/x"))[0] == 200
        code, out, _ = await cli("refresh", "demo", "-c", str(path))
        assert (code, out) == (0, "demo: refreshed; state now static\n")
        code, out, _ = await cli("revoke", "demo", "-c", str(path))
        assert (code, out) == (0, "demo: revoked; state now static\n")


async def test_a_failed_refresh_exits_1_with_the_reason(tmp_path, upstream, cli):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    data = base_config(tmp_path, secrets, {"gone": credential(upstream.url, secret="api/gone#token")}, admin_token=True)
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path):
        code, out, err = await cli("refresh", "gone", "-c", str(path))
        assert (code, out) == (1, "")
        assert err == "credproxy: refresh gone failed: credential unavailable (credential_unavailable)\n"
        code, out, _ = await cli("status", "-c", str(path))
        assert code == 1 and "NOT ready (waiting for: gone)" in out and "SecretNotFound" in out  # scripts see it


async def test_probe_reports_success_and_failure(setup, cli, upstream):
    data, path = setup
    async with running(path):
        code, out, _ = await cli("probe", "demo", "-c", str(path))
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == "probe demo: ok" and lines[1].startswith("  token: static")
        assert lines[2].startswith("  call:  GET /health -> 200 (expected 200) in ")
        assert upstream.seen[-1]["authorization"] == f"Bearer {CANARY}"
        code, out, _ = await cli("probe", "flaky", "-c", str(path))
        assert code == 1 and out.splitlines()[0] == "probe flaky: FAILED"
        assert "-> 500 (expected 200)" in out
        code, out, _ = await cli("probe", "flaky", "-c", str(path), "--json")
        body = json.loads(out)
        assert code == 1 and body["ok"] is False and body["call"]["status"] == 500


@pytest.mark.parametrize("action", ["refresh", "revoke", "disable", "enable", "probe"])
async def test_an_unknown_credential_exits_1(setup, cli, action):
    data, path = setup
    async with running(path):
        code, out, err = await cli(action, "nope", "-c", str(path))
        assert (code, out, err) == (1, "", "credproxy: no credential named 'nope' in the running config\n")
        code, out, _ = await cli(action, "nope", "-c", str(path), "--json")
        assert code == 1 and json.loads(out) == {"error": "not_found", "message": "no such credential"}


async def test_reload_applies_a_good_file_and_explains_a_bad_one(setup, cli, upstream):
    data, path = setup
    async with running(path) as proxy:
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        data["server"]["listen"] = f"127.0.0.1:{free_port()}"
        write_config(path, data)
        code, out, _ = await cli("reload", "-c", str(path))
        assert code == 0
        assert out.splitlines() == ["reload: applied", "  added: second", "  needs a restart to take effect: server.listen"]
        assert (await call(proxy, "/second/v1/x"))[0] == 200
        data["credentials"]["second"]["upstream"] = "ftp://example.com"
        write_config(path, data)
        code, out, err = await cli("reload", "-c", str(path))
        assert code == 1 and out == ""
        lines = err.splitlines()
        assert lines[0] == "reload rejected; the running config stays. Problems:"
        assert lines[1].startswith(f"  {path}:") and lines[1].endswith(
            ": credentials.second.upstream: must be an absolute https:// URL")
        code, out, _ = await cli("reload", "-c", str(path), "--json")
        assert code == 1 and json.loads(out)["error"] == "invalid_config"
        assert (await call(proxy, "/second/v1/x"))[0] == 200


async def _real_reload(path, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(PYTHON, "-m", "proxy", "reload", "-c", str(path), *extra,
                                                stdout=asyncio.subprocess.PIPE, env=subprocess_env())
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_reload_after_the_file_watcher_says_who_applied_the_edit_and_when(setup, upstream):
    data, path = setup
    async with running(path, watch_interval=0.05) as proxy:
        code, out = await _real_reload(path)
        started = re.fullmatch(r"reload: nothing to apply: the running config is the one the proxy started with "
                               r"at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\n", out)
        assert code == 0 and started, out
        data["credentials"]["second"] = credential(upstream.url, secret="api/second#token")
        data["server"]["deny_private_upstreams"] = True
        write_config(path, data)
        for _ in range(250):  # the watcher applies it
            if "second" in proxy.holder.current.credentials:
                break
            await asyncio.sleep(0.02)
        assert "second" in proxy.holder.current.credentials
        for _ in range(2):  # the same answer however often it is asked
            code, out = await _real_reload(path)
            lines = out.splitlines()
            assert code == 0
            when = re.fullmatch(r"reload: nothing to apply: the file watcher already applied this config at (\S+)",
                                lines[0])
            assert when and when[1] >= started[1], out
            assert lines[1:] == ["  added: second", "  settings: server.deny_private_upstreams"]
        code, out = await _real_reload(path, "--json")
        body = json.loads(out)
        assert code == 0 and body["changed"] is False and body["credentials"]["added"] == []
        last = body["last_change"]
        assert (last["trigger"], last["by"], last["at"]) == ("watch", "the file watcher", when[1])
        assert last["credentials"]["added"] == ["second"]
        assert (await call(proxy, "/second/v1/x"))[0] == 200


async def test_a_wrong_admin_token_exits_4(setup, tmp_path, cli):
    data, path = setup
    async with running(path):
        (tmp_path / "other.token").write_text("not-the-admin-token\n")
        data["admin"]["token_file"] = str(tmp_path / "other.token")
        other = write_config(tmp_path / "other.yaml", data)
        code, out, err = await cli("status", "-c", str(other))
        assert (code, out) == (4, "")
        assert err == f"credproxy: the proxy refused the token in {tmp_path / 'other.token'}: missing or wrong admin token\n"
        del data["admin"]["token_file"]
        write_config(other, data)
        code, out, _ = await cli("disable", "demo", "-c", str(other), "--json")
        assert code == 4 and json.loads(out)["error"] == "admin_unauthorized"
        data["admin"]["token_file"] = str(tmp_path / "missing.token")
        write_config(other, data)
        code, _, err = await cli("status", "-c", str(other))
        assert code == 2 and "missing.token cannot be read (No such file or directory)" in err


async def test_admin_commands_over_a_unix_socket(tmp_path, upstream, cli):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    data = base_config(tmp_path, secrets, {"demo": credential(upstream.url)}, admin_listen=f"unix:{tmp_path}/a.sock")
    path = write_config(tmp_path / "config.yaml", data)
    async with running(path) as proxy:
        code, out, _ = await cli("disable", "demo", "-c", str(path))
        assert code == 0 and (await call(proxy, "/demo/v1/x"))[0] == 503
        code, out, _ = await cli("status", "-c", str(path))
        assert code == 0 and out.startswith(f"credproxy on unix:{tmp_path}/a.sock: ready")


def test_the_real_command_says_when_the_proxy_is_not_running(tmp_path):
    secrets = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    data = base_config(tmp_path, secrets, {"demo": credential("http://127.0.0.1:9/api")})
    path = write_config(tmp_path / "config.yaml", data)
    for args, stream in ((["status"], "stderr"), (["probe", "demo", "--json"], "stdout")):
        done = subprocess.run([PYTHON, "-m", "proxy", *args, "-c", str(path)], capture_output=True, text=True,
                              env=subprocess_env(), timeout=60)
        assert done.returncode == 3
        text = getattr(done, stream)
        assert f"not answering on its admin listener {data['admin']['listen']}" in text
        if stream == "stdout":
            assert json.loads(text)["error"] == "proxy_unreachable"


async def test_the_real_command_against_a_running_proxy(setup):
    data, path = setup
    async with running(path):
        proc = await asyncio.create_subprocess_exec(PYTHON, "-m", "proxy", "status", "-c", str(path), "--json",
                                                    stdout=asyncio.subprocess.PIPE, env=subprocess_env())
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and json.loads(out)["ready"] is True
        assert_no_secret(out)


def test_schema_is_a_valid_json_schema_that_accepts_the_example_and_refuses_mistakes(capsys, tmp_path):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = yaml.safe_load((ROOT / "config" / "example.yaml").read_text())
    validator.validate(example)
    ours = base_config(tmp_path, {"backend": "file"}, {"demo": credential("https://api.example.com", probe={"path": "/h"})},
                       admin_token=True)
    validator.validate(ours)
    bad = [
        {"credentials": {"x": {"upstream": "https://a.example", "auth": {"type": "telepathy", "secret": "a#b"}}}},
        {"credentials": {"x": {"auth": {"type": "header", "secret": "a#b"}}}},  # no upstream
        {"server": {"drain_timeout": "soon"}},
        {"credentials": {"x": {"upstream": "https://a.example", "auth": {"type": "header", "secret": "a#b"},
                               "colour": "blue"}}},  # unknown key
    ]
    for doc in bad:
        assert not validator.is_valid(doc), doc
