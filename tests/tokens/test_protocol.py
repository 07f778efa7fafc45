"""The protocol pieces without sockets: token answers, client authentication, assertions,
login requests and login answers. Every bad answer has one defined outcome."""

import base64
import json
import logging
import time

import jwt
import pytest
from yarl import URL

from proxy.config.auth import SessionLoginAuth
from proxy.store.secret import Secret
from proxy.tokens.answer import MAX_LIFETIME, parse_oauth2
from proxy.tokens.clientauth import (
    CLIENT_ASSERTION_TYPE,
    FormRequest,
    apply_client_auth,
)
from proxy.errors import TokenFailure
from proxy.tokens.http import Answer
from proxy.tokens.jwt_bearer import assertion_claims, token_request
from proxy.tokens.session_login import login_request, parse_login
from tests.tokens_fixtures import ec_key, rsa_key  # noqa: F401 - fixtures

NOW = 1_700_000_000.0
BODY_CANARY = "BODYCANARY-3c9f"


def answer(body, status=200, content_type="application/json") -> Answer:
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return Answer(status, content_type, body.encode() if isinstance(body, str) else body)


def jwt_token(exp: float) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'sub': 'x'})}.sig"


@pytest.mark.parametrize("expires_in,expected", [
    (3600, 3600.0), (3599.5, 3599.5), ("3599", 3599.0), (" 120 ", 120.0),  # Azure AD v1 sends strings
    (10**12, MAX_LIFETIME), (1e308, MAX_LIFETIME),  # huge: capped
    ("soon", None), (True, None), (None, None), ({"s": 1}, None),  # unusable: as if absent
])
def test_expires_in_forms(expires_in, expected):
    got = parse_oauth2(answer({"access_token": "tok-123456", "expires_in": expires_in}), now_wall=NOW)
    assert got.expires_in == expected and got.access.reveal() == "tok-123456"


@pytest.mark.parametrize("expires_in", [0, -1, "0", "-30", -0.5])
def test_zero_or_negative_expires_in_is_refused(expires_in):
    with pytest.raises(TokenFailure) as err:
        parse_oauth2(answer({"access_token": "tok-123456", "expires_in": expires_in}), now_wall=NOW)
    assert err.value.reason == "bad_expires_in"


def test_missing_expires_in_uses_the_jwt_exp_then_nothing():
    got = parse_oauth2(answer({"access_token": jwt_token(NOW + 900)}), now_wall=NOW)
    assert got.expires_in == 900.0
    assert parse_oauth2(answer({"access_token": "opaque-token"}), now_wall=NOW).expires_in is None
    with pytest.raises(TokenFailure) as err:
        parse_oauth2(answer({"access_token": jwt_token(NOW - 1)}), now_wall=NOW)
    assert err.value.reason == "bad_expires_in"


@pytest.mark.parametrize("resp,reason", [
    (answer({"token_type": "Bearer", "expires_in": 3600, "note": BODY_CANARY}), "no_access_token"),
    (answer({"access_token": "", "note": BODY_CANARY}), "no_access_token"),
    (answer({"access_token": 12345, "note": BODY_CANARY}), "no_access_token"),
    (answer({"access_token": None}), "no_access_token"),
    (answer(f"<!DOCTYPE html><html><body>{BODY_CANARY} sign in</body></html>", content_type="text/html"), "html"),
    (answer(f"<html>{BODY_CANARY}</html>", content_type="application/json"), "html"),
    (answer('{"access_token": "' + BODY_CANARY), "invalid_json"),
    (answer(f"access_token={BODY_CANARY}&expires_in=3600", content_type="text/plain"), "invalid_json"),
    (answer(b"\xff\xfe" + BODY_CANARY.encode()), "invalid_json"),
    (answer(f'["{BODY_CANARY}"]'), "invalid_json"),
    (answer('{"access_token": "tok-123456", "expires_in": NaN}'), "invalid_json"),
    (answer({"error": "invalid_client", "error_description": BODY_CANARY}, status=401), "rejected"),
    (answer({"error": "invalid_grant"}, status=400), "rejected"),
    (answer(f"<html>{BODY_CANARY}</html>", status=502, content_type="text/html"), "http_error"),
    (answer("", status=503), "http_error"),
    (answer("", status=302), "http_error"),
])
def test_bad_answers_have_one_reason_and_never_carry_the_body(resp, reason, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TokenFailure) as err:
        parse_oauth2(resp, now_wall=NOW)
    assert err.value.reason == reason
    assert BODY_CANARY not in str(err.value) and BODY_CANARY not in caplog.text


