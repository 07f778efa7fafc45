"""Typed secret values and references.

A ``Secret`` never shows its value in ``repr``/``str``/format/pickle; the value
is taken out with :meth:`Secret.reveal` at the one place that injects it.
A ``SecretRef`` (``PATH#FIELD``) names where a value lives; it is not secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REF = re.compile(r"^(?P<path>[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*)#(?P<field>[A-Za-z0-9_.\-]+)$")


class Secret:
    """A secret value whose printed forms are always redacted."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret value must be str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret([REDACTED])"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac

        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self):  # never pickled by accident
        raise TypeError("Secret cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class SecretRef:
    """``PATH#FIELD``: a field of a secret in the configured backend."""

    path: str
    field: str

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        m = _REF.match(text or "")
        if not m or ".." in m.group("path").split("/"):
            raise ValueError("must be a secret reference PATH#FIELD (letters, digits, '_', '-', '.', '/')")
        return cls(m.group("path"), m.group("field"))

    def __str__(self) -> str:
        return f"{self.path}#{self.field}"
