"""``credproxy check``: every problem of a config file in one run, then what each credential will send.

Beyond the file itself, the embedded store is opened read-only: a key that cannot be read and each
reference the store does not hold are problems too (the proxy would start not ready and answer 503).
Never prints a secret value: only references, field paths and templates.
"""

from __future__ import annotations

import shlex
import sys

from proxy.config import models as config_mod
from proxy.config.references import secret_references
from proxy.errors import StoreError


def run(config_path: str, *, open_store: bool = True) -> int:
    try:
        examined = config_mod.examine(config_mod.read(config_path), config_path)
    except config_mod.ConfigInvalid as exc:
        return _report(exc.problems)
    problems = examined.problems + (store_problems(examined) if open_store else [])
    if problems:
        return _report(sorted(problems, key=lambda p: p.line or 0))
    cfg = examined.cfg
    print(f"{config_path}: ok ({len(cfg.credentials)} credentials, {len(cfg.callers or {})} callers)")
    for name, cred in cfg.credentials.items():
        print(f"  {name} ({cred.auth.type}): {_sends(cred.auth)}")
        if not cred.allow:
            print(f"  {name}: no allow rules: every request is denied")
    if cfg.secrets.backend == "vault":
        print("  (secret references are read from vault when serve starts; check does not log in)")
    return 0


def _report(problems: list[config_mod.Problem]) -> int:
    for p in problems:
        print(str(p), file=sys.stderr)
    return 1


def _sends(auth) -> str:
    """What the credential adds to a request, as templates: ``{secret}`` stands for the value, never shown."""
    if hasattr(auth, "header") and hasattr(auth, "value"):
        note = " ({secret} is the token)" if auth.type not in ("header",) else ""
        return f"sends {auth.header}: {auth.value}{note}"
    if auth.type == "query":
        return f"sends ?{auth.param}={{secret}}"
    if auth.type == "basic":
        return "sends Authorization: Basic base64(username:password)"
    return "signs each request"


def store_problems(examined: config_mod.Examined) -> list[config_mod.Problem]:
    """The file store opened read-only: each reference it cannot resolve, with the command that adds it."""
    from proxy.store.file import FileStore, load_key

    cfg = examined.cfg
    if cfg.secrets.backend != "file" or not examined.as_written(("secrets",)):
        return []  # a vault is read when serve starts; a broken secrets section is its own problem already
    try:
        key = load_key(cfg.secrets.file)
    except StoreError as exc:
        return [examined.problem(("secrets", "file", "key_file"), str(exc))]
    try:
        held = FileStore(cfg.secrets.file.path, key).listing()
    except StoreError as exc:
        return [examined.problem(("secrets", "file", "path"), str(exc))]
    out = []
    for loc, ref in secret_references(cfg):
        if examined.as_written(loc) and ref.field not in held.get(ref.path, ()):
            command = shlex.join(["credproxy", "secrets", "put", "-c", examined.filename, ref.path, ref.field])
            out.append(examined.problem(loc, f"{ref} is not in the secret store; add it with: {command}"))
    return out
