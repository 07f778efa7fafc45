"""A realistic credproxy setup for the benchmark: five callers, several credentials and
allow rules, header injection from the encrypted file store, audit log to a file,
leak guard ``redact``, metrics (always on)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from pathlib import Path

import yaml

from proxy.store.secret import Secret
from proxy.store.file import FileStore, generate_key

CALLER_TOKEN = "cp_bench_billing_token_4b1c9e"
UPSTREAM_SECRET = "sk_live_bench_9f8e7d6c5b4a3210"
CALLERS = {"billing": CALLER_TOKEN, "reports": "cp_bench_reports_1", "ledger": "cp_bench_ledger_2",
           "search": "cp_bench_search_3", "support": "cp_bench_support_4"}


def tokens_available() -> bool:
    """Token types (``proxy.tokens``) are built on another branch; the expiry scenario needs them."""
    import proxy

    spec = importlib.util.find_spec("proxy.tokens")
    # an editable install elsewhere can answer for proxy.tokens: only this checkout's counts
    if spec is None or not (spec.origin or "").startswith(proxy.__path__[0]):
        return False
    import proxy.tokens

    return hasattr(proxy.tokens, "TokenSource")


def write_store(workdir: Path) -> tuple[Path, Path]:
    key_file = workdir / "master.key"
    key_file.write_text(generate_key())
    key_file.chmod(0o600)
    store = FileStore(workdir / "secrets.enc", base64.b64decode(key_file.read_text()))
    store.init()
    values = {"apis/bench#token": UPSTREAM_SECRET, "apis/other#token": "sk_other_0a1b2c3d4e5f",
              "apis/legacy#user": "legacy-user", "apis/legacy#pass": "legacy-pass-77aa",
              "apis/oauth#client_secret": "oauth-client-secret-55cc"}
    for ref, value in values.items():
        path, _, name = ref.partition("#")
        store.put_sync(path, name, Secret(value))
    return workdir / "secrets.enc", key_file


def config(workdir: Path, tag: str, *, port: int, admin_port: int, upstream: str, aux: str,
           with_tokens: bool, token_session: dict | None = None) -> Path:
    """``credproxy-<tag>.yaml`` (with its own audit file) using the store ``write_store`` made."""
    store, key = workdir / "secrets.enc", workdir / "master.key"
    rules = [
        {"callers": ["reports"], "methods": ["GET"], "paths": ["/v1/reports/**"]},
        {"callers": ["support"], "methods": ["GET"], "paths": ["/v1/customers/*", "/v1/customers/*/notes"]},
        {"callers": ["billing", "ledger"], "methods": ["GET", "POST"],
         "paths": ["/v1/customers/**", "/v1/invoices/*", "/v1/small", "/v1/files/*", "/v1/upload"]},
    ]
    creds = {
        "bench": {"upstream": upstream, "allow_insecure_upstream": True,
                  "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                           "secret": "apis/bench#token"},
                  "allow": rules},
        "sink": {"upstream": aux, "allow_insecure_upstream": True,
                 "auth": {"type": "header", "header": "Authorization", "value": "Bearer {secret}",
                          "secret": "apis/bench#token"},
                 "allow": rules},
        "other": {"upstream": "https://api.other.example/v2",
                  "auth": {"type": "header", "header": "X-Api-Key", "value": "{secret}", "secret": "apis/other#token"},
                  "allow": [{"callers": ["search"], "methods": ["GET"], "paths": ["/search/**"]}]},
        "legacy": {"upstream": "https://legacy.example",
                   "auth": {"type": "basic", "username": "apis/legacy#user", "password": "apis/legacy#pass"},
                   "allow": [{"callers": ["ledger"], "paths": ["/soap/*"]}]},
    }
    if with_tokens:
        creds["tokbench"] = {
            "upstream": upstream, "allow_insecure_upstream": True,
            "auth": {"type": "oauth2_client_credentials", "token_url": f"{aux}/token", "client_id": "bench",
                     "client_secret": "apis/oauth#client_secret"},
            "session": token_session or {},
            "allow": rules,
        }
    cfg = {
        "server": {"listen": f"127.0.0.1:{port}", "drain_timeout": "5s"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "secrets": {"backend": "file", "file": {"path": str(store), "key_file": str(key)}},
        "audit": {"path": str(workdir / f"audit-{tag}.log")},
        "leak_guard": "redact",
        "callers": {name: {"token_sha256": hashlib.sha256(tok.encode()).hexdigest()} for name, tok in CALLERS.items()},
        "credentials": creds,
    }
    path = workdir / f"credproxy-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
