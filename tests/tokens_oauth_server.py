"""A real OAuth2 authorization server for the token tests, built from authlib's server
components (``AuthorizationServer``, the client-credentials, refresh-token and RFC 7523
JWT-bearer grants, ``JWTBearerClientAssertion`` for private_key_jwt, the RFC 7009
``RevocationEndpoint``) and served by aiohttp on 127.0.0.1 over TLS (a trustme CA).

Also a resource server (the upstream API) that accepts exactly the access tokens this
authorization server issued and has not revoked, and records what it saw.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field

from aiohttp import web
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    OAuth2Request,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion, JWTBearerGrant

AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]


@dataclass
class Client(ClientMixin):
    client_id: str
    secret: str | None = None
    auth_method: str = "client_secret_basic"  # the one method this client may use
    grant_types: tuple[str, ...] = ("client_credentials",)
    public_key: bytes | None = None  # PEM, for private_key_jwt and the JWT bearer grant
    scope: str = ""

    def get_client_id(self):
        return self.client_id

    def get_allowed_scope(self, scope):
        return scope or self.scope

    def check_client_secret(self, client_secret):
        return self.secret is not None and secrets.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.auth_method

    def check_grant_type(self, grant_type):
        return grant_type in self.grant_types


@dataclass(eq=False)
class Token(TokenMixin):
    client_id: str
    access_token: str | None
    refresh_token: str | None = None
    scope: str = ""
    subject: str | None = None
    issued_at: float = field(default_factory=time.time)
    expires_in: int = 3600
    access_revoked: bool = False
    refresh_revoked: bool = False

    def check_client(self, client):
        return client.client_id == self.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.expires_in

    def is_expired(self):
        return False

    def is_revoked(self):
        return self.access_revoked

    def get_user(self):
        return self.subject

    def get_client(self):
        return None


class DB:
    """Everything the authorization server knows, and what it was asked."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.by_access: dict[str, Token] = {}
        self.by_refresh: dict[str, Token] = {}
        self.token_requests: list[dict] = []  # one per POST /token
        self.revocations: list[str] = []  # revoked access tokens, in order
        self.users = {"integration@example.com"}
        self.jwt_audience = "https://login.example.com"
        self.instance_url: str | None = None
        self.expires_in = 3600
        self.rotate_refresh_tokens = True
        self.jti_seen: set[str] = set()
        self.hold: asyncio.Event | None = None  # when set up: token answers wait for it
        self.arrived = 0  # POST /token requests received (counted before any hold)

    def save(self, token: dict, request) -> Token:
        tok = Token(client_id=request.client.client_id, access_token=token.get("access_token"),
                    refresh_token=token.get("refresh_token"), scope=token.get("scope", ""),
                    subject=getattr(request, "user", None), expires_in=token.get("expires_in", 0))
        self.by_access[tok.access_token] = tok
        if tok.refresh_token:
            self.by_refresh[tok.refresh_token] = tok
        return tok

    def seed_refresh_token(self, client_id: str, scope: str = "api") -> str:
        rt = "rt-" + secrets.token_urlsafe(24)
        self.by_refresh[rt] = Token(client_id=client_id, access_token=None, refresh_token=rt, scope=scope,
                                    subject="integration@example.com")
        return rt

    def valid_access(self, token: str) -> bool:
        tok = self.by_access.get(token)
        return tok is not None and not tok.access_revoked

    def revoke_access(self, token: str) -> None:
        self.by_access[token].access_revoked = True

    @property
    def issued(self) -> list[str]:
        """Access tokens issued, in order."""
        return [t for t in self.by_access]

    @property
    def requests(self) -> int:
        return len(self.token_requests)


class AioOAuth2Request(OAuth2Request):
    def __init__(self, method: str, uri: str, headers, form: dict) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = form
        self.payload = BasicOAuth2Payload(form)

    @property
    def form(self):
        return self._form

    @property
    def args(self):
        return {}


class Server(AuthorizationServer):
    """authlib's framework-agnostic server, wired to aiohttp requests and responses."""

    def __init__(self, db: DB, token_url: str) -> None:
        super().__init__()
        self.db = db
        self.token_url = token_url
        generator = BearerTokenGenerator(lambda **_: "at-" + secrets.token_urlsafe(24),
                                         lambda **_: "rt-" + secrets.token_urlsafe(24),
                                         lambda client, grant_type: db.expires_in)

        def with_instance(grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=True):
            tok = generator(grant_type, client, user, scope, expires_in, include_refresh_token)
            if db.instance_url:
                tok["instance_url"] = db.instance_url
            return tok

        self.register_token_generator("default", with_instance)
        self.register_client_auth_method("private_key_jwt", PrivateKeyJWT(self))
        self.register_grant(ClientCredentials)
        self.register_grant(RefreshToken)
        self.register_grant(JWTBearer)
        self.register_endpoint(Revocation)

    def query_client(self, client_id):
        return self.db.clients.get(client_id)

    def save_token(self, token, request):
        self.db.save(token, request)

    def create_oauth2_request(self, request):
        return request

    def handle_response(self, status, body, headers):
        return web.Response(status=status, text=json.dumps(body) if isinstance(body, dict) else body,
                            headers={k: v for k, v in headers if k.lower() != "content-length"})

    def send_signal(self, name, *args, **kwargs):
        pass


