"""Injection for ``header``, ``query`` and ``basic``, and the header form token types share."""

from __future__ import annotations

import base64
from urllib.parse import quote, unquote_plus

from proxy.inject.base import Injector, SecretValues
from proxy.upstream.outbound import Outbound
from proxy.template import Template


class HeaderInjector(Injector):
    def __init__(self, header: str, template: Template) -> None:
        self.header = header
        self.template = template
        self.removes = (header,)
        self._refs = tuple((ref, str(ref)) for ref in template.refs)  # the template's placeholders, found once

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        refs = {ref: secrets[key] for ref, key in self._refs}
        value = self.template.render(secrets.get("secret"), refs)
        out.headers.popall(self.header, None)
        out.headers[self.header] = value


class QueryInjector(Injector):
    def __init__(self, param: str) -> None:
        self.param = param

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        kept = [p for p in out.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != self.param]
        kept.append(f"{quote(self.param, safe='')}={quote(secrets['secret'].reveal(), safe='')}")
        out.query = "&".join(kept)


class BasicInjector(Injector):
    removes = ("Authorization",)

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        raw = f"{secrets['username'].reveal()}:{secrets['password'].reveal()}".encode()
        out.headers.popall("Authorization", None)
        out.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
