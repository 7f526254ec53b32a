"""``pgcorral-cli``: manage a running pgcorral, locally or remotely, as pgagroal-cli does.

Only argument parsing and rendering live here: the connection and the wire format are
``management.client`` / ``management.protocol``. Local mode finds the management socket from the
configuration file (``-c``, pgagroal-style); remote mode (``-h``/``-p``) authenticates as an
admin. Output is aligned text (``-F text``) or the daemon's answer as JSON (``-F json``). Exit
code 0 on success, 1 when the daemon refused the command or cannot be reached, 2 for a usage
error; every failure prints one line on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from pgcorral import __version__
from pgcorral.config import load_config
from pgcorral.errors import ConfigError
from pgcorral.management import protocol
from pgcorral.management.client import ManagementClient, ManagementError

_PROG = "pgcorral-cli"
_DEFAULT_DIR = "/etc/pgcorral"
_CONFIG_NAMES = ("pgcorral.conf", "pgagroal.conf")

_COMMANDS_HELP = """commands:
  ping                                  is pgcorral alive (alias: is-alive)
  status [details]                      status, with one line per connection (alias: details)
  flush [gracefully|idle|all] [db]      close server connections (flush-idle, flush-gracefully,
                                        flush-all); all aborts clients: USE WITH CAUTION
  enable [db] / disable [db]            allow / refuse new logins to a database (default all)
  pause [db] / resume [db]              hold / release new transactions of a database
  kill-client <id>                      abort one client (id from the console's SHOW CLIENTS)
  shutdown [gracefully|immediate|cancel]  stop pgcorral (gracefully, stop, cancel-shutdown)
  switch-to <server>                    send new server connections to <server>
  clear prometheus | clear server <name>  reset counters / a failed server
  conf reload | ls | get [key] | set <key> <value> | alias
  stats                                 everything the views show (pools, clients, servers)
  top [--interval S]                    live view of pools and clients; q quits
"""


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit code 2, no usage dump
        raise _Usage(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, add_help=False, description="Manage a running pgcorral",
                epilog=_COMMANDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="CONFIG_FILE",
                   help="pgcorral.conf, to find the local management socket")
    p.add_argument("-h", "--host", help="remote host (remote management)")
    p.add_argument("-p", "--port", type=int, help="remote management port")
    p.add_argument("-U", "--user", help="admin user (remote)")
    p.add_argument("-P", "--password", help="admin password (remote; or PGCORRAL_PASSWORD)")
    p.add_argument("-F", "--format", choices=("text", "json"), default=None,
                   help="output format (default text)")
    p.add_argument("--interval", type=float, default=None, metavar="S",
                   help="top: seconds between refreshes (default 1)")
    p.add_argument("-V", "--version", action="version", version=f"{_PROG} {__version__}")
    p.add_argument("-?", "--help", action="help", help="display help")
    p.add_argument("command", nargs="*", help="the command and its arguments")
    return p


def _local_socket(config: str | None) -> str:
    if config is None:
        directory = os.environ.get("PGCORRAL_CONFIG_DIR") or _DEFAULT_DIR
        candidates = [os.path.join(directory, name) for name in _CONFIG_NAMES]
        config = next((c for c in candidates if os.path.exists(c)), candidates[0])
    try:
        main = load_config(config).main
    except ConfigError as exc:
        raise ManagementError(exc.problems[0] if exc.problems else str(exc)) from None
    return protocol.socket_path(main.unix_socket_dir, main.port)


def _connect(args: argparse.Namespace) -> ManagementClient:
    if args.host is None and args.port is None:
        return ManagementClient.local(_local_socket(args.config))
    if args.host is None or args.port is None:
        raise _Usage("remote management needs both -h HOST and -p PORT")
    user = args.user or os.environ.get("PGCORRAL_USER")
    if not user:
        raise _Usage("remote management needs -U USER")
    password = args.password or os.environ.get("PGCORRAL_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise _Usage("remote management needs -P PASSWORD or PGCORRAL_PASSWORD")
        password = getpass.getpass(f"Password for {user}: ")
    args.password = password  # asked once: top connects again after a failure
    return ManagementClient.remote(args.host, args.port, user, password)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if not args.command:
            raise _Usage("no command given (see -?)")
        name, rest = args.command[0], args.command[1:]
        if name == "top":
            return _top(args, rest)
        if args.interval is not None:
            raise _Usage("--interval applies to top only")
        if name not in protocol.COMMANDS and name not in protocol.ALIASES:
            raise _Usage(f"unknown command {name!r} (see -?)")
        client = _connect(args)
        try:
            answer = client.command(name, rest)
        finally:
            client.close()
    except _Usage as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 2
    except ManagementError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(answer, indent=2, sort_keys=True))
    if answer.get("outcome") != "ok":
        print(f"{_PROG}: {answer.get('command', name)}: {answer.get('reason', 'failed')}",
              file=sys.stderr)
        return 1
    if args.format != "json":
        print(render_text(answer))
    return 0


def _top(args: argparse.Namespace, rest: list[str]) -> int:
    """``top``: the first connection is made before the screen is taken, so that a daemon
    that is not running fails like every other command."""
    from pgcorral.cli import top  # curses is loaded only for top

    if rest:
        raise _Usage(f"top takes no arguments (got {' '.join(rest)!r}); use --interval S")
    if args.format is not None:
        raise _Usage("-F does not apply to top")
    interval = 1.0 if args.interval is None else args.interval
    if not 0.1 <= interval <= 3600:
        raise _Usage("--interval must be between 0.1 and 3600 seconds")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise _Usage("top needs a terminal (use stats -F json in scripts)")
    feed = top.Feed(lambda: _connect(args))
    try:
        feed.stats()
    except ManagementError:
        feed.close()
        raise
    try:
        return top.run(feed, interval)
    except KeyboardInterrupt:
        return 0
    finally:
        feed.close()


# --- text output --------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value) or "-"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(rows[0])
    cells = [[_scalar(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return out


def render_text(answer: dict[str, Any]) -> str:
    """Aligned ``name  value`` lines; nested objects indented; lists of objects as tables."""
    fields = {k: v for k, v in answer.items() if k not in ("outcome", "command")}
    if not fields:
        return "ok"
    return "\n".join(_render(fields, ""))


def _render(fields: dict[str, Any], indent: str) -> list[str]:
    scalars = {k: v for k, v in fields.items()
               if not isinstance(v, dict) and not (isinstance(v, list) and v
                                                   and isinstance(v[0], dict))}
    width = max((len(k) for k in scalars), default=0)
    out = [f"{indent}{k.ljust(width)}  {_scalar(v)}".rstrip() for k, v in scalars.items()]
    for key, value in fields.items():
        if key in scalars:
            continue
        out.append(f"{indent}{key}:")
        if isinstance(value, dict):
            out += _render(value, indent + "  ") if value else [f"{indent}  -"]
        else:
            out += [indent + "  " + line for line in _table(value)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
