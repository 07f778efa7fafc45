"""``session_login`` in the shape of Salesforce's SOAP ``login()``, through a real proxy.

Salesforce itself cannot run on loopback, so this is a Salesforce-shaped fake: a login
server that parses the SOAP envelope and answers ``loginResponse`` (sessionId,
serverUrl naming the instance, sessionSecondsValid) or an INVALID_LOGIN fault, and an
instance that accepts only live session IDs and otherwise answers 500 with
``INVALID_SESSION_ID`` — the expiry signal that is not a 401.
"""

import json
import logging
import secrets
import subprocess
import sys
from xml.etree import ElementTree

import pytest
from aiohttp import web

from tests.helpers import REPO, assert_no_canary
from tests.tokens_fixtures import call, proxy_logs, run_proxy  # noqa: F401 - fixtures

PASSWORD = "pw&<CANARY>-7c1e"  # XML-special characters on purpose
REPORTS_PASSWORD = "pw-reports-CANARY-22e0"
SOAP_BODY = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<env:Envelope xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:env="http://schemas.xmlsoap.org/soap/envelope/">'
    '<env:Body><n1:login xmlns:n1="urn:partner.soap.sforce.com">'
    "<n1:username>{secret:sf/login#username}</n1:username>"
    "<n1:password>{secret:sf/login#password}</n1:password>"
    "</n1:login></env:Body></env:Envelope>"
)
INVALID_SESSION = (
    b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
    b'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><soapenv:Fault>'
    b"<faultcode>sf:INVALID_SESSION_ID</faultcode><faultstring>INVALID_SESSION_ID: Invalid Session ID found in "
    b"SessionHeader: Illegal Session</faultstring></soapenv:Fault></soapenv:Body></soapenv:Envelope>"
)
NS = "{urn:partner.soap.sforce.com}"


