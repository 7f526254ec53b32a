"""``pgcorral-admin``: creates the master key and edits vault files, with pgagroal's commands.

Owns the command line, prompts and output of the tool; the files themselves belong to
``pgcorral.security.vault``. It never prints a password it did not generate.

Commands (pgagroal 0.5.0 names accepted as aliases): ``master-key``, ``user add``
(``add-user``), ``user edit`` (``update-user``), ``user del`` (``remove-user``), ``user ls``
(``list-users``). Exit status: 0 on success, 1 when the command failed, 2 for a command line
that cannot be understood; each failure prints one line per problem on stderr.

With ``-F json`` stdout holds exactly one JSON object, keys in this order:
``command`` (the canonical name, e.g. ``"user add"``, or null), ``outcome`` (``"ok"`` or
``"error"``), then ``file`` (the master key or users file), ``user``, ``users`` (for ``user ls``),
``password`` (only when generated with ``-g``) and ``error`` (the message, on failure) when they
apply.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import string
import sys
from collections.abc import Callable
from typing import Any

from pgcorral import __version__
from pgcorral.errors import ConfigError
from pgcorral.security.vault import (
    MAX_PASSWORD_BYTES,
    MasterKey,
    Vault,
    default_master_key_path,
    master_key_exists,
    master_key_weakness,
    password_problem,
    user_problem,
)

_PROG = "pgcorral-admin"
_PASSWORD_ENV = "PGCORRAL_PASSWORD"
#: Generated passwords avoid characters that need quoting in conninfo strings, .pgpass or a
#: shell: no space, quote, backslash, backtick or colon.
_GENERATE_ALPHABET = string.ascii_letters + string.digits + "!#$%&()*+,-./;<=>?@[]^_{|}~"

_COMMANDS: dict[tuple[str, ...], str] = {
    ("master-key",): "master-key",
    ("user", "add"): "user add",
    ("user", "edit"): "user edit",
    ("user", "del"): "user del",
    ("user", "ls"): "user ls",
    ("add-user",): "user add",
    ("update-user",): "user edit",
    ("remove-user",): "user del",
    ("list-users",): "user ls",
}

_HELP = f"""\
{_PROG} {__version__}
  Administration utility for pgcorral: the master key and the user vault files

Usage:
  {_PROG} [ -f FILE ] [ OPTIONS ] COMMAND

Options:
  -f, --file FILE         The vault file to edit (pgcorral_users.conf, frontend_users, admins...)
  -u, --users FILE        Same as -f
  -U, --user USER         The user name
  -P, --password PASSWORD The password (also read from ${_PASSWORD_ENV})
  -g, --generate          Generate a password (printed once)
  -l, --length N          Length of a generated password (default 64)
  -F, --format text|json  Output format (default text)
  -V, --version           Display version information
  -?, --help              Display help

Commands:
  master-key              Create the master key (~/.pgcorral/master.key)
  user add                Add a user (also: add-user)
  user edit               Change a user's password (also: update-user)
  user del                Remove a user (also: remove-user)
  user ls                 List the users (also: list-users)
"""


class _Failure(Exception):
    """The command failed: one line per problem, and an exit status."""

    def __init__(self, problems: list[str], status: int = 1) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit
        raise _Failure([f"{message} (try {_PROG} --help)"], 2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, add_help=False)
    p.add_argument("-f", "--file", "-u", "--users", dest="file", metavar="FILE")
    p.add_argument("-U", "--user", metavar="USER")
    p.add_argument("-P", "--password", metavar="PASSWORD")
    p.add_argument("-g", "--generate", action="store_true")
    p.add_argument("-l", "--length", type=int, default=64, metavar="N")
    p.add_argument("-F", "--format", choices=("text", "json"), default="text")
    p.add_argument("-V", "--version", action="store_true")
    p.add_argument("-?", "--help", action="store_true")
    p.add_argument("words", nargs="*", metavar="COMMAND")
    return p


def generate_password(length: int) -> str:
    return "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(length))


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _prompt_line(prompt: str) -> str:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise _Failure(["no input"])
    return line.rstrip("\r\n")


def _prompt_secret(prompt: str) -> str:
    try:
        first = getpass.getpass(prompt, stream=sys.stderr)
        second = getpass.getpass("Verify: ", stream=sys.stderr)
    except EOFError:
        raise _Failure(["no input"])
    if first != second:
        raise _Failure(["the two entries differ"])
    return first


class _Run:
    """One invocation: the parsed options and what gets reported."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args = args
        self.command = command
        self.result: dict[str, Any] = {}
        self.lines: list[str] = []

    def users_file(self) -> str:
        if not self.args.file:
            raise _Failure([f"{self.command}: no vault file: give -f FILE (or -u FILE)"])
        return str(self.args.file)

    def user_name(self) -> str:
        if self.args.user is not None:
            name = str(self.args.user)
        elif _interactive():
            name = _prompt_line("User: ").strip()
        else:
            raise _Failure([f"{self.command}: no user name: give -U USER"])
        problem = user_problem(name)
        if problem:
            raise _Failure([f"{self.command}: {problem}"])
        return name

    def secret(self, what: str, check: Callable[[str], str | None]) -> str:
        """The password from -g, -P, $PGCORRAL_PASSWORD or a prompt, checked by ``check``."""
        args = self.args
        if args.generate:
            if args.password is not None:
                raise _Failure(["-g and -P cannot be used together"], 2)
            if not 1 <= args.length <= MAX_PASSWORD_BYTES:
                raise _Failure([f"-l must be between 1 and {MAX_PASSWORD_BYTES}"], 2)
            value = generate_password(args.length)
            for _ in range(100):  # a rule can fail by chance for short lengths
                if check(value) is None:
                    break
                value = generate_password(args.length)
        elif args.password is not None:
            value = str(args.password)
        elif os.environ.get(_PASSWORD_ENV):
            value = os.environ[_PASSWORD_ENV]
        elif _interactive():
            value = _prompt_secret(f"{what[0].upper()}{what[1:]}: ")
        else:
            raise _Failure([f"{self.command}: no {what}: give -P, -g or ${_PASSWORD_ENV} "
                            "(stdin is not a terminal, so no prompt)"])
        problem = check(value)
        if problem:
            raise _Failure([f"{self.command}: {problem}"])
        if args.generate:
            self.result["password"] = value
            self.lines.append(f"{what}: {value}")
        return value


