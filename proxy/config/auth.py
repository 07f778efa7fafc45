"""``credentials.*.auth``: one model per auth type, a union keyed on ``type``.

Fields that carry secret material are always references (``Ref``) or templates
whose placeholders are references; identifiers and URLs are literals.
To add a type: define its model here, add it to ``AuthConfig``, and give it a
row in ``proxy.auth_types``.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.store.secret import SecretRef
from proxy.template import Template
from proxy.config import hmac_template
from proxy.config.fields import Ref, TemplateStr


class _Auth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per-caller principals: caller name -> {field: reference} overriding this auth's references.
    per_caller: dict[str, dict[str, Ref]] = Field(default_factory=dict)

    def ref_fields(self) -> dict[str, SecretRef]:
        """The auth type's own secret-reference fields that are set (name -> ref)."""
        return {name: v for name in type(self).model_fields if isinstance(v := getattr(self, name), SecretRef)}

    def overridable_fields(self) -> set[str]:
        """Names a ``per_caller`` entry may override."""
        return set(self.ref_fields()) | {"secret"}

    def principals(self) -> frozenset[str]:
        """Callers that get a principal (token, material) of their own."""
        return frozenset(self.per_caller)

    def template_refs(self) -> tuple[SecretRef, ...]:
        out: list[SecretRef] = []
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, Template):
                out.extend(v.refs)
        return tuple(out)

    def refs_for(self, principal: str) -> dict[str, SecretRef]:
        """What ``principal`` reads, by field name or ``PATH#FIELD`` (template placeholders):
        its ``per_caller`` overrides, then this auth's own references."""
        refs = dict(self.ref_fields())
        for ref in self.template_refs():
            refs[str(ref)] = ref
        refs.update(self.per_caller.get(principal, {}))
        return refs

    def all_refs(self) -> set[SecretRef]:
        """Every reference any principal reads (readiness and warm-up check them)."""
        out = set(self.refs_for("").values())
        for principal in self.per_caller:
            out |= set(self.refs_for(principal).values())
        return out


def default_value(header: str) -> str:
    """What a header carries when ``value`` is not set: a bearer token in ``Authorization``, the bare
    secret in any other header (``X-Api-Key: {secret}``: API-key upstreams refuse a ``Bearer`` prefix)."""
    return "Bearer {secret}" if header.lower() == "authorization" else "{secret}"


_VALUE_DOC = 'template; default "Bearer {secret}" in Authorization, "{secret}" in any other header'


class _InjectsHeader(_Auth):
    """``header: value``, the value's default following the header (``default_value``)."""

    header: str = Field(default="Authorization", min_length=1)
    value: TemplateStr = Field(default=None, description=_VALUE_DOC,  # always set by _value_for_header
                               json_schema_extra=lambda schema: schema.pop("default", None))

    @model_validator(mode="before")
    @classmethod
    def _value_for_header(cls, data):
        if isinstance(data, dict) and data.get("value") is None:
            header = data.get("header")  # not text: its own problem, reported by the field
            data = {**data, "value": default_value(header if isinstance(header, str) and header else "Authorization")}
        return data


class HeaderAuth(_InjectsHeader):
    type: Literal["header"]
    secret: Ref

    @model_validator(mode="after")
    def _template_uses_secret(self) -> "HeaderAuth":
        if not self.value.uses_self and not self.value.refs:
            raise ValueError("value must contain {secret}")
        return self


class QueryAuth(_Auth):
    type: Literal["query"]
    param: str = Field(min_length=1)
    secret: Ref


class BasicAuth(_Auth):
    type: Literal["basic"]
    username: Ref
    password: Ref


# --- token types (runtime: proxy.tokens) -------------------------------------------


class _TokenAuth(_InjectsHeader):
    """A token obtained from a provider, injected as ``header: value`` (``{secret}`` is the token)."""

    @model_validator(mode="after")
    def _value_uses_token(self) -> "_TokenAuth":
        if not self.value.uses_self:
            raise ValueError("value must contain {secret} (the token)")
        return self


ClientAuthMethod = Literal["basic", "post", "private_key_jwt"]


class _OAuth2Client(_TokenAuth):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: Ref | None = None
    client_auth: ClientAuthMethod = "basic"
    private_key: Ref | None = None  # PEM, RSA (RS256) or EC P-256 (ES256), for private_key_jwt
    key_id: str | None = None
    scope: str | None = None
    revocation_url: str | None = None

    @model_validator(mode="after")
    def _client_auth_material(self) -> "_OAuth2Client":
        if self.client_auth == "private_key_jwt" and self.private_key is None:
            raise ValueError("client_auth private_key_jwt needs private_key")
        return self


class OAuth2ClientCredentialsAuth(_OAuth2Client):
    type: Literal["oauth2_client_credentials"]
    audience: str | None = None

    @model_validator(mode="after")
    def _needs_secret(self) -> "OAuth2ClientCredentialsAuth":
        if self.client_auth in ("basic", "post") and self.client_secret is None:
            raise ValueError(f"client_auth {self.client_auth} needs client_secret")
        return self


