"""``credentials.*.auth``: one model per auth type, a union keyed on ``type``.

Fields that carry secret material are always references (``Ref``) or templates
whose placeholders are references; identifiers and URLs are literals.
To add a type: define its model here, add it to ``AuthConfig``, and register
its runtime in ``proxy.credential``.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.secret import SecretRef
from proxy.template import Template
from proxy.types import Ref, TemplateStr


class _Auth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per-caller principals: caller name -> {field: reference} overriding this auth's references.
    per_caller: dict[str, dict[str, Ref]] = Field(default_factory=dict)

    def ref_fields(self) -> dict[str, SecretRef]:
        """The auth type's own secret-reference fields that are set (name -> ref)."""
        return {name: v for name in type(self).model_fields if isinstance(v := getattr(self, name), SecretRef)}

    def template_refs(self) -> tuple[SecretRef, ...]:
        out: list[SecretRef] = []
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, Template):
                out.extend(v.refs)
        return tuple(out)


class HeaderAuth(_Auth):
    type: Literal["header"]
    header: str = "Authorization"
    value: TemplateStr = Template.parse("Bearer {secret}")
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
        from proxy.inject import hmacsign

        hmacsign.parse(v, hmacsign.CANONICAL_FIELDS)
        return v

    @field_validator("headers")
    @classmethod
    def _header_templates(cls, v: dict[str, str]) -> dict[str, str]:
        from proxy.inject import hmacsign

        parsed = [hmacsign.parse(value, hmacsign.HEADER_FIELDS) for value in v.values()]
        if not any("signature" in hmacsign.fields(p) for p in parsed):
            raise ValueError("one of the headers must contain {signature}")
        return v


AuthConfig = Annotated[
    Union[HeaderAuth, QueryAuth, BasicAuth, AwsSigV4Auth, HmacAuth],
    Field(discriminator="type"),
]

STATIC_TYPES = frozenset({"header", "query", "basic", "aws_sigv4", "hmac"})
