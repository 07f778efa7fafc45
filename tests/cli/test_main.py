"""The command line as a new user meets it: each mistake gets one plain line that says what to do.

Every test runs ``python -m proxy ...`` in a subprocess (as a user types it) or ``main([...])`` with the
output captured, against real files in a temp directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli.main import main
from tests.helpers import REPO, free_port, sha
from tests.vault_fixture import bao  # noqa: F401 - fixture

ROOT = REPO
CANARY = "sk_live_CANARY_cli_5e0d1b"


def credproxy(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m proxy ARGS`` in a subprocess, exactly as a user types it."""
    env = {k: v for k, v in os.environ.items() if k != "CREDPROXY_MASTER_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``main(ARGS)`` in this process with stdin, stdout and stderr captured (a subprocess costs seconds)."""
    out, err = io.StringIO(), io.StringIO()
    here, env_key = os.getcwd(), os.environ.pop("CREDPROXY_MASTER_KEY", None)
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
        sys.stdin = saved
        if env_key is not None:
            os.environ["CREDPROXY_MASTER_KEY"] = env_key
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def write_config(directory: Path, **sections) -> Path:
    cfg = {
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "secrets": {"backend": "file", "file": {"path": "secrets.enc", "key_file": "master.key"}},
        "audit": {"path": "audit.log"},
        "callers": {"billing": {"token_sha256": sha("tok-billing")}},
        "credentials": {"example": {
            "upstream": "https://api.example.com/base",
            "auth": {"type": "header", "secret": "apis/example#token"},
            "allow": [{"callers": ["billing"], "paths": ["/v1/**"]}],
        }},
    }
    cfg.update(sections)
    path = directory / "credproxy.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def init_with_secret(directory: Path) -> Path:
    cfg = write_config(directory)
    assert cli("secrets", "init", "-c", cfg.name, cwd=directory).returncode == 0
    put = cli("secrets", "put", "-c", cfg.name, "apis/example", "token", cwd=directory, stdin=CANARY)
    assert put.returncode == 0, put.stderr
    return cfg


# --- secrets init never damages a working setup ----------------------------------------------------


def test_a_mistyped_key_file_is_not_sent_to_init_and_init_writes_nothing(tmp_path):
    cfg = init_with_secret(tmp_path)
    text = cfg.read_text().replace("key_file: master.key", "key_file: master.kye")
    cfg.write_text(text)

    listing = cli("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1
    assert "master.kye does not exist" in listing.stderr
    assert "secrets.file.key_file" in listing.stderr and "CREDPROXY_MASTER_KEY" in listing.stderr
    assert "run: credproxy secrets init" not in listing.stderr

    init = cli("secrets", "init", "-c", cfg.name, cwd=tmp_path)
    assert init.returncode == 1 and "already exists" in init.stderr
    assert not (tmp_path / "master.kye").exists()  # refused before anything was written

    cfg.write_text(text.replace("master.kye", "master.key"))
    again = cli("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "apis/example: token"


def test_a_new_setup_is_still_told_to_run_init(tmp_path):
    cfg = write_config(tmp_path)
    listing = cli("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1 and "run: credproxy secrets init" in listing.stderr


def test_a_wrong_key_says_where_the_key_comes_from(tmp_path):
    cfg = init_with_secret(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    cli("secrets", "init", "-c", write_config(other).name, cwd=other)
    (tmp_path / "master.key").write_text((other / "master.key").read_text())
    listing = cli("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1
    assert "wrong master key" in listing.stderr and "secrets.file.key_file" in listing.stderr


# --- serving twice on one port ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["server", "admin", "dedicated", "forward_proxy"])
def test_an_address_in_use_is_one_line_and_exit_1(tmp_path, which):
    cfg = init_with_secret(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = "127.0.0.1:%d" % taken.getsockname()[1]
    field = "credentials.example.listen" if which == "dedicated" else f"{which}.listen"
    if which == "dedicated":
        doc["credentials"]["example"]["listen"] = address
    elif which == "forward_proxy":
        doc["forward_proxy"] = {"listen": address, "ca": {"cert_file": "ca.pem", "key": "credproxy/ca#key"}}
        cfg.write_text(yaml.safe_dump(doc))
        assert cli("ca", "init", "-c", cfg.name, cwd=tmp_path).returncode == 0
    else:
        doc[which]["listen"] = address
    cfg.write_text(yaml.safe_dump(doc))
    with taken:
        served = credproxy("serve", "-c", cfg.name, cwd=tmp_path)
    assert served.returncode == 1
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1, served.stderr
    assert json.loads(lines[0])["msg"] == f"cannot start: {address} is already in use ({field})"
    assert "Traceback" not in served.stderr and CANARY not in served.stderr


# --- check: every problem in one run, in plain words -----------------------------------------------


def check(cfg: Path) -> subprocess.CompletedProcess:
    return cli("check", "-c", cfg.name, cwd=cfg.parent)


def test_check_reports_schema_problems_and_the_later_checks_in_one_run(tmp_path):
    cfg = init_with_secret(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["server"]["drain_timout"] = "20s"  # a typo: schema
    doc["admin"]["listen"] = doc["server"]["listen"]  # a listener clash: a later check
    doc["credentials"]["example"]["upstream"] = "https://me:pw@api.example.com"  # userinfo: a later check
    doc["credentials"]["broken"] = {"upstrem": "https://api.example.com",
                                    "auth": {"type": "header", "secret": "apis/example#token"}}
    doc["credentials"]["other"] = {"upstream": "https://api.example.com",
                                   "auth": {"type": "telepathy"},  # schema, and its rule names a ghost
                                   "allow": [{"callers": ["ghost"], "paths": ["/**"]}]}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = check(cfg)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        "server.drain_timout: is not a known key: did you mean drain_timeout?",
        "admin.listen: listener already used by server.listen",
        "credentials.example.upstream: must not contain userinfo",
        "credentials.broken.upstrem: is not a known key: did you mean upstream? (upstream is required)",
        "credentials.other.auth.type: must be one of 'header'",
        "credentials.other.allow[0].callers: names a caller that is not defined under callers",
    ]
    for want in expected:
        assert sum(want in line for line in lines) == 1, (want, lines)
    assert len(lines) == len(expected), lines  # one typo is one problem, nothing reported twice
    assert all(line.startswith("credproxy.yaml:") and line.split(":")[1].isdigit() for line in lines)
    assert "Value error" not in result.stderr and "Extra inputs" not in result.stderr
    assert "Field required" not in result.stderr and "me:pw" not in result.stderr


def test_a_mistyped_allow_says_the_credential_would_deny_everything(tmp_path):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("    allow:", "    alow:"))
    result = cli("check", "--config-only", "-c", cfg.name, cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "credentials.example.alow: is not a known key: did you mean allow?" in line
    assert "denies every request" in line


@pytest.mark.parametrize("written,ok", [("5", False), ("5s", True), ("250ms", True), ("1.5", False)])
def test_a_duration_must_name_its_unit(tmp_path, written, ok):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("server:\n", f"server:\n  drain_timeout: {written}\n"))
    result = cli("check", "--config-only", "-c", cfg.name, cwd=tmp_path)
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert f"server.drain_timeout: a number alone has no unit: write {written}s" in result.stderr


@pytest.mark.parametrize("written,size", [("512KiB", 512 << 10), ("1MiB", 1 << 20), ("1GiB", 1 << 30),
                                          ("1048576", 1048576), ("2MB", 2_000_000)])
def test_sizes_as_documented(tmp_path, written, size):
    from proxy.config import models as config_mod

    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("server:\n", f"server:\n  limits:\n    max_body: {written}\n"))
    assert cli("check", "--config-only", "-c", cfg.name, cwd=tmp_path).returncode == 0
    assert config_mod.load(cfg).server.limits.max_body == size
    cfg.write_text(cfg.read_text().replace(f"max_body: {written}", "max_body: 2 parsecs"))
    result = cli("check", "--config-only", "-c", cfg.name, cwd=tmp_path)
    assert "server.limits.max_body: must be a size such as 1048576, 512KiB or 1GiB" in result.stderr


# --- check opens the store read-only ---------------------------------------------------------------


def test_check_names_each_missing_secret_with_the_command_that_adds_it(tmp_path):
    cfg = init_with_secret(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["credentials"]["other"] = {"upstream": "https://api.example.com",
                                   "auth": {"type": "basic", "username": "apis/other#user",
                                            "password": "apis/example#password"},
                                   "allow": [{"callers": ["billing"], "paths": ["/**"]}]}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    store_before = (tmp_path / "secrets.enc").read_bytes()
    result = check(cfg)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"credproxy.yaml:{_line(cfg, 'username')}: credentials.other.auth.username: apis/other#user is not in the "
        "secret store; add it with: credproxy secrets put -c credproxy.yaml apis/other user",
        f"credproxy.yaml:{_line(cfg, 'password')}: credentials.other.auth.password: apis/example#password is not in "
        "the secret store; add it with: credproxy secrets put -c credproxy.yaml apis/example password",
    ]
    assert CANARY not in result.stdout + result.stderr
    assert (tmp_path / "secrets.enc").read_bytes() == store_before  # read-only

    fix = result.stderr.splitlines()[0].split("add it with: ")[1].split()[1:]
    assert cli(*fix, cwd=tmp_path, stdin="someone").returncode == 0
    fix = result.stderr.splitlines()[1].split("add it with: ")[1].split()[1:]
    assert cli(*fix, cwd=tmp_path, stdin="pw").returncode == 0
    assert check(cfg).returncode == 0


def _line(cfg: Path, key: str) -> int:
    return next(i for i, line in enumerate(cfg.read_text().splitlines(), 1) if line.strip().startswith(key + ":"))


def test_check_reports_a_missing_key_file(tmp_path):
    cfg = init_with_secret(tmp_path)
    (tmp_path / "master.key").rename(tmp_path / "master.key.bak")
    result = check(cfg)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "secrets.file.key_file: master key file master.key does not exist" in line
    assert "secrets init would not help" in line


def test_check_says_what_each_header_credential_sends(tmp_path):
    cfg = init_with_secret(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["credentials"]["apikey"] = {"upstream": "https://api.example.com",
                                    "auth": {"type": "header", "header": "X-Api-Key", "secret": "apis/example#token"},
                                    "allow": [{"callers": ["billing"], "paths": ["/**"]}]}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = check(cfg)
    assert result.returncode == 0, result.stderr
    assert "  example (header): sends Authorization: Bearer {secret}" in result.stdout.splitlines()
    assert "  apikey (header): sends X-Api-Key: {secret}" in result.stdout.splitlines()
    assert CANARY not in result.stdout


def test_schema_shows_defaults_as_they_are_written():
    result = credproxy("schema", cwd=ROOT)
    schema = json.loads(result.stdout)
    defs = schema["$defs"]
    assert "default" not in defs["HeaderAuth"]["properties"]["value"]
    assert "{secret}" in defs["HeaderAuth"]["properties"]["value"]["description"]
    assert defs["ServerConfig"]["properties"]["listen"]["default"] == "127.0.0.1:8080"
    assert defs["ServerConfig"]["properties"]["drain_timeout"]["default"] == "20s"
    assert defs["SessionConfig"]["properties"]["ttl"]["default"] == "1h"
    assert '"parts"' not in result.stdout and '"host"' not in result.stdout


# --- the header credential's default value, at the upstream ----------------------------------------


async def test_a_header_other_than_authorization_gets_the_bare_secret(proxy_factory, upstream, tmp_path):
    import aiohttp

    from tests.conftest import SECRET
    from tests.helpers import auth, base_config

    cfg = base_config(tmp_path, upstream.url)
    cfg["credentials"]["example"]["auth"] = {"type": "header", "header": "X-Api-Key", "secret": "apis/example#token"}
    proxy = await proxy_factory(cfg)
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/example/v1/x", headers=auth()) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].headers["X-Api-Key"] == SECRET  # not "Bearer <key>"


# --- serve names the field of a secret it cannot read ----------------------------------------------


def test_serve_logs_the_field_path_of_a_missing_secret(tmp_path):
    cfg = init_with_secret(tmp_path)
    cfg.write_text(cfg.read_text().replace("apis/example#token", "apis/gone#token"))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", cfg.name], cwd=tmp_path, text=True,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in proc.stderr:
            if "secret not readable yet" in line:
                record = json.loads(line)
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert record["field"] == "credentials.example.auth.secret"
    assert (record["secret_path"], record["secret_field"]) == ("apis/gone", "token")


def test_check_reads_vault_with_its_own_login(tmp_path, bao):
    bao.put("credproxy/cli/present", {"token": CANARY})
    token_file = tmp_path / "vault.token"
    token_file.write_text(bao.root_token)
    vault = {"backend": "vault", "vault": {"address": bao.address, "timeout": "2s",
                                           "auth": {"method": "token", "token_file": str(token_file)}}}
    cfg = write_config(tmp_path, secrets=vault)
    doc = yaml.safe_load(cfg.read_text())
    doc["credentials"]["example"]["auth"]["secret"] = "credproxy/cli/present#token"
    doc["credentials"]["other"] = {"upstream": "https://api.example.com",
                                   "auth": {"type": "basic", "username": "credproxy/cli/present#user",
                                            "password": "credproxy/cli/absent#password"},
                                   "allow": [{"callers": ["billing"], "paths": ["/**"]}]}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = check(cfg)
    assert result.returncode == 1
    assert [line.split(": ", 2)[1:] for line in result.stderr.splitlines()] == [
        ["credentials.other.auth.username", "credproxy/cli/present#user is not in vault; add it with: "
         "vault kv patch -mount=secret credproxy/cli/present user=-"],  # patch: the path's token stays
        ["credentials.other.auth.password", "credproxy/cli/absent#password is not in vault; add it with: "
         "vault kv put -mount=secret credproxy/cli/absent password=-"],
    ]
    assert CANARY not in result.stdout + result.stderr and bao.root_token not in result.stdout + result.stderr

    token_file.write_text("not-a-token")
    refused = check(cfg)
    assert refused.returncode == 1 and "secrets.vault.auth: cannot log in to vault" in refused.stderr