class FakeSalesforce:
    def __init__(self) -> None:
        self.users = {"integration@acme.com": PASSWORD, "reports@acme.com": REPORTS_PASSWORD}
        self.sessions: dict[str, str] = {}  # session ID -> username
        self.logins: list[str] = []  # usernames, one per successful login
        self.calls: list[tuple[str, int]] = []  # (session ID, status) per API call
        self.other_500 = False
        self.echo = False
        self.runners = []

    async def login(self, request: web.Request) -> web.Response:
        assert request.headers["SOAPAction"] == "login"
        root = ElementTree.fromstring(await request.read())
        user, password = root.find(f".//{NS}username").text, root.find(f".//{NS}password").text
        if self.users.get(user) != password:
            fault = ("<soapenv:Envelope xmlns:soapenv='http://schemas.xmlsoap.org/soap/envelope/'><soapenv:Body>"
                     "<soapenv:Fault><faultcode>INVALID_LOGIN</faultcode><faultstring>INVALID_LOGIN: Invalid "
                     "username, password, security token; or user locked out.</faultstring></soapenv:Fault>"
                     "</soapenv:Body></soapenv:Envelope>")
            return web.Response(status=500, text=fault, content_type="text/xml")
        sid = "00D5g000000Abcd!AQ0AQ" + secrets.token_urlsafe(40).replace("-", "x").replace("_", "y")
        self.sessions[sid] = user
        self.logins.append(user)
        return web.Response(content_type="text/xml", text=f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com">
<soapenv:Body><loginResponse><result><metadataServerUrl>{self.instance}/services/Soap/m/59.0/00D5g000000Abcd</metadataServerUrl>
<passwordExpired>false</passwordExpired><sandbox>false</sandbox>
<serverUrl>{self.instance}/services/Soap/u/59.0/00D5g000000Abcd</serverUrl>
<sessionId>{sid}</sessionId><userId>0055g00000AbCdEAAV</userId>
<userInfo><sessionSecondsValid>7200</sessionSecondsValid><userName>{user}</userName></userInfo>
</result></loginResponse></soapenv:Body></soapenv:Envelope>""")

    async def api(self, request: web.Request) -> web.Response:
        sid = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.other_500:
            self.calls.append((sid, 500))
            return web.Response(status=500, text="UNKNOWN_EXCEPTION: an unexpected error occurred",
                                content_type="text/plain")
        if sid not in self.sessions:
            self.calls.append((sid, 500))
            return web.Response(status=500, body=INVALID_SESSION, content_type="text/xml")
        self.calls.append((sid, 200))
        answer = {"user": self.sessions[sid], "path": request.path}
        if self.echo:
            answer["session"] = sid
        return web.json_response(answer)

    async def _serve(self, app) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def start(self):
        login_app = web.Application()
        login_app.router.add_post("/services/Soap/u/59.0", self.login)
        instance_app = web.Application()
        instance_app.router.add_route("*", "/{tail:.*}", self.api)
        self.login_url = await self._serve(login_app) + "/services/Soap/u/59.0"
        self.instance = await self._serve(instance_app)
        return self

    async def stop(self):
        for r in self.runners:
            await r.cleanup()


@pytest.fixture
async def sf():
    s = await FakeSalesforce().start()
    yield s
    await s.stop()


def sf_cred(sf, **auth_extra) -> dict:
    return {
        "upstream": "http://127.0.0.1:9",  # placeholder: serverUrl names the instance
        "allow_insecure_upstream": True,
        "auth": {"type": "session_login",
                 "login": {"url": sf.login_url, "method": "POST",
                           "headers": {"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": "login"},
                           "body": SOAP_BODY},
                 "session_id": {"xml_element": "sessionId"}, "server_url": {"xml_element": "serverUrl"},
                 "expires_in": {"xml_element": "sessionSecondsValid"}, **auth_extra},
        "session": {"expired_when": [{"status": 401}, {"status": 500, "body_contains": "INVALID_SESSION_ID"}]},
        "allow": [{"callers": ["billing", "reports"], "paths": ["/**"]}],
    }


SECRETS = {"sf/login#username": "integration@acme.com", "sf/login#password": PASSWORD,
           "sf/reports#username": "reports@acme.com", "sf/reports#password": REPORTS_PASSWORD}


async def test_login_once_and_call_the_instance_named_by_server_url(sf, run_proxy):
    p = await run_proxy({"sf": sf_cred(sf)}, SECRETS)
    for _ in range(5):
        status, _, body = await call(p, "/sf/services/data/v59.0/sobjects/Account")
        assert status == 200
        assert json.loads(body) == {"user": "integration@acme.com", "path": "/services/data/v59.0/sobjects/Account"}
    assert sf.logins == ["integration@acme.com"]  # the password with & and < arrived intact
    state = p.proxy.holder.current.credentials["sf"].describe()
    assert state["state"] == "fresh" and 7190 < state["expires_in_s"] <= 7200  # sessionSecondsValid


async def test_500_invalid_session_id_means_log_in_again_and_replay(sf, run_proxy, tmp_path):
    p = await run_proxy({"sf": sf_cred(sf)}, SECRETS)
    assert (await call(p, "/sf/services/data/v59.0/limits"))[0] == 200
    sf.sessions.clear()  # Salesforce ends the session (timeout, logout, password change)
    status, _, body = await call(p, "/sf/services/data/v59.0/limits", method="POST", data=b'{"q": 1}')
    assert status == 200 and json.loads(body)["user"] == "integration@acme.com"
    assert len(sf.logins) == 2
    assert [s for _, s in sf.calls] == [200, 500, 200]
    assert p.audit_lines(tmp_path)[-1]["token_refreshed"] is True


async def test_other_500s_are_passed_through_without_a_new_login(sf, run_proxy):
    p = await run_proxy({"sf": sf_cred(sf)}, SECRETS)
    assert (await call(p, "/sf/x"))[0] == 200
    sf.other_500 = True
    status, _, body = await call(p, "/sf/x")
    assert status == 500 and b"UNKNOWN_EXCEPTION" in body
    assert len(sf.logins) == 1


async def test_a_wrong_password_is_a_503_and_never_logged(sf, run_proxy, caplog):
    caplog.set_level(logging.DEBUG)
    p = await run_proxy({"sf": sf_cred(sf)}, {**SECRETS, "sf/login#password": "wrong-CANARY-pw-91d2"})
    status, headers, body = await call(p, "/sf/x")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert p.proxy.holder.current.credentials["sf"].describe()["last_error"] == "http_error"  # SOAP fault: 500
    for secret in ("wrong-CANARY-pw-91d2", PASSWORD):
        assert_no_canary(proxy_logs(caplog), secret, "logs")
        assert_no_canary(body, secret, "response")


async def test_each_caller_principal_has_its_own_session(sf, run_proxy):
    overrides = {"reports": {"sf/login#username": "sf/reports#username", "sf/login#password": "sf/reports#password"}}
    p = await run_proxy({"sf": sf_cred(sf, per_caller=overrides)}, SECRETS)
    for caller, user in [("billing", "integration@acme.com"), ("reports", "reports@acme.com")] * 3:
        status, _, body = await call(p, "/sf/whoami", caller=caller)
        assert status == 200 and json.loads(body)["user"] == user
    assert sorted(sf.logins) == ["integration@acme.com", "reports@acme.com"]


async def test_session_ids_and_passwords_never_reach_callers_logs_or_audit(sf, run_proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sf.echo = True
    p = await run_proxy({"sf": sf_cred(sf)}, SECRETS)
    bodies = []
    for _ in range(2):
        status, headers, body = await call(p, "/sf/services/data/v59.0/query")
        assert status == 200 and json.loads(body)["session"] == "[REDACTED]"
        bodies.append(body + str(dict(headers)).encode())
    sf.sessions.clear()
    bodies.append((await call(p, "/sf/services/data/v59.0/query"))[2])
    admin = json.dumps(p.proxy.holder.current.credentials["sf"].describe())
    metrics = p.proxy.holder.current.metrics.render()
    await p.proxy.stop()
    p.stopped = True
    audit = (tmp_path / "audit.log").read_text()
    assert len(sf.sessions) == 1 and len(sf.logins) == 2
    for secret in [*sf.sessions, *(sid for sid, _ in sf.calls), PASSWORD]:
        for where, text in [("logs", proxy_logs(caplog)), ("audit", audit), ("admin", admin), ("metrics", metrics),
                            *(("response", b) for b in bodies)]:
            assert_no_canary(text, secret, where)


def test_the_salesforce_soap_example_config_validates():
    root = REPO
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config-only", "-c",
                             "config/examples/salesforce-soap.yaml"],
                            cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok (1 credentials" in result.stdout
