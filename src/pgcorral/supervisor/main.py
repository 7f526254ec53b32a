"""The main process with one worker: the worker runtime, the management server, signals, reload.

With ``workers = 1`` pgcorral is one process: this ``Daemon`` runs one ``WorkerRuntime`` (the
listeners and the pool) in the same event loop (uvloop when installed) as the management server.
With more workers, ``supervisor.multi.Supervisor`` plays this part and the runtimes run in
worker processes. Signal handlers only set what the loop then acts on: SIGTERM shuts down
gracefully (connected clients may finish within ``flush_timeout``; the listeners stay open so
that a client connecting meanwhile gets 57P01, and ``cancel-shutdown`` returns to normal
service), SIGINT shuts down fast, SIGHUP reloads the configuration files (a broken file keeps
the old configuration and logs every problem). The ``Daemon`` is also the controller the
management commands drive (``management.commands``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from typing import Any

from pgcorral.config import Config
from pgcorral.errors import ConfigError
from pgcorral.management import sqlconsole
from pgcorral.management.commands import dispatch
from pgcorral.management.server import ManagementServer
from pgcorral.management.services import start_http
from pgcorral.net import control
from pgcorral.security.secrets import Secrets
from pgcorral.supervisor.health import HealthChecker
from pgcorral.supervisor.multi import Supervisor
from pgcorral.supervisor.process import sd_notify
from pgcorral.supervisor.reload import ReloadConfig, reload_files
from pgcorral.supervisor.runtime import WorkerRuntime, loop_kind, raise_fd_limit, run_loop

log = logging.getLogger("pgcorral.main")


class Daemon:
    def __init__(self, config: Config, secrets: Secrets, reload_config: ReloadConfig) -> None:
        self.runtime = WorkerRuntime(config, secrets)
        self.ctx = self.runtime.ctx
        self._reload_config = reload_config
        self.management = ManagementServer(self)
        # the SQL admin console runs management commands with this daemon as controller
        self.ctx.admin_console = functools.partial(sqlconsole.answer, manage=self._manage)
        #: issue 13: probes the servers, routes this process's pool by their roles
        self.health = HealthChecker(config, secrets, self.ctx.set_topology,
                                    lambda: self.ctx.switched_to)
        self.ctx.probe_now = self.health.poke  # the primary refused a connection

    # --- the Controller of management.commands -----------------------------------------------

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def secrets(self) -> Secrets:
        return self.ctx.secrets

    @property
    def shutting_down(self) -> bool:
        return self.ctx.shutting_down

    async def call(self, operation: str, *args: Any) -> Any:
        answer = control.OPERATIONS[operation](self.ctx, *args)
        if operation == "switch_to":
            self.health.poke()
        return answer

    def note_command(self) -> None:
        self.ctx.counters["management_commands"] += 1

    def stop(self, mode: str) -> None:
        if mode == "graceful":
            sd_notify("STOPPING=1")
        self.runtime.stop(mode)

    def cancel_shutdown(self) -> bool:
        return self.runtime.cancel_shutdown()

    def reload(self) -> list[str]:
        """Re-read the files; the problems found (then the running configuration is kept)."""
        sd_notify("RELOADING=1")
        try:
            config, secrets = reload_files(self._reload_config, self.ctx.config)
        except ConfigError as exc:
            sd_notify("READY=1")
            return list(exc.problems) or [str(exc)]
        self.runtime.apply(config, secrets)
        self.health.apply(config, secrets)
        log.info("configuration reloaded")
        sd_notify("READY=1")
        return []

    async def _manage(self, request: dict[str, Any]) -> dict[str, Any]:
        return await dispatch(self, request)

    # --- running -----------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        await runtime.start()
        await self.management.start()
        http = await start_http(self)
        # so_reuseport: SIGTERM stops when the clients have left (a rolling restart, as
        # PgBouncer's SIGTERM); else gracefully, as pgagroal
        term = "wait_for_clients" if self.config.main.so_reuseport else "graceful"
        for signum, action in ((signal.SIGTERM, term), (signal.SIGINT, "fast")):
            loop.add_signal_handler(signum, self.stop, action)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        main = self.ctx.config.main
        server = self.ctx.server
        log.info("pgcorral: started on %s:%d (unix socket %s), server %s at %s:%d, "
                 "event loop %s", main.host, main.port, runtime.unix_path, server.name,
                 server.host, server.port, loop_kind())
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        self.health.start()
        mode = await runtime.run()
        self.health.stop()
        sd_notify("STOPPING=1")
        self.management.close()
        for service in http:
            service.close()
        await runtime.shutdown(mode)
        log.info("pgcorral: stopped (%s)", mode)
        return 0


def run(config: Config, secrets: Secrets, reload_config: ReloadConfig) -> int:
    """Run the daemon until it is stopped; the exit code."""
    raise_fd_limit()
    workers = config.main.workers or len(os.sched_getaffinity(0))
    if workers > 1:
        return run_loop(Supervisor(config, secrets, reload_config, workers).serve())
    return run_loop(Daemon(config, secrets, reload_config).serve())
