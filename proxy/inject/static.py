"""Injection for ``header``, ``query`` and ``basic``, and the header form token types share."""

from __future__ import annotations

import base64
from collections.abc import Callable
from urllib.parse import quote, unquote_plus

from proxy.inject.base import Injector, SecretValues, header_line
from proxy.upstream.outbound import Outbound
from proxy.template import Template


class _PerMaterial:
    """A value derived from secret material, kept per material object: a source hands out the same mapping for
    as long as the secret's version (or the token) is unchanged, and a new one when it changes, so the value is
    derived once per version, not once per request. Holding the mapping keeps its id from being reused."""

    __slots__ = ("_derive", "_kept", "_max")

    def __init__(self, derive: Callable[[SecretValues], object], kept_max: int) -> None:
        self._derive = derive
        self._max = kept_max  # one per principal in use, at a time; more is a rotation churning through
        self._kept: dict[int, tuple[SecretValues, object]] = {}  # id(secrets) -> (secrets, value)

    def __call__(self, secrets: SecretValues):
        found = self._kept.get(id(secrets))
        if found is not None and found[0] is secrets:
            return found[1]
        value = self._derive(secrets)
        if len(self._kept) >= self._max:
            del self._kept[next(iter(self._kept))]  # the oldest
        self._kept[id(secrets)] = (secrets, value)
        return value


class HeaderInjector(Injector):
    """The header's value is rendered once per ``secrets`` object (``_PerMaterial``)."""

    RENDERED_MAX = 16

    def __init__(self, header: str, template: Template) -> None:
        self.header = header
        self.template = template
        self.removes = (header,)
        self.sends = f"sends {header}: {template}"
        self._refs = tuple((ref, str(ref)) for ref in template.refs)  # the template's placeholders, found once
        self._rendered = _PerMaterial(self._render, self.RENDERED_MAX)
        # ``Injector.header_line``: the line rendered once per material, called as it is (no method frame around it)
        self.header_line = _PerMaterial(lambda secrets: header_line(header, self._rendered(secrets)),
                                        self.RENDERED_MAX)

    def _render(self, secrets: SecretValues) -> str:
        return self.template.render(secrets.get("secret"), {ref: secrets[key] for ref, key in self._refs})

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        out.headers.popall(self.header, None)
        out.headers[self.header] = self._rendered(secrets)


class QueryInjector(Injector):
    def __init__(self, param: str) -> None:
        self.param = param
        self.sends = f"sends ?{param}={{secret}}"
        self._pair = _PerMaterial(lambda secrets: f"{quote(param, safe='')}={quote(secrets['secret'].reveal(), safe='')}",
                                  HeaderInjector.RENDERED_MAX)

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        kept = [p for p in out.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != self.param]
        kept.append(self._pair(secrets))
        out.query = "&".join(kept)


class BasicInjector(Injector):
    removes = ("Authorization",)
    sends = "sends Authorization: Basic base64(username:password)"

    def __init__(self) -> None:
        self._value = _PerMaterial(_basic_value, HeaderInjector.RENDERED_MAX)
        self.header_line = _PerMaterial(lambda secrets: header_line("Authorization", self._value(secrets)),
                                        HeaderInjector.RENDERED_MAX)  # as HeaderInjector's

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        value = self._value(secrets)
        out.headers.popall("Authorization", None)
        out.headers["Authorization"] = value


def _basic_value(secrets: SecretValues) -> str:
    raw = f"{secrets['username'].reveal()}:{secrets['password'].reveal()}".encode()
    return "Basic " + base64.b64encode(raw).decode()