def _master_key(run: _Run) -> None:
    path = default_master_key_path()
    run.result["file"] = path
    exists = master_key_exists(path)  # checked before asking for a passphrase
    if exists:
        raise _Failure([exists])
    passphrase = run.secret("master key", master_key_weakness)
    MasterKey.create(passphrase, path)
    run.lines.append(f"master key stored in {path}")


def _open_vault(run: _Run, *, create: bool) -> tuple[Vault, str]:
    path = run.users_file()
    run.result["file"] = path
    user = run.user_name()
    run.result["user"] = user
    master = MasterKey.load()
    return Vault.load(path, master, missing_ok=create), user


def _user_add(run: _Run) -> None:
    vault, user = _open_vault(run, create=True)
    if user in vault:
        raise _Failure([f"user {user!r} already exists in {vault.path} (use 'user edit')"])
    vault.set(user, run.secret("password", password_problem))
    vault.save()
    run.lines.append(f"user {user!r} added to {vault.path}")


def _user_edit(run: _Run) -> None:
    vault, user = _open_vault(run, create=False)
    if user not in vault:
        raise _Failure([f"no user {user!r} in {vault.path} (use 'user add')"])
    vault.set(user, run.secret("password", password_problem))
    vault.save()
    run.lines.append(f"password of user {user!r} changed in {vault.path}")


def _user_del(run: _Run) -> None:
    vault, user = _open_vault(run, create=False)
    if user not in vault:
        raise _Failure([f"no user {user!r} in {vault.path}"])
    vault.delete(user)
    vault.save()
    run.lines.append(f"user {user!r} removed from {vault.path}")


def _user_ls(run: _Run) -> None:
    path = run.users_file()
    run.result["file"] = path
    users = Vault.load(path, MasterKey.load()).users()
    run.result["users"] = users
    run.lines.extend(users)


_HANDLERS: dict[str, Callable[[_Run], None]] = {
    "master-key": _master_key,
    "user add": _user_add,
    "user edit": _user_edit,
    "user del": _user_del,
    "user ls": _user_ls,
}


def _report(fmt: str, command: str | None, run: _Run | None, problems: list[str]) -> None:
    if fmt == "json":
        doc: dict[str, Any] = {"command": command, "outcome": "error" if problems else "ok"}
        if run is not None:
            for key in ("file", "user", "users", "password"):
                if key in run.result and not (problems and key == "password"):
                    doc[key] = run.result[key]
        if problems:
            doc["error"] = "; ".join(problems)
        print(json.dumps(doc))
    elif run is not None and not problems:
        for line in run.lines:
            print(line)
    for problem in problems:
        print(f"{_PROG}: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    fmt = "json" if _wants_json(args_list) else "text"
    command: str | None = None
    run: _Run | None = None
    try:
        args = build_parser().parse_intermixed_args(args_list)
        fmt = args.format
        if args.help:
            print(_HELP, end="")
            return 0
        if args.version:
            print(f"{_PROG} {__version__}")
            return 0
        if not args.words:
            raise _Failure([f"no command given (try {_PROG} --help)"], 2)
        command = _COMMANDS.get(tuple(args.words))
        if command is None:
            raise _Failure([f"unknown command {' '.join(args.words)!r} "
                            f"(try {_PROG} --help)"], 2)
        run = _Run(args, command)
        _HANDLERS[command](run)
    except _Failure as e:
        _report(fmt, command, run, e.problems)
        return e.status
    except ConfigError as e:
        _report(fmt, command, run, e.problems or [e.message])
        return 1
    except KeyboardInterrupt:
        _report(fmt, command, run, ["interrupted"])
        return 130
    _report(fmt, command, run, [])
    return 0


def _wants_json(argv: list[str]) -> bool:
    """Whether -F json was asked for, so that even a bad command line answers in JSON."""
    for i, arg in enumerate(argv):
        if arg in ("-F", "--format") and i + 1 < len(argv):
            return argv[i + 1] == "json"
        if arg in ("-Fjson", "--format=json"):
            return True
    return False


if __name__ == "__main__":
    raise SystemExit(main())
