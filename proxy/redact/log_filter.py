"""A logging filter that scrubs every record before any handler sees it.

Our JSON formatter scrubs its own output, but records also reach handlers we do
not format (a test's caplog, an operator's extra handler) and come from
libraries that log request details on their own (aiohttp, hvac, urllib3,
asyncio). The filter rewrites the record in place — message with its
arguments, extra fields, exception text with its traceback, stack info — so
every handler downstream sees only the scrubbed copy. The exception object is
dropped from the record once its text is taken: it may carry the value.

Each part is scrubbed once, here; a record marked as scrubbed is not scrubbed
again by our formatter. A field whose name says it holds a secret (``token``,
``client_secret``, ``cookie``) is replaced whole, as the line rules would do
to ``"token": "..."`` in the formatted line.
"""

from __future__ import annotations

import logging
import sys
import threading

from proxy.redact.scrubber import Scrubber
from proxy.redact.shapes import names_a_secret

# Loggers whose records may carry request or token details. A filter on a logger
# sees only records logged on that very logger, so the known children are named too.
LOGGERS = (
    "credproxy", "credproxy.request", "credproxy.relay", "credproxy.secrets", "credproxy.tokens",
    "credproxy.alerts", "credproxy.server", "credproxy.admin", "credproxy.audit", "credproxy.cluster",
    "credproxy.drain", "credproxy.forward", "credproxy.reload", "credproxy.upstream_tls", "credproxy.vault",
    "credproxy.watch", "credproxy.workers",
    "aiohttp", "aiohttp.access", "aiohttp.client", "aiohttp.internal", "aiohttp.server", "aiohttp.web",
    "aiohttp.websocket",
    "hvac", "hvac.adapters", "hvac.api", "urllib3", "urllib3.connectionpool", "urllib3.util.retry",
    "requests", "asyncio", "authlib", "botocore", "py.warnings",
)
_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
MARK = "_credproxy_scrubbed"


class ScrubFilter(logging.Filter):
    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, MARK, False):
            return True
        scrub = self.scrubber.scrub
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - arguments that do not fit the template: keep the template only
            message = str(record.msg)
        record.msg, record.args = scrub(message), None
        for key, value in list(vars(record).items()):
            if key not in _STD and not key.startswith("_"):
                record.__dict__[key] = _scrub_field(scrub, key, value)
        if record.exc_info:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        setattr(record, MARK, True)
        return True


def _scrub_field(scrub, key: str, value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (str, int, float)) and names_a_secret(key):
        return "[REDACTED]"
    if isinstance(value, (int, float)):
        return value
    return scrub(value if isinstance(value, str) else str(value))


def install(scrubber: Scrubber) -> ScrubFilter:
    """Put one filter on the root logger, the named loggers, every logger that
    exists now, and every handler attached to any of them. Idempotent."""
    existing = next((f for f in logging.getLogger().filters if isinstance(f, ScrubFilter)), None)
    filt = existing or ScrubFilter(scrubber)
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in LOGGERS]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        _add(lg, filt)
        for handler in lg.handlers:
            _add(handler, filt)
    if logging.lastResort is not None:
        _add(logging.lastResort, filt)
    return filt


def _add(target: logging.Filterer, filt: ScrubFilter) -> None:
    if not any(isinstance(f, ScrubFilter) for f in target.filters):
        target.addFilter(filt)


def install_excepthooks(logger: logging.Logger) -> None:
    """Uncaught exceptions go through the (scrubbed) log instead of a raw traceback on stderr."""

    def hook(exc_type, exc, tb):
        logger.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args):
        if args.exc_type is not SystemExit:
            logger.critical("uncaught exception in a thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = hook
    threading.excepthook = thread_hook
