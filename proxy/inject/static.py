"""Injection for ``header``, ``query`` and ``basic``, and the header form token types share."""

from __future__ import annotations

import base64
from urllib.parse import quote, unquote_plus

from proxy.inject.base import Injector, SecretValues
from proxy.upstream.outbound import Outbound
from proxy.template import Template


class HeaderInjector(Injector):
    """The header's value is rendered once per ``secrets`` object: a source hands out the same mapping for
    as long as the secret's version (or the token) is unchanged, and a new one when it changes."""

    RENDERED_MAX = 16  # one per principal in use, at a time; more is a rotation churning through

    def __init__(self, header: str, template: Template) -> None:
        self.header = header
        self.template = template
        self.removes = (header,)
        self.sends = f"sends {header}: {template}"
        self._refs = tuple((ref, str(ref)) for ref in template.refs)  # the template's placeholders, found once
        # id(secrets) -> (secrets, value): holding the mapping keeps its id from being reused by another
        self._rendered: dict[int, tuple[SecretValues, str]] = {}

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        found = self._rendered.get(id(secrets))
        if found is not None and found[0] is secrets:
            value = found[1]
        else:
            refs = {ref: secrets[key] for ref, key in self._refs}
            value = self.template.render(secrets.get("secret"), refs)
            if len(self._rendered) >= self.RENDERED_MAX:
                del self._rendered[next(iter(self._rendered))]  # the oldest
            self._rendered[id(secrets)] = (secrets, value)
        out.headers.popall(self.header, None)
        out.headers[self.header] = value


class QueryInjector(Injector):
    def __init__(self, param: str) -> None:
        self.param = param
        self.sends = f"sends ?{param}={{secret}}"

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        kept = [p for p in out.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != self.param]
        kept.append(f"{quote(self.param, safe='')}={quote(secrets['secret'].reveal(), safe='')}")
        out.query = "&".join(kept)


class BasicInjector(Injector):
    removes = ("Authorization",)
    sends = "sends Authorization: Basic base64(username:password)"

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        raw = f"{secrets['username'].reveal()}:{secrets['password'].reveal()}".encode()
        out.headers.popall("Authorization", None)
        out.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
