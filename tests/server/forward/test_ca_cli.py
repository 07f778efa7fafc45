"""`credproxy ca init|show` and the forward_proxy config: the CA key goes into the secret store through its
write path and nowhere else (no file, no output); init refuses to overwrite; check names every problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import models as config_mod
from proxy.server.forward.ca import CA, CAError, LeafContexts, generate_ca
from proxy.store.file import FileStore, load_key
from proxy.store.secret import Secret
from tests.vault_fixture import bao  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[3]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=60)


def write_config(tmp: Path, **forward) -> Path:
    cfg = {
        "secrets": {"backend": "file", "file": {"path": str(tmp / "secrets.enc"), "key_file": str(tmp / "master.key")}},
        "forward_proxy": {"listen": "127.0.0.1:3128", "ca": {"cert_file": str(tmp / "ca.pem"), "key": "credproxy/ca#key"},
                          **forward},
        "credentials": {"pay": {"upstream": "https://api.pay.example", "hosts": ["api.pay.example"],
                                "auth": {"type": "header", "secret": "apis/pay#token"}}},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def store_of(tmp: Path) -> FileStore:
    return FileStore(tmp / "secrets.enc", load_key(config_mod.FileStoreConfig(
        path=str(tmp / "secrets.enc"), key_file=str(tmp / "master.key"))))


def test_ca_init_puts_the_key_in_the_store_only_and_show_prints_the_certificate(tmp_path):
    config = write_config(tmp_path)
    assert run("secrets", "init", "-c", str(config), cwd=tmp_path).returncode == 0
    done = run("ca", "init", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    key = store_of(tmp_path).get_sync("credproxy/ca").fields["key"].reveal()
    assert "PRIVATE KEY" in key
    body = "".join(key.splitlines()[1:-1])
    # the key is in no output and in no file in the clear (the store is encrypted)
    for text in (done.stdout, done.stderr):
        assert body[10:40] not in text and "PRIVATE KEY" not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data and body[10:40].encode() not in data, path
    cert = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    CA.load((tmp_path / "ca.pem").read_bytes(), Secret(key))  # key and certificate belong together

    shown = run("ca", "show", "-c", str(config), cwd=tmp_path)
    assert shown.returncode == 0
    assert shown.stdout == (tmp_path / "ca.pem").read_text()
    assert "PRIVATE" not in shown.stdout


def test_ca_init_refuses_to_overwrite_the_certificate_or_the_key(tmp_path):
    config = write_config(tmp_path)
    run("secrets", "init", "-c", str(config), cwd=tmp_path)
    assert run("ca", "init", "-c", str(config), cwd=tmp_path).returncode == 0
    stored = store_of(tmp_path).get_sync("credproxy/ca")
    again = run("ca", "init", "-c", str(config), cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    (tmp_path / "ca.pem").unlink()  # certificate gone, key still stored: still refused
    again = run("ca", "init", "-c", str(config), cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert store_of(tmp_path).get_sync("credproxy/ca").version == stored.version
    assert not (tmp_path / "ca.pem").exists()


def test_ca_show_without_init_says_what_to_run(tmp_path):
    config = write_config(tmp_path)
    shown = run("ca", "show", "-c", str(config), cwd=tmp_path)
    assert shown.returncode == 1 and "credproxy ca init" in shown.stderr


def test_ca_key_that_does_not_match_the_certificate_is_refused():
    cert_a, _ = generate_ca()
    _, key_b = generate_ca()
    with pytest.raises(CAError) as exc:
        CA.load(cert_a, key_b)
    assert "PRIVATE" not in str(exc.value)


async def test_leaf_certificates_are_p256_for_the_host_valid_24h_and_the_cache_is_bounded():
    cert_pem, key = generate_ca()
    leaves = LeafContexts(CA.load(cert_pem, key), max_entries=8)
    leaf = x509.load_pem_x509_certificate(leaves.leaf_pem("api.pay.invalid", 1_800_000_000.0))
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["api.pay.invalid"]
    assert isinstance(leaf.public_key().curve, ec.SECP256R1)
    lifetime = leaf.not_valid_after_utc.timestamp() - 1_800_000_000.0
    assert lifetime == 24 * 3600
    for i in range(40):
        await leaves.context(f"h{i}.invalid")
    assert len(leaves) == 8 and leaves.minted == 40
    same = await leaves.context("h39.invalid")
    assert same is await leaves.context("h39.invalid") and leaves.minted == 40  # cached
    await leaves.context("h0.invalid")  # evicted long ago: minted again
    assert leaves.minted == 41 and len(leaves) == 8


def problems(cfg: dict) -> list[str]:
    with pytest.raises(config_mod.ConfigInvalid) as exc:
        config_mod.parse(yaml.safe_dump(cfg), "c.yaml")
    return [str(p) for p in exc.value.problems]


def base(**forward) -> dict:
    return {"forward_proxy": {"listen": "127.0.0.1:3128", "ca": {"cert_file": "ca.pem", "key": "credproxy/ca#key"},
                              **forward},
            "credentials": {"pay": {"upstream": "https://api.pay.example", "hosts": ["api.pay.example"],
                                    "auth": {"type": "header", "secret": "apis/pay#token"}}}}


def test_config_accepts_forward_proxy_and_reports_every_host_problem():
    cfg = config_mod.parse(yaml.safe_dump(base(tunnel_hosts=["github.com:443"])), "c.yaml")
    assert cfg.forward_proxy.ca.key.path == "credproxy/ca"
    bad = base(tunnel_hosts=["api.pay.example:443", "github.com", "10.0.0.1:443"])
    bad["credentials"]["pay"]["hosts"] = ["api.pay.example", "API.pay.example:443", "192.168.1.1", "*.pay.example"]
    found = problems(bad)
    assert any("tunnel_hosts[1]: must be host:port" in p for p in found)
    assert any("tunnel_hosts[2]: must be a DNS name" in p for p in found)
    assert any("hosts[1]: listed twice" in p for p in found)
    assert any("hosts[2]: must be a DNS name" in p for p in found)
    assert any("hosts[3]: must be a DNS name" in p for p in found)
    assert any("hosts[0]: also in forward_proxy.tunnel_hosts" in p for p in found)
    lonely = base()
    del lonely["forward_proxy"]
    assert any("hosts needs a forward_proxy section" in p for p in problems(lonely))
    clash = base(listen="127.0.0.1:8080")
    assert any("forward_proxy.listen: listener already used by server.listen" in p for p in problems(clash))


def test_ca_init_with_the_vault_backend_writes_the_key_into_vault(tmp_path, bao):
    token_file = tmp_path / "vault.token"
    token_file.write_text(bao.root_token)
    bao.put("other/fields", {"keep": "me"})
    cfg = {
        "secrets": {"backend": "vault", "vault": {"address": bao.address, "auth": {"method": "token",
                                                                                 "token_file": str(token_file)}}},
        "forward_proxy": {"listen": "127.0.0.1:3128",
                          "ca": {"cert_file": str(tmp_path / "ca.pem"), "key": "other/fields#ca_key"}},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = run("ca", "init", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = bao.root().secrets.kv.v2.read_secret_version(path="other/fields", raise_on_deleted_version=True)["data"]
    assert data["data"]["keep"] == "me"  # the store's write path keeps the path's other fields
    CA.load((tmp_path / "ca.pem").read_bytes(), Secret(data["data"]["ca_key"]))
    assert "PRIVATE" not in done.stdout + done.stderr
    (tmp_path / "ca.pem").unlink()
    again = run("ca", "init", "-c", str(config), cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
