"""Request IDs: 32 hex characters, unique per process and across processes.

A random per-process prefix (64 bits, drawn again in a forked child) and a counter:
one string format per request instead of 16 bytes from the kernel. An ID names a
request in the audit log and upstream; it is not a secret and authorises nothing.
"""

from __future__ import annotations

import itertools
import os
import secrets


def _ids() -> itertools.count:
    """The prefix in the upper 64 bits, the counter in the lower: an ID is one hex format of one number."""
    return itertools.count(secrets.randbits(64) << 64)


_counter = _ids()


def new_request_id() -> str:
    return "%032x" % next(_counter)


def _reseed() -> None:
    global _counter
    _counter = _ids()


os.register_at_fork(after_in_child=_reseed)
