"""Config loading and `credproxy check`: every refusal names file, line and field path."""

import json
import subprocess
import sys

import pytest

from proxy.config import models as config_mod
from proxy.cli.main import main
from tests.helpers import REPO

ROOT = REPO

GOOD = """\
server:
  listen: 127.0.0.1:8080
callers:
  billing:
    token_sha256: "{sha}"
credentials:
  example:
    upstream: https://api.example.com/base
    auth:
      type: header
      secret: apis/example#token
    session:
      ttl: 2h
      refresh_before: 5m
    allow:
      - callers: [billing]
        methods: [get, POST]
        paths: ["/v1/**"]
""".replace("{sha}", "a" * 64)


def problems(text: str) -> list[str]:
    with pytest.raises(config_mod.ConfigInvalid) as exc:
        config_mod.parse(text, "c.yaml")
    return [str(p) for p in exc.value.problems]


def test_good_config_parses_with_durations_and_defaults():
    cfg = config_mod.parse(GOOD, "c.yaml")
    cred = cfg.credentials["example"]
    assert cred.session.ttl == 7200 and cred.session.refresh_before == 300
    assert [m.status for m in cred.session.expired_when] == [401]
    assert cred.session.replay_max_body == 1 << 20
    assert cred.allow[0].methods == ["GET", "POST"]
    assert cfg.server.drain_timeout == 20 and cfg.server.limits.max_body == 1 << 30
    assert cfg.leak_guard_for("example") == "redact"
    assert str(cred.auth.secret) == "apis/example#token"


def test_example_config_is_valid():
    config_mod.load(ROOT / "config" / "example.yaml")


@pytest.mark.parametrize("old,new,expect", [
    ("https://api.example.com/base", "http://api.example.com/base",
     "c.yaml:8: credentials.example.upstream: http:// is refused unless the credential sets allow_insecure_upstream: true"),
    ("https://api.example.com/base", "https://me:pw@api.example.com/base",
     "c.yaml:8: credentials.example.upstream: must not contain userinfo"),
    ("  example:", "  Example:", "c.yaml:7: credentials.Example: credential names must match"),
    ("  example:", "  bad.name:", "c.yaml:7: credentials.bad.name: credential names must match"),
    ("secret: apis/example#token", "secret: apis/example-token",
     "c.yaml:11: credentials.example.auth.secret: must be a secret reference PATH#FIELD"),
    ("type: header", "type: telepathy", "c.yaml:10: credentials.example.auth.type: must be one of 'header'"),
    ("callers: [billing]", "callers: [ghost]",
     "c.yaml:16: credentials.example.allow[0].callers: names a caller that is not defined under callers"),
    ("ttl: 2h", "ttl: two hours", "c.yaml:13: credentials.example.session.ttl: must be a duration"),
    ("listen: 127.0.0.1:8080", "listen: 127.0.0.1:http", "c.yaml:2: server.listen: must be host:port"),
    ("    upstream:", "    upstreem:", "c.yaml:8: credentials.example.upstreem: is not a known key: did you mean upstream? (upstream is required)"),
    ('paths: ["/v1/**"]', 'paths: ["v1/**"]', "c.yaml:18: credentials.example.allow[0].paths: paths must start with /"),
])
def test_refusals_name_line_and_path(old, new, expect):
    assert old in GOOD
    found = problems(GOOD.replace(old, new))
    assert any(p.startswith(expect) for p in found), found


def test_anonymous_callers_only_on_loopback():
    text = GOOD.split("callers:")[0] + "credentials:" + GOOD.split("credentials:")[1].replace("callers: [billing]", "methods: [GET]")
    text = text.replace("        methods: [get, POST]\n", "")
    config_mod.parse(text, "c.yaml")  # loopback: fine
    found = problems(text.replace("127.0.0.1:8080", "0.0.0.0:8080"))
    assert any("callers may be omitted only when every listener is loopback" in p for p in found)
    config_mod.parse(text.replace("127.0.0.1:8080", "unix:/run/credproxy.sock"), "c.yaml")


def test_duplicate_listeners_are_refused():
    found = problems(GOOD.replace("server:\n", "admin:\n  listen: 127.0.0.1:8080\nserver:\n"))
    assert any("listener already used by server.listen" in p for p in found)


def test_invalid_yaml_reports_a_line():
    found = problems("server:\n  listen: [\n")
    assert found[0].startswith("c.yaml:") and "is not valid YAML" in found[0]


def test_check_command_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["check", "--config-only", "-c", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("type: header", "type: nope").replace("https://", "http://"))
    assert main(["check", "--config-only", "-c", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith(str(bad) + ":") for line in err)
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "proxy", "schema"], capture_output=True, text=True, check=True).stdout
    schema = json.loads(out)
    assert schema["title"] == "credproxy configuration"
    assert "credentials" in schema["properties"]


def test_two_callers_with_the_same_token_are_refused():
    """The token would not say which caller is calling: the audit line and the allow rules would guess."""
    billing = GOOD.split("billing:\n    token_sha256: ")[1].split("\n")[0]
    text = GOOD.replace("callers:\n  billing:\n", f"callers:\n  reports:\n    token_sha256: {billing}\n  billing:\n")
    found = problems(text)
    assert any("callers.billing.token_sha256" in p and "the same token as caller reports" in p for p in found), found
