"""Injection for ``header``, ``query`` and ``basic``, and the header form token types share."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from urllib.parse import quote, unquote_plus

from proxy.upstream.outbound import Outbound
from proxy.store.secret import Secret
from proxy.template import Template

Material = Mapping[str, Secret]


class Injector:
    """Sets credentials on an outbound request; ``removes`` names headers callers may not supply."""

    removes: tuple[str, ...] = ()

    def inject(self, out: Outbound, material: Material) -> None:
        raise NotImplementedError


class HeaderInjector(Injector):
    def __init__(self, header: str, template: Template) -> None:
        self.header = header
        self.template = template
        self.removes = (header,)
        self._refs = tuple((ref, str(ref)) for ref in template.refs)  # the template's placeholders, found once

    def inject(self, out: Outbound, material: Material) -> None:
        refs = {ref: material[key] for ref, key in self._refs}
        value = self.template.render(material.get("secret"), refs)
        out.headers.popall(self.header, None)
        out.headers[self.header] = value


class QueryInjector(Injector):
    def __init__(self, param: str) -> None:
        self.param = param

    def inject(self, out: Outbound, material: Material) -> None:
        kept = [p for p in out.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != self.param]
        kept.append(f"{quote(self.param, safe='')}={quote(material['secret'].reveal(), safe='')}")
        out.query = "&".join(kept)


class BasicInjector(Injector):
    removes = ("Authorization",)

    def inject(self, out: Outbound, material: Material) -> None:
        raw = f"{material['username'].reveal()}:{material['password'].reveal()}".encode()
        out.headers.popall("Authorization", None)
        out.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()


def injector_for(auth) -> Injector:
    """The injector for an auth config. Token types inject like ``header`` with a Bearer default."""
    if auth.type == "query":
        return QueryInjector(auth.param)
    if auth.type == "basic":
        return BasicInjector()
    if auth.type == "aws_sigv4":
        from proxy.inject.sigv4 import SigV4Injector  # botocore is an optional extra: import only when used

        return SigV4Injector(auth.region, auth.service)
    if auth.type == "hmac":
        from proxy.inject.hmacsign import HmacInjector

        return HmacInjector(auth)
    header = getattr(auth, "header", None) or "Authorization"
    value = getattr(auth, "value", None) or Template.parse("Bearer {secret}")
    return HeaderInjector(header, value)
