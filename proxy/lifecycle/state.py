"""The running configuration as one immutable-by-convention bundle.

Everything a config decides lives here — credentials, policy, callers, the
upstream address policy, the rate limiter, the alert settings — so a reload
builds a whole new State and commits it by assigning ``holder.current``; a
rejected reload drops the State it built and nothing running has changed.
A request takes ``holder.current`` once at its start and finishes on it, so a
reload never changes a request mid-flight. ``use()``
counts requests per state, so a reload knows when an old state has no request
left (and its retired credentials can be closed), and shutdown knows when
nothing is in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy.observe.alerts import AlertMonitor
from proxy.observe.audit import AuditLog
from proxy.callers import Authenticator
from proxy.config.models import Config
from proxy.credential import Credential
from proxy.observe.metrics import Metrics
from proxy.policy import Policy
from proxy.ratelimit import RateLimiter
from proxy.host_map import HostMap
from proxy.upstream.address_policy import AddressPolicy
from proxy.upstream.relay import AnswerBudget
from proxy.store.cache import SecretCache


def _idle_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass(eq=False)
class State:
    config: Config
    credentials: dict[str, Credential]
    policy: Policy
    authenticator: Authenticator
    audit: AuditLog
    metrics: Metrics
    cache: SecretCache
    addresses: AddressPolicy | None = None  # this config's upstream address rules (the credentials' clients use it)
    alerts: AlertMonitor | None = None  # this config's alert settings over the alert history of every config
    limiter: RateLimiter | None = None  # this config's limits; unchanged ones keep their buckets across reloads
    answer_budget: AnswerBudget | None = None  # long-lived (owned by Proxy): one memory bound across reloads
    forward_hosts: HostMap = field(default_factory=HostMap)  # forward proxy: built from the config, rebuilt on reload
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=_idle_event, repr=False)

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(eq=False)
class StateHolder:
    current: State
    draining: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=_idle_event, repr=False)
    _tasks: set = field(default_factory=set, repr=False)

    def use(self, task=None) -> "_InUse":
        """The state one request runs on, from start to finish: ``with holder.use() as state``. ``task``: what
        a drain deadline cancels — the task running the request, or an object with ``done()`` and
        ``cancel()`` (returning the task to wait for, or None) for one answered in callbacks
        (``pipeline.Exchange``); by default the current task."""
        return _InUse(self, task)

    def enter(self, running) -> State:
        """``use`` without the context manager: ``running`` (what a drain deadline cancels, as for ``use``) is
        in flight on the state returned, until ``leave(state, running)``."""
        state = self.current
        state.in_flight += 1
        self.in_flight += 1
        self._tasks.add(running)
        # An idle event is set exactly while its count is 0: only the first request in flight clears it.
        if state.in_flight == 1:
            state._idle.clear()
        if self.in_flight == 1:
            self._idle.clear()
        return state

    def leave(self, state: State, running) -> None:
        self._tasks.discard(running)
        state.in_flight -= 1
        self.in_flight -= 1
        if not state.in_flight:
            state._idle.set()
        if not self.in_flight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is in flight on any state (current or retired)."""
        await self._idle.wait()

    def cancel_in_flight(self) -> list[asyncio.Task]:
        """Cancel every request still running (the drain deadline passed); returns their tasks."""
        tasks = []
        for running in [t for t in self._tasks if t is not None and not t.done()]:
            if isinstance(running, asyncio.Task):
                running.cancel()
                tasks.append(running)
            else:
                task = running.cancel()
                if task is not None:
                    tasks.append(task)
        return tasks


class _InUse:
    """``StateHolder.use()``: a plain context manager, as it wraps every request (a generator-based one
    costs several times as much)."""

    __slots__ = ("_holder", "_state", "_task")

    def __init__(self, holder: StateHolder, task: asyncio.Task | None) -> None:
        self._holder = holder
        self._task = task

    def __enter__(self) -> State:
        if self._task is None:  # asyncio.current_task is Python code in 3.11: skipped when the caller knows its task
            self._task = asyncio.current_task()
        state = self._state = self._holder.enter(self._task)
        return state

    def __exit__(self, *exc) -> None:
        self._holder.leave(self._state, self._task)
