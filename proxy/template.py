"""Value templates: ``"Bearer {secret}"``, ``"<u>{secret:sf/login#username}</u>"``.

A template is parsed once at config load into literal text and placeholders;
rendering takes the secrets explicitly, so a template never holds a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.store.secret import Secret, SecretRef

_PLACEHOLDER = re.compile(r"\{secret(?::([^{}]+))?\}")

SELF = "secret"  # the placeholder ``{secret}``: the auth type's own secret or token


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[str | SecretRef | None, ...]  # None stands for ``{secret}``

    @classmethod
    def parse(cls, text: str) -> "Template":
        parts: list[str | SecretRef | None] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append(SecretRef.parse(m.group(1)) if m.group(1) else None)
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return cls(tuple(parts))

    @property
    def refs(self) -> tuple[SecretRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, SecretRef))

    @property
    def uses_self(self) -> bool:
        return any(p is None for p in self.parts)

    def render(self, own: Secret | None = None, refs: Mapping[SecretRef, Secret] | None = None) -> str:
        out: list[str] = []
        for p in self.parts:
            if p is None:
                if own is None:
                    raise ValueError("template needs {secret} but none was given")
                out.append(own.reveal())
            elif isinstance(p, SecretRef):
                out.append((refs or {})[p].reveal())
            else:
                out.append(p)
        return "".join(out)

    def __str__(self) -> str:
        return "".join("{secret}" if p is None else f"{{secret:{p}}}" if isinstance(p, SecretRef) else p for p in self.parts)
