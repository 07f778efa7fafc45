"""pydantic's validation errors in an operator's words, and what is left of a file once they are set aside.

``explain`` turns ``ValidationError.errors()`` into ``(path, message)`` pairs: paths in the document (no
union tags), one problem per typo (``upstrem`` is "not a known key: did you mean upstream?", not also
"upstream: required"), no ``Value error,`` prefixes, never the offending value. ``without`` removes what
the errors are about, so the checks that need a valid config can still run over the rest (SPEC §11:
``check`` reports every problem in one run).
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

Loc = tuple[str | int, ...]

# pydantic's phrasing -> ours (the start of the message)
_PLAIN = (
    ("Input should be a valid dictionary", "must be a mapping (key: value lines)"),
    ("Input should be a valid list", "must be a list"),
    ("Input should be a valid string", "must be text"),
    ("Input should be", "must be"),
    ("String should have at least 1 character", "must not be empty"),
    ("List should have at least 1 item", "must not be empty"),
    ("Dictionary should have at least 1 item", "must not be empty"),
    ("String should match pattern", "has characters that are not allowed here; expected pattern"),
)


def _members(tp: Any) -> list[Any]:
    """The concrete types a field annotation can hold (Annotated and Optional unwrapped, unions flattened)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(tp) if arg is not type(None) for m in _members(arg)]
    return [tp]


def _models(candidates: list[Any]) -> list[type[BaseModel]]:
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is not None and get_origin(field.annotation) is Literal:
        return get_args(field.annotation)[0]
    return None


def locate(root: type[BaseModel], loc: Loc) -> tuple[Loc, list[type[BaseModel]]]:
    """The error location as a path in the document, and the models that can sit at its end.

    pydantic puts a discriminated union's tag in the location (``auth.header.value``); the tag is not a
    key of the file, so it is dropped (a credential *named* ``header`` stays, being a dict key)."""
    path: list[str | int] = []
    candidates: list[Any] = [root]
    for part in loc:
        models = _models(candidates)
        if isinstance(part, int):
            items = [get_args(c)[0] for c in candidates if get_origin(c) in (list, tuple) and get_args(c)]
            path.append(part)
            candidates = [m for item in items for m in _members(item)]
            continue
        if "[" in part:  # a validator's internal name, not a key
            continue
        tagged = [m for m in models if _tag_of(m) == part]
        if len(models) > 1 and tagged:  # in a union, the member's tag comes first (``header`` is both)
            candidates = tagged
            continue
        fields = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if fields:
            path.append(part)
            candidates = [m for f in fields for m in _members(f)]
            continue
        values = [get_args(c)[1] for c in candidates if get_origin(c) is dict and len(get_args(c)) == 2]
        path.append(part)
        candidates = [m for v in values for m in _members(v)]
    return tuple(path), _models(candidates)


def _known_keys(models: list[type[BaseModel]]) -> list[str]:
    return sorted({name for m in models for name in m.model_fields})


def _plain(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "union_tag_invalid":
        return f"must be one of {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return "needs a type (see: credproxy schema)"
    if kind in ("value_error", "assertion_error"):
        msg = str(err["ctx"]["error"]) if "error" in err.get("ctx", {}) else msg.split(", ", 1)[-1]
    for theirs, ours in _PLAIN:
        if msg.startswith(theirs):
            msg = ours + msg[len(theirs):]
            break
    value = err.get("input")
    if isinstance(value, str) and value and value in msg:  # never echo a configured value
        msg = msg.replace(value, "…")
    return msg


def explain(root: type[BaseModel], errors: list[dict]) -> list[tuple[Loc, str]]:
    """One ``(path, message)`` per problem a person would fix, in the order pydantic found them."""
    located = [(locate(root, err["loc"]), err) for err in errors]
    missing: dict[Loc, set[str]] = {}
    for (path, _), err in located:
        if err["type"] == "missing":
            missing.setdefault(path[:-1], set()).add(str(path[-1]))
    typos: dict[Loc, str] = {}  # the misspelt key -> the required key it stands for
    for (path, _), err in located:
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(path[-1]), sorted(missing.get(path[:-1], ())), n=1, cutoff=0.6)
            if close:
                typos[path] = close[0]
    meant = {(path[:-1], key) for path, key in typos.items()}
    out: list[tuple[Loc, str]] = []
    for (path, _), err in located:
        if err["type"] == "missing" and (path[:-1], str(path[-1])) in meant:
            continue  # reported once, at the misspelt key
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path += ("type",)
        if err["type"] == "extra_forbidden":
            out.append((path, _unknown_key(root, path, typos.get(path))))
        else:
            out.append((path, _plain(err)))
    return out


def _unknown_key(root: type[BaseModel], path: Loc, required: str | None) -> str:
    if required:
        return f"is not a known key: did you mean {required}? ({required} is required)"
    known = _known_keys(locate(root, path[:-1])[1])
    close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"is not a known key: did you mean {close[0]}?"
    if known:
        return "is not a known key here (known: " + ", ".join(known) + ")"
    return "is not a known key here"


def misplaced(path: Loc, message: str, key: str) -> bool:
    """Whether the problem at ``path`` is ``key`` misspelt or in the wrong place."""
    return message.startswith("is not a known key") and (path[-1:] == (key,) or f"did you mean {key}?" in message)


# --- what remains ---------------------------------------------------------------------------------------


def without(data: Any, root: type[BaseModel], errors: list[dict],
            stand_ins: dict[str, Any]) -> tuple[Any, list[Loc]]:
    """``data`` with what ``errors`` are about set aside; returns it and the paths set aside.

    A wrong value goes with its key. A missing key gets its stand-in (``stand_ins``: key name -> a valid
    value) so the rest of its mapping is still checked; without one, the mapping that lacks it goes. A bad
    list item takes the whole list (so the indices of the checks that follow still match the file)."""
    drop: set[Loc] = set()
    put: dict[Loc, Any] = {}
    for err in errors:
        path, _ = locate(root, err["loc"])
        if err["type"] == "missing":
            if str(path[-1]) in stand_ins and path not in put:
                put[path] = stand_ins[str(path[-1])]
                continue
            path = path[:-1]
        while path and isinstance(path[-1], int):
            path = path[:-1]
        if not path:
            return {}, [()]
        drop.add(path)
    return _rebuilt(data, drop, put, ()), sorted(drop | set(put), key=str)


def _rebuilt(data: Any, drop: set[Loc], put: dict[Loc, Any], here: Loc) -> Any:
    if isinstance(data, dict):
        out = {k: _rebuilt(v, drop, put, here + (k,)) for k, v in data.items() if here + (k,) not in drop}
        out.update({path[-1]: value for path, value in put.items() if path[:-1] == here})
        return out
    if isinstance(data, list):
        return [_rebuilt(v, drop, put, here + (i,)) for i, v in enumerate(data)]
    return data


def related(a: Loc, b: Loc) -> bool:
    """One path lies inside the other (or they are the same)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]
