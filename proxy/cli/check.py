"""``credproxy check``: every problem of a config file in one run, then what each credential will send.

Beyond the file itself, the secret store is opened read-only (the file store, or Vault with credproxy's
own login): a key or login that does not work, and each reference the store does not hold, are problems
too (the proxy would start not ready and answer 503).
Never prints a secret value: only references, field paths and templates.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys

from proxy.auth_types import AUTH_TYPES, injector_for
from proxy.config import models as config_mod
from proxy.config.references import secret_references
from proxy.errors import SecretBackendError, SecretNotFound, StoreError


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
    return 0


def _report(problems: list[config_mod.Problem]) -> int:
    for p in problems:
        print(str(p), file=sys.stderr)
    return 1


def _sends(auth) -> str:
    """What the credential adds to a request, as templates: ``{secret}`` stands for the value, never shown."""
    note = " ({secret} is the token)" if AUTH_TYPES[auth.type].provider is not None else ""
    return injector_for(auth).sends + note


def store_problems(examined: config_mod.Examined) -> list[config_mod.Problem]:
    """The secret store opened read-only: each reference it cannot resolve, with the command that adds it."""
    cfg = examined.cfg
    if not examined.as_written(("secrets",)):
        return []  # a broken secrets section is its own problem already
    refs = [(loc, ref) for loc, ref in secret_references(cfg) if examined.as_written(loc)]
    if cfg.secrets.backend == "vault":
        if cfg.secrets.vault is None:
            return []  # reported by the config checks
        held, problems = asyncio.run(_vault_held(examined, {ref.path for _, ref in refs}))
    else:
        held, problems = _file_held(examined)
    if problems:
        return problems
    out = []
    for loc, ref in refs:
        fields = held.get(ref.path)
        if isinstance(fields, Exception):
            out.append(examined.problem(loc, f"{ref} cannot be read: {fields}"))
        elif ref.field not in (fields or ()):
            where = "vault" if cfg.secrets.backend == "vault" else "the secret store"
            out.append(examined.problem(loc, f"{ref} is not in {where}; add it with: "
                                             f"{_put_command(examined, ref, path_exists=fields is not None)}"))
    return out


def _put_command(examined: config_mod.Examined, ref, *, path_exists: bool) -> str:
    """The command that stores ``ref``'s value, read from stdin (never from argv)."""
    vault = examined.cfg.secrets.vault if examined.cfg.secrets.backend == "vault" else None
    if vault is None:
        return shlex.join(["credproxy", "secrets", "put", "-c", examined.filename, ref.path, ref.field])
    # kv put replaces the path's other fields; kv patch keeps them (and needs the path to exist)
    verb = "patch" if path_exists else "put"
    return shlex.join(["vault", "kv", verb, f"-mount={vault.kv_mount}", ref.path, f"{ref.field}=-"])


def _file_held(examined: config_mod.Examined):
    from proxy.store.file import FileStore, load_key

    file_cfg = examined.cfg.secrets.file
    try:
        key = load_key(file_cfg)
    except StoreError as exc:
        return {}, [examined.problem(("secrets", "file", "key_file"), str(exc))]
    try:
        return {path: set(fields) for path, fields in FileStore(file_cfg.path, key).listing().items()}, []
    except StoreError as exc:
        return {}, [examined.problem(("secrets", "file", "path"), str(exc))]


async def _vault_held(examined: config_mod.Examined, paths: set[str]):
    """path -> its field names (None: no such path; an exception: it could not be read)."""
    quiet = logging.getLogger("credproxy")  # the store's "retrying in the background" is serve's story
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return await _read_vault(examined, paths)
    finally:
        quiet.setLevel(level)


async def _read_vault(examined: config_mod.Examined, paths: set[str]):
    from proxy.store.vault import VaultStore

    store = VaultStore(examined.cfg.secrets.vault)
    try:
        await store.start()
    except StoreError as exc:  # the login was refused, or its credentials cannot be read
        return {}, [examined.problem(("secrets", "vault", "auth"), str(exc))]
    try:
        if store.keeper.token is None:
            return {}, [examined.problem(("secrets", "vault", "address"), "vault did not answer, so the secret "
                                         "references were not checked (--config-only checks the file alone)")]
        held: dict = {}
        for path in sorted(paths):
            try:
                held[path] = set((await store.get(path)).fields)
            except SecretNotFound:
                held[path] = None
            except SecretBackendError as exc:
                held[path] = exc
        return held, []
    finally:
        await store.close()
