"""Every auth type in one table: its config model, how its material is obtained, how it is injected.

Each row names the ``credentials.*.auth`` model (``proxy.config.auth``; its fields
are the type's secret references, read for a principal by ``refs_for``), the
injector, and for token types the provider that obtains the token. Static types
(no provider) inject the stored secrets themselves (``StaticSource``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from proxy.config import auth as models
from proxy.config.models import CredentialConfig
from proxy.grant import AuthSource
from proxy.inject import BasicInjector, HeaderInjector, Injector, QueryInjector
from proxy.static_source import StaticSource
from proxy.store.cache import SecretCache
from proxy.tokens.client_credentials import ClientCredentialsProvider
from proxy.tokens.http import TokenHttp
from proxy.tokens.jwt_bearer import JwtBearerProvider
from proxy.tokens.lifecycle import Settings
from proxy.tokens.provider import Provider
from proxy.tokens.refresh_token import RefreshTokenProvider
from proxy.tokens.session_login import SessionLoginProvider
from proxy.tokens.source import TokenSource
from proxy.upstream.address_policy import AddressPolicy

# (credential config, token HTTP client, provider keywords) -> the provider of one token kind
ProviderFactory = Callable[[CredentialConfig, TokenHttp, dict[str, Any]], Provider]


@dataclass(frozen=True, slots=True)
class AuthType:
    model: type[models._Auth]
    injector: Callable[[Any], Injector]
    provider: ProviderFactory | None = None  # None: a static type


def _header(auth) -> Injector:
    return HeaderInjector(auth.header, auth.value)


def _sigv4(auth) -> Injector:
    from proxy.inject.sigv4 import SigV4Injector  # botocore is an optional extra: import only when used

    return SigV4Injector(auth.region, auth.service)


def _hmac(auth) -> Injector:
    from proxy.inject.hmacsign import HmacInjector

    return HmacInjector(auth)


def _at_upstream(cls) -> ProviderFactory:
    """Providers that may resolve a relative token or login URL against the credential's upstream."""
    return lambda cfg, http, kw: cls(cfg.auth, http, base=URL(cfg.upstream), insecure_ok=cfg.allow_insecure_upstream,
                                     **kw)


AUTH_TYPES: dict[str, AuthType] = {
    "header": AuthType(models.HeaderAuth, _header),
    "query": AuthType(models.QueryAuth, lambda auth: QueryInjector(auth.param)),
    "basic": AuthType(models.BasicAuth, lambda auth: BasicInjector()),
    "aws_sigv4": AuthType(models.AwsSigV4Auth, _sigv4),
    "hmac": AuthType(models.HmacAuth, _hmac),
    "oauth2_client_credentials": AuthType(models.OAuth2ClientCredentialsAuth, _header,
                                          lambda cfg, http, kw: ClientCredentialsProvider(cfg.auth, http, **kw)),
    "oauth2_refresh_token": AuthType(models.OAuth2RefreshTokenAuth, _header,
                                     lambda cfg, http, kw: RefreshTokenProvider(cfg.auth, http, **kw)),
    "oauth2_jwt_bearer": AuthType(models.OAuth2JwtBearerAuth, _header, _at_upstream(JwtBearerProvider)),
    "session_login": AuthType(models.SessionLoginAuth, _header, _at_upstream(SessionLoginProvider)),
}
if {t: row.model for t, row in AUTH_TYPES.items()} != models.AUTH_MODELS:
    raise ImportError("proxy.auth_types and proxy.config.auth.AuthConfig list different auth types")


def injector_for(auth) -> Injector:
    return AUTH_TYPES[auth.type].injector(auth)


def build_source(cfg: CredentialConfig, cache: SecretCache, *, name: str, metrics=None, store=None,
                 settings: Settings | None = None, http: TokenHttp | None = None, cluster=None,
                 addresses: Callable[[], AddressPolicy] | None = None, **provider_kw) -> AuthSource:
    """The runtime source of ``cfg``'s material.

    For token types, ``settings`` (clock, randomness), ``http`` (timeouts) and ``provider_kw``
    (``wall``, ``new_id``) are injectable for tests; ``cluster`` (a ``ClusterTokens``) shares
    tokens between replicas; ``addresses`` returns the address policy in force (the committed State's)
    for the token, login and revocation calls."""
    row = AUTH_TYPES[cfg.auth.type]
    if row.provider is None:
        return StaticSource(cfg.auth, cache, name=name, metrics=metrics)
    http = http or TokenHttp(ca_file=cfg.upstream_tls.ca_file if cfg.upstream_tls else None, address_policy=addresses)
    provider = row.provider(cfg, http, dict(credential=name, **provider_kw))
    return TokenSource(name, cfg.auth, cfg.session, provider, http, cache, store=store, metrics=metrics,
                       settings=settings, cluster=cluster)
