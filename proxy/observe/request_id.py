"""Request IDs: 32 hex characters, unique per process and across processes.

A random per-process prefix (64 bits, drawn again in a forked child) and a counter:
one string format per request instead of 16 bytes from the kernel. An ID names a
request in the audit log and upstream; it is not a secret and authorises nothing.
"""

from __future__ import annotations

import itertools
import os
import secrets

_prefix = secrets.token_hex(8)
_counter = itertools.count()


def new_request_id() -> str:
    return f"{_prefix}{next(_counter):016x}"


def _reseed() -> None:
    global _prefix, _counter
    _prefix = secrets.token_hex(8)
    _counter = itertools.count()


os.register_at_fork(after_in_child=_reseed)
