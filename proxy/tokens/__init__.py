"""Token types: one provider module per protocol, one lifecycle for all.

``token_source(cfg, cache, ...)`` is what ``proxy.credential.build_source`` calls for
every non-static auth type.
"""

from __future__ import annotations

from yarl import URL

from proxy.tokens.client_credentials import ClientCredentialsProvider
from proxy.tokens.http import TokenHttp
from proxy.tokens.jwt_bearer import JwtBearerProvider
from proxy.tokens.lifecycle import Settings, TokenSlot, TokenUnavailable
from proxy.tokens.refresh_token import RefreshTokenProvider
from proxy.tokens.session_login import SessionLoginProvider
from proxy.tokens.source import TokenSource

__all__ = ["Settings", "TokenSlot", "TokenSource", "TokenUnavailable", "token_source"]


def token_source(cfg, cache, *, name: str, metrics=None, store=None, settings: Settings | None = None,
                 http: TokenHttp | None = None, cluster=None, **provider_kw) -> TokenSource:
    """The runtime of ``cfg`` (a ``CredentialConfig`` with a token auth type).

    ``settings`` (clock, randomness), ``http`` (timeouts) and ``provider_kw`` (``wall``,
    ``new_id``) are injectable for tests. ``cluster`` (a ``ClusterTokens``) shares tokens between replicas."""
    auth = cfg.auth
    ca_file = cfg.upstream_tls.ca_file if cfg.upstream_tls else None
    http = http or TokenHttp(ca_file=ca_file)
    base = URL(cfg.upstream)
    common = dict(credential=name, **provider_kw)
    if auth.type == "oauth2_client_credentials":
        provider = ClientCredentialsProvider(auth, http, **common)
    elif auth.type == "oauth2_refresh_token":
        provider = RefreshTokenProvider(auth, http, **common)
    elif auth.type == "oauth2_jwt_bearer":
        provider = JwtBearerProvider(auth, http, base=base, insecure_ok=cfg.allow_insecure_upstream, **common)
    elif auth.type == "session_login":
        provider = SessionLoginProvider(auth, http, base=base, insecure_ok=cfg.allow_insecure_upstream, **common)
    else:
        raise ValueError(f"no token runtime for auth type {auth.type!r}")
    return TokenSource(name, auth, cfg.session, provider, http, cache, store=store, metrics=metrics,
                       settings=settings, cluster=cluster)
