"""The main process: listening sockets, the management server, signals, reload, shutdown.

Runs one worker's event loop in this process (uvloop when installed). Signal handlers only set
what the loop then acts on: SIGTERM shuts down gracefully (connected clients may finish within
``flush_timeout``; the listeners stay open so that a client connecting meanwhile gets 57P01, and
``cancel-shutdown`` returns to normal service), SIGINT shuts down fast, SIGHUP reloads the
configuration files (a broken file keeps the old configuration and logs every problem). The
``Daemon`` is also the controller the management commands drive (``management.commands``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from pgcorral.config import KEYS, Config
from pgcorral.errors import ConfigError
from pgcorral.management.server import ManagementServer
from pgcorral.net.client import ClientConnection
from pgcorral.net.context import Context
from pgcorral.net.transaction import TransactionClient
from pgcorral.security.secrets import Secrets
from pgcorral.supervisor.process import sd_notify

log = logging.getLogger("pgcorral.main")

#: Longest pause between two runs of the lifecycle rules (shorter when their timeouts are).
MAINTENANCE_TICK = 5.0


class Daemon:
    def __init__(self, config: Config, secrets: Secrets,
                 reload_config: Callable[[], tuple[Config, Secrets]]) -> None:
        self.ctx = Context(config, secrets)
        self._reload_config = reload_config
        self._listeners: list[asyncio.AbstractServer] = []
        self._stop: asyncio.Future[str] | None = None
        self._resume: asyncio.Future[str] | None = None  # set while draining
        self.unix_path = ""
        self.management = ManagementServer(self)
        self._prefill: asyncio.Task[int] | None = None

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        await self._listen()
        await self.management.start()
        for signum, action in ((signal.SIGTERM, "graceful"), (signal.SIGINT, "fast")):
            loop.add_signal_handler(signum, self.stop, action)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        main = self.ctx.config.main
        server = self.ctx.server
        loop_kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        log.info("pgcorral: started on %s:%d (unix socket %s), server %s at %s:%d, "
                 "event loop %s", main.host, main.port, self.unix_path, server.name,
                 server.host, server.port, loop_kind)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        maintenance = loop.create_task(self._maintenance())
        self._prefill = loop.create_task(self.ctx.prefill(initial=True))
        while True:
            mode = await self._stop
            if mode == "graceful":
                mode = await self._drain()
                if mode == "cancel":
                    self._stop = loop.create_future()
                    continue
            break
        maintenance.cancel()
        await self._shutdown(mode)
        return 0

    async def _drain(self) -> str:
        """Graceful shutdown: new logins get 57P01 while connected clients finish, until none
        is left or flush_timeout passes ("graceful"), a fast stop comes ("fast"), or
        cancel-shutdown ("cancel", service resumes)."""
        ctx = self.ctx
        ctx.shutting_down = True
        sd_notify("STOPPING=1")
        loop = asyncio.get_running_loop()
        resume: asyncio.Future[str] = loop.create_future()
        self._resume = resume
        log.info("graceful shutdown: waiting for %d client(s)", len(ctx.clients))
        for client in list(ctx.clients):
            client.shutdown_started()
        gone = loop.create_task(self._clients_gone())
        try:
            waits: list[asyncio.Future[Any]] = [gone, resume]
            await asyncio.wait(waits, timeout=ctx.config.main.flush_timeout or None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            self._resume = None
        mode = resume.result() if resume.done() else "graceful"
        if mode == "cancel":
            ctx.shutting_down = False
            log.info("graceful shutdown cancelled; back to normal service")
        return mode

    async def _clients_gone(self) -> None:
        ctx = self.ctx
        while ctx.clients:
            ctx.all_idle.clear()
            if ctx.clients:
                await ctx.all_idle.wait()

    async def _maintenance(self) -> None:
        """The periodic tick: idle_timeout, max_connection_age, background validation."""
        ctx = self.ctx
        next_validation = time.monotonic() + ctx.config.main.background_interval
        while True:
            main = ctx.config.main
            short = [t for t in (main.idle_timeout, main.max_connection_age,
                                 main.disconnect_client) if t > 0]
            if main.validation == "background":
                short.append(main.background_interval)
            await asyncio.sleep(min([MAINTENANCE_TICK, *[t / 2 for t in short]]))
            ctx.close_expired()
            ctx.disconnect_idle_clients()
            # top up to MIN_SIZE (INITIAL_SIZE after a flush)
            if self._prefill is None or self._prefill.done():
                initial, ctx.prefill_initial = ctx.prefill_initial, False
                self._prefill = asyncio.get_running_loop().create_task(
                    ctx.prefill(initial=initial))
            if main.validation == "background" and time.monotonic() >= next_validation:
                next_validation = time.monotonic() + main.background_interval
                await ctx.validate_idle()

    def stop(self, mode: str) -> None:
        """Shut down: "graceful" or "fast" (a fast stop during a graceful one hurries it)."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(mode)
        elif mode == "fast":
            if self._resume is not None and not self._resume.done():
                self._resume.set_result("fast")
            for client in list(self.ctx.clients):
                client.abort()

    def cancel_shutdown(self) -> bool:
        """Leave a graceful shutdown in progress; False if there is none."""
        if self._resume is None or self._resume.done():
            return False
        self._resume.set_result("cancel")
        return True

    def reload(self) -> list[str]:
        """Re-read the files; the problems found (then the running configuration is kept)."""
        sd_notify("RELOADING=1")
        try:
            config, secrets = self._reload_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload failed, keeping the running configuration: %s", problem)
            sd_notify("READY=1")
            return list(exc.problems) or [str(exc)]
        for warning in config.warnings:
            log.warning("%s", warning)
        config = keep_restart_only(self.ctx.config, config)
        self.ctx.apply(config, secrets)
        log.info("configuration reloaded")
        sd_notify("READY=1")
        return []

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        main = self.ctx.config.main
        ctx = self.ctx
        backlog = main.backlog
        host = None if main.host in ("*", "") else main.host
        counters = ctx.counters

        kind = TransactionClient if ctx.transaction else ClientConnection

        def client(conn_type: str) -> ClientConnection:
            counters["client_connections"] += 1
            return kind(ctx, conn_type)

        tcp = await loop.create_server(lambda: client("host"), host, main.port,
                                       backlog=backlog, reuse_address=True)
        self._listeners.append(tcp)
        os.makedirs(main.unix_socket_dir, exist_ok=True)
        self.unix_path = os.path.join(main.unix_socket_dir, f".s.PGSQL.{main.port}")
        _remove_stale_socket(self.unix_path)
        unix = await loop.create_unix_server(lambda: client("local"),
                                             self.unix_path, backlog=backlog)
        os.chmod(self.unix_path, 0o777)
        self._listeners.append(unix)

    async def _shutdown(self, mode: str) -> None:
        ctx = self.ctx
        ctx.shutting_down = True
        sd_notify("STOPPING=1")
        for listener in self._listeners:
            listener.close()
        self.management.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)
        for client in list(ctx.clients):
            client.abort()
        for slot in ctx.pool.slots():
            if slot.conn is not None:
                slot.conn.terminate()
        await asyncio.sleep(0)
        log.info("pgcorral: stopped (%s)", mode)


