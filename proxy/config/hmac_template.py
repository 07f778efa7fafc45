"""The template grammar of ``hmac`` auth: the canonical string and the header values.

``{field}`` placeholders from a fixed set, ``{{`` and ``}}`` for literal braces. Parsed
here so a config with a bad template is refused at load; ``proxy.inject.hmacsign``
renders the parts.
"""

from __future__ import annotations

import re

CANONICAL_FIELDS = frozenset({"method", "host", "path", "query", "path_query", "timestamp", "body", "body_sha256",
                              "key_id"})
HEADER_FIELDS = frozenset({"signature", "timestamp", "key_id"})
_TOKEN = re.compile(r"\{\{|\}\}|\{([a-z_]*)\}|[{}]")

Parts = tuple[str | tuple[str], ...]  # literal text, or (field,) for a placeholder


def parse(template: str, allowed: frozenset[str]) -> Parts:
    """Split a template into literals and placeholders; ValueError names what is wrong."""
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        parts.append(template[pos:m.start()])
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif m.group(1) in allowed:
            parts.append((m.group(1),))
        else:
            # The message names no part of the template: config problems never echo configured values.
            raise ValueError("unknown placeholder or unpaired brace; allowed: "
                             + ", ".join("{" + f + "}" for f in sorted(allowed)) + ", {{ and }} for braces")
        pos = m.end()
    parts.append(template[pos:])
    return tuple(p for p in parts if p != "")


def fields(parts: Parts) -> set[str]:
    return {p[0] for p in parts if isinstance(p, tuple)}
