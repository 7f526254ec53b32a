"""The command dispatch table of the management layer: one handler per command.

A handler takes the controller (the running daemon, one process or a supervisor with workers)
and the command's arguments, and returns the fields of the answer; a ``CommandError`` becomes
``{"outcome": "error", "reason": ...}``. Handlers act on the pool only through the workers'
control API (``net.control``), by name through ``Controller.call``, which with several workers
asks every worker and merges their answers. Aliases (pgagroal 0.5.0 names) are resolved first
by ``protocol.resolve``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pgcorral import __version__
from pgcorral.config import Config
from pgcorral.config.keys import MAIN_KEYS, MAIN_SECTIONS, SERVER_KEYS, Key
from pgcorral.config.parse import convert
from pgcorral.management import protocol
from pgcorral.security.secrets import Secrets

log = logging.getLogger("pgcorral.management")

_LEVELS = {"fatal": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
           "info": logging.INFO, "trace": 5}
FLUSH_MODES = ("gracefully", "idle", "all")


class Controller(Protocol):
    """What the management layer may ask of the running daemon."""

    @property
    def config(self) -> Config: ...

    @property
    def secrets(self) -> Secrets: ...

    @property
    def shutting_down(self) -> bool: ...

    async def call(self, operation: str, *args: Any) -> Any:
        """Run ``net.control.<operation>`` in every worker; the merged answer."""
        ...

    def note_command(self) -> None: ...

    def stop(self, mode: str) -> None: ...

    def cancel_shutdown(self) -> bool: ...

    def reload(self) -> list[str]: ...


class CommandError(Exception):
    """A refused command: a one-line reason, and extra fields for the answer."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


Fields = dict[str, Any]
Handler = Callable[[Controller, list[str]], Awaitable[Fields]]


def _max_args(args: list[str], n: int, usage: str) -> None:
    if len(args) > n:
        raise CommandError(f"too many arguments; usage: {usage}")


async def ping(c: Controller, args: list[str]) -> Fields:
    _max_args(args, 0, "ping")
    return {"status": "graceful shutdown" if c.shutting_down else "running",
            "version": __version__}


async def status(c: Controller, args: list[str]) -> Fields:
    _max_args(args, 1, "status [details]")
    if not args:
        return dict(await c.call("status"))
    if args[0] != "details":
        raise CommandError(f"unknown status argument {args[0]!r}; usage: status [details]")
    return dict(await c.call("details"))


async def stats(c: Controller, args: list[str]) -> Fields:
    """Everything the views show (``net.control.stats``, all workers added up)."""
    _max_args(args, 0, "stats")
    return dict(await c.call("stats"))


async def flush(c: Controller, args: list[str]) -> Fields:
    _max_args(args, 2, "flush [gracefully|idle|all] [database]")
    mode = "gracefully"
    if args and args[0] in FLUSH_MODES:
        mode, args = args[0], args[1:]
    elif len(args) == 2:
        raise CommandError(f"unknown flush mode {args[0]!r}; use gracefully, idle or all")
    database = args[0] if args else "all"
    return {"mode": mode, "database": database, **(await c.call("flush", mode, database))}


def _toggle(enable: bool) -> Handler:
    async def handler(c: Controller, args: list[str]) -> Fields:
        _max_args(args, 1, f"{'enable' if enable else 'disable'} [database]")
        database = args[0] if args else "all"
        disabled = await c.call("enable" if enable else "disable", database)
        log.info("%s database %s", "enabled" if enable else "disabled", database)
        return {"database": database, "disabled": disabled}
    return handler


def _pause(pause: bool) -> Handler:
    """``pause [database]`` / ``resume [database]``: clients of the database (all: every
    database) get no server connection until resumed; what runs now goes on
    (``net.control.pause``). ``pause`` answers at once; the SQL console's PAUSE then waits
    for the active server connections to finish, as PgBouncer's does."""
    name = "pause" if pause else "resume"

    async def handler(c: Controller, args: list[str]) -> Fields:
        _max_args(args, 1, f"{name} [database]")
        database = args[0] if args else "all"
        paused = await c.call(name, database)
        log.info("%s database %s", "paused" if pause else "resumed", database)
        return {"database": database, "paused": paused}
    return handler


async def kill_client(c: Controller, args: list[str]) -> Fields:
    """``kill-client <id>``: abort the client with that id (the id SHOW CLIENTS shows:
    ``worker * 1000000000 + the worker's own id``)."""
    if len(args) != 1 or not args[0].isdigit():
        raise CommandError("usage: kill-client <client id>")
    if not await c.call("kill_client", int(args[0])):
        raise CommandError(f"no client with id {args[0]}")
    log.info("killed client %s", args[0])
    return {"client": int(args[0])}


async def shutdown(c: Controller, args: list[str]) -> Fields:
    _max_args(args, 1, "shutdown [gracefully|immediate|wait_for_clients|cancel]")
    mode = args[0] if args else "gracefully"
    if mode == "cancel":
        if not c.cancel_shutdown():
            raise CommandError("no graceful shutdown in progress")
    elif mode in ("gracefully", "immediate", "wait_for_clients"):
        # wait_for_clients: PgBouncer's SHUTDOWN WAIT_FOR_CLIENTS (a rolling restart with
        # so_reuseport): stop listening now, stop when the clients have left by themselves
        c.stop({"gracefully": "graceful", "immediate": "fast"}.get(mode, mode))
    else:
        raise CommandError(f"unknown shutdown mode {mode!r}; use gracefully, immediate, "
                           "wait_for_clients or cancel")
    return {"mode": mode}


