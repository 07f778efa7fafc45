"""The log scrubber: active secret values and token shapes never reach a log line.

Secrets register themselves here when they are injected (values are kept as
compiled patterns, never logged); shape rules catch what was never registered:
bearer/basic credentials, JWTs, Salesforce session IDs, credproxy caller tokens,
and ``key=value`` / ``"key": "value"`` pairs whose key names a secret.
"""

from __future__ import annotations

import re
import threading

from proxy.redact.leak_guard import MIN_SECRET, LeakGuard

_SECRET_KEYS = (r"access_token|refresh_token|id_token|client_secret|client_assertion|password|passwd|"
                r"session_?id|sessionid|secret|api[_-]?key|x-api-key|private_key|assertion|token")
_SHAPES = [
    (re.compile(r"(?i)\b(bearer|basic|negotiate)(\s+)[A-Za-z0-9\-._~+/=]{8,}"), r"\1\2[REDACTED]"),
    # "Token <value>" (an Authorization scheme) but not prose such as "token obtained":
    # the value must be long or contain a digit.
    (re.compile(r"(?i)\b(token)(\s+)(?=[A-Za-z0-9\-._~+/=]{20,}|[A-Za-z0-9\-._~+/=]*\d)[A-Za-z0-9\-._~+/=]{8,}"),
     r"\1\2[REDACTED]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[REDACTED]"),  # JWT
    (re.compile(r"\b00D[A-Za-z0-9]{12,15}![A-Za-z0-9._]{20,}"), "[REDACTED]"),  # Salesforce session ID
    (re.compile(r"\bcp_[A-Za-z0-9_-]{20,}"), "[REDACTED]"),  # credproxy caller token (credproxy callers new)
    # A value, not a structure: "token": {...} in an admin answer is left alone.
    (re.compile(r"(?i)((?:proxy-)?authorization|cookie)(\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\"'\\\r\n,{}\[]+"), r"\1\2[REDACTED]"),
    (re.compile(r"(?i)(\\?[\"']?\b(?:" + _SECRET_KEYS + r")\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\s\"'\\&,{}\[]+"), r"\1[REDACTED]"),
]


class Scrubber:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._guard = LeakGuard(())

    def register(self, *values: str) -> None:
        new = {v for v in values if v and len(v) >= MIN_SECRET} - self._values
        if not new:
            return
        with self._lock:
            self._values |= new
            self._guard = LeakGuard(self._values)

    def forget(self, *values: str) -> None:
        with self._lock:
            self._values -= set(values)
            self._guard = LeakGuard(self._values)

    def scrub(self, text: str) -> str:
        text, _ = self._guard.redact_text(text)
        for rx, repl in _SHAPES:
            text = rx.sub(repl, text)
        return text


SCRUBBER = Scrubber()
