"""Token shapes: what the log scrubber removes without having been told the value.

PEM private-key blocks, bearer/basic credentials, JWTs, Salesforce session IDs, credproxy caller tokens, and
``key=value`` / ``"key": "value"`` pairs whose key names a secret. Python's ``re`` tries each rule
at every position (~140 µs for seven rules over a 250-byte line), so each rule carries the
lower-case words one of which every match contains: for an ASCII text (nearly every log line) one
search for all the words in ``text.lower()`` picks the rules that can match — usually none; other
texts run every rule.
"""

from __future__ import annotations

import functools
import re

_SECRET_KEYS = (r"access_token|refresh_token|id_token|client_secret|client_assertion|password|passwd|"
                r"session_?id|sessionid|secret|api[_-]?key|x-api-key|private_key|assertion|token")
_SECRET_WORDS = ("token", "secret", "assertion", "passw", "session", "api", "private_key")

# (rule, replacement, words one of which every match contains, lower-cased)
_RULES = [
    # A PEM private key, its newlines real or escaped; a block cut off before its END line is redacted
    # to the end of the text (fail closed).
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:.*?-----END \1PRIVATE KEY-----|.*\Z)", re.S),
     "[REDACTED]", ("private key-----",)),
    (re.compile(r"(?i)\b(bearer|basic|negotiate)(\s+)[A-Za-z0-9\-._~+/=]{8,}"), r"\1\2[REDACTED]",
     ("bearer", "basic", "negotiate")),
    # "Token <value>" (an Authorization scheme) but not prose such as "token obtained":
    # the value must be long or contain a digit.
    (re.compile(r"(?i)\b(token)(\s+)(?=[A-Za-z0-9\-._~+/=]{20,}|[A-Za-z0-9\-._~+/=]*\d)[A-Za-z0-9\-._~+/=]{8,}"),
     r"\1\2[REDACTED]", ("token",)),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[REDACTED]", ("eyj",)),  # JWT
    (re.compile(r"\b00D[A-Za-z0-9]{12,15}![A-Za-z0-9._]{20,}"), "[REDACTED]", ("00d",)),  # Salesforce session
    (re.compile(r"\bcp_[A-Za-z0-9_-]{20,}"), "[REDACTED]", ("cp_",)),  # credproxy caller token
    # A value, not a structure: "token": {...} in an admin answer is left alone.
    (re.compile(r"(?i)((?:proxy-)?authorization|cookie)(\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\"'\\\r\n,{}\[]+"),
     r"\1\2[REDACTED]", ("authorization", "cookie")),
    (re.compile(r"(?i)(\\?[\"']?\b(?:" + _SECRET_KEYS + r")\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\s\"'\\&,{}\[]+"),
     r"\1[REDACTED]", _SECRET_WORDS),
]

# A lookahead, so that overlapping words are all found ("basicookie" holds "basic" and "cookie"); no word
# is a prefix of another, so the one alternative tried at a position reports every word starting there.
_WORDS = re.compile("(?=(" + "|".join(sorted({re.escape(w) for _, _, words in _RULES for w in words})) + "))")
_SHORTEST = 7  # the shortest text any rule matches ("token=x"): shorter texts are left as they are

# A log field whose name would make the line rules above redact its value in a JSON line.
_FIELD = re.compile(r"(?i)(?:\b(?:" + _SECRET_KEYS + r")|(?:proxy-)?authorization|cookie)\Z")


def scrub_shapes(text: str) -> str:
    if len(text) < _SHORTEST:
        return text
    if text.isascii():
        present = set(_WORDS.findall(text.lower()))
        if not present:
            return text
        for rule, replacement, words in _RULES:
            if not present.isdisjoint(words):
                text = rule.sub(replacement, text)
        return text
    for rule, replacement, _ in _RULES:
        text = rule.sub(replacement, text)
    return text


@functools.lru_cache(maxsize=1024)  # log field names are few and fixed
def names_a_secret(field: str) -> bool:
    """Does a log field called ``field`` hold a secret by its name (``token``, ``client_secret``, ``cookie``)?"""
    return _FIELD.search(field) is not None