class PrivateKeyJWT(JWTBearerClientAssertion):
    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server

    def get_audiences(self):
        return [self.server.token_url]

    def validate_jti(self, claims, jti):
        if jti in self.server.db.jti_seen:
            return False
        self.server.db.jti_seen.add(jti)
        return True

    def resolve_client_public_key(self, client):
        return client.public_key


class ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS


class RefreshToken(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS + ["none"]

    @property
    def INCLUDE_NEW_REFRESH_TOKEN(self):
        return self.server.db.rotate_refresh_tokens

    def authenticate_refresh_token(self, refresh_token):
        tok = self.server.db.by_refresh.get(refresh_token)
        return tok if tok is not None and not tok.refresh_revoked else None

    def authenticate_user(self, refresh_token):
        return refresh_token.subject

    def revoke_old_credential(self, refresh_token):
        if self.server.db.rotate_refresh_tokens:
            refresh_token.refresh_revoked = True  # single use, as rotating providers do


class JWTBearer(JWTBearerGrant):
    def resolve_issuer_client(self, issuer):
        return self.server.db.clients.get(issuer)

    def resolve_client_public_key(self, client):
        return client.public_key

    def authenticate_user(self, subject):
        return subject if subject in self.server.db.users else None

    def has_granted_permission(self, client, user):
        return True

    def get_audiences(self):
        return [self.server.db.jwt_audience]


class Revocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = AUTH_METHODS + ["none"]

    def query_token(self, token_string, token_type_hint):
        return self.server.db.by_access.get(token_string)

    def revoke_token(self, token, request):
        token.access_revoked = True
        self.server.db.revocations.append(token.access_token)

    def create_endpoint_request(self, request):
        return request


class OAuthServer:
    """The authorization server at https://127.0.0.1:PORT (``/token``, ``/revoke``)."""

    def __init__(self, server_ssl: ssl.SSLContext) -> None:
        self.db = DB()
        self.ssl = server_ssl
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.server: Server | None = None

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    async def _form_request(self, request: web.Request) -> AioOAuth2Request:
        form = {k: v for k, v in (await request.post()).items()}
        return AioOAuth2Request(request.method, str(request.url), dict(request.headers), form)

    async def token(self, request: web.Request) -> web.Response:
        req = await self._form_request(request)
        self.db.arrived += 1
        if self.db.hold is not None:
            await self.db.hold.wait()
        resp = self.server.create_token_response(req)
        self.db.token_requests.append({"grant_type": req.form.get("grant_type"), "auth": req.auth_method,
                                       "status": resp.status, "scope": req.form.get("scope"),
                                       "headers": dict(request.headers)})
        return resp

    async def revoke(self, request: web.Request) -> web.Response:
        return self.server.create_endpoint_response("revocation", await self._form_request(request))

    async def start(self) -> OAuthServer:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/revoke", self.revoke)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl).start()
        self.url = f"https://127.0.0.1:{self.runner.addresses[0][1]}"
        self.server = Server(self.db, self.token_url)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Seen:
    request_id: str
    token: str
    status: int
    body_len: int
    path: str


class ResourceServer:
    """The upstream API: 200 for a live access token of ``db``, else ``reject_status``."""

    def __init__(self, db: DB, reject_status: int = 401, reject_body: bytes = b'{"error":"invalid_token"}') -> None:
        self.db = db
        self.reject_status = reject_status
        self.reject_body = reject_body
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.echo_token = False  # answer with the token it received (the leak guard must catch it)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        ok = scheme == "Bearer" and self.db.valid_access(token)
        status = 200 if ok else self.reject_status
        self.seen.append(Seen(request.headers.get("X-Request-Id", ""), token, status, size, request.path))
        if not ok:
            return web.Response(status=status, body=self.reject_body, content_type="application/json")
        answer = {"ok": True, "path": request.path, "received": size}
        if self.echo_token:
            answer["you_sent"] = request.headers.get("Authorization")
        return web.json_response(answer)

    async def start(self) -> ResourceServer:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
