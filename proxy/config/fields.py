"""Annotated field types shared by the config models: durations, sizes, references, listeners."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from proxy.store.secret import SecretRef
from proxy.template import Template

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "k": 1024, "K": 1024, "KiB": 1024, "KB": 1000, "M": 1 << 20, "MiB": 1 << 20,
               "MB": 10**6, "G": 1 << 30, "GiB": 1 << 30, "GB": 10**9}


def parse_duration(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("must be a duration such as 250ms, 30s, 5m or 2h")
    if isinstance(v, (int, float)):
        seconds = float(v)
    else:
        m = _DURATION.match(str(v))
        if not m:
            raise ValueError("must be a duration such as 250ms, 30s, 5m or 2h")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError("must be a size such as 1048576, 512KiB or 1GiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


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


Duration = Annotated[float, BeforeValidator(parse_duration),
                     WithJsonSchema({"type": ["string", "number"], "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)$",
                                     "description": "duration: 250ms, 30s, 5m, 2h (or seconds)"})]
Size = Annotated[int, BeforeValidator(parse_size),
                 WithJsonSchema({"type": ["string", "integer"], "description": "bytes, or 512KiB, 1MiB, 1GiB"})]
Ref = Annotated[SecretRef, BeforeValidator(_ref), PlainSerializer(str),
                WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_.\-/]+#[A-Za-z0-9_.\-]+$",
                                "description": "secret reference PATH#FIELD"})]
TemplateStr = Annotated[Template, BeforeValidator(_template), PlainSerializer(str),
                        WithJsonSchema({"type": "string", "description": "template with {secret} / {secret:PATH#FIELD}"})]
ListenAddr = Annotated[Listen, BeforeValidator(Listen.parse), PlainSerializer(str),
                       WithJsonSchema({"type": "string", "description": "host:port or unix:/path"})]
