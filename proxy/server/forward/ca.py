"""credproxy's own CA (SPEC §10) and the leaf certificates it mints for intercepted hosts.

The CA key is a PEM string held only as a ``Secret`` (it lives in the secret store; ``credproxy ca
init`` writes it there). Leaves are ECDSA P-256, SAN = the host, valid 24 h, and share one
per-process key, so minting a leaf is one signature (~0.1 ms) plus loading it into an
``SSLContext``; both happen through an anonymous in-memory file (``pem_path``), never on disk.
``LeafContexts`` keeps the last ``max_entries`` hosts' contexts (LRU) and mints anew before a
leaf gets old.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import SecretBackendError, StoreError
from proxy.redact.scrubber import SCRUBBER, forward_key_owner, pem_values
from proxy.store.secret import Secret
from proxy.upstream.mtls import pem_path

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(hours=24)
LEAF_BACKDATE = datetime.timedelta(minutes=5)  # callers whose clock is a little behind still accept it
REMINT_AFTER = 12 * 3600.0  # a cached leaf is replaced while it has half its life left
MAX_LEAVES = 1024


class CAError(StoreError):
    """The CA certificate or key cannot be used (message never carries key material)."""


def _no_password() -> bytes:
    return b""  # without a callback OpenSSL would prompt on the terminal for an encrypted key


def generate_ca(common_name: str = "credproxy forward-proxy CA", *, now: datetime.datetime | None = None
                ) -> tuple[bytes, Secret]:
    """A new CA: (certificate PEM, private key PEM as a Secret)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credproxy")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM), Secret(pem)


@dataclass(frozen=True, eq=False)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | object  # any key cryptography can sign with

    def __repr__(self) -> str:
        return f"CA(subject={self.cert.subject.rfc4514_string()!r}, key=[secure])"

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: Secret) -> "CA":
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CAError("forward_proxy.ca.cert_file is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem.reveal().encode(), password=None)
        except (ValueError, TypeError):
            raise CAError("forward_proxy.ca.key is not an unencrypted PEM private key") from None
        if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
                != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CAError("forward_proxy.ca.key does not belong to the certificate in cert_file")
        return cls(cert, key)


async def load_ca(cfg, cache) -> CA:
    """The CA of ``forward_proxy.ca``: certificate from ``cert_file``, key through the secret cache."""
    try:
        cert_pem = await asyncio.to_thread(_read, cfg.cert_file)
    except OSError as exc:
        raise CAError(f"forward_proxy.ca.cert_file {cfg.cert_file} cannot be read ({exc.strerror}; "
                      "run: credproxy ca init)") from None
    try:
        key = await cache.read(cfg.key)
    except SecretBackendError:
        raise CAError(f"forward_proxy.ca.key {cfg.key} cannot be read from the secret store "
                      "(run: credproxy ca init)") from None
    SCRUBBER.hold(forward_key_owner("ca"), *pem_values(key.reveal()))  # before parsing: an error about it is scrubbed too
    return CA.load(cert_pem, key)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class LeafContexts:
    """Server-side ``SSLContext`` per intercepted host, minted from ``ca`` on first use (bounded LRU)."""

    def __init__(self, ca: CA, *, max_entries: int = MAX_LEAVES, clock: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.max_entries = max_entries
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())  # one leaf key per process: minting is one signature
        self._key_pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        SCRUBBER.hold(forward_key_owner("leaf"), *pem_values(self._key_pem.decode()))
        self._ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())
        self._cache: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self._minting: dict[str, asyncio.Future] = {}
        self.minted = 0

    def __len__(self) -> int:
        return len(self._cache)

    async def context(self, host: str) -> ssl.SSLContext:
        """The host's context; a miss is built in a worker thread (loading it into OpenSSL takes a few ms),
        once however many tunnels to that host open at the same time."""
        now = self._clock()
        hit = self._cache.get(host)
        if hit is not None and now - hit[0] < REMINT_AFTER:
            self._cache.move_to_end(host)
            return hit[1]
        pending = self._minting.get(host)
        if pending is None:
            pending = self._minting[host] = asyncio.ensure_future(asyncio.to_thread(self._build, host, now))
            pending.add_done_callback(lambda _f: self._minting.pop(host, None))
        ctx = await asyncio.shield(pending)
        self._cache[host] = (now, ctx)
        self._cache.move_to_end(host)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return ctx

    def leaf_pem(self, host: str, now: float) -> bytes:
        start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(self.ca.cert.subject).public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start - LEAF_BACKDATE).not_valid_after(start + LEAF_VALIDITY)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(self._aki, critical=False)
                .sign(self.ca.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def _build(self, host: str, now: float) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # no HTTP/2 inside the tunnel
        with pem_path(self.leaf_pem(host, now) + self._ca_pem + self._key_pem) as path:
            ctx.load_cert_chain(path, password=_no_password)
        self.minted += 1
        return ctx
