"""The command line as a new user meets it: each mistake gets one plain line that says what to do.

Every test runs ``python -m proxy ...`` in a subprocess (as a user types it) or ``main([...])`` with the
output captured, against real files in a temp directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, sha

ROOT = Path(__file__).resolve().parent.parent
CANARY = "sk_live_CANARY_cli_5e0d1b"


def credproxy(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CREDPROXY_MASTER_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


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
    assert credproxy("secrets", "init", "-c", cfg.name, cwd=directory).returncode == 0
    put = credproxy("secrets", "put", "-c", cfg.name, "apis/example", "token", cwd=directory, stdin=CANARY)
    assert put.returncode == 0, put.stderr
    return cfg


# --- secrets init never damages a working setup ----------------------------------------------------


def test_a_mistyped_key_file_is_not_sent_to_init_and_init_writes_nothing(tmp_path):
    cfg = init_with_secret(tmp_path)
    text = cfg.read_text().replace("key_file: master.key", "key_file: master.kye")
    cfg.write_text(text)

    listing = credproxy("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1
    assert "master.kye does not exist" in listing.stderr
    assert "secrets.file.key_file" in listing.stderr and "CREDPROXY_MASTER_KEY" in listing.stderr
    assert "run: credproxy secrets init" not in listing.stderr

    init = credproxy("secrets", "init", "-c", cfg.name, cwd=tmp_path)
    assert init.returncode == 1 and "already exists" in init.stderr
    assert not (tmp_path / "master.kye").exists()  # refused before anything was written

    cfg.write_text(text.replace("master.kye", "master.key"))
    again = credproxy("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "apis/example: token"


def test_a_new_setup_is_still_told_to_run_init(tmp_path):
    cfg = write_config(tmp_path)
    listing = credproxy("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1 and "run: credproxy secrets init" in listing.stderr


def test_a_wrong_key_says_where_the_key_comes_from(tmp_path):
    cfg = init_with_secret(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    credproxy("secrets", "init", "-c", write_config(other).name, cwd=other)
    (tmp_path / "master.key").write_text((other / "master.key").read_text())
    listing = credproxy("secrets", "list", "-c", cfg.name, cwd=tmp_path)
    assert listing.returncode == 1
    assert "wrong master key" in listing.stderr and "secrets.file.key_file" in listing.stderr


# --- serving twice on one port ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["server", "admin", "dedicated"])
def test_an_address_in_use_is_one_line_and_exit_1(tmp_path, which):
    cfg = init_with_secret(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = "127.0.0.1:%d" % taken.getsockname()[1]
    field = {"server": "server.listen", "admin": "admin.listen", "dedicated": "credentials.example.listen"}[which]
    if which == "dedicated":
        doc["credentials"]["example"]["listen"] = address
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
