"""The credentials' dedicated listeners across reloads, in two phases.

- ``prepare(cfg)`` binds every listener the new config adds or changes and
  loads its TLS context; nothing serves on them yet and no running listener
  is touched. A listener that keeps its address (only its TLS changed, or
  another credential takes over a removed one's address) gets a duplicate of
  the running socket, so nothing has to let go of the address first.
- ``commit(plan)`` (after the new State is current): the leaving listeners
  stop accepting, then the new ones start accepting. Connections that arrive
  in between wait in the kernel's backlog.
- ``discard(plan)`` (a rejected reload) closes only what ``prepare`` made.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.config.fields import Listen
from proxy.config.models import Config, TLSConfig
from proxy.errors import ListenerUnavailable
from proxy.lifecycle.drain import stop_accepting
from proxy.server.binding import LISTEN_BACKLOG, address_of, bind_sockets, server_ssl
from proxy.server.listener import CallerListener
from proxy.upstream.address_policy import OwnListeners


@dataclass(eq=False)
class Listener:
    name: str
    key: tuple  # (listen, tls) as configured: a change to either makes a new listener
    runner: CallerListener
    socks: list[socket.socket]
    ssl: ssl.SSLContext | None
    address: str  # as bound: "host:port" or "unix:/path"
    handed_over: bool = False  # its sockets duplicate a running listener's


@dataclass(eq=False)
class Plan:
    coming: list[Listener] = field(default_factory=list)
    leaving: list[str] = field(default_factory=list)

    @property
    def started(self) -> list[str]:
        return [f"{x.name} {x.key[0]}" for x in self.coming]


def _tcp_addresses(socks: list[socket.socket]) -> list[tuple[str, int]]:
    return [a for a in map(address_of, socks) if a is not None]


class DedicatedListeners:
    def __init__(self, *, runner_for: Callable[[str], Awaitable[CallerListener]], own: OwnListeners,
                 bound: dict[str, str], server_tls: TLSConfig | None, reuse_port: bool = False) -> None:
        self._runner_for = runner_for  # a set-up runner (not serving) whose requests use that credential
        self._own = own
        self._bound = bound  # "credential:<name>" -> address, beside the main and admin ones
        self._server_tls = server_tls  # bound at start (server.tls needs a restart)
        self._reuse_port = reuse_port
        self.active: dict[str, Listener] = {}

    def runners(self) -> list[CallerListener]:
        return [x.runner for x in self.active.values()]

    async def start(self, cfg: Config) -> None:
        plan = await self.prepare(cfg)
        await self.commit(plan)

    async def prepare(self, cfg: Config) -> Plan:
        want = {n: (c.listen, c.tls) for n, c in cfg.credentials.items() if c.listen is not None}
        plan = Plan(leaving=[n for n, x in self.active.items() if want.get(n) != x.key])
        try:
            for name, key in want.items():
                if name not in self.active or self.active[name].key != key:
                    plan.coming.append(await self._prepare_one(name, key, plan.leaving))
        except BaseException:
            await self.discard(plan)
            raise
        return plan

    async def _prepare_one(self, name: str, key: tuple, leaving: list[str]) -> Listener:
        listen, tls = key
        try:
            ctx = server_ssl(tls or self._server_tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ListenerUnavailable(name, "tls", f"cannot load the certificate ({_reason(exc)})") from None
        same = [x for n in leaving if _same_address((x := self.active[n]).key[0], listen)]
        try:
            socks = [s.dup() for s in same[0].socks] if same else bind_sockets(listen, reuse_port=self._reuse_port)
        except OSError as exc:
            raise ListenerUnavailable(name, "listen", f"cannot listen ({_reason(exc)})", listen=listen,
                                      os_error=exc) from None
        if not same:
            for host, port in _tcp_addresses(socks):
                self._own.add(host, port)  # no upstream may be credproxy itself
        try:
            runner = await self._runner_for(name)
        except BaseException:
            _close(socks, forget=None if same else self._own)
            raise
        if listen.unix:
            address = str(listen)
        else:
            host, port = _tcp_addresses(socks)[-1]
            address = f"{host}:{port}"
        return Listener(name, key, runner, socks, ctx, address, handed_over=bool(same))

    async def discard(self, plan: Plan) -> None:
        """A rejected reload: close what ``prepare`` made; the running listeners never changed."""
        for x in plan.coming:
            await x.runner.cleanup()
            _close(x.socks, forget=None if x.handed_over else self._own)
            if x.key[0].unix and not x.handed_over:
                _remove_socket_file(x.key[0].unix)
        plan.coming.clear()

    async def commit(self, plan: Plan) -> list[CallerListener]:
        """Serve the new listeners, stop accepting on the leaving ones; returns the runners to clean up
        once the old state is idle (their connections may still carry requests)."""
        stopped = []
        keep = {a for x in plan.coming for a in _tcp_addresses(x.socks)}
        for name in plan.leaving:
            old = self.active.pop(name)
            self._bound.pop(f"credential:{name}", None)
            addresses = _tcp_addresses(old.socks)  # before stopping: that closes the sockets
            await stop_accepting([old.runner])
            for host, port in addresses:
                if (host, port) not in keep:
                    self._own.discard(host, port)
            stopped.append(old.runner)
        for x in plan.coming:
            for sock in x.socks:
                await x.runner.serve(sock, x.ssl, backlog=LISTEN_BACKLOG)
            self.active[x.name] = x
            self._bound[f"credential:{x.name}"] = x.address
        return stopped

    def clear(self) -> None:
        self.active.clear()


def _same_address(a: Listen, b: Listen) -> bool:
    if a.unix or b.unix:
        return a.unix == b.unix
    return a.port != 0 and (a.host, a.port) == (b.host, b.port)  # two ephemeral ports are two listeners


def _close(socks: list[socket.socket], forget: OwnListeners | None) -> None:
    for sock in socks:
        if forget is not None:
            addr = address_of(sock) if sock.fileno() != -1 else None
            if addr is not None:
                forget.discard(*addr)
        sock.close()


def _remove_socket_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return "not a valid PEM certificate and key"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return type(exc).__name__
