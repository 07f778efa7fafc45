"""Upstream mutual TLS: the client certificate a credential presents to its upstream.

The certificate and key are secrets (``upstream_tls.client_cert`` / ``client_key``),
read through the secret cache like any other and turned into an ``ssl.SSLContext``.

Python's ``ssl`` loads a certificate chain only from a path, so the PEM is handed to
OpenSSL through an anonymous in-memory file (``memfd_create``, opened as
``/proc/self/fd/N``) that has no name on any filesystem. Where that is unavailable,
it goes to a 0600 file in a fresh 0700 directory (under /dev/shm when present, so it
stays in memory) that is removed as soon as OpenSSL has read it. Either way nothing
is left behind once the context is built.

Rotation: each request checks, from the cache, that the certificate and key are still
the ones loaded, and a change builds a new context; the cache's change notice does so
at once, so the reported expiry is current. The upstream client pools connections per SSL
context, so connections made with the old certificate are simply not reused. A new pair that
cannot be loaded (a certificate rotated before its key, say) is reported and the last
good certificate stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone

from proxy.config.models import UpstreamTLSConfig
from proxy.errors import CredentialUnavailable, SecretBackendError
from proxy.observe.metrics import ScrapeTimeGauge
from proxy.redact.scrubber import SCRUBBER, client_key_owner, pem_values
from proxy.store.secret import Secret, SecretRef
from proxy.store.cache import SecretCache
from proxy.upstream.client import ssl_context

log = logging.getLogger("credproxy.upstream_tls")


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_after: float  # epoch seconds


def cert_info(pem: str) -> CertInfo:
    """Subject and expiry of the first (leaf) certificate in ``pem``."""
    from cryptography import x509  # only with a client certificate configured (~3 MiB at import otherwise not taken)

    cert = x509.load_pem_x509_certificate(pem.encode())
    return CertInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def _private_file(data: bytes, base_dir: str | None) -> Iterator[str]:
    if base_dir is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base_dir = "/dev/shm"
    directory = tempfile.mkdtemp(prefix="credproxy-tls-", dir=base_dir)  # mode 0700
    path = os.path.join(directory, "client.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(directory)


def _memfd(use_memfd: bool) -> int | None:
    if not (use_memfd and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")):
        return None
    try:
        return os.memfd_create("credproxy-upstream-tls", os.MFD_CLOEXEC)
    except OSError:  # may be blocked (seccomp): fall back to the private file
        return None


@contextmanager
def pem_path(data: bytes, *, use_memfd: bool = True, base_dir: str | None = None) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, gone when the block ends."""
    fd = _memfd(use_memfd)
    if fd is None:
        with _private_file(data, base_dir) as path:
            yield path
        return
    try:
        _write_all(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def build_context(ca_file: str | None, cert: Secret, key: Secret, **pem_opts) -> ssl.SSLContext:
    ctx = ssl_context(ca_file)
    data = (cert.reveal().strip() + "\n" + key.reveal().strip() + "\n").encode()
    with pem_path(data, **pem_opts) as path:
        ctx.load_cert_chain(path, password=_no_password)
    return ctx


@dataclass(frozen=True)
class _Loaded:
    cert: Secret
    key: Secret
    ctx: ssl.SSLContext
    info: CertInfo


def _same(a: Secret, b: Secret) -> bool:
    return a is b or a == b


class ClientTLS:
    """One credential's client certificate: loaded on demand, rebuilt on rotation."""

    def __init__(self, credential: str, cfg: UpstreamTLSConfig, cache: SecretCache, *,
                 expiry_gauge: ScrapeTimeGauge | None = None, clock: Callable[[], float] = time.time,
                 **pem_opts) -> None:
        if cfg.client_cert is None or cfg.client_key is None:
            raise ValueError("upstream_tls without client_cert/client_key needs no ClientTLS")
        self.credential = credential
        self._ca_file = cfg.ca_file
        self._cert_ref: SecretRef = cfg.client_cert
        self._key_ref: SecretRef = cfg.client_key
        self._cache = cache
        self._gauge = expiry_gauge
        self._clock = clock
        self._pem_opts = pem_opts
        self._loaded: _Loaded | None = None
        self._rejected: tuple[Secret, Secret] | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self.last_error: str | None = None

    def refs(self) -> set[SecretRef]:
        return {self._cert_ref, self._key_ref}

    async def context(self) -> ssl.SSLContext:
        """The SSL context to use now; raises ``CredentialUnavailable`` when there is none."""
        try:
            cert = await self._cache.read(self._cert_ref)
            key = await self._cache.read(self._key_ref)
        except SecretBackendError as exc:
            self.last_error = type(exc).__name__
            raise CredentialUnavailable("upstream client certificate unreadable", reason="secret_unavailable",
                                        retry_after=5) from None
        loaded = self._loaded
        if loaded is not None and _same(loaded.cert, cert) and _same(loaded.key, key):
            return loaded.ctx
        if self._rejected is not None and _same(self._rejected[0], cert) and _same(self._rejected[1], key):
            return self._last_good()
        # The key the store holds now and the one still in use are both scrubbed from logs.
        SCRUBBER.hold(client_key_owner(self.credential), *pem_values(key.reveal()),
                      *(pem_values(loaded.key.reveal()) if loaded is not None else ()))
        try:
            ctx = build_context(self._ca_file, cert, key, **self._pem_opts)
            info = cert_info(cert.reveal())
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._rejected = (cert, key)
            self.last_error = "client_cert_invalid"
            log.error("upstream client certificate or key cannot be loaded",
                      extra={"credential": self.credential, "error": type(exc).__name__,
                             "keeps_previous": loaded is not None})
            return self._last_good()
        self._loaded = _Loaded(cert, key, ctx, info)
        SCRUBBER.hold(client_key_owner(self.credential), *pem_values(key.reveal()))
        self._rejected = None
        self.last_error = None
        log.info("upstream client certificate loaded",
                 extra={"credential": self.credential, "subject": info.subject, "not_after": _iso(info.not_after)})
        return ctx

    def _last_good(self) -> ssl.SSLContext:
        if self._loaded is not None:
            return self._loaded.ctx
        raise CredentialUnavailable("upstream client certificate invalid", reason="client_cert_invalid",
                                    retry_after=30)

    def expires_in(self) -> float | None:
        return self._loaded.info.not_after - self._clock() if self._loaded else None

    def describe(self) -> dict:
        info = self._loaded.info if self._loaded else None
        cert = None if info is None else {"subject": info.subject, "not_after": _iso(info.not_after),
                                          "expires_in_s": round(info.not_after - self._clock())}
        return {"client_cert": cert, "last_error": self.last_error}

    def _on_change(self, path: str) -> None:
        if self._closed or path not in (self._cert_ref.path, self._key_ref.path):
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        with suppress(CredentialUnavailable):  # already logged and kept in last_error
            await self.context()

    async def start(self) -> None:
        self._cache.on_change(self._on_change)
        if self._gauge is not None:
            self._gauge.set_function(self.expires_in, label=self.credential)
        try:
            await self.context()
        except CredentialUnavailable:
            log.warning("upstream client certificate not loaded yet", extra={"credential": self.credential})

    async def close(self) -> None:
        self._closed = True
        self._cache.off_change(self._on_change)
        if self._gauge is not None:
            self._gauge.remove(self.expires_in, label=self.credential)
        for task in list(self._tasks):
            task.cancel()
        SCRUBBER.release(client_key_owner(self.credential))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
