"""A worker process: one event loop serving clients on the listening sockets of the supervisor.

Started by ``supervisor.multi`` as ``python -m pgcorral.supervisor.worker <fd>``, where ``fd`` is
its end of the control channel. The first message on it carries the worker's index, the
configuration and secrets, the shared-memory table and the listening sockets (inherited fds).
Then the worker runs a ``WorkerRuntime`` and does what the supervisor says: management calls
(``net.control``), reload, stop, cancel-shutdown, evict an idle connection for another worker,
try waiting clients again, look up a cancel key. Its log records go to the supervisor, which
owns the log. It ignores SIGINT, SIGTERM and SIGHUP (the supervisor handles them for the whole
pooler) and stops at once when the supervisor is gone (end of the control channel).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any

from pgcorral.management import sqlconsole
from pgcorral.net import control, handoff
from pgcorral.pool.budget import RULE_FULL
from pgcorral.supervisor.channel import Channel, receive_blocking
from pgcorral.supervisor.logs import level_of
from pgcorral.supervisor.runtime import WorkerRuntime, run_loop
from pgcorral.supervisor.shared import SharedBudget, SharedTable

log = logging.getLogger("pgcorral.main")


class ChannelLog(logging.Handler):
    """Log records of this worker, sent to the supervisor as (level, logger, text)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send("log", record.levelno, record.name, self.format(record))
        except Exception:  # pragma: no cover - logging must never break the worker
            self.handleError(record)


class Worker:
    def __init__(self, sock: socket.socket, init: dict[str, Any]) -> None:
        self.index: int = init["index"]
        self.sock = sock
        self.table = SharedTable(init["shm_fd"], init["workers"])
        self.budget = SharedBudget(self.table, self.index)
        listeners = [(socket.socket(fileno=fd), kind) for fd, kind in init["listeners"]]
        for listener, _ in listeners:
            listener.setblocking(False)
        self.runtime = WorkerRuntime(init["config"], init["secrets"], worker=self.index,
                                     budget=self.budget, sockets=listeners)
        ctx = self.runtime.ctx
        ctx.workers = init["workers"]  # (they share max_client_conn)
        state = init["state"]
        ctx.disabled.update(state["disabled"])
        ctx.switched_to = state["switched_to"]
        ctx.failed_servers.update(state["failed_servers"])
        ctx.pool.paused.update(state["paused"])
        if state.get("topology") is not None:  # the health checker's last decision
            ctx.set_topology(state["topology"])
        self.channel = Channel(self._on_message, self._on_lost)
        self._starving = False
        # SCM_RIGHTS to and from the supervisor (server connections handed over)
        self.fdsock = socket.socket(fileno=init["fd_channel"])
        self.fdsock.settimeout(5)
        self._handing: dict[int, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: self.channel, self.sock)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(ChannelLog(self.channel))
        ctx = self.runtime.ctx
        self.budget.on_freed = lambda: self.channel.send("freed")
        ctx.pool.on_starved = self._starved
        ctx.cancel_elsewhere = lambda pid, secret: self.channel.send("cancel", pid, secret)
        ctx.probe_now = lambda: self.channel.send("probe_now")  # the supervisor's checker
        # the SQL admin console: management commands run by the supervisor, for every worker
        ctx.admin_console = functools.partial(sqlconsole.answer, manage=self._manage)
        if handoff.hands_over(ctx):
            ctx.offer = lambda key, rule_no: self.channel.send("offer", key, rule_no)
        await self.runtime.start()
        self.table.set_pid(self.index, os.getpid())
        self.channel.send("ready", os.getpid())
        mode = await self.runtime.run()
        await self.runtime.shutdown(mode)
        self.channel.send("stopped", mode)
        self.channel.close()
        return 0

    async def _manage(self, request: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self.channel.request("admin", request)
        return answer

    def _starved(self, key: tuple[str, str], rule_no: int, outcome: int) -> None:
        """No room for a new connection and nothing idle here to close: ask the supervisor to
        have another worker close an idle one (one request at a time)."""
        if not self._starving:
            self._starving = True
            self.channel.send("starved", key, rule_no if outcome == RULE_FULL else None)

    async def _adopt(self, request_id: int, state: dict[str, Any]) -> None:
        try:
            _, fds, _, _ = socket.recv_fds(self.fdsock, 16, 1)
            adopted = bool(fds) and await handoff.adopt(self.runtime.ctx, fds[0], state)
        except OSError as exc:
            log.warning("could not adopt a server connection from another worker: %s", exc)
            adopted = False
        self.channel.reply(request_id, True, adopted)

    def _on_lost(self) -> None:
        self.runtime.stop("fast")  # the supervisor is gone

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        ctx = self.runtime.ctx
        if kind == "call":
            _, request_id, operation, args = message
            try:
                value = control.OPERATIONS[operation](ctx, *args)
                if operation == "set_main_key" and args[0] == "log_level":
                    logging.getLogger().setLevel(level_of(str(args[1])))
            except Exception as exc:  # KeyError for an unknown server name, and the like
                self.channel.reply(request_id, False, exc)
                return
            self.channel.reply(request_id, True, value)
        elif kind == "evict":
            _, request_id, rule_no = message
            slot = ctx.pool.evict_idle(rule_no)
            if slot is not None:
                log.debug("closing idle server connection %d for another worker", slot.id)
                slot.conn.terminate()
                ctx.pool.discard(slot)
            self.channel.reply(request_id, True, slot is not None)
        elif kind == "give":  # another worker waits for this database/user
            _, request_id, key = message
            given = handoff.detach(ctx, tuple(key), self._handing)
            if given is not None:
                fd, state = given
                try:
                    socket.send_fds(self.fdsock, [b"h"], [fd])
                except OSError as exc:  # closed instead (the fd below was the last one)
                    log.warning("could not hand a server connection over: %s", exc)
                    handoff.handed(ctx, state["slot"], self._handing)
                    self.channel.reply(request_id, True, None)
                    return
                finally:
                    os.close(fd)
                self.channel.reply(request_id, True, state)
            else:
                self.channel.reply(request_id, True, None)
        elif kind == "handed":
            handoff.handed(ctx, message[1], self._handing)
        elif kind == "adopt":
            task = asyncio.get_running_loop().create_task(self._adopt(message[1], message[2]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "starve_done":
            self._starving = False
            ctx.pool.retry()
        elif kind == "retry":
            for pool in ctx.pools():
                pool.retry()
        elif kind == "topology":  # supervisor.health decided (issue 13)
            ctx.set_topology(message[1])
        elif kind == "cancel":
            asyncio.get_running_loop().create_task(
                ctx.forward_cancel(message[1], message[2], local_only=True))
        elif kind == "apply":
            self.runtime.apply(message[1], message[2])
            logging.getLogger().setLevel(level_of(message[1].main.log_level))
        elif kind == "stop":
            self.runtime.stop(message[1])
        elif kind == "close_listeners":  # a rolling restart: the port is handed over
            self.runtime.close_listeners()
            self.channel.reply(message[1], True, None)
        elif kind == "cancel_shutdown":
            self.channel.reply(message[1], True, self.runtime.cancel_shutdown())


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    message = receive_blocking(sock)
    init: dict[str, Any] = message[1]
    logging.getLogger().setLevel(level_of(init["config"].main.log_level))
    worker = Worker(sock, init)
    return run_loop(worker.serve())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
