"""Log scrubbing as a filter: records from any logger — ours or a library's — are
clean before any handler formats them, whichever formatter it uses."""

from __future__ import annotations

import io
import logging

import pytest

from proxy.redact import log_filter as logfilter

from proxy.observe import log_setup as logs
from proxy.redact.scrubber import SCRUBBER, Scrubber

from .harness import CANARY, assert_clean

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiaWxsaW5nIn0.c2lnbmF0dXJlLXBhcnQ"
SF_SESSION = "00D5g000004XYZA!AQ4AQLkTd0W2bHpq7Qm9.Zr3UvA8sdfkjh_3kL"
CALLER = "cp_Zk3J9fQ2mN8vX1cR4tY7uI0oP5aS6dF"


@pytest.fixture
def captured():
    """A plain handler with the stdlib formatter on the root logger, then the filter installed
    (the order ``logs.setup`` uses)."""
    SCRUBBER.hold("test canary", CANARY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(detail)s", defaults={"detail": ""}))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logfilter.install(SCRUBBER)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


LOGGERS = ["aiohttp.client", "aiohttp.server", "aiohttp.access", "hvac", "urllib3.connectionpool", "asyncio",
           "credproxy.request", "credproxy.some.new.module", "authlib.integrations", "an.unknown.library"]


@pytest.mark.parametrize("name", LOGGERS)
def test_message_args_extras_and_tracebacks_are_scrubbed(captured, name):
    log = logging.getLogger(name)
    log.debug("sending Authorization: Bearer %s to %s", CANARY, "api", extra={"detail": f"token={CANARY}"})
    try:
        raise ValueError(f"upstream said: invalid key {CANARY}")
    except ValueError:
        log.exception("request failed for %r", {"auth": CANARY}, extra={"detail": CANARY})
    log.warning("with stack", stack_info=True, extra={"detail": [CANARY]})
    out = captured.getvalue()
    assert out.count(name) >= 3
    assert "Traceback" in out and "ValueError" in out  # the traceback is kept, only the value goes
    assert "[REDACTED]" in out
    assert_clean(out, where=f"records of {name}")


def test_records_seen_by_other_handlers_are_already_clean(captured, caplog):
    logfilter.install(SCRUBBER)  # caplog's handler was added after the fixture's install
    logging.getLogger("aiohttp.client").warning("key %s", CANARY)
    assert caplog.records and CANARY not in caplog.records[-1].getMessage()
    assert_clean(caplog.text)


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {JWT}", f"id_token={JWT}", f"session {SF_SESSION}", f"caller token {CALLER}",
    '{"access_token": "ya29.a0AfH6SMBx3jkl", "token_type": "bearer"}', "client_secret=s3cr3t-Value-123&grant_type=x",
    "Proxy-Authorization: Basic dXNlcjpwYXNzd29yZA==", "Cookie: sid=abcdef0123456789",
])
def test_token_shapes_are_scrubbed_without_registration(text):
    out = Scrubber().scrub(text)
    assert "[REDACTED]" in out
    for secret in (JWT, SF_SESSION, CALLER, "ya29.a0AfH6SMBx3jkl", "s3cr3t-Value-123", "dXNlcjpwYXNzd29yZA==",
                   "abcdef0123456789"):
        assert secret not in out


def test_ordinary_log_text_is_left_alone():
    text = '{"reason": "bad_caller_token", "token_refreshed": false, "secret_path": "apis/demo", "status": 401}'
    assert Scrubber().scrub(text) == text


def test_json_formatter_output_is_scrubbed():
    SCRUBBER.hold("test canary", CANARY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "value %s", (CANARY,), None)
    record.detail = {"nested": CANARY}
    handler.handle(record)
    assert_clean(stream.getvalue())


def test_uncaught_exceptions_go_through_the_scrubbed_log(captured):
    logfilter.install_excepthooks(logging.getLogger("credproxy"))
    import sys

    try:
        raise RuntimeError(f"boom {CANARY}")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook = sys.__excepthook__
        import threading

        threading.excepthook = threading.__excepthook__
    out = captured.getvalue()
    assert "uncaught exception" in out and "RuntimeError" in out
    assert_clean(out)
