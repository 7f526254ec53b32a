"""``pgcorral``: the daemon's command line, with pgagroal's flags.

Turns options into file paths, loads the configuration (one line per problem and exit 1 on
error, never a traceback), sets up logging, optionally detaches, and hands over to the
supervisor.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pgcorral import __version__
from pgcorral.config import Config, load_config
from pgcorral.errors import ConfigError
from pgcorral.security.secrets import Secrets, load_secrets
from pgcorral.supervisor.logs import setup_logging
from pgcorral.supervisor.process import (
    check_pidfile,
    check_port_free,
    daemonize,
    write_pidfile,
)

#: Default file names in a configuration directory (-D or PGCORRAL_CONFIG_DIR), ours first.
_DEFAULT_FILES = {
    "config": ("pgcorral.conf", "pgagroal.conf"),
    "hba": ("pgcorral_hba.conf", "pgagroal_hba.conf"),
    "limit": ("pgcorral_databases.conf", "pgagroal_databases.conf"),
}
_DEFAULT_DIR = "/etc/pgcorral"



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgcorral", add_help=False,
        description="High-performance connection pool for PostgreSQL")
    p.add_argument("-c", "--config", metavar="CONFIG_FILE", help="path to pgcorral.conf")
    p.add_argument("-a", "--hba", metavar="HBA_CONFIG_FILE", help="path to pgcorral_hba.conf")
    p.add_argument("-l", "--limit", metavar="LIMIT_CONFIG_FILE",
                   help="path to pgcorral_databases.conf")
    p.add_argument("-u", "--users", metavar="USERS_FILE", help="path to pgcorral_users.conf")
    p.add_argument("-F", "--frontend", metavar="FRONTEND_USERS_FILE",
                   help="path to pgcorral_frontend_users.conf")
    p.add_argument("-A", "--admins", metavar="ADMINS_FILE", help="path to pgcorral_admins.conf")
    p.add_argument("-S", "--superuser", metavar="SUPERUSER_FILE",
                   help="path to pgcorral_superuser.conf")
    p.add_argument("-D", "--directory", metavar="DIRECTORY",
                   help="directory holding the configuration files")
    p.add_argument("-d", "--daemon", action="store_true", help="run as a daemon")
    p.add_argument("-V", "--version", action=_Version, nargs=0,
                   help="show the version and which build runs (compiled or pure Python)")
    p.add_argument("-?", "--help", action="help", help="display help")
    return p


class _Version(argparse.Action):
    """``-V``: the version and the build (looked at only when asked: it imports the modules)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from pgcorral.build import info

        print(f"pgcorral {__version__} ({info().describe()})")
        parser.exit()


def _locate(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    directory = args.directory or os.environ.get("PGCORRAL_CONFIG_DIR") or _DEFAULT_DIR

    def pick(given: str | None, kind: str, required: bool) -> str | None:
        if given:
            return str(given)
        for name in _DEFAULT_FILES[kind]:
            candidate = os.path.join(directory, name)
            if os.path.exists(candidate):
                return candidate
        return os.path.join(directory, _DEFAULT_FILES[kind][0]) if required else None

    config = pick(args.config, "config", True)
    assert config is not None
    return config, pick(args.hba, "hba", False), pick(args.limit, "limit", False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_path, hba_path, limits_path = _locate(args)

    def load(check_tls: bool = True) -> tuple[Config, Secrets]:
        config = load_config(config_path, hba_path, limits_path, check_tls=check_tls)
        return config, load_secrets(args.users, args.frontend, args.admins, args.superuser)

    def reload() -> tuple[Config, Secrets]:
        # a TLS file that does not load keeps the TLS settings in use and the rest of the
        # reload applies (net.context logs it); at startup it is a configuration error
        return load(check_tls=False)

    try:
        config, secrets = load()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"pgcorral: {problem}", file=sys.stderr)
        for warning in exc.warnings:
            print(f"pgcorral: warning: {warning}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"pgcorral: warning: {warning}", file=sys.stderr)
    if config.main.auth_query and secrets.superuser is None:
        print("pgcorral: warning: auth_query = on needs a superuser file (-S); ignored",
              file=sys.stderr)
    main_cfg = config.main
    try:
        if not main_cfg.so_reuseport:  # (else a rolling restart: the newest takes both over)
            check_pidfile(main_cfg.pidfile)
        if args.daemon:
            if main_cfg.log_type == "console":
                raise ConfigError(["daemon mode (-d) needs log_type = file or syslog"])
            if not main_cfg.so_reuseport:
                check_port_free(main_cfg.host, main_cfg.port)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"pgcorral: {problem}", file=sys.stderr)
        return 1
    if args.daemon:
        daemonize()
    write_pidfile(main_cfg.pidfile)
    setup_logging(main_cfg)
    from pgcorral.build import startup_line
    from pgcorral.supervisor.main import run

    if line := startup_line():  # pure Python (no compiler at install) or a stale build
        logging.getLogger("pgcorral.main").warning("%s", line)

    try:
        return run(config, secrets, reload)
    except OSError as exc:
        logging.getLogger("pgcorral.main").critical("cannot start: %s", exc)
        print(f"pgcorral: cannot start: {exc}", file=sys.stderr)
        return 1
