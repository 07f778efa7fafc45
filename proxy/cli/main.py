"""Command line: serve, check, secrets, callers, ca, schema, audit. Never prints a secret value."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets as pysecrets
import sys

from proxy.cli.config_file import load_or_exit
from proxy.config import models as config_mod
from proxy.errors import AdminTokenError, ListenError, StoreError


def cmd_serve(args) -> int:
    from proxy.observe import log_setup as logs
    from proxy.app import run

    logs.setup(args.log_level)
    load_or_exit(args.config)  # report problems in the same form as `check` before anything starts
    options = {}
    if args.worker_index is not None:
        from proxy.lifecycle.workers import worker_options

        options = worker_options(args.worker_index, args.worker_admin)
    elif args.workers != 1:
        from proxy.lifecycle.workers import supervise

        return supervise(args.config, args.workers, log_level=args.log_level)
    try:
        return run(args.config, **options)
    except (StoreError, AdminTokenError, ListenError) as exc:
        import logging

        logging.getLogger("credproxy").error("cannot start: %s", exc)
        return 1


def cmd_check(args) -> int:
    from proxy.cli import check

    return check.run(args.config, open_store=not args.config_only)


def _file_store(args):
    from proxy.store.file import FileStore

    cfg = load_or_exit(args.config)
    if cfg.secrets.backend != "file":
        print("secrets commands manage the embedded file store; this config uses the vault backend", file=sys.stderr)
        raise SystemExit(1)
    return cfg, FileStore


def cmd_secrets(args) -> int:
    from proxy.store.secret import Secret
    from proxy.store.file import FileStore, init_store

    cfg, _ = _file_store(args)
    try:
        if args.action == "init":
            store_path, key_path = init_store(cfg.secrets.file)
            print(f"created {store_path}" + (f" and key {key_path} (mode 0600; back it up)" if key_path else ""))
            return 0
        store = FileStore.from_config(cfg.secrets.file)
        if args.action == "put":
            if sys.stdin.isatty():
                print(f"value for {args.path}#{args.field} (end with Enter): ", end="", file=sys.stderr, flush=True)
            value = sys.stdin.readline() if sys.stdin.isatty() else sys.stdin.read()
            value = value[:-1] if value.endswith("\n") else value
            value = value[:-1] if value.endswith("\r") else value
            if not value:
                print("refusing to store an empty value (the value is read from stdin)", file=sys.stderr)
                return 1
            from proxy.store.secret import SecretRef

            try:
                SecretRef.parse(f"{args.path}#{args.field}")
            except ValueError as exc:
                print(f"{args.path}#{args.field}: {exc}", file=sys.stderr)
                return 1
            version = store.put_sync(args.path, args.field, Secret(value))
            print(f"stored {args.path}#{args.field} (version {version})")
            return 0
        for path, fields in store.listing().items():
            print(f"{path}: {', '.join(fields)}")
        return 0
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_callers_new(args) -> int:
    token = "cp_" + pysecrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"caller token for {args.name} (shown once; give it to the service, store it as a secret):")
    print(f"  {token}")
    print("config snippet (only the hash is kept):")
    print("callers:")
    print(f"  {args.name}:")
    print(f'    token_sha256: "{digest}"')
    return 0


def cmd_schema(args) -> int:
    print(json.dumps(config_mod.json_schema(), indent=2))
    return 0


def cmd_audit_verify(args) -> int:
    from proxy.observe.audit import verify

    try:
        problems = verify(args.file)
    except OSError as exc:
        print(f"{args.file}: cannot be read ({exc.strerror})", file=sys.stderr)
        return 1
    for p in problems:
        print(f"{args.file}: {p}")
    if problems:
        return 1
    print(f"{args.file}: chain intact")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credproxy", description="named-credential secrets proxy")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy in the foreground")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N worker processes sharing the listening ports (SO_REUSEPORT); see README, Performance")
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the --workers supervisor
    s.add_argument("--worker-admin", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("check", help="validate a config file without starting (and that the store holds its secrets)")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--config-only", action="store_true",
                   help="check the file alone, without opening the secret store (CI, before a deploy)")
    s.set_defaults(fn=cmd_check)

    sec = sub.add_parser("secrets", help="manage the embedded encrypted file store")
    ssub = sec.add_subparsers(dest="action", required=True)
    for action in ("init", "list"):
        a = ssub.add_parser(action)
        a.add_argument("-c", "--config", required=True)
        a.set_defaults(fn=cmd_secrets)
    a = ssub.add_parser("put", help="store the value read from stdin at PATH#FIELD")
    a.add_argument("-c", "--config", required=True)
    a.add_argument("path")
    a.add_argument("field")
    a.set_defaults(fn=cmd_secrets)

    cal = sub.add_parser("callers", help="caller tokens")
    csub = cal.add_subparsers(dest="action", required=True)
    a = csub.add_parser("new", help="generate a caller token; prints it once with its config snippet")
    a.add_argument("name")
    a.set_defaults(fn=cmd_callers_new)

    s = sub.add_parser("schema", help="print the JSON Schema of the config file")
    s.set_defaults(fn=cmd_schema)

    aud = sub.add_parser("audit", help="audit log tools")
    asub = aud.add_subparsers(dest="action", required=True)
    a = asub.add_parser("verify", help="check the audit log's hash chain")
    a.add_argument("file")
    a.set_defaults(fn=cmd_audit_verify)

    from proxy.cli.ca_commands import add_ca_commands

    add_ca_commands(sub)
    try:
        from proxy.cli.admin_commands import add_admin_commands
    except ImportError:
        pass
    else:
        add_admin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
