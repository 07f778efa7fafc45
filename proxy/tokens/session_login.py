"""``session_login``: a templated login request whose answer carries a session ID.

Covers Salesforce's SOAP ``login()``: the body template holds ``{secret:PATH#FIELD}``
placeholders, each value escaped for the body's content type (XML, JSON or form)
so a password with ``<`` or ``"`` cannot break or rewrite the request. The session
ID is read by XML element (local name, namespaces ignored) or JSON pointer;
``server_url`` optionally names the server that becomes the upstream; ``expires_in``
optionally names the session lifetime in seconds (else ``session.ttl``). XML with a
DOCTYPE is refused (SOAP forbids it; it is how entity-expansion attacks start).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from urllib.parse import quote_plus
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

from yarl import URL

from proxy.store.secret import Secret
from proxy.template import Template
from proxy.tokens.answer import (
    TokenAnswer,
    check_status,
    json_object,
    lifetime,
    looks_like_html,
    upstream_from,
)
from proxy.errors import TokenFailure
from proxy.tokens.http import Answer
from proxy.tokens.provider import PrincipalSecrets, Provider


def escaper(content_type: str) -> Callable[[str], str]:
    ct = content_type.lower()
    if "xml" in ct:
        return lambda v: xml_escape(v, {'"': "&quot;", "'": "&apos;"})
    if "json" in ct:
        return lambda v: json.dumps(v)[1:-1]
    if "x-www-form-urlencoded" in ct:
        return quote_plus
    return lambda v: v


def _render(t: Template, values: Mapping[str, Secret], escape: Callable[[str], str]) -> str:
    return t.render(None, {ref: Secret(escape(values[str(ref)].reveal())) for ref in t.refs})


def login_request(login, values: Mapping[str, Secret]) -> tuple[dict[str, str], bytes | None]:
    """Headers and body of the login call, placeholders filled from ``values`` (by ``PATH#FIELD``)."""
    headers = {name: _render(t, values, lambda v: v) for name, t in login.headers.items()}
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    body = _render(login.body, values, escaper(content_type)).encode() if login.body is not None else None
    return headers, body


class ParsedLogin:
    """A login answer parsed once (XML or JSON, by what the answer is), then queried by ``Extract``."""

    def __init__(self, answer: Answer, want_xml: bool) -> None:
        if looks_like_html(answer):
            raise TokenFailure("html", f"HTML instead of a login answer (HTTP {answer.status})")
        self.xml = self.json = None
        if want_xml:
            if b"<!DOCTYPE" in answer.body[:4096].upper():
                raise TokenFailure("invalid_xml", "login answer has a DOCTYPE")
            try:
                self.xml = ElementTree.fromstring(answer.body)
            except (ElementTree.ParseError, ValueError):
                raise TokenFailure("invalid_xml", f"login answer is not XML ({len(answer.body)} bytes)") from None
        else:
            self.json = json_object(answer)

    def get(self, spec) -> object:
        if spec.xml_element is not None:
            if self.xml is None:
                return None
            for el in self.xml.iter():
                if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] == spec.xml_element:
                    return (el.text or "").strip() or None
            return None
        return json_pointer(self.json, spec.json_pointer)


def json_pointer(doc: object, pointer: str) -> object:
    """RFC 6901; None when the path does not exist. (Ten lines, kept rather than the ``jsonpointer``
    package: its ``-`` resolves to an end-of-list marker and a bad escape raises, both of which
    would need wrapping here to mean "not in the answer".)"""
    if pointer == "":
        return doc
    cur = doc
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(cur, dict) and token in cur:
            cur = cur[token]
        elif isinstance(cur, list) and token.isdigit() and int(token) < len(cur):
            cur = cur[int(token)]
        else:
            return None
    return cur


def parse_login(answer: Answer, auth, *, base: URL, insecure_ok: bool) -> TokenAnswer:
    check_status(answer, "login endpoint")
    specs = [auth.session_id, auth.server_url, auth.expires_in]
    parsed = ParsedLogin(answer, want_xml=any(s is not None and s.xml_element is not None for s in specs))
    session = parsed.get(auth.session_id)
    if not isinstance(session, str) or not session.strip():
        raise TokenFailure("no_session_id", "login answer has no session ID")
    expires = lifetime(parsed.get(auth.expires_in), "expires_in") if auth.expires_in is not None else None
    upstream = upstream_from(parsed.get(auth.server_url), base, insecure_ok) if auth.server_url is not None else None
    return TokenAnswer(Secret(session.strip()), expires, None, upstream)


class SessionLoginProvider(Provider):
    @property
    def takes_upstream(self) -> bool:
        return self.auth.server_url is not None

    def __init__(self, auth, http, *, base: URL, insecure_ok: bool = False, credential: str = "", **kw) -> None:
        super().__init__(http, **kw)
        self.auth = auth
        self.base = base
        self.insecure_ok = insecure_ok
        self.credential = credential

    async def fetch(self, secrets: PrincipalSecrets) -> TokenAnswer:
        values = {str(ref): await secrets.read(str(ref)) for ref in self.auth.template_refs()}
        headers, body = login_request(self.auth.login, values)
        answer = await self.http.send(self.auth.login.method, self.auth.login.url, headers=headers, body=body)
        return parse_login(answer, self.auth, base=self.base, insecure_ok=self.insecure_ok)
