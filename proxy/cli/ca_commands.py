"""``credproxy ca init|show -c CONFIG``: the forward proxy's CA (SPEC §10).

``init`` writes the key into the configured secret store (file or Vault, through the store's own
write path, compare-and-set so a concurrent writer cannot be overwritten) and the certificate to
``forward_proxy.ca.cert_file``; it refuses when either exists. ``show`` prints the certificate.
Neither ever prints the key.
"""

from __future__ import annotations

import asyncio
import os
import sys

from proxy.cli.config_file import load_or_exit
from proxy.errors import ConflictError, SecretBackendError, SecretNotFound, StoreError


def _forward(args):
    cfg = load_or_exit(args.config)
    if cfg.forward_proxy is None:
        print(f"{args.config}: no forward_proxy section (see README, Agents and unmodified clients)", file=sys.stderr)
        raise SystemExit(1)
    return cfg


async def _store_key(cfg, key) -> None:
    from proxy.store import open_store

    ref = cfg.forward_proxy.ca.key
    store = open_store(cfg.secrets)
    await store.start()
    try:
        try:
            entry = await store.get(ref.path)
        except SecretNotFound:
            version = 0
        else:
            if ref.field in entry.fields:
                raise ConflictError(f"{ref} already holds a value; refusing to overwrite it "
                                    "(to rotate, point ca.key at a new reference: see README)")
            version = entry.version
        await store.put(ref.path, ref.field, key, cas=version)
    finally:
        await store.close()


def cmd_ca_init(args) -> int:
    from proxy.server.forward.ca import generate_ca

    cfg = _forward(args)
    cert_file = cfg.forward_proxy.ca.cert_file
    if os.path.exists(cert_file):
        print(f"{cert_file} already exists; refusing to overwrite it", file=sys.stderr)
        return 1
    cert_pem, key = generate_ca()
    try:
        asyncio.run(_store_key(cfg, key))
    except (StoreError, SecretBackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        fd = os.open(cert_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        print(f"{cert_file}: cannot be created ({exc.strerror}); the key was stored at "
              f"{cfg.forward_proxy.ca.key}: remove it before trying again", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(cert_pem)
    print(f"stored the CA key at {cfg.forward_proxy.ca.key} ({cfg.secrets.backend} store) "
          f"and the certificate at {cert_file}")
    print("callers trust it with: credproxy ca show -c CONFIG > credproxy-ca.pem")
    return 0


def cmd_ca_show(args) -> int:
    from cryptography import x509

    cfg = _forward(args)
    cert_file = cfg.forward_proxy.ca.cert_file
    try:
        data = open(cert_file, "rb").read()
        x509.load_pem_x509_certificate(data)
    except OSError as exc:
        print(f"{cert_file}: cannot be read ({exc.strerror}; run: credproxy ca init)", file=sys.stderr)
        return 1
    except ValueError:
        print(f"{cert_file}: not a PEM certificate", file=sys.stderr)
        return 1
    sys.stdout.write(data.decode("ascii"))
    return 0


def add_ca_commands(sub) -> None:
    ca = sub.add_parser("ca", help="the forward proxy's certificate authority")
    csub = ca.add_subparsers(dest="action", required=True)
    a = csub.add_parser("init", help="create the CA: key into the secret store, certificate to ca.cert_file")
    a.add_argument("-c", "--config", required=True)
    a.set_defaults(fn=cmd_ca_init)
    a = csub.add_parser("show", help="print the CA certificate (PEM) for callers to trust")
    a.add_argument("-c", "--config", required=True)
    a.set_defaults(fn=cmd_ca_show)
