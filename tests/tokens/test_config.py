"""Config for the token types: what is accepted, and one problem line per mistake."""

import pytest
import yaml

from proxy.config import models as config_mod
from proxy.config.models import ConfigInvalid


def cfg_with(auth: dict, **cred) -> str:
    return yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"}, "admin": {"listen": "127.0.0.1:0"},
        "callers": {"billing": {"token_sha256": "0" * 64}},
        "credentials": {"api": {"upstream": "https://api.example.com", "auth": auth, **cred}},
    })


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as err:
        config_mod.parse(text, "c.yaml")
    return [f"{p.path}: {p.message}" for p in err.value.problems]


CC = {"type": "oauth2_client_credentials", "token_url": "https://as.example.com/token", "client_id": "svc",
      "client_secret": "oauth/svc#secret"}
RT = {"type": "oauth2_refresh_token", "token_url": "https://as.example.com/token", "client_id": "app",
      "refresh_token": "oauth/app#rt"}
JWT = {"type": "oauth2_jwt_bearer", "token_url": "https://login.salesforce.com/services/oauth2/token",
       "client_id": "3MVG9", "subject": "u@acme.com", "private_key": "sf/jwt#key", "use_instance_url": True}
LOGIN = {"type": "session_login", "login": {"url": "https://login.example.com/api/login",
                                            "headers": {"Content-Type": "application/json"},
                                            "body": '{"u": "{secret:l/x#u}", "p": "{secret:l/x#p}"}'},
         "session_id": {"json_pointer": "/session"}}


@pytest.mark.parametrize("auth", [CC, RT, JWT, LOGIN, {**CC, "client_auth": "private_key_jwt",
                                                        "private_key": "oauth/svc#key", "client_secret": None}])
def test_token_types_parse_with_their_defaults(auth):
    cfg = config_mod.parse(cfg_with({k: v for k, v in auth.items() if v is not None}))
    cred = cfg.credentials["api"]
    assert cred.auth.header == "Authorization" and str(cred.auth.value) == "Bearer {secret}"
    assert cred.session.refresh_before == 300 and cred.session.replay_max_body == 1 << 20
    assert [(m.status, m.body_contains) for m in cred.session.expired_when] == [(401, None)]


def test_session_login_template_refs_are_secret_refs():
    auth = config_mod.parse(cfg_with(LOGIN)).credentials["api"].auth
    assert sorted(str(r) for r in auth.template_refs()) == ["l/x#p", "l/x#u"]


@pytest.mark.parametrize("auth,expected", [
    ({**CC, "client_secret": None}, "client_auth basic needs client_secret"),
    ({**CC, "client_auth": "post", "client_secret": None}, "client_auth post needs client_secret"),
    ({**CC, "client_auth": "private_key_jwt"}, "client_auth private_key_jwt needs private_key"),
    ({**CC, "client_auth": "mtls"}, "credentials.api.auth.client_auth"),
    ({**CC, "client_secret": "not-a-reference"}, "credentials.api.auth.client_secret"),
    ({**CC, "value": "Token abc"}, "value must contain {secret}"),
    ({**RT, "refresh_token": None}, "credentials.api.auth.refresh_token"),
    ({**JWT, "subject": None}, "credentials.api.auth.subject"),
    ({**LOGIN, "session_id": {}}, "set exactly one of xml_element or json_pointer"),
    ({**LOGIN, "session_id": {"xml_element": "a", "json_pointer": "/a"}}, "set exactly one"),
    ({**LOGIN, "session_id": {"json_pointer": "session"}}, "json_pointer must start with /"),
    ({**LOGIN, "login": {"url": "https://x/l", "body": "{secret:not a ref}"}}, "credentials.api.auth.login.body"),
])
def test_bad_token_auth_is_one_problem_with_its_path(auth, expected):
    found = problems(cfg_with({k: v for k, v in auth.items() if v is not None}))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("auth,field", [
    ({**CC, "token_url": "http://as.example.com/token"}, "credentials.api.auth.token_url"),
    ({**CC, "revocation_url": "http://as.example.com/revoke"}, "credentials.api.auth.revocation_url"),
    ({**LOGIN, "login": {**LOGIN["login"], "url": "http://login.example.com/l"}}, "credentials.api.auth.login.url"),
])
def test_token_urls_must_be_https_unless_insecure_is_allowed(auth, field):
    found = problems(cfg_with(auth))
    assert found == [f"{field}: http:// is refused unless the credential sets allow_insecure_upstream: true"]
    config_mod.parse(cfg_with(auth, allow_insecure_upstream=True))


def test_userinfo_in_a_token_url_is_refused():
    found = problems(cfg_with({**CC, "token_url": "https://svc:pw@as.example.com/token"}))
    assert found == ["credentials.api.auth.token_url: must not contain userinfo (user:password@)"]


def test_per_caller_overrides_secret_fields_and_login_placeholders():
    cc = {**CC, "per_caller": {"billing": {"client_secret": "oauth/billing#secret"}}}
    config_mod.parse(cfg_with(cc))
    login = {**LOGIN, "per_caller": {"billing": {"l/x#u": "l/billing#u", "l/x#p": "l/billing#p"}}}
    config_mod.parse(cfg_with(login))
    found = problems(cfg_with({**CC, "per_caller": {"billing": {"client_id": "oauth/x#id"}}}))
    assert found == ["credentials.api.auth.per_caller.billing.client_id: is not a secret field of this auth type"]
    found = problems(cfg_with({**CC, "per_caller": {"billing": {"l/x#u": "l/billing#u"}}}))
    assert found == ["credentials.api.auth.per_caller.billing.l/x#u: is not a secret field of this auth type"]
