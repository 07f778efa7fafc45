"""The auth-type table: every type the config accepts has a runtime, and one precedence decides
which secret a principal reads."""

from __future__ import annotations

from pydantic import TypeAdapter

from proxy.auth_types import AUTH_TYPES, build_source, injector_for
from proxy.config.auth import AUTH_MODELS, AuthConfig
from proxy.config.models import CredentialConfig
from proxy.inject import HeaderInjector
from proxy.static_source import StaticSource
from proxy.store.cache import SecretCache
from proxy.store.file import FileStore
from proxy.store.secret import SecretRef
from proxy.tokens import TokenSource


def test_every_configurable_type_has_a_row():
    assert set(AUTH_TYPES) == set(AUTH_MODELS)


def test_a_per_caller_override_wins_over_the_credentials_own_reference():
    auth = TypeAdapter(AuthConfig).validate_python({
        "type": "session_login", "login": {"url": "https://login.example/x", "body": "<p>{secret:sf/login#password}</p>"},
        "session_id": {"xml_element": "sessionId"},
        "per_caller": {"reports": {"sf/login#password": "sf/reports#password"}}})
    assert auth.refs_for("")["sf/login#password"] == SecretRef.parse("sf/login#password")
    assert auth.refs_for("reports")["sf/login#password"] == SecretRef.parse("sf/reports#password")
    assert auth.all_refs() == {SecretRef.parse("sf/login#password"), SecretRef.parse("sf/reports#password")}


def test_static_and_token_types_get_their_own_source_and_injector(tmp_path):
    cache = SecretCache(FileStore(tmp_path / "secrets.enc", bytes(32)))  # building a source reads no secret
    static = CredentialConfig.model_validate({"upstream": "https://api.example", "auth": {
        "type": "header", "header": "X-Key", "value": "{secret}", "secret": "k#v"}})
    token = CredentialConfig.model_validate({"upstream": "https://api.example", "auth": {
        "type": "oauth2_client_credentials", "token_url": "https://idp.example/token", "client_id": "c",
        "client_secret": "k#s"}})
    assert isinstance(build_source(static, cache, name="s"), StaticSource)
    assert isinstance(build_source(token, cache, name="t"), TokenSource)
    assert isinstance(injector_for(static.auth), HeaderInjector) and injector_for(static.auth).removes == ("X-Key",)
    assert injector_for(token.auth).removes == ("Authorization",)
