"""JSON-lines logging on stderr, with every record passed through the scrubber first.

``setup`` installs the scrubbing filter (``proxy.redact.log_filter``) on every
logger and handler, so records are clean before any handler sees them; the
formatter then scrubs its whole line only for a record the filter has not seen
(fail closed), so each line is scrubbed once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

from proxy.redact import log_filter as logfilter
from proxy.redact.scrubber import SCRUBBER

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:  # the scrubbing filter keeps only the text of the exception
            out["exc"] = record.exc_text
        line = json.dumps(out, ensure_ascii=False, default=str)
        return line if getattr(record, logfilter.MARK, False) else SCRUBBER.scrub(line)


def setup(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
    logging.captureWarnings(True)
    # A failing handler would print the raw traceback of whatever was being handled to stderr.
    logging.raiseExceptions = False
    logfilter.install(SCRUBBER)
    logfilter.install_excepthooks(logging.getLogger("credproxy"))
