"""The embedded secret store: one AES-256-GCM encrypted file.

Layout: ``b"CPS1" || nonce(12) || AESGCM(key, nonce, json, aad=b"CPS1")``. The JSON
is ``{"paths": {PATH: {"version": N, "fields": {FIELD: VALUE}}}}``. Writes are atomic
(temp file, fsync, rename, fsync dir) with mode 0600 and serialized across
processes with an flock on ``<path>.lock``. A wrong key, a tampered, truncated
or group/world-accessible file is refused whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import json
import os
import secrets as pysecrets
import stat
from contextlib import contextmanager
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConflictError, SecretNotFound, StoreError
from proxy.store.secret import Secret
from proxy.store.base import SecretEntry, SecretStore

MAGIC = b"CPS1"
KEY_ENV = "CREDPROXY_MASTER_KEY"


def generate_key() -> str:
    return base64.b64encode(pysecrets.token_bytes(32)).decode()


def decode_key(text: str, source: str) -> bytes:
    text = text.strip()
    try:
        key = base64.b64decode(text, validate=True) if len(text) != 64 else bytes.fromhex(text)
    except (binascii.Error, ValueError):
        raise StoreError(f"master key from {source} is not base64 or hex") from None
    if len(key) != 32:
        raise StoreError(f"master key from {source} must be 32 bytes (AES-256), got {len(key)}")
    return key


def _check_private(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    if mode & stat.S_IRWXO:
        raise StoreError(f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it")


class FileStore(SecretStore):
    name = "file"

    def __init__(self, path: str | Path, key: bytes) -> None:
        self.path = Path(path)
        self._aead = AESGCM(key)
        self._cache: tuple[tuple[int, int, int], dict] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg, *, base_dir: str | Path | None = None) -> "FileStore":
        return cls(_resolve(cfg.path, base_dir), load_key(cfg, base_dir=base_dir))

    # --- whole-file encryption ---------------------------------------------------

    def _decrypt(self, blob: bytes) -> dict:
        if len(blob) < len(MAGIC) + 12 + 16 or not blob.startswith(MAGIC):
            raise StoreError(f"secret store {self.path} is truncated or not a credproxy store")
        nonce, ct = blob[4:16], blob[16:]
        try:
            plain = self._aead.decrypt(nonce, ct, MAGIC)
        except InvalidTag:
            raise StoreError(f"secret store {self.path} cannot be decrypted: wrong master key, or the file was modified "
                             f"(check secrets.file.key_file and ${KEY_ENV})") from None
        data = json.loads(plain)
        if not isinstance(data, dict) or not isinstance(data.get("paths"), dict):
            raise StoreError(f"secret store {self.path} has an unknown layout")
        return data

    def _encrypt(self, data: dict) -> bytes:
        nonce = os.urandom(12)
        return MAGIC + nonce + self._aead.encrypt(nonce, json.dumps(data, sort_keys=True).encode(), MAGIC)

    def _load(self) -> dict:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise StoreError(f"secret store {self.path} does not exist (run: credproxy secrets init)") from None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache and self._cache[0] == sig:
            return self._cache[1]
        _check_private(self.path, "secret store")
        data = self._decrypt(self.path.read_bytes())
        self._cache = (sig, data)
        return data

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self._encrypt(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._cache = None

    @contextmanager
    def _flock(self):
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- sync API (CLI) -----------------------------------------------------------

    def init(self) -> None:
        if self.path.exists():
            raise StoreError(f"secret store {self.path} already exists; refusing to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._flock():
            self._write({"paths": {}})

    def put_sync(self, path: str, field: str, value: Secret, cas: int | None = None) -> int:
        with self._flock():
            self._cache = None
            data = self._load()
            entry = data["paths"].get(path)
            current = entry["version"] if entry else 0
            if cas is not None and cas != current:
                raise ConflictError(f"{path} is at version {current}, expected {cas}")
            fields = dict(entry["fields"]) if entry else {}
            fields[field] = value.reveal()
            data = {"paths": {**data["paths"], path: {"version": current + 1, "fields": fields}}}
            self._write(data)
            return current + 1

    def get_sync(self, path: str) -> SecretEntry:
        entry = self._load()["paths"].get(path)
        if entry is None:
            raise SecretNotFound(f"secret path missing: {path}")
        return SecretEntry({k: Secret(v) for k, v in entry["fields"].items()}, entry["version"])

    def listing(self) -> dict[str, list[str]]:
        return {p: sorted(e["fields"]) for p, e in sorted(self._load()["paths"].items())}

    # --- async API (proxy) --------------------------------------------------------

    async def get(self, path: str) -> SecretEntry:
        return await asyncio.to_thread(self.get_sync, path)

    async def put(self, path: str, field: str, value: Secret, *, cas: int | None = None) -> int:
        async with self._lock:
            return await asyncio.to_thread(self.put_sync, path, field, value, cas)

    async def start(self) -> None:
        await asyncio.to_thread(self._load)  # refuse a bad store before serving


def _resolve(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def _key_hint(cfg, base_dir) -> str:
    """What to do about a key that is missing or does not open the store: ``init`` only for a new store."""
    if _resolve(cfg.path, base_dir).exists():
        return (f"the store {_resolve(cfg.path, base_dir)} exists: check secrets.file.key_file, or set "
                f"${KEY_ENV} to its key (secrets init would not help: it never replaces a store)")
    return "run: credproxy secrets init"


def load_key(cfg, *, base_dir: str | Path | None = None) -> bytes:
    env = os.environ.get(KEY_ENV)
    if env:
        return decode_key(env, f"${KEY_ENV}")
    if not cfg.key_file:
        raise StoreError(f"no master key: set secrets.file.key_file or ${KEY_ENV}")
    path = _resolve(cfg.key_file, base_dir)
    try:
        _check_private(path, "master key file")
        return decode_key(path.read_text(), str(path))
    except FileNotFoundError:
        raise StoreError(f"master key file {path} does not exist; {_key_hint(cfg, base_dir)}") from None


def init_store(cfg, *, base_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """``secrets init``: a new key file (unless the key comes from the environment) and an empty store.

    Everything is checked before anything is written, and a key written for a store that then cannot be
    created is removed again: a refused init leaves the files as they were. Returns (store, new key file)."""
    store_path = _resolve(cfg.path, base_dir)
    if store_path.exists():
        raise StoreError(f"secret store {store_path} already exists; refusing to overwrite it (nothing was written)")
    env = os.environ.get(KEY_ENV)
    if env:
        FileStore(store_path, decode_key(env, f"${KEY_ENV}")).init()
        return store_path, None
    if not cfg.key_file:
        raise StoreError(f"no master key: set secrets.file.key_file or ${KEY_ENV}")
    key_path = _resolve(cfg.key_file, base_dir)
    if key_path.exists():
        raise StoreError(f"master key file {key_path} already exists; refusing to overwrite it (nothing was written)")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    try:
        FileStore(store_path, decode_key(key, str(key_path))).init()
    except BaseException:
        key_path.unlink(missing_ok=True)  # its store was not made: a key for nothing would only mislead
        raise
    return store_path, key_path
