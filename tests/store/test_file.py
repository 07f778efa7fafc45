"""The embedded encrypted store and its CLI: refuses bad keys and damaged files whole."""

import base64
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.errors import ConflictError, SecretNotFound, StoreError
from proxy.store.secret import Secret, SecretRef
from proxy.store.file import FileStore, generate_key

CANARY = "pw-CANARY-4f1e9d2c7b"


@pytest.fixture
def store(tmp_path):
    s = FileStore(tmp_path / "s.enc", base64.b64decode(generate_key()))
    s.init()
    return s


async def test_put_get_versions_and_cas(store):
    assert await store.put("apis/x", "token", Secret("v1")) == 1
    assert await store.put("apis/x", "other", Secret("o")) == 2
    entry = await store.get("apis/x")
    assert entry.version == 2 and entry.fields["token"].reveal() == "v1" and entry.fields["other"].reveal() == "o"
    assert (await store.get("apis/x")).get(SecretRef.parse("apis/x#token")).reveal() == "v1"
    assert await store.put("apis/x", "token", Secret("v2"), cas=2) == 3
    with pytest.raises(ConflictError):
        await store.put("apis/x", "token", Secret("v3"), cas=2)
    with pytest.raises(ConflictError):
        await store.put("apis/x", "token", Secret("v3"), cas=0)
    assert await store.put("apis/new", "t", Secret("n"), cas=0) == 1
    with pytest.raises(SecretNotFound):
        await store.get("apis/none")
    with pytest.raises(SecretNotFound):
        (await store.get("apis/x")).get(SecretRef.parse("apis/x#nofield"))


def test_file_is_encrypted_and_private(store):
    store.put_sync("a", "b", Secret(CANARY))
    raw = store.path.read_bytes()
    assert CANARY.encode() not in raw
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert not list(store.path.parent.glob(".*.tmp"))


def test_wrong_key_is_refused(store):
    store.put_sync("a", "b", Secret(CANARY))
    other = FileStore(store.path, base64.b64decode(generate_key()))
    with pytest.raises(StoreError, match="wrong master key, or the file was modified"):
        other.get_sync("a")


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_file_is_refused_whole(store, damage):
    store.put_sync("a", "b", Secret(CANARY))
    data = bytearray(store.path.read_bytes())
    if damage == "flip":
        data[-5] ^= 1
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a store at all, just text")
    store.path.write_bytes(bytes(data))
    store._cache = None
    with pytest.raises(StoreError) as exc:
        store.get_sync("a")
    assert CANARY not in str(exc.value)


def test_world_readable_file_is_refused(store):
    store.put_sync("a", "b", Secret(CANARY))
    os.chmod(store.path, 0o644)
    store._cache = None
    with pytest.raises(StoreError, match="accessible by other users"):
        store.get_sync("a")


def test_init_refuses_to_overwrite(store):
    with pytest.raises(StoreError, match="already exists"):
        store.init()


# --- CLI ---------------------------------------------------------------------------

def cli(args, cwd, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def write_cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
secrets:
  file:
    path: {tmp_path}/store.enc
    key_file: {tmp_path}/master.key
credentials: {{}}
""")
    return cfg


def test_secrets_cli_roundtrip(tmp_path):
    cfg = write_cfg(tmp_path)
    r = cli(["secrets", "init", "-c", str(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    r = cli(["secrets", "init", "-c", str(cfg)], tmp_path)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr
    r = cli(["secrets", "put", "-c", str(cfg), "apis/example", "token"], tmp_path, stdin=CANARY + "\n")
    assert r.returncode == 0 and "version 1" in r.stdout
    r = cli(["secrets", "list", "-c", str(cfg)], tmp_path)
    assert r.stdout.strip() == "apis/example: token"
    for out in (r.stdout, r.stderr):
        assert CANARY not in out
    key = base64.b64decode((tmp_path / "master.key").read_text())
    assert FileStore(tmp_path / "store.enc", key).get_sync("apis/example").fields["token"].reveal() == CANARY


def test_secrets_put_rejects_value_on_argv_and_empty_stdin(tmp_path):
    cfg = write_cfg(tmp_path)
    cli(["secrets", "init", "-c", str(cfg)], tmp_path)
    r = cli(["secrets", "put", "-c", str(cfg), "apis/example", "token", CANARY], tmp_path, stdin="")
    assert r.returncode == 2  # no positional for a value: argparse refuses
    assert CANARY not in r.stdout
    r = cli(["secrets", "put", "-c", str(cfg), "apis/example", "token"], tmp_path, stdin="")
    assert r.returncode == 1 and "empty" in r.stderr


def test_master_key_from_environment(tmp_path):
    cfg = write_cfg(tmp_path)
    key = generate_key()
    r = cli(["secrets", "init", "-c", str(cfg)], tmp_path, env={"CREDPROXY_MASTER_KEY": key})
    assert r.returncode == 0 and not (tmp_path / "master.key").exists()
    r = cli(["secrets", "put", "-c", str(cfg), "p", "f"], tmp_path, stdin="v", env={"CREDPROXY_MASTER_KEY": key})
    assert r.returncode == 0
    r = cli(["secrets", "list", "-c", str(cfg)], tmp_path, env={"CREDPROXY_MASTER_KEY": generate_key()})
    assert r.returncode == 1 and "wrong master key" in r.stderr


def test_callers_new_prints_token_once_and_only_its_hash_in_config(tmp_path):
    r = cli(["callers", "new", "billing"], tmp_path)
    lines = r.stdout.splitlines()
    token = lines[1].strip()
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f'token_sha256: "{digest}"' in r.stdout
    assert r.stdout.count(token) == 1
    assert len(token) > 40


def test_serve_refuses_a_store_opened_with_the_wrong_key(tmp_path):
    cfg = write_cfg(tmp_path)
    cli(["secrets", "init", "-c", str(cfg)], tmp_path)
    (tmp_path / "master.key").write_text(generate_key())
    r = cli(["serve", "-c", str(cfg)], tmp_path)
    assert r.returncode == 1
    assert "wrong master key" in r.stderr