def keep_restart_only(old: Config, new: Config) -> Config:
    """The reloaded configuration with every restart-only key (and the server sections) kept
    as they run now; each change that needs a restart is logged, not applied."""
    kept: dict[str, object] = {}
    for key in KEYS:
        if key.section == "main" and not key.reloadable:
            before, after = getattr(old.main, key.name), getattr(new.main, key.name)
            if before != after:
                log.warning("%s: changed from %r to %r: restart required, not applied",
                            key.name, before, after)
                kept[key.name] = before
    servers = new.servers
    if [(s.name, s.host, s.port) for s in old.servers] != [
            (s.name, s.host, s.port) for s in new.servers]:
        log.warning("server sections changed: restart required, not applied")
        servers = old.servers
    return dataclasses.replace(new, main=dataclasses.replace(new.main, **kept),  # type: ignore[arg-type]
                               servers=servers)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse if something still listens there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"another server is listening on {path}")


def _raise_fd_limit() -> None:
    """Every client and server connection is a file descriptor: use all the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: Config, secrets: Secrets,
        reload_config: Callable[[], tuple[Config, Secrets]]) -> int:
    """Run the daemon until it is stopped; the exit code."""
    _raise_fd_limit()
    daemon = Daemon(config, secrets, reload_config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.run(daemon.serve())
    if os.environ.get("PGCORRAL_EVENT_LOOP") == "asyncio":
        return asyncio.run(daemon.serve())
    result: int = uvloop.run(daemon.serve())
    return result