class OAuth2RefreshTokenAuth(_OAuth2Client):
    # Without client_secret (and with basic/post) the client is public: client_id goes in the form.
    type: Literal["oauth2_refresh_token"]
    refresh_token: Ref


class OAuth2JwtBearerAuth(_TokenAuth):
    type: Literal["oauth2_jwt_bearer"]
    token_url: str
    client_id: str = Field(min_length=1)  # the assertion's iss
    subject: str = Field(min_length=1)
    # Extension: caller -> the assertion's sub for that caller (a literal, like subject), so each calling
    # service acts as its own user with one connected app's key (Salesforce per-user JWT bearer logins).
    per_caller_subject: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    audience: str | None = None  # default: token_url
    private_key: Ref
    key_id: str | None = None
    scope: str | None = None
    use_instance_url: bool = False
    revocation_url: str | None = None

    def principals(self) -> frozenset[str]:
        return frozenset(self.per_caller) | frozenset(self.per_caller_subject)

    def subject_for(self, principal: str) -> str:
        return self.per_caller_subject.get(principal, self.subject)


class Extract(BaseModel):
    """Where a value sits in a login answer: an XML element (by local name) or a JSON pointer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    xml_element: str | None = Field(default=None, min_length=1)
    json_pointer: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Extract":
        if (self.xml_element is None) == (self.json_pointer is None):
            raise ValueError("set exactly one of xml_element or json_pointer")
        if self.json_pointer is not None and self.json_pointer and not self.json_pointer.startswith("/"):
            raise ValueError("json_pointer must start with /")
        return self


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    method: Literal["POST", "GET", "PUT"] = "POST"
    headers: dict[str, TemplateStr] = Field(default_factory=dict)
    body: TemplateStr | None = None


class SessionLoginAuth(_TokenAuth):
    type: Literal["session_login"]
    login: LoginRequest
    session_id: Extract
    server_url: Extract | None = None
    expires_in: Extract | None = None  # seconds; session.ttl when absent or not in the answer

    def template_refs(self) -> tuple[SecretRef, ...]:
        refs = list(super().template_refs())
        if self.login.body is not None:
            refs.extend(self.login.body.refs)
        for t in self.login.headers.values():
            refs.extend(t.refs)
        return tuple(dict.fromkeys(refs))

    def overridable_fields(self) -> set[str]:
        # Per-user logins (Salesforce per-user principals) swap the login template's references.
        return super().overridable_fields() | {str(r) for r in self.template_refs()}


class AwsSigV4Auth(_Auth):
    """AWS Signature V4 on every request (``proxy.inject.sigv4``); needs the ``aws`` extra (botocore)."""

    type: Literal["aws_sigv4"]
    access_key_id: Ref
    secret_access_key: Ref
    session_token: Ref | None = None
    region: str = Field(pattern=r"^[a-z0-9-]{1,64}$")
    service: str = Field(pattern=r"^[a-z0-9-]{1,64}$")

    @model_validator(mode="after")
    def _botocore_installed(self) -> "AwsSigV4Auth":
        if importlib.util.find_spec("botocore") is None:
            raise ValueError("aws_sigv4 needs botocore: install credproxy[aws]")
        return self


class HmacAuth(_Auth):
    """A generic HMAC request signature (``proxy.inject.hmacsign``)."""

    type: Literal["hmac"]
    secret: Ref  # the HMAC key
    key_encoding: Literal["raw", "base64", "hex"] = "raw"
    key_id: str | None = None
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    canonical: str = Field(min_length=1)
    timestamp_format: Literal["unix", "unix_ms", "iso8601", "http_date"] = "unix"
    headers: dict[str, str] = Field(default_factory=lambda: {"Authorization": "{signature}"}, min_length=1)

    @field_validator("canonical")
    @classmethod
    def _canonical_template(cls, v: str) -> str:
        hmac_template.parse(v, hmac_template.CANONICAL_FIELDS)
        return v

    @field_validator("headers")
    @classmethod
    def _header_templates(cls, v: dict[str, str]) -> dict[str, str]:
        parsed = [hmac_template.parse(value, hmac_template.HEADER_FIELDS) for value in v.values()]
        if not any("signature" in hmac_template.fields(p) for p in parsed):
            raise ValueError("one of the headers must contain {signature}")
        return v


AuthConfig = Annotated[
    Union[HeaderAuth, QueryAuth, BasicAuth, OAuth2ClientCredentialsAuth, OAuth2RefreshTokenAuth,
          OAuth2JwtBearerAuth, SessionLoginAuth, AwsSigV4Auth, HmacAuth],
    Field(discriminator="type"),
]

# type -> model, read off the union (the config's own list; ``proxy.auth_types`` gives each its runtime).
AUTH_MODELS: dict[str, type[_Auth]] = {get_args(m.model_fields["type"].annotation)[0]: m
                                       for m in get_args(get_args(AuthConfig)[0])}
