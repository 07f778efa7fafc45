"""The caller-token digest (CPython's own SHA-256 where there is one) is hashlib's SHA-256, for any token."""

from __future__ import annotations

import hashlib

from hypothesis import given, strategies as st

from proxy.callers import Authenticator, _sha256
from proxy.config.models import CallerConfig


@given(st.text(max_size=300))
def test_the_token_digest_is_sha256(token):
    data = token.encode("utf-8", "surrogateescape")
    assert _sha256(data).digest() == hashlib.sha256(data).digest()


def test_a_configured_token_authenticates_by_its_sha256():
    auth = Authenticator({"billing": CallerConfig(token_sha256=hashlib.sha256(b"tok-1").hexdigest())})
    assert auth.authenticate({"authorization": "Bearer tok-1"}, None).name == "billing"
