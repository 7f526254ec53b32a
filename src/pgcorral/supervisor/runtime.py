"""One worker's event-loop side: listeners, the maintenance tick, drain and shutdown.

With one process, ``supervisor.main.Daemon`` runs one ``WorkerRuntime`` beside the management
server and the signal handlers. With several, each worker process runs one
(``supervisor.worker``) on the listening sockets the supervisor bound, and the supervisor drives
it over the control channel. Either way the runtime only acts when told: ``stop`` (graceful or
fast), ``cancel_shutdown``, ``apply`` (a reloaded configuration).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from typing import Any

from pgcorral.config import Config
from pgcorral.net import maintenance
from pgcorral.net.client import ClientConnection
from pgcorral.net.context import Context
from pgcorral.net.pipeline import choose
from pgcorral.pool.budget import Budget
from pgcorral.security.secrets import Secrets
from pgcorral.supervisor import handover, peers
from pgcorral.supervisor.process import sd_notify

log = logging.getLogger("pgcorral.main")

#: Longest pause between two runs of the lifecycle rules (shorter when their timeouts are).
MAINTENANCE_TICK = 5.0

#: An inherited listening socket and the kind of client it serves ("host" or "local").
Listener = tuple[socket.socket, str]


class WorkerRuntime:
    def __init__(self, config: Config, secrets: Secrets, *, worker: int = 0,
                 budget: Budget | None = None, sockets: list[Listener] | None = None) -> None:
        self.pipeline = choose(config.main.pipeline)
        self.ctx = Context(config, secrets, new_server=self.pipeline.server, worker=worker,
                           budget=budget)
        self._sockets = sockets
        self._listeners: list[asyncio.AbstractServer] = []
        self._stop: asyncio.Future[str] | None = None
        self._resume: asyncio.Future[str] | None = None  # set while draining
        self._prefill: asyncio.Task[int] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self.unix_path = ""  # the client socket this runtime created (and removes)
        self.unix_inode = 0  # its inode: another process may take the path over (so_reuseport)
        self.peer: peers.PeerListener | None = None  # so_reuseport: cancels from the others

    async def start(self) -> None:
        """Listen for clients; start the maintenance tick and the initial prefill."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        await self._listen()
        self._maintenance = loop.create_task(self._tick())
        self._prefill = loop.create_task(maintenance.prefill(self.ctx, initial=True))

    async def run(self) -> str:
        """Serve until stopped; the stop mode ("graceful" once clients are gone, or "fast")."""
        loop = asyncio.get_running_loop()
        assert self._stop is not None
        while True:
            mode = await self._stop
            if mode == "wait_for_clients":
                await self._wait_for_clients()
                return "graceful"
            if mode == "graceful":
                mode = await self._drain()
                if mode == "cancel":
                    self._stop = loop.create_future()
                    continue
            return mode

    async def _drain(self) -> str:
        """Graceful shutdown: new logins get 57P01 while connected clients finish, until none
        is left or flush_timeout passes ("graceful"), a fast stop comes ("fast"), or
        cancel-shutdown ("cancel", service resumes)."""
        ctx = self.ctx
        ctx.shutting_down = True
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

    async def _wait_for_clients(self) -> None:
        """PgBouncer's SHUTDOWN WAIT_FOR_CLIENTS, for rolling restarts (``so_reuseport``):
        the listeners close now (new clients reach the other pgcorral on the port), the
        clients connected stay until they leave by themselves (none is told to), then we
        stop. Cancel requests still arrive through the peer socket."""
        ctx = self.ctx
        ctx.draining = True
        if self._sockets is None:  # (a worker's listeners: the supervisor hands them over)
            await self.hand_over_port()
        self.close_listeners()
        log.info("shutdown when the clients are gone: listeners closed, waiting for %d "
                 "client(s) to leave", len(ctx.clients))
        await self._clients_gone()

    async def _clients_gone(self) -> None:
        ctx = self.ctx
        while ctx.clients:
            ctx.all_idle.clear()
            if ctx.clients:
                await ctx.all_idle.wait()

    async def _tick(self) -> None:
        """The periodic tick: idle_timeout, max_connection_age, background validation."""
        ctx = self.ctx
        next_validation = time.monotonic() + ctx.config.main.background_interval
        while True:
            main = ctx.config.main
            short = [t for t in (main.idle_timeout, main.max_connection_age,
                                 main.disconnect_client, main.query_timeout,
                                 main.idle_transaction_timeout, main.transaction_timeout)
                     if t > 0]
            if main.validation == "background":
                short.append(main.background_interval)
            await asyncio.sleep(min([MAINTENANCE_TICK, *[t / 2 for t in short]]))
            maintenance.close_expired(ctx)
            maintenance.disconnect_idle_clients(ctx)
            maintenance.enforce_timeouts(ctx)
            # top up to MIN_SIZE (INITIAL_SIZE after a flush)
            if self._prefill is None or self._prefill.done():
                initial, ctx.prefill_initial = ctx.prefill_initial, False
                self._prefill = asyncio.get_running_loop().create_task(
                    maintenance.prefill(ctx, initial=initial))
            if main.validation == "background" and time.monotonic() >= next_validation:
                next_validation = time.monotonic() + main.background_interval
                await maintenance.validate_idle(ctx)

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

    def apply(self, config: Config, secrets: Secrets) -> None:
        self.ctx.apply(config, secrets)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        main = self.ctx.config.main
        ctx = self.ctx
        counters = ctx.counters
        kind = self.pipeline.client

        def client(conn_type: str) -> ClientConnection:
            counters["client_connections"] += 1
            return kind(ctx, conn_type)

        if self._sockets is not None:  # a worker: the supervisor bound them
            for sock, conn_type in self._sockets:
                if conn_type == "local":
                    self._listeners.append(await loop.create_unix_server(
                        lambda: client("local"), sock=sock))
                else:
                    self._listeners.append(await loop.create_server(
                        lambda: client("host"), sock=sock))
            return
        host = None if main.host in ("*", "") else main.host
        tcp = await loop.create_server(lambda: client("host"), host, main.port,
                                       backlog=main.backlog, reuse_address=True,
                                       reuse_port=main.so_reuseport or None)
        self._listeners.append(tcp)
        os.makedirs(main.unix_socket_dir, exist_ok=True)
        self.unix_path = os.path.join(main.unix_socket_dir, f".s.PGSQL.{main.port}")
        if main.so_reuseport:
            peers.take_over_unix_socket(self.unix_path)
            socket_dir, port = main.unix_socket_dir, main.port

            tasks: set[asyncio.Task[Any]] = set()  # (referenced until done)

            def keep(task: asyncio.Task[Any]) -> None:
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            def from_peer(pid: int, secret: bytes) -> None:
                keep(loop.create_task(ctx.forward_cancel(pid, secret, local_only=True)))

            def to_peers(pid: int, secret: bytes) -> None:
                keep(loop.create_task(peers.send_to_peers(socket_dir, port, pid, secret)))

            self.peer = peers.PeerListener(socket_dir, port, from_peer)
            await self.peer.start()
            ctx.cancel_peers = to_peers
        else:
            remove_stale_socket(self.unix_path)
        unix = await loop.create_unix_server(lambda: client("local"),
                                             self.unix_path, backlog=main.backlog)
        os.chmod(self.unix_path, 0o777)
        self.unix_inode = os.stat(self.unix_path).st_ino
        self._listeners.append(unix)

    async def hand_over_port(self) -> None:
        """New connections go to the other pgcorral on the port, and the ones queued here are
        accepted, before the listeners close (``supervisor.handover``)."""
        socks = handover.listening_sockets(self._listeners)
        try:
            steered = handover.steer_away(socks)
            if steered and not await handover.drained(socks):
                log.warning("rolling restart: the accept queue did not empty within %g s",
                            handover.DRAIN_TIMEOUT)
            handover.detach(steered)
        finally:
            for sock in socks:
                sock.close()

    def close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self.unix_path and self.unix_inode:
            peers.unlink_if_ours(self.unix_path, self.unix_inode)  # (maybe taken over)
            self.unix_inode = 0

    async def shutdown(self, mode: str) -> None:
        ctx = self.ctx
        if self.peer is not None:
            self.peer.close()
        ctx.shutting_down = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        self.close_listeners()
        for client in list(ctx.clients):
            client.abort()
        for slot in ctx.pool.slots():
            if slot.conn is not None:
                slot.conn.terminate()
        await asyncio.sleep(0)


def remove_stale_socket(path: str) -> None:
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


def raise_fd_limit() -> None:
    """Every client and server connection is a file descriptor: use all the system allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_loop(main: Any) -> int:
    """Run the coroutine ``main`` on uvloop (plain asyncio with PGCORRAL_EVENT_LOOP=asyncio)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return int(asyncio.run(main))
    if os.environ.get("PGCORRAL_EVENT_LOOP") == "asyncio":
        return int(asyncio.run(main))
    return int(uvloop.run(main))


def loop_kind() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


__all__ = ["MAINTENANCE_TICK", "Listener", "WorkerRuntime", "loop_kind", "raise_fd_limit",
           "remove_stale_socket", "run_loop", "sd_notify"]
