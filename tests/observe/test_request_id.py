"""Request IDs: 32 hex characters, unique within a process and across forked workers."""

from __future__ import annotations

import os
import re

from proxy.observe.request_id import new_request_id


def test_ids_are_32_hex_characters_and_a_forked_child_draws_its_own_prefix():
    ids = [new_request_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids) and len({i[:16] for i in ids}) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its IDs, then out without running anything of the parent's
        try:
            os.write(write, "".join(new_request_id() for _ in range(2)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        child = fh.read()
    os.waitpid(pid, 0)
    first, second = child[:32], child[32:]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first[:16] == second[:16] != ids[0][:16]
    assert int(second[16:], 16) == int(first[16:], 16) + 1