def test_only_rfc6749_shaped_error_codes_are_reported():
    with pytest.raises(TokenFailure) as err:
        parse_oauth2(answer({"error": "invalid_grant"}, status=400), now_wall=NOW)
    assert err.value.detail == "token endpoint answered HTTP 400 error=invalid_grant"
    with pytest.raises(TokenFailure) as err:
        parse_oauth2(answer({"error": f"bad {BODY_CANARY}"}, status=400), now_wall=NOW)
    assert err.value.detail == "token endpoint answered HTTP 400"


@pytest.mark.parametrize("url,insecure,ok", [
    ("https://acme.my.salesforce.com", False, True),
    ("https://acme.my.salesforce.com:8443/ignored/path", False, True),
    ("http://127.0.0.1:8080", True, True),
    ("http://acme.my.salesforce.com", False, False),
    ("https://user:pw@evil.example", False, False),
    ("ftp://acme.example", False, False),
    ("/relative", False, False),
    (None, False, False),
    (42, False, False),
])
def test_instance_url_becomes_the_upstream_keeping_the_path_prefix(url, insecure, ok):
    body = {"access_token": "tok-123456"}
    if url is not None:
        body["instance_url"] = url
    if not ok:
        with pytest.raises(TokenFailure) as err:
            parse_oauth2(answer(body), now_wall=NOW, want_instance_url=True, base=URL("https://x/prefix"),
                         insecure_ok=insecure)
        assert err.value.reason == "bad_instance_url"
        return
    got = parse_oauth2(answer(body), now_wall=NOW, want_instance_url=True, base=URL("https://x/prefix"),
                       insecure_ok=insecure)
    u = URL(url)
    assert (got.upstream.scheme, got.upstream.host, got.upstream.port, got.upstream.path) == (
        u.scheme, u.host, u.port, "/prefix")


def test_client_secret_basic_and_post():
    req = FormRequest("https://as/token", {"grant_type": "client_credentials"})
    apply_client_auth(req, "basic", "id:with colon", client_secret=Secret("s3cr%t"))
    assert "client_secret" not in req.form and "client_id" not in req.form
    decoded = base64.b64decode(req.headers["Authorization"].removeprefix("Basic ")).decode()
    assert decoded == "id%3Awith%20colon:s3cr%25t"  # RFC 6749 §2.3.1: form-encoded, then Basic
    req = FormRequest("https://as/token", {"grant_type": "client_credentials"})
    apply_client_auth(req, "post", "svc", client_secret=Secret("s3cret"))
    assert req.form == {"grant_type": "client_credentials", "client_id": "svc", "client_secret": "s3cret"}
    assert req.headers == {} and "s3cret" not in repr(req)
    public = FormRequest("https://as/token", {})
    apply_client_auth(public, "basic", "app")
    assert public.form == {"client_id": "app"} and public.headers == {}


@pytest.mark.parametrize("kind,alg", [("rsa", "RS256"), ("ec", "ES256")])
def test_private_key_jwt_assertion(kind, alg, rsa_key, ec_key):
    pem, public = rsa_key if kind == "rsa" else ec_key
    req = FormRequest("https://as/revoke", {})
    apply_client_auth(req, "private_key_jwt", "svc", private_key=Secret(pem), key_id="k1", now=time.time(),
                      jti="j-1", aud="https://as/token")
    assert req.form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    token = req.form["client_assertion"]
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "k1", "typ": "JWT"}
    claims = jwt.decode(token, public, algorithms=[alg], audience="https://as/token")
    assert claims["iss"] == claims["sub"] == "svc" and claims["jti"] == "j-1"
    assert claims["exp"] - claims["iat"] == 60


