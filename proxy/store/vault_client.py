"""The hvac client, and the one way credproxy calls it.

hvac is synchronous, so every call runs on a small dedicated thread pool with a
deadline: a slow or hung Vault occupies those threads only, never the event
loop or requests served from the secret cache. Exceptions are translated here,
inside the worker thread, into the proxy's own error tree; they carry the
operation, the path and the HTTP status, never Vault's error text (which can
echo request data) and never the token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hx

from proxy.errors import SecretBackendError, StoreError, VaultRefused, VaultUnavailable

log = logging.getLogger("credproxy.vault")

T = TypeVar("T")
POOL_SIZE = 4

# hvac raises one class per status and does not keep the status itself.
_STATUS = {hx.InvalidRequest: 400, hx.Unauthorized: 401, hx.Forbidden: 403, hx.InvalidPath: 404,
           hx.PreconditionFailed: 412, hx.RateLimitExceeded: 429, hx.InternalServerError: 500,
           hx.VaultNotInitialized: 501, hx.BadGateway: 502, hx.VaultDown: 503}


def translate(exc: BaseException, what: str) -> SecretBackendError:
    """Map an hvac/requests exception to ours. Only types and status codes are used."""
    if isinstance(exc, hx.VaultError):
        status = _STATUS.get(type(exc))
        if status is not None and 400 <= status < 500 and status != 429:
            return VaultRefused(f"{what}: vault answered {status}", status)
        return VaultUnavailable(f"{what}: vault answered {status or 'an unexpected status'}")
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultUnavailable(f"{what}: TLS handshake with vault failed (certificate not verified?)")
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable(f"{what}: vault did not answer in time")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return VaultUnavailable(f"{what}: vault is unreachable")
    if isinstance(exc, (KeyError, TypeError, ValueError, AttributeError)):
        return VaultUnavailable(f"{what}: unexpected answer from vault ({type(exc).__name__})")
    # Not a Vault or network answer: a bug (ours or hvac's). Its traceback goes to the (scrubbed) log.
    log.error("vault call failed unexpectedly", exc_info=exc, extra={"call": what})
    return VaultUnavailable(f"{what}: vault call failed ({type(exc).__name__})")


def expect_dict(result: Any, what: str) -> dict:
    """hvac returns the raw response (not a dict) for anything but a 200 with JSON, e.g. a redirect."""
    if not isinstance(result, dict):
        status = getattr(result, "status_code", "?")
        raise VaultUnavailable(f"{what}: unexpected answer from vault (HTTP {status})")
    return result


class VaultClients:
    """Builds hvac clients that share one HTTP session, and runs calls on the pool."""

    def __init__(self, address: str, *, namespace: str | None, ca_file: str | None, timeout: float,
                 pool_size: int = POOL_SIZE) -> None:
        self.timeout = timeout
        self._session = requests.Session()
        # Ambient settings must not change where the token goes or which CA is trusted:
        # no HTTP(S)_PROXY, no .netrc, no REQUESTS_CA_BUNDLE; verification is never off.
        self._session.trust_env = False
        self._session.verify = ca_file or True
        self._address = address
        self._namespace = namespace
        self._verify = ca_file or True
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="credproxy-vault")

    def client(self, token: str) -> hvac.Client:
        """A client for one call, carrying exactly the token that call is made with (cheap: the
        HTTP session and its connection pool are shared)."""
        # token "" (never None): hvac would otherwise pick up VAULT_TOKEN / ~/.vault-token by itself.
        # No redirects: a standby's redirect would carry X-Vault-Token to another address.
        return hvac.Client(url=self._address, token=token, verify=self._verify, timeout=self.timeout,
                           session=self._session, namespace=self._namespace, allow_redirects=False)

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pool; answer within ``timeout`` whatever Vault does."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, partial(_guarded, what, fn, *args))
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the call completes, and then nothing could stop the caller's loop.
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            raise VaultUnavailable(f"{what}: no answer from vault within {self.timeout:g}s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def _guarded(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except (SecretBackendError, StoreError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one of ours, without its text
        raise translate(exc, what) from None
