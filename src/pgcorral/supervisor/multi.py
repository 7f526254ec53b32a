"""The supervisor of ``workers = N`` (N > 1): one process that serves no client itself.

It owns the configuration, the signals, the log, the management socket and the listening
sockets, and starts N worker processes (``supervisor.worker``) that accept clients on those
sockets and share one pool budget in shared memory (``supervisor.shared``). It relays what
concerns more than one worker:

* management calls go to every worker and their answers are merged (``merge``): counts are
  summed, lists joined, and ``workers`` lists each worker's own figures;
* a worker with clients waiting and no room (``starved``) gets another worker to close an idle
  connection (``evict``, asked of one worker after another until one had one);
* a worker that gave a connection back while others wait (``freed``) makes the waiting workers
  try again (``retry``);
* a CancelRequest whose key no client of the receiving worker has goes to every other worker;
* a worker that dies is logged, its row in the shared table zeroed (the kernel closed its
  sockets, so PostgreSQL ends its backends), and a new worker takes its index.

Listening: every worker accepts on the same inherited sockets (TCP and unix) by default;
``PGCORRAL_LISTEN=reuseport`` gives each worker a TCP socket of its own with SO_REUSEPORT
instead (bench/README.md has the measurement that chose the default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from pgcorral.config import Config
from pgcorral.errors import ConfigError
from pgcorral.management.commands import dispatch
from pgcorral.management.server import ManagementServer
from pgcorral.management.services import start_http
from pgcorral.net.control import replace_main_key, replace_server_key
from pgcorral.pool.topology import Snapshot
from pgcorral.security.secrets import Secrets
from pgcorral.supervisor import handover, peers
from pgcorral.supervisor.channel import Channel, ChannelClosed, send_blocking
from pgcorral.supervisor.health import HealthChecker
from pgcorral.supervisor.logs import level_of
from pgcorral.supervisor.process import sd_notify
from pgcorral.supervisor.reload import ReloadConfig, reload_files
from pgcorral.supervisor.runtime import loop_kind, remove_stale_socket
from pgcorral.supervisor.shared import SharedTable

log = logging.getLogger("pgcorral.main")

#: Seconds a worker may take to answer a management call, and to start.
CALL_TIMEOUT = 5.0
START_TIMEOUT = 30.0
#: Seconds workers get to exit after a fast stop before they are killed.
EXIT_TIMEOUT = 10.0
#: A worker that dies within this many seconds of its start is restarted after a pause
#: (0.5 s, doubling, at most RESTART_PAUSE_MAX).
QUICK_DEATH = 5.0
RESTART_PAUSE_MAX = 30.0
#: status fields that are summed over workers
_SUMMED = ("active_connections", "idle_connections", "opening_connections",
           "total_connections", "clients", "waiting_clients", "pinned_clients",
           "reads_to_replica", "reads_to_primary")


class WorkerHandle:
    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: Channel,
                 fdsock: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.fdsock = fdsock  # SCM_RIGHTS: server connections handed between workers
        self.pid = proc.pid
        self.started = asyncio.get_running_loop().time()
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Supervisor:
    def __init__(self, config: Config, secrets: Secrets, reload_config: ReloadConfig,
                 workers: int) -> None:
        self._config = config
        self._secrets = secrets
        self._reload_config = reload_config
        self.count = workers
        self.table = SharedTable.create(workers)
        self.workers: dict[int, WorkerHandle] = {}
        self.management = ManagementServer(self)
        self.reuseport = os.environ.get("PGCORRAL_LISTEN") == "reuseport"
        self._tcp: list[socket.socket] = []  # shared listening sockets
        self._own_tcp: dict[int, list[socket.socket]] = {}  # reuseport: per worker
        self._unix: socket.socket | None = None
        self.unix_path = ""
        self._stopping: str | None = None
        self._unix_inode = 0  # the unix socket's inode (another pgcorral may take it over)
        self._peer: peers.PeerListener | None = None  # so_reuseport: cancels from the others
        self._done: asyncio.Future[None] | None = None
        self._commands = 0
        self._state: dict[str, Any] = {"disabled": set(), "switched_to": None,
                                       "failed_servers": set(), "paused": set(),
                                       "topology": None}
        #: issue 13: one health checker for every worker; its decisions go to each
        self.health = HealthChecker(config, secrets, self._publish_topology,
                                    lambda: self._state["switched_to"])
        self._tasks: set[asyncio.Task[Any]] = set()
        self._quick_deaths: dict[int, int] = {}  # worker index -> deaths soon after start

    # --- the Controller of management.commands -----------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    @property
    def shutting_down(self) -> bool:
        return self._stopping is not None

    def note_command(self) -> None:
        self._commands += 1

    async def call(self, operation: str, *args: Any) -> Any:
        """``net.control.<operation>`` in every running worker; the merged answer."""
        starting = [h.ready for h in self.workers.values() if not h.ready.done()]
        if starting:  # a worker (re)starting is waited for, not left out
            await asyncio.wait(starting, timeout=START_TIMEOUT)
        handles = [h for h in self.workers.values()
                   if h.ready.done() and not h.ready.exception() and not h.lost.done()]
        futures = [h.channel.request("call", operation, args) for h in handles]
        answers: list[Any] = []
        for handle, future in zip(handles, futures, strict=True):
            try:
                answers.append(await asyncio.wait_for(future, CALL_TIMEOUT))
            except (ChannelClosed, TimeoutError):
                log.warning("worker %d did not answer %s", handle.index, operation)
        merged = merge(operation, answers, self)
        self._track(operation, args, merged)
        return merged

    def _track(self, operation: str, args: tuple[Any, ...], answer: Any) -> None:
        """Keep what a worker started later must be told (and the supervisor's own view)."""
        state = self._state
        if operation in ("enable", "disable") and answer is not None:
            state["disabled"] = set(answer)  # the workers' disabled list after the change
        elif operation in ("pause", "resume") and answer is not None:
            state["paused"] = set(answer)
        elif operation == "switch_to":
            state["switched_to"] = args[0]
            self.health.poke()
            if answer not in (None, args[0]):  # the previous server is marked failed
                state["failed_servers"].add(answer)
            state["failed_servers"].discard(args[0])
        elif operation == "clear_server":
            state["failed_servers"].discard(args[0])
        elif operation == "set_main_key":
            self._config, _ = replace_main_key(self._config, args[0], args[1])
            if args[0] == "log_level":
                logging.getLogger().setLevel(level_of(str(args[1])))
        elif operation == "set_server_key":
            self._config, _ = replace_server_key(self._config, *args)

    def stop(self, mode: str) -> None:
        """Shut every worker down: "graceful" or "fast"."""
        if self._stopping == "fast" or (self._stopping == mode):
            return
        self._stopping = mode
        sd_notify("STOPPING=1")
        log.info("%s shutdown of %d worker(s)", mode, len(self.workers))
        if mode == "wait_for_clients":  # new clients go to the other pgcorral on the port
            self._spawn_task(self._hand_over_port())
        else:
            self._broadcast("stop", mode)
        if mode == "fast":
            self._spawn_task(self._kill_stragglers())
        self._check_done()

    async def _hand_over_port(self) -> None:
        """A rolling restart (``supervisor.handover``): new connections are steered to the
        other pgcorral on the port while the workers accept what is queued here; then the
        workers close their copies of the listening sockets, the steering is taken off, this
        process closes its copies, and the workers wait for their clients to leave."""
        socks = self._listening()
        steered = handover.steer_away(socks)
        if steered and not await handover.drained(socks):
            log.warning("rolling restart: the accept queue did not empty within %g s",
                        handover.DRAIN_TIMEOUT)
        handles = [h for h in self.workers.values() if not h.lost.done()]
        closing = [h.channel.request("close_listeners") for h in handles]
        if closing:
            await asyncio.wait(closing, timeout=CALL_TIMEOUT)
            for future in closing:  # a worker that died meanwhile: its listeners went with it
                if future.done() and not future.cancelled():
                    future.exception()
        handover.detach(steered)
        for sock in socks:
            sock.close()
        self._tcp = []
        self._own_tcp.clear()
        self._unix = None
        if self.unix_path and self._unix_inode:
            peers.unlink_if_ours(self.unix_path, self._unix_inode)
            self._unix_inode = 0
        if self._stopping == "wait_for_clients":  # (not hurried to "fast" meanwhile)
            self._broadcast("stop", "wait_for_clients")

    def cancel_shutdown(self) -> bool:
        if self._stopping != "graceful":
            return False
        self._stopping = None
        for handle in list(self.workers.values()):
            if not handle.lost.done():
                self._spawn_task(handle.channel.request("cancel_shutdown"))
        for index in range(self.count):  # workers that had already finished
            if index not in self.workers:
                self._spawn_task(self._spawn(index))
        log.info("graceful shutdown cancelled; back to normal service")
        sd_notify("READY=1")
        return True

    def reload(self) -> list[str]:
        sd_notify("RELOADING=1")
        try:
            config, secrets = reload_files(self._reload_config, self._config)
        except ConfigError as exc:
            sd_notify("READY=1")
            return list(exc.problems) or [str(exc)]
        self._config, self._secrets = config, secrets
        logging.getLogger().setLevel(level_of(config.main.log_level))
        self._broadcast("apply", config, secrets)
        self.health.apply(config, secrets)
        log.info("configuration reloaded")
        sd_notify("READY=1")
        return []

    # --- running -----------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        # so_reuseport: SIGTERM stops when the clients have left (a rolling restart, as
        # PgBouncer's SIGTERM); else gracefully, as pgagroal
        term = "wait_for_clients" if self.config.main.so_reuseport else "graceful"
        for signum, action in ((signal.SIGTERM, term), (signal.SIGINT, "fast")):
            loop.add_signal_handler(signum, self.stop, action)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._bind()
        main = self._config.main
        if main.so_reuseport:  # cancels for our clients that land on another pgcorral
            self._peer = peers.PeerListener(main.unix_socket_dir, main.port,
                                            lambda pid, secret: self._broadcast(
                                                "cancel", pid, secret))
            await self._peer.start()
        await self.management.start()
        http = await start_http(self)
        await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(h.ready for h in self.workers.values()))
        except TimeoutError:
            log.critical("workers did not start within %.0f s", START_TIMEOUT)
            self.stop("fast")
        main = self._config.main
        server = self._config.current_server(self._state["switched_to"])
        log.info("pgcorral: started on %s:%d (unix socket %s), server %s at %s:%d, "
                 "event loop %s, %d workers (pids %s)", main.host, main.port, self.unix_path,
                 server.name, server.host, server.port, loop_kind(), self.count,
                 " ".join(str(h.pid) for h in self.workers.values()))
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        self.health.start()
        await self._done
        self.health.stop()
        self.management.close()
        for service in http:
            service.close()
        for sock in self._listening():
            sock.close()
        if self.unix_path and self._unix_inode:
            peers.unlink_if_ours(self.unix_path, self._unix_inode)
        if self._peer is not None:
            self._peer.close()
        log.info("pgcorral: stopped (%s)", self._stopping)
        return 0

    def _bind(self) -> None:
        main = self._config.main
        if not self.reuseport:
            self._tcp = bind_tcp(main.host, main.port, main.backlog,
                                 reuseport=main.so_reuseport)
        else:
            for index in range(self.count):
                self._own_tcp[index] = bind_tcp(main.host, main.port, main.backlog,
                                                reuseport=True)
        os.makedirs(main.unix_socket_dir, exist_ok=True)
        self.unix_path = os.path.join(main.unix_socket_dir, f".s.PGSQL.{main.port}")
        if main.so_reuseport:
            peers.take_over_unix_socket(self.unix_path)
        else:
            remove_stale_socket(self.unix_path)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self._unix_inode = os.stat(self.unix_path).st_ino
        unix.listen(main.backlog)
        unix.set_inheritable(True)
        self._unix = unix

    def _listening(self) -> list[socket.socket]:
        own = [s for socks in self._own_tcp.values() for s in socks]
        return self._tcp + own + ([self._unix] if self._unix is not None else [])

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        fd_parent, fd_child = socket.socketpair()
        fd_parent.settimeout(5)
        tcp = self._own_tcp.get(index, self._tcp)
        assert self._unix is not None
        listeners = [(s.fileno(), "host") for s in tcp] + [(self._unix.fileno(), "local")]
        fd_channel = fd_child.fileno()
        fds = [child.fileno(), fd_channel, self.table.fd,
               *(fd for fd, _ in listeners)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgcorral.supervisor.worker", str(child.fileno())],
            pass_fds=fds, stdin=subprocess.DEVNULL)
        child.close()
        fd_child.close()
        send_blocking(parent, "init", {
            "index": index, "workers": self.count, "shm_fd": self.table.fd,
            "fd_channel": fd_channel,
            "listeners": listeners, "config": self._config, "secrets": self._secrets,
            "state": self._state})
        parent.setblocking(False)
        handle: WorkerHandle | None = None

        def on_message(message: tuple[Any, ...]) -> None:
            assert handle is not None
            self._on_message(handle, message)

        def on_lost() -> None:
            assert handle is not None
            if not handle.lost.done():
                handle.lost.set_result(None)

        channel = Channel(on_message, on_lost)
        handle = WorkerHandle(index, proc, channel, fd_parent)
        self.workers[index] = handle
        await loop.connect_accepted_socket(lambda: channel, parent)
        self._spawn_task(self._watch(handle))

    async def _watch(self, handle: WorkerHandle) -> None:
        await handle.lost
        code = await asyncio.to_thread(handle.proc.wait)
        handle.fdsock.close()
        held = self.table.clear(handle.index)
        if self.workers.get(handle.index) is handle:
            del self.workers[handle.index]
        if not handle.ready.done():
            handle.ready.set_exception(ChannelClosed())
            handle.ready.exception()  # retrieved: serve() logs the start failure itself
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if self._stopping is None:
            log.error("worker %d (pid %d) died (%s); its clients lost their connections, its "
                      "%d server connection(s) were closed; starting a new worker",
                      handle.index, handle.pid, how, held["connections"])
            self._broadcast("retry")
            # a worker that dies at once (a broken installation, no memory) is restarted
            # after a pause that doubles each time, not in a tight loop
            loop = asyncio.get_running_loop()
            fails = self._quick_deaths.get(handle.index, 0)
            if loop.time() - handle.started < QUICK_DEATH:
                self._quick_deaths[handle.index] = fails + 1
                await asyncio.sleep(min(RESTART_PAUSE_MAX, 0.5 * 2 ** fails))
            else:
                self._quick_deaths.pop(handle.index, None)
            if self._stopping is None:
                await self._spawn(handle.index)
        else:
            log.info("worker %d (pid %d) stopped (%s)", handle.index, handle.pid, how)
            if self.reuseport:  # nobody accepts on its socket any more
                for sock in self._own_tcp.pop(handle.index, []):
                    sock.close()
        self._check_done()

    def _check_done(self) -> None:
        if self._stopping is not None and not self.workers and self._done is not None \
                and not self._done.done():
            self._done.set_result(None)

    async def _kill_stragglers(self) -> None:
        await asyncio.sleep(EXIT_TIMEOUT)
        for handle in list(self.workers.values()):
            log.warning("worker %d (pid %d) did not exit; killing it", handle.index,
                        handle.pid)
            with contextlib.suppress(ProcessLookupError):
                handle.proc.kill()

    def _publish_topology(self, snapshot: Snapshot) -> None:
        self._state["topology"] = snapshot  # for a worker started later
        self._broadcast("topology", snapshot)

    def _broadcast(self, *message: Any) -> None:
        for handle in self.workers.values():
            handle.channel.send(*message)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- messages from workers ---------------------------------------------------------------

    def _on_message(self, handle: WorkerHandle, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            _, level, name, text = message
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                logger.handle(logging.makeLogRecord({
                    "name": name, "levelno": level, "levelname": logging.getLevelName(level),
                    "msg": text, "process": handle.pid}))
        elif kind == "freed":
            for other in self.workers.values():
                if other is not handle and self.table.waiting(other.index):
                    other.channel.send("retry")
        elif kind == "offer":  # an idle connection another worker's client waits for
            self._spawn_task(self._place(handle, message[1], message[2]))
        elif kind == "starved":
            self._spawn_task(self._find_room(handle, message[1], message[2]))
        elif kind == "probe_now":  # a worker's connection to the primary was refused
            self.health.poke()
        elif kind == "cancel":
            for other in self.workers.values():
                if other is not handle:
                    other.channel.send("cancel", message[1], message[2])
            main = self._config.main
            if self._peer is not None:  # maybe a client of the other pgcorral on the port
                self._spawn_task(peers.send_to_peers(main.unix_socket_dir, main.port,
                                                     message[1], message[2]))
        elif kind == "admin":  # a statement of the SQL admin console (management.sqlconsole)
            self._spawn_task(self._admin(handle, message[1], message[2]))
        elif kind == "ready":
            handle.pid = message[1]
            if not handle.ready.done():
                handle.ready.set_result(message[1])

    async def _admin(self, handle: WorkerHandle, request_id: int,
                     request: dict[str, Any]) -> None:
        """A management request from a worker's SQL console, run with this supervisor as the
        controller (so for every worker); the answer goes back to that worker."""
        try:
            answer = await dispatch(self, request)
        except Exception as exc:
            log.exception("admin console request %r failed", request.get("command"))
            handle.channel.reply(request_id, False, RuntimeError(str(exc)))
            return
        handle.channel.reply(request_id, True, answer)

    async def _find_room(self, starved: WorkerHandle, key: tuple[str, str],
                         rule_no: int | None) -> None:
        """Find ``starved`` a connection: an idle one for ``key`` handed over by another
        worker (``net.handoff``); else ask the other workers, one after another, to close an
        idle connection (under ``rule_no`` when the rule is what is full) so that ``starved``
        can open one."""
        try:
            for other in list(self.workers.values()):
                if other is not starved and not other.lost.done() and \
                        await self._hand_over(other, starved, key):
                    return
            for other in list(self.workers.values()):
                if other is starved or other.lost.done():
                    continue
                with contextlib.suppress(ChannelClosed, TimeoutError):
                    if await asyncio.wait_for(other.channel.request("evict", rule_no),
                                              CALL_TIMEOUT):
                        return
        finally:
            starved.channel.send("starve_done")


    async def _place(self, giver: WorkerHandle, key: tuple[str, str], rule_no: int) -> None:
        """Hand ``giver``'s idle connection for ``key`` to a worker with clients waiting; if
        none takes it, ``giver`` closes an idle connection under its rule (what it would have
        done without the hand-over) and the waiters try again."""
        for other in list(self.workers.values()):
            if other is not giver and not other.lost.done() and \
                    self.table.waiting(other.index) and \
                    await self._hand_over(giver, other, key):
                return
        with contextlib.suppress(ChannelClosed, TimeoutError):
            await asyncio.wait_for(giver.channel.request("evict", rule_no), CALL_TIMEOUT)
        self._broadcast("retry")

    async def _hand_over(self, giver: WorkerHandle, taker: WorkerHandle,
                         key: tuple[str, str]) -> bool:
        """Move an idle connection for ``key`` from ``giver`` to ``taker``; True if done."""
        try:
            state = await asyncio.wait_for(giver.channel.request("give", key), CALL_TIMEOUT)
        except (ChannelClosed, TimeoutError):
            return False
        if state is None:
            return False
        adopted = False
        try:
            _, fds, _, _ = socket.recv_fds(giver.fdsock, 16, 1)
            try:
                socket.send_fds(taker.fdsock, [b"h"], fds)
            finally:
                for fd in fds:
                    os.close(fd)
            adopted = bool(await asyncio.wait_for(taker.channel.request("adopt", state),
                                                  CALL_TIMEOUT))
        except (OSError, ChannelClosed, TimeoutError) as exc:
            log.warning("handing a server connection from worker %d to worker %d failed: %s",
                        giver.index, taker.index, exc)
        finally:
            giver.channel.send("handed", state["slot"])
        return adopted


def merge(operation: str, answers: list[Any], supervisor: Supervisor) -> Any:
    """One answer from the workers' answers to ``operation``."""
    if operation in ("status", "details"):
        return merge_status(answers, supervisor)
    if operation == "stats":
        merged = merge_stats(answers)
        merged["pid"] = os.getpid()
        merged["counters"]["management_commands"] = \
            merged["counters"].get("management_commands", 0) + supervisor._commands
        if supervisor.shutting_down:
            merged["status"] = "graceful shutdown"
        return merged
    if operation == "flush":
        out: dict[str, int] = {}
        for answer in answers:
            for name, value in answer.items():
                out[name] = out.get(name, 0) + value
        return out
    if operation == "kill_client":  # only the worker that has the client finds it
        return any(answers)
    return answers[0] if answers else None


def merge_status(answers: list[dict[str, Any]], supervisor: Supervisor) -> dict[str, Any]:
    if not answers:
        return {"status": "graceful shutdown" if supervisor.shutting_down else "running",
                "workers": []}
    out = dict(answers[0])
    for name in _SUMMED:
        out[name] = sum(a[name] for a in answers)
    out["servers"] = _merge_sections(answers)
    # writes are refused if any worker refuses them (they follow the same decisions, a
    # moment apart)
    out["writes_refused"] = next((a.get("writes_refused") for a in answers
                                  if a.get("writes_refused")), "")
    counters: dict[str, int] = {}
    for answer in answers:
        for name, value in answer["counters"].items():
            counters[name] = counters.get(name, 0) + value
    counters["management_commands"] = counters.get("management_commands", 0) + \
        supervisor._commands
    out["counters"] = counters
    if supervisor.shutting_down:
        out["status"] = "graceful shutdown"
    out["workers"] = [{k: a[k] for k in ("worker", "pid", *_SUMMED)} for a in answers]
    out["pid"] = os.getpid()
    out.pop("worker", None)
    if "connections" in out:
        out["connections"] = [c for a in answers for c in a["connections"]]
        sessions = [s for a in answers for s in a["sessions"]]
        sessions.sort(key=lambda c: (str(c["database"]), str(c["user"]), str(c["address"])))
        out["sessions"] = sessions
    return out


#: pool fields that are not summed over workers
_POOL_SAME = ("database", "user", "pool_mode", "pool_size", "min_pool_size")


def _add_into(out: dict[str, Any], item: dict[str, Any]) -> None:
    """Sum ``item`` into ``out``: numbers added, dicts by key, lists element-wise."""
    for name, value in item.items():
        have = out.get(name)
        if have is None:
            out[name] = (dict(value) if isinstance(value, dict) else
                         list(value) if isinstance(value, list) else value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, list):
                    have[k] = [a + b for a, b in zip(have.get(k, [0] * len(v)), v,
                                                     strict=True)]
                else:
                    have[k] = have.get(k, 0) + v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = have + value


def _merge_sections(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server sections of the first answer with every worker's connect errors added."""
    key = "server_sections" if "server_sections" in answers[0] else "servers"
    sections = [dict(s) for s in answers[0][key]]
    for section in sections:
        section["errors"] = sum(next((s.get("errors", 0) for s in a[key]
                                      if s["name"] == section["name"]), 0) for a in answers)
    return sections


def merge_stats(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole pooler's ``stats`` from the workers': pools and client groups added up,
    clients and server connections listed together (each row has its ``worker``)."""
    if not answers:
        return {"pools": [], "clients": [], "servers": [], "client_groups": [],
                "counters": {}, "workers": [], "status": "running"}
    out = {k: v for k, v in answers[0].items() if k not in ("worker", "pid")}
    pools: dict[tuple[str, str], dict[str, Any]] = {}
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    counters: dict[str, int] = {}
    for answer in answers:
        for pool in answer["pools"]:
            key = (pool["database"], pool["user"])
            have = pools.get(key)
            if have is None:
                pools[key] = {**pool, "errors": dict(pool["errors"]),
                              "logins": dict(pool["logins"]),
                              "prepared": dict(pool["prepared"]),
                              "hist": {k: list(v) for k, v in pool["hist"].items()},
                              "hist_sum_us": dict(pool["hist_sum_us"])}
                continue
            maxwait = max(have["maxwait_us"], pool["maxwait_us"])
            _add_into(have, {k: v for k, v in pool.items() if k not in _POOL_SAME})
            have["maxwait_us"] = maxwait
        for group in answer["client_groups"]:
            gkey = (group["address"], group["application_name"], group["user"])
            if gkey not in groups:
                groups[gkey] = dict(group)
            else:
                _add_into(groups[gkey], {k: v for k, v in group.items()
                                         if k not in ("address", "application_name", "user")})
        for name, value in answer["counters"].items():
            counters[name] = counters.get(name, 0) + value
    out["server_sections"] = _merge_sections(answers)
    out["pools"] = [pools[k] for k in sorted(pools)]
    out["client_groups"] = [groups[k] for k in sorted(groups)]
    out["clients"] = [c for a in answers for c in a["clients"]]
    out["servers"] = [s for a in answers for s in a["servers"]]
    out["counters"] = counters
    out["started"] = min(a["started"] for a in answers)
    out["workers"] = [{"worker": a["worker"], "pid": a["pid"], "clients": len(a["clients"]),
                       "servers": len(a["servers"])} for a in answers]
    return out


def bind_tcp(host: str, port: int, backlog: int, reuseport: bool) -> list[socket.socket]:
    """Listening sockets for ``host`` (``*``: every address), inheritable by workers."""
    name = None if host in ("*", "") else host
    seen: set[tuple[int, Any]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


__all__ = ["Supervisor", "bind_tcp", "merge", "merge_stats", "merge_status"]