def test_bad_private_keys_are_a_defined_failure():
    for pem in ("not a key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(TokenFailure) as err:
            apply_client_auth(FormRequest("https://as/token", {}), "private_key_jwt", "svc", private_key=Secret(pem))
        assert err.value.reason == "bad_private_key" and pem not in str(err.value)


def test_jwt_bearer_assertion_claims(rsa_key):
    from proxy.config.auth import OAuth2JwtBearerAuth

    pem, public = rsa_key
    auth = OAuth2JwtBearerAuth(type="oauth2_jwt_bearer", token_url="https://login.salesforce.com/services/oauth2/token",
                               client_id="3MVG9", subject="user@acme.com", audience="https://login.salesforce.com",
                               private_key="sf/jwt#key")
    req = token_request(auth, Secret(pem), now=NOW, jti="j")
    assert req.form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = jwt.decode(req.form["assertion"], public, algorithms=["RS256"], audience="https://login.salesforce.com",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == assertion_claims(auth, now=NOW, jti="j")
    assert claims["exp"] - claims["iat"] <= 180  # Salesforce: at most 3 minutes


SOAP_OK = """<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com">
 <soapenv:Body><loginResponse><result>
  <serverUrl>https://acme.my.salesforce.com/services/Soap/u/59.0/00D000000000001</serverUrl>
  <sessionId>00D000000000001!AQ0AQsessionvalue</sessionId>
  <userInfo><sessionSecondsValid>7200</sessionSecondsValid></userInfo>
 </result></loginResponse></soapenv:Body></soapenv:Envelope>"""


def soap_auth(**extra) -> SessionLoginAuth:
    return SessionLoginAuth.model_validate({
        "type": "session_login",
        "login": {"url": "https://login.salesforce.com/services/Soap/u/59.0",
                  "headers": {"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": "login"},
                  "body": "<n1:username>{secret:sf/login#username}</n1:username>"
                          "<n1:password>{secret:sf/login#password}</n1:password>"},
        "session_id": {"xml_element": "sessionId"}, "server_url": {"xml_element": "serverUrl"},
        "expires_in": {"xml_element": "sessionSecondsValid"}, **extra})


def test_login_body_escapes_values_for_its_content_type():
    values = {"sf/login#username": Secret("a&b@acme.com"), "sf/login#password": Secret('p<w>"d\'</n1:password>')}
    headers, body = login_request(soap_auth().login, values)
    assert headers == {"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": "login"}
    assert body.decode() == ("<n1:username>a&amp;b@acme.com</n1:username>"
                             "<n1:password>p&lt;w&gt;&quot;d&apos;&lt;/n1:password&gt;</n1:password>")
    jauth = SessionLoginAuth.model_validate({
        "type": "session_login", "session_id": {"json_pointer": "/token"},
        "login": {"url": "https://x/login", "headers": {"Content-Type": "application/json"},
                  "body": '{"user": "{secret:a#u}", "pass": "{secret:a#p}"}'}})
    _, body = login_request(jauth.login, {"a#u": Secret("me"), "a#p": Secret('q"uote\\')})
    assert json.loads(body) == {"user": "me", "pass": 'q"uote\\'}


def test_soap_login_answer():
    got = parse_login(answer(SOAP_OK, content_type="text/xml"), soap_auth(), base=URL("https://placeholder/"),
                      insecure_ok=False)
    assert got.access.reveal() == "00D000000000001!AQ0AQsessionvalue"
    assert got.expires_in == 7200.0
    assert str(got.upstream) == "https://acme.my.salesforce.com/"


@pytest.mark.parametrize("body,status,reason", [
    (SOAP_OK.replace("<sessionId>00D000000000001!AQ0AQsessionvalue</sessionId>", ""), 200, "no_session_id"),
    (SOAP_OK.replace("00D000000000001!AQ0AQsessionvalue", "  "), 200, "no_session_id"),
    ("<soapenv:Envelope><unclosed>" + BODY_CANARY, 200, "invalid_xml"),
    ('<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY lol "lol">]><sessionId>&lol;</sessionId>', 200, "invalid_xml"),
    (f"<html><body>{BODY_CANARY}</body></html>", 200, "html"),
    (f"<soapenv:Fault><faultcode>INVALID_LOGIN</faultcode><faultstring>{BODY_CANARY}</faultstring></soapenv:Fault>",
     500, "http_error"),
    (SOAP_OK.replace("https://acme.my.salesforce.com", "http://acme.my.salesforce.com"), 200, "bad_instance_url"),
    (SOAP_OK.replace("7200", "0"), 200, "bad_expires_in"),
])
def test_bad_login_answers(body, status, reason):
    with pytest.raises(TokenFailure) as err:
        parse_login(answer(body, status=status, content_type="text/xml"), soap_auth(),
                    base=URL("https://placeholder/"), insecure_ok=False)
    assert err.value.reason == reason and BODY_CANARY not in str(err.value)


def test_json_login_answer_by_pointer():
    auth = SessionLoginAuth.model_validate({
        "type": "session_login", "login": {"url": "https://x/login"},
        "session_id": {"json_pointer": "/data/sessions/0/id"}, "expires_in": {"json_pointer": "/data/ttl"}})
    got = parse_login(answer({"data": {"sessions": [{"id": "sess-1"}], "ttl": "600"}}), auth, base=URL("https://x/"),
                      insecure_ok=False)
    assert got.access.reveal() == "sess-1" and got.expires_in == 600.0 and got.upstream is None
    got = parse_login(answer({"data": {"sessions": [{"id": "sess-1"}]}}), auth, base=URL("https://x/"),
                      insecure_ok=False)
    assert got.expires_in is None  # session.ttl applies
    with pytest.raises(TokenFailure) as err:
        parse_login(answer({"data": {"sessions": []}}), auth, base=URL("https://x/"), insecure_ok=False)
    assert err.value.reason == "no_session_id"