async def switch_to(c: Controller, args: list[str]) -> Fields:
    if len(args) != 1:
        raise CommandError("usage: switch-to <server>")
    try:
        previous = await c.call("switch_to", args[0])
    except KeyError:
        raise CommandError(f"no server named {args[0]!r}") from None
    return {"server": args[0], "previous": previous}


async def clear(c: Controller, args: list[str]) -> Fields:
    if args in (["prometheus"], ["prometheus", "all"]):
        await c.call("clear_counters")
        return {"cleared": "prometheus"}
    name = args[1] if len(args) == 2 and args[0] == "server" else (
        args[0] if len(args) == 1 else None)
    if name is None:
        raise CommandError("usage: clear prometheus | clear [server] <name>")
    try:
        await c.call("clear_server", name)
    except KeyError:
        raise CommandError(f"no server named {name!r}") from None
    return {"cleared": "server", "server": name}


# --- conf ------------------------------------------------------------------------------------


def _lookup(c: Controller, name: str) -> tuple[Key, str | None, str]:
    """(key, server section or None, bare key name) for ``key``, ``pgcorral.key``,
    ``pgagroal.key`` or ``server.<name>.<key>``."""
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[0] in MAIN_SECTIONS):
        bare = parts[-1]
        if bare in MAIN_KEYS:
            return MAIN_KEYS[bare], None, bare
    elif len(parts) == 3 and parts[0] == "server" and parts[2] in SERVER_KEYS:
        if parts[1] in [s.name for s in c.config.servers]:
            return SERVER_KEYS[parts[2]], parts[1], parts[2]
        raise CommandError(f"no server named {parts[1]!r}")
    raise CommandError(f"unknown configuration key {name!r}")


def _values(c: Controller) -> dict[str, Any]:
    config = c.config
    values: dict[str, Any] = {name: getattr(config.main, name) for name in MAIN_KEYS}
    for server in config.servers:
        for name in SERVER_KEYS:
            values[f"server.{server.name}.{name}"] = getattr(server, name)
    return values


async def conf(c: Controller, args: list[str]) -> Fields:
    sub, rest = (args[0], args[1:]) if args else ("", [])
    if sub == "reload":
        _max_args(rest, 0, "conf reload")
        problems = c.reload()
        if problems:
            raise CommandError("reload failed, the running configuration is kept: "
                               + "; ".join(problems))
        return {"reloaded": True}
    if sub == "ls":
        config = c.config
        return {"files": {"main": config.config_path, "hba": config.hba_path,
                          "limit": config.limits_path}, "values": _values(c)}
    if sub == "get":
        _max_args(rest, 1, "conf get [key]")
        if not rest:
            return {"values": _values(c)}
        _, server, bare = _lookup(c, rest[0])
        entry = c.config.main if server is None else next(
            s for s in c.config.servers if s.name == server)
        return {"key": rest[0], "value": getattr(entry, bare)}
    if sub == "set":
        if len(rest) != 2:
            raise CommandError("usage: conf set <key> <value>")
        return await _conf_set(c, rest[0], rest[1])
    if sub == "alias":
        return {"databases": [
            {"database": r.database, "aliases": list(r.aliases), "user": r.user,
             "max_size": r.max_size, "initial_size": r.initial_size, "min_size": r.min_size}
            for r in c.config.limits]}
    raise CommandError("usage: conf reload | ls | get [key] | set <key> <value> | alias")


async def _conf_set(c: Controller, name: str, text: str) -> Fields:
    key, server, bare = _lookup(c, name)
    try:
        value = convert(key, text)
    except ValueError as exc:
        raise CommandError(f"invalid value for {name}: {exc}") from None
    if not key.reloadable:
        raise CommandError("restart required", key=name, restart_required=True)
    if server is None:
        old = await c.call("set_main_key", bare, value)
        if bare == "log_level":
            level = _LEVELS.get(str(value), logging.DEBUG if str(value).startswith("debug")
                                else logging.INFO)
            logging.getLogger().setLevel(level)
    else:
        old = await c.call("set_server_key", server, bare, value)
    log.info("conf set %s = %r (was %r)", name, value, old)
    return {"key": name, "value": value, "previous": old}


HANDLERS: dict[str, Handler] = {
    "ping": ping,
    "status": status,
    "stats": stats,
    "flush": flush,
    "enable": _toggle(True),
    "disable": _toggle(False),
    "pause": _pause(True),
    "resume": _pause(False),
    "kill-client": kill_client,
    "shutdown": shutdown,
    "switch-to": switch_to,
    "clear": clear,
    "conf": conf,
}
assert set(HANDLERS) == set(protocol.COMMANDS)


async def dispatch(controller: Controller, request: dict[str, Any]) -> dict[str, Any]:
    """Run one request; the answer object."""
    name, args = request.get("command"), request.get("args", [])
    if not isinstance(name, str) or not isinstance(args, list) or not all(
            isinstance(a, str) for a in args):
        return protocol.error(str(name), "a request is {\"command\": str, \"args\": [str]}")
    command, args = protocol.resolve(name, args)
    handler = HANDLERS.get(command)
    if handler is None:
        return protocol.error(name, f"unknown command {name!r}")
    controller.note_command()
    try:
        return protocol.ok(command, **(await handler(controller, args)))
    except CommandError as exc:
        return protocol.error(command, exc.reason, **exc.fields)
