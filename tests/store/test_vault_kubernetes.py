"""``auth.method: kubernetes`` against a real OpenBao, without a cluster.

Two ways, both with the real OpenBao server:
- OpenBao's ``kubernetes`` auth method, whose TokenReview call goes to a small
  aiohttp stand-in for the Kubernetes API server (the only fake here: there is no
  cluster on this machine). It records the service-account JWT it was asked about.
- OpenBao's ``jwt`` auth method validating the same kind of service-account JWT
  with a public key (how Vault is set up against a cluster's OIDC issuer). The
  login request credproxy sends ({role, jwt} to auth/<mount>/login) is the same.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import jwt as pyjwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config.models import VaultConfig
from proxy.store.vault import VaultStore
from proxy.errors import LoginRefused
from tests.vault_fixture import OpenBao, bao  # noqa: F401 - fixtures
from tests.helpers import REPO

POLICY = (REPO / "deploy" / "vault" / "policy.hcl").read_text()
SA_NAMESPACE, SA_NAME, SA_UID = "apps", "credproxy", str(uuid.uuid4())


def service_account_jwt(key, *, audience: str = "vault") -> str:
    now = int(time.time())
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}",
        "aud": [audience], "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": SA_NAMESPACE, "serviceaccount": {"name": SA_NAME, "uid": SA_UID}},
        # the legacy claims OpenBao's kubernetes method reads the identity from
        "kubernetes.io/serviceaccount/namespace": SA_NAMESPACE,
        "kubernetes.io/serviceaccount/service-account.name": SA_NAME,
        "kubernetes.io/serviceaccount/service-account.uid": SA_UID,
    }
    return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "test"})


@pytest.fixture(scope="module")
def signing_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_public(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def store_for(bao: OpenBao, mount: str, jwt_file: Path) -> VaultStore:
    return VaultStore(VaultConfig(address=bao.address, auth={
        "method": "kubernetes", "mount": mount, "role": "credproxy", "jwt_file": str(jwt_file)}))


async def test_kubernetes_auth_method_with_token_review(bao, signing_key, tmp_path, aiohttp_server):
    sa_jwt = service_account_jwt(signing_key)
    reviewed: list[dict] = []

    async def token_review(request: web.Request) -> web.Response:
        body = await request.json()
        reviewed.append({"auth": request.headers.get("Authorization"), "token": body["spec"]["token"]})
        ok = body["spec"]["token"] == sa_jwt
        status = {"authenticated": ok, "audiences": body["spec"].get("audiences") or []}
        if ok:
            status["user"] = {"username": f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}", "uid": SA_UID,
                              "groups": ["system:serviceaccounts"]}
        return web.json_response({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})

    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", token_review)
    api = await aiohttp_server(app)
    root = bao.root()
    root.sys.enable_auth_method("kubernetes", path="k8s")
    root.write("auth/k8s/config", kubernetes_host=f"http://127.0.0.1:{api.port}", token_reviewer_jwt="reviewer-jwt",
               disable_local_ca_jwt=True, kubernetes_ca_cert=trustme.CA().cert_pem.bytes().decode())
    bao.policy("credproxy", POLICY)
    root.write("auth/k8s/role/credproxy", bound_service_account_names=SA_NAME,
               bound_service_account_namespaces=SA_NAMESPACE, token_policies="credproxy", token_ttl="1h")
    bao.put("credproxy/secrets/k8s", {"token": "via-kubernetes"})

    jwt_file = tmp_path / "token"
    jwt_file.write_text(sa_jwt)
    store = store_for(bao, "k8s", jwt_file)
    await store.start()
    try:
        assert (await store.get("credproxy/secrets/k8s")).fields["token"].reveal() == "via-kubernetes"
    finally:
        await store.close()
    assert reviewed == [{"auth": "Bearer reviewer-jwt", "token": sa_jwt}]  # OpenBao asked the cluster about our JWT

    jwt_file.write_text(service_account_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(LoginRefused, match=r"vault kubernetes login refused \(HTTP 403\): check secrets.vault.auth.role"):
        await store_for(bao, "k8s", jwt_file).start()


async def test_kubernetes_login_against_jwt_auth_method(bao, signing_key, tmp_path):
    root = bao.root()
    root.sys.enable_auth_method("jwt", path="k8s-oidc")
    root.write("auth/k8s-oidc/config", jwt_validation_pubkeys=[pem_public(signing_key)])
    bao.policy("credproxy", POLICY)
    root.write("auth/k8s-oidc/role/credproxy", role_type="jwt", user_claim="sub", bound_audiences=["vault"],
               bound_subject=f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}", token_policies=["credproxy"],
               token_ttl="1h")
    bao.put("credproxy/secrets/jwt", {"token": "via-service-account-jwt"})

    jwt_file = tmp_path / "token"
    jwt_file.write_text(service_account_jwt(signing_key))
    store = store_for(bao, "k8s-oidc", jwt_file)
    await store.start()
    try:
        assert (await store.get("credproxy/secrets/jwt")).fields["token"].reveal() == "via-service-account-jwt"
    finally:
        await store.close()

    jwt_file.write_text(service_account_jwt(signing_key, audience="someone-else"))
    with pytest.raises(LoginRefused, match=r"vault kubernetes login refused \(HTTP 400\)"):
        await store_for(bao, "k8s-oidc", jwt_file).start()
