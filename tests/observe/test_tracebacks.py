"""Unexpected exceptions (bugs) are logged with their traceback, through the scrubbing filter: an operator
can find the failing line, and a secret in the exception's message or its frames never reaches the log."""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy.admin import api as admin_api
from proxy.observe.log_setup import JsonFormatter
from proxy.redact import log_filter
from proxy.redact.scrubber import SCRUBBER
from proxy.tokens.lifecycle import Settings, TokenSlot, TokenUnavailable
from tests.ops_support import (ADMIN_TOKEN, CANARY, Admin, assert_no_secret, base_config, credential, make_store,
                               running, upstream, write_config)

__all__ = ["upstream"]  # the fixture


@pytest.fixture
def json_log():
    """Root logger -> a JSON-lines stream, with the scrubbing filter installed (as ``log_setup.setup`` does)."""
    SCRUBBER.hold("test canary", CANARY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    log_filter.install(SCRUBBER)
    yield stream
    root.removeHandler(handler)


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def provider_with_a_bug():
    def build_request(secret: str) -> None:
        raise KeyError(f"no field 'expires' in answer carrying {secret}")

    async def obtain():
        build_request(CANARY)

    return obtain


async def test_a_token_provider_bug_logs_its_traceback_without_the_secret(json_log):
    slot = TokenSlot(provider_with_a_bug(), Settings(ttl=60, refresh_before=10), label="demo")
    with pytest.raises(TokenUnavailable):
        await slot.get()
    [bug] = [r for r in records(json_log) if r["msg"] == "token provider failed unexpectedly"]
    assert bug["credential"] == "demo" and bug["level"] == "error"
    assert "Traceback" in bug["exc"] and "in build_request" in bug["exc"] and "KeyError" in bug["exc"]
    assert_no_secret(json_log.getvalue())


async def test_an_admin_500_logs_its_traceback_without_the_secret(tmp_path, upstream, json_log, monkeypatch):
    def broken_readiness(holder):  # fault injection: a bug in an admin handler
        raise RuntimeError(f"readiness bug near {CANARY}")

    monkeypatch.setattr(admin_api, "readiness", broken_readiness)
    store = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    cfg = write_config(tmp_path / "config.yaml",
                       base_config(tmp_path, store, {"demo": credential(upstream.url)}, admin_token=True))
    async with running(cfg) as proxy:
        status, body, text = await Admin(proxy.cfg.admin.listen, ADMIN_TOKEN).call("GET", "/readyz")
    assert status == 500 and body["error"] == "internal_error"
    assert_no_secret(text)
    [failed] = [r for r in records(json_log) if r["msg"] == "admin request failed"]
    assert failed["path"] == "/readyz" and failed["error"] == "RuntimeError"
    assert "Traceback" in failed["exc"] and "in broken_readiness" in failed["exc"]
    assert_no_secret(json_log.getvalue())


def test_an_unexpected_vault_client_error_logs_its_traceback_without_the_secret(json_log):
    from proxy.store.vault_client import translate

    def parse_answer():
        raise ZeroDivisionError(f"while reading {CANARY}")

    try:
        parse_answer()
    except ZeroDivisionError as exc:
        mapped = translate(exc, "vault read apis/demo")
    assert CANARY not in str(mapped)
    [bug] = [r for r in records(json_log) if r["msg"] == "vault call failed unexpectedly"]
    assert "in parse_answer" in bug["exc"] and "ZeroDivisionError" in bug["exc"]
    assert_no_secret(json_log.getvalue())


async def test_a_reload_that_cannot_be_applied_logs_its_traceback_without_the_secret(tmp_path, upstream, json_log,
                                                                                     monkeypatch):
    store = make_store(tmp_path, {"api/demo": {"token": CANARY}})
    cfg = write_config(tmp_path / "config.yaml",
                       base_config(tmp_path, store, {"demo": credential(upstream.url)}, admin_token=True))
    async with running(cfg) as proxy:
        def build_state_with_a_bug(*args, **kw):  # fault injection: a bug while the new state is built
            raise RuntimeError(f"state bug near {CANARY}")

        monkeypatch.setattr(proxy, "build_state", build_state_with_a_bug)
        result = await proxy.reload()
    assert result.result == "invalid" and any("cannot be applied" in p.message for p in result.problems)
    [failed] = [r for r in records(json_log) if r["msg"] == "reload could not be applied"]
    assert "in build_state_with_a_bug" in failed["exc"] and "RuntimeError" in failed["exc"]
    assert_no_secret(json_log.getvalue())
