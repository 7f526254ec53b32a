"""Loads the main, hba and databases files into one frozen Config snapshot.

Owns reading the files from disk and the order of the work: parse every file, collect every
problem, then raise one ConfigError with all of them (or return the snapshot with its warnings).
It never lets a traceback escape for bad input, and it does not apply a configuration.
"""

from __future__ import annotations

from pgcorral.config.hba import parse_hba
from pgcorral.config.limits import parse_limits
from pgcorral.config.model import Config, HbaRule, LimitRule, MainConfig, ServerConfig
from pgcorral.config.parse import parse_main_config, problem, read_ini
from pgcorral.errors import ConfigError

DEFAULT_MAX_CONNECTIONS = 100


def read_text(path: str, problems: list[str]) -> str | None:
    """The text of ``path``, or None with ``path: cannot read: <reason>`` appended."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read()
    except OSError as exc:
        problems.append(problem(path, None, None, f"cannot read: {exc.strerror or exc}"))
    except UnicodeDecodeError as exc:
        problems.append(problem(path, None, None, f"cannot read: not valid UTF-8 ({exc.reason} "
                                                  f"at byte {exc.start})"))
    except ValueError as exc:  # e.g. an embedded NUL in the path
        problems.append(problem(path, None, None, f"cannot read: {exc}"))
    return None


def _check_tls(path: str, text: str, main: MainConfig, servers: list[ServerConfig],
               problems: list[str]) -> None:
    """Every TLS context builds (certificates, keys, CAs, ciphers; clients, servers, the
    metrics and console ports); a problem names the key's line."""
    from pgcorral.security.tls import TlsFileError, client_side, http_side, server_side

    def line_of(section: str | None, key: str) -> int | None:
        for found in read_ini(path, text, []):
            if section is None or found.name == section:
                for name, _, number in found.entries:
                    if name == key:
                        return number
        return None

    try:
        client_side(main)
    except TlsFileError as exc:
        problems.append(problem(path, line_of(None, exc.key), None, str(exc)))
    try:
        http_side(main)
    except TlsFileError as exc:
        problems.append(problem(path, line_of(None, exc.key), None, str(exc)))
    for server in servers:
        try:
            server_side(server)
        except TlsFileError as exc:
            problems.append(problem(path, line_of(server.name, exc.key), None,
                                    f"[{server.name}] {exc}"))


def load_config(config_path: str, hba_path: str | None = None,
                limits_path: str | None = None, *, check_tls: bool = True) -> Config:
    """Read and check every file; raise ConfigError listing every problem found.
    ``check_tls``: the TLS files must load too (at startup; a reload keeps the TLS contexts
    in use instead, see net.context)."""
    problems: list[str] = []
    warnings: list[str] = []
    main: MainConfig | None = None
    servers: list[ServerConfig] = []
    text = read_text(config_path, problems)
    if text is not None:
        main, servers = parse_main_config(config_path, text, problems, warnings)
        if main is not None and not problems and check_tls:
            _check_tls(config_path, text, main, servers, problems)
    hba: list[HbaRule] = []
    if hba_path is not None:
        text = read_text(hba_path, problems)
        if text is not None:
            hba = parse_hba(hba_path, text, problems)
    limits: list[LimitRule] = []
    if limits_path is not None:
        text = read_text(limits_path, problems)
        if text is not None:
            max_connections = main.max_connections if main else DEFAULT_MAX_CONNECTIONS
            limits = parse_limits(limits_path, text, max_connections, problems, warnings)
    if problems or main is None:
        error = ConfigError(problems or [problem(config_path, None, None, "invalid")])
        error.warnings = warnings
        raise error
    return Config(main=main, servers=tuple(servers), hba=tuple(hba), limits=tuple(limits),
                  warnings=tuple(warnings), config_path=config_path, hba_path=hba_path,
                  limits_path=limits_path)
