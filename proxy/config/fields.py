"""Annotated field types shared by the config models: durations, sizes, references, listeners,
certificate subjects."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (AfterValidator, BeforeValidator, ByteSize, PlainSerializer, ValidationError, ValidationInfo,
                      ValidatorFunctionWrapHandler, WithJsonSchema, WrapValidator)

from proxy.store.secret import SecretRef
from proxy.template import Template

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_HINT = "must be a duration such as 250ms, 30s, 5m or 2h"

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

FROM_FILE = {"source": "file"}
"""Validation context of a config file (``proxy.config.models.parse``): there a duration must name its unit."""


def parse_duration(v: Any, info: ValidationInfo) -> float:
    if isinstance(v, bool):
        raise ValueError(_DURATION_HINT)
    if isinstance(v, (int, float)):
        if info.context == FROM_FILE:
            # ``drain_timeout: 5`` could mean seconds or minutes to whoever reads the file: it must say.
            raise ValueError(f"a number alone has no unit: write {v:g}s (or 250ms, 5m, 2h)")
        seconds = float(v)  # from code: seconds
    else:
        m = _DURATION.match(str(v))
        if not m:
            raise ValueError(_DURATION_HINT)
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the file would say them: ``20s``, ``5m``, ``1h``, ``250ms``."""
    for unit in ("d", "h", "m", "s"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return "0s" if not seconds else f"{seconds * 1000:g}ms"


def _size(v: Any, handler: ValidatorFunctionWrapHandler) -> int:
    """pydantic's ByteSize (bytes, ``512KiB``, ``1MiB``, ``1GiB``, ``1MB``...) as a plain int, in our words."""
    if isinstance(v, bool):
        raise ValueError("must be a size such as 1048576, 512KiB or 1GiB")
    try:
        return int(handler(v))
    except ValidationError:
        raise ValueError("must be a size such as 1048576, 512KiB or 1GiB") from None


def _network(v: Any) -> IPNet:
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return v
    try:
        return ipaddress.ip_network(str(v))
    except ValueError:
        raise ValueError("must be an IP address or network such as 10.1.0.0/16 (no host bits set)") from None


def _ref(v: Any) -> SecretRef:
    if isinstance(v, SecretRef):
        return v
    if not isinstance(v, str):
        raise ValueError("must be a secret reference PATH#FIELD")
    return SecretRef.parse(v)


def _template(v: Any) -> Template:
    if isinstance(v, Template):
        return v
    if not isinstance(v, str):
        raise ValueError("must be a string template")
    return Template.parse(v)


SubjectAttributes = frozenset[tuple[str, str]]


def subject_attributes(text: str) -> SubjectAttributes:
    """``{("CN", "billing"), ("O", "acme")}`` from an RFC 4514 name such as ``"CN=billing,O=acme"``
    (order-free: the certificate's subject must carry these attributes, and may carry more)."""
    # cryptography's X.509 module is imported only when a config names a certificate subject (~3 MiB at import a
    # proxy without one does not take on).
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    # RFC 4514 names cryptography does not know by a short name, spelt as the ssl module's peer dict maps them.
    names = {"EMAILADDRESS": NameOID.EMAIL_ADDRESS, "SERIALNUMBER": NameOID.SERIAL_NUMBER}
    keys = {oid: name for name, oid in names.items()}
    try:
        name = x509.Name.from_rfc4514_string(text, names)
    except ValueError:
        raise ValueError("cert_subject must be an RFC 4514 name such as CN=billing,O=acme") from None
    out = frozenset((keys.get(a.oid, a.rfc4514_attribute_name), str(a.value)) for a in name)
    if not out:
        raise ValueError("cert_subject must be an RFC 4514 name such as CN=billing,O=acme")
    return out


def _subject(v: str) -> str:
    subject_attributes(v)
    return v


@dataclass(frozen=True, slots=True)
class Listen:
    """``host:port`` or ``unix:/path``."""

    host: str | None = None
    port: int | None = None
    unix: str | None = None

    @classmethod
    def parse(cls, v: Any) -> "Listen":
        if isinstance(v, Listen):
            return v
        text = str(v)
        if text.startswith("unix:"):
            if len(text) <= 5:
                raise ValueError("unix listener needs a path: unix:/path/to.sock")
            return cls(unix=text[5:])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port or unix:/path")
        host = host.strip("[]") or "0.0.0.0"
        return cls(host=host, port=int(port))

    @property
    def is_loopback(self) -> bool:
        if self.unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration),
                     WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)$",
                                     "description": "duration: 250ms, 30s, 5m, 2h (the unit is required)"})]
Size = Annotated[ByteSize, WrapValidator(_size),
                 WithJsonSchema({"type": ["string", "integer"], "description": "bytes, or 512KiB, 1MiB, 1GiB"})]
Network = Annotated[IPNet, BeforeValidator(_network),
                    WithJsonSchema({"type": "string", "description": "IP address or CIDR network"})]
Ref = Annotated[SecretRef, BeforeValidator(_ref), PlainSerializer(str),
                WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_.\-/]+#[A-Za-z0-9_.\-]+$",
                                "description": "secret reference PATH#FIELD"})]
TemplateStr = Annotated[Template, BeforeValidator(_template), PlainSerializer(str),
                        WithJsonSchema({"type": "string", "description": "template with {secret} / {secret:PATH#FIELD}"})]
ListenAddr = Annotated[Listen, BeforeValidator(Listen.parse), PlainSerializer(str),
                       WithJsonSchema({"type": "string", "description": "host:port or unix:/path"})]
CertSubject = Annotated[str, AfterValidator(_subject),
                        WithJsonSchema({"type": "string", "description": "RFC 4514 name: CN=billing,O=acme"})]
