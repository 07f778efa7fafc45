"""Where a config refers to secrets: every ``PATH#FIELD`` with the field path that names it."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel

from proxy.store.secret import SecretRef
from proxy.template import Template


def secret_references(cfg: BaseModel) -> list[tuple[tuple, SecretRef]]:
    """``(field path, reference)`` for every reference field and ``{secret:PATH#FIELD}`` placeholder, in
    the order of the file (the path of a placeholder is its template's field)."""
    return list(_walk(cfg, ()))


def _walk(value: object, loc: tuple) -> Iterator[tuple[tuple, SecretRef]]:
    if isinstance(value, SecretRef):
        yield loc, value
    elif isinstance(value, Template):
        for ref in value.refs:
            yield loc, ref
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name), loc + (name,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, loc + (key,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, loc + (i,))
