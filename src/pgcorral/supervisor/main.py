"""The main process: listening sockets, signals, reload, shutdown.

Runs one worker's event loop in this process (uvloop when installed). Signal handlers only set
what the loop then acts on: SIGTERM shuts down gracefully (stop accepting, let connected clients
finish within ``flush_timeout``), SIGINT shuts down fast, SIGHUP reloads the configuration files
(a broken file keeps the old configuration and logs every problem).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable

from pgcorral.config import Config
from pgcorral.errors import ConfigError
from pgcorral.net.client import ClientConnection
from pgcorral.net.context import Context
from pgcorral.security.secrets import Secrets

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
        self.unix_path = ""

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        await self._listen()
        for signum, action in ((signal.SIGTERM, "graceful"), (signal.SIGINT, "fast")):
            loop.add_signal_handler(signum, self.stop, action)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        main = self.ctx.config.main
        server = self.ctx.server
        loop_kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        log.info("pgcorral: started on %s:%d (unix socket %s), server %s at %s:%d, "
                 "event loop %s", main.host, main.port, self.unix_path, server.name,
                 server.host, server.port, loop_kind)
        maintenance = loop.create_task(self._maintenance())
        mode = await self._stop
        maintenance.cancel()
        await self._shutdown(mode)
        return 0

    async def _maintenance(self) -> None:
        """The periodic tick: idle_timeout, max_connection_age, background validation."""
        ctx = self.ctx
        next_validation = time.monotonic() + ctx.config.main.background_interval
        while True:
            main = ctx.config.main
            short = [t for t in (main.idle_timeout, main.max_connection_age) if t > 0]
            if main.validation == "background":
                short.append(main.background_interval)
            await asyncio.sleep(min([MAINTENANCE_TICK, *[t / 2 for t in short]]))
            ctx.close_expired()
            if main.validation == "background" and time.monotonic() >= next_validation:
                next_validation = time.monotonic() + main.background_interval
                await ctx.validate_idle()

    def stop(self, mode: str) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(mode)
        elif mode == "fast":  # a second signal during a graceful shutdown: hurry up
            for client in list(self.ctx.clients):
                client.abort()

    def reload(self) -> None:
        try:
            config, secrets = self._reload_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload failed, keeping the running configuration: %s", problem)
            return
        for warning in config.warnings:
            log.warning("%s", warning)
        self.ctx.apply(config, secrets)
        log.info("configuration reloaded")

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        main = self.ctx.config.main
        ctx = self.ctx
        backlog = main.backlog
        host = None if main.host in ("*", "") else main.host
        tcp = await loop.create_server(lambda: ClientConnection(ctx, "host"), host, main.port,
                                       backlog=backlog, reuse_address=True)
        self._listeners.append(tcp)
        os.makedirs(main.unix_socket_dir, exist_ok=True)
        self.unix_path = os.path.join(main.unix_socket_dir, f".s.PGSQL.{main.port}")
        _remove_stale_socket(self.unix_path)
        unix = await loop.create_unix_server(lambda: ClientConnection(ctx, "local"),
                                             self.unix_path, backlog=backlog)
        os.chmod(self.unix_path, 0o777)
        self._listeners.append(unix)

    async def _shutdown(self, mode: str) -> None:
        ctx = self.ctx
        ctx.shutting_down = True
        for listener in self._listeners:
            listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)
        if mode == "graceful" and ctx.clients:
            timeout = ctx.config.main.flush_timeout or None
            log.info("graceful shutdown: waiting for %d client(s)", len(ctx.clients))
            ctx.all_idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while ctx.clients:
                        await ctx.all_idle.wait()
                        ctx.all_idle.clear()
        for client in list(ctx.clients):
            client.abort()
        for slot in ctx.pool.slots():
            if slot.conn is not None:
                slot.conn.terminate()
        await asyncio.sleep(0)
        log.info("pgcorral: stopped (%s)", mode)


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
