"""Loading the config file for a CLI command: problems printed as ``check`` prints them, then exit 1."""

from __future__ import annotations

import sys

from proxy.config import models as config_mod
from proxy.config.models import Config


def load_or_exit(path: str) -> Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigInvalid as exc:
        for p in exc.problems:
            print(str(p), file=sys.stderr)
        raise SystemExit(1) from None
