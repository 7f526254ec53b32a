"""Reads the main configuration file (pgagroal's INI dialect) into MainConfig and ServerConfigs.

Owns the INI syntax (sections, ``key = value``, quotes, ``#``/``;`` comments), the conversion of
values by key type (bool, int, duration, size, enum, path) and the checks that involve only the
main file. It collects every problem as ``path:line: key: what is wrong`` and never raises for bad
input; reading the file from disk and raising ConfigError is ``load``'s job.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, cast

from pgcorral.config.keys import GLOBAL_SECTIONS, MAIN_KEYS, MAIN_SECTIONS, SERVER_KEYS, Key
from pgcorral.config.model import MainConfig, ServerConfig

MAX_SERVERS = 64

_TRUE = frozenset({"on", "yes", "true", "1"})
_FALSE = frozenset({"off", "no", "false", "0"})
_INT_RE = re.compile(r"[+-]?[0-9]+")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE = re.compile(r"([0-9]+)\s*(b|k|kb|m|mb|g|gb)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30}
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def problem(path: str, line: int | None, key: str | None, what: str) -> str:
    """Format one problem (or warning) as ``path:line: key: what``."""
    head = path if line is None else f"{path}:{line}"
    return f"{head}: {key}: {what}" if key else f"{head}: {what}"


# -- values ------------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (on/off, yes/no, true/false, 1/0)")


def parse_int(text: str) -> int:
    if not _INT_RE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def parse_duration(text: str, plain_unit: float = 1.0) -> float:
    """Seconds for ``10``, ``10s``, ``5m``, ``1h``, ``2d``, ``1w``, ``250ms`` (any case).

    ``plain_unit`` is the unit of a number without suffix, in seconds.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (a number, optionally with "
                         "ms, s, m, h, d or w)")
    number, unit = match.groups()
    scale = _DURATION_UNITS[unit.lower()] if unit else plain_unit
    return float(number) * scale


def parse_size(text: str) -> int:
    """Bytes for ``512``, ``256K``, ``1MB``, ``2g`` (any case)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (a number, optionally with B, K, KB, M, MB, "
                         "G or GB)")
    number, unit = match.groups()
    return int(number) * (_SIZE_UNITS[unit.lower()] if unit else 1)


def expand_path(text: str) -> str:
    """Expand ``$VAR``/``${VAR}`` and a leading ``~`` in a path value."""
    return os.path.expanduser(os.path.expandvars(text))


def convert(key: Key, text: str) -> object:
    """Convert ``text`` to the Python value of ``key``; raises ValueError saying what is wrong."""
    if key.type == "string":
        return text
    if key.type == "path":
        return expand_path(text)
    if key.type == "bool":
        return parse_bool(text)
    if key.type == "int_auto" and text.strip().lower() == "auto":
        return 0
    if key.type in ("int", "int_auto"):
        value: object = parse_int(text)
    elif key.type == "duration":
        value = parse_duration(text)
    elif key.type == "duration_ms":
        value = parse_duration(text, plain_unit=0.001)
    elif key.type == "size":
        value = parse_size(text)
    elif key.type == "enum":
        lowered = text.strip().lower()
        lowered = dict(key.aliases).get(lowered, lowered)
        if key.choices is None or lowered not in key.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(key.choices or ())}")
        return lowered
    else:  # pragma: no cover - the key table only uses known types
        raise ValueError(f"unknown key type {key.type}")
    if isinstance(value, int) and not isinstance(value, bool):
        if key.minimum is not None and value < key.minimum:
            raise ValueError(f"{value} is below the minimum {key.minimum}")
        if key.maximum is not None and value > key.maximum:
            raise ValueError(f"{value} is above the maximum {key.maximum}")
    return value


# -- INI syntax --------------------------------------------------------------------------------


@dataclass(slots=True)
class Section:
    name: str
    line: int
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # key, value, line


def strip_value(raw: str) -> str:
    """The value part of ``key = value``: quotes removed, trailing comment dropped."""
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        end = raw.find(raw[0], 1)
        if end < 0:
            raise ValueError("unterminated quoted value")
        rest = raw[end + 1 :].strip()
        if rest and rest[0] not in "#;":
            raise ValueError(f"unexpected text after the quoted value: {rest!r}")
        return raw[1:end]
    cut = min((i for i in (raw.find("#"), raw.find(";")) if i >= 0), default=len(raw))
    return raw[:cut].strip()


def read_ini(path: str, text: str, problems: list[str]) -> list[Section]:
    """Split ``text`` into sections; entries before the first section are problems."""
    sections: list[Section] = []
    current: Section | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            end = line.find("]")
            rest = line[end + 1 :].strip() if end >= 0 else ""
            name = line[1:end].strip() if end >= 0 else ""
            if end < 0 or not name or (rest and rest[0] not in "#;"):
                problems.append(problem(path, number, None, f"bad section header {line!r}"))
                current = None
                continue
            current = Section(name, number)
            sections.append(current)
            continue
        key, sep, value_text = line.partition("=")
        key = key.strip().lower()
        if not sep or not _KEY_RE.fullmatch(key):
            problems.append(problem(path, number, None, f"expected 'key = value', got {line!r}"))
            continue
        try:
            value = strip_value(value_text)
        except ValueError as exc:
            problems.append(problem(path, number, key, str(exc)))
            continue
        if current is None:
            problems.append(problem(path, number, key, "key outside any section"))
            continue
        current.entries.append((key, value, number))
    return sections


# -- sections to values ------------------------------------------------------------------------


@dataclass(slots=True)
class _Values:
    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, int] = field(default_factory=dict)


def _collect(path: str, section: Section, table: dict[str, Key], into: _Values,
             problems: list[str], warnings: list[str]) -> None:
    kind = "server" if table is SERVER_KEYS else "main"
    for key_name, text, line in section.entries:
        key = table.get(key_name)
        if key is None:
            warnings.append(problem(path, line, key_name, f"unknown {kind} key, ignored"))
            continue
        if key_name in into.where:
            warnings.append(problem(path, line, key_name,
                                    f"set again (first at line {into.where[key_name]}); "
                                    "the last value is used"))
        try:
            if key.required and not text:
                raise ValueError("must not be empty")
            into.values[key_name] = convert(key, text)
        except ValueError as exc:
            problems.append(problem(path, line, key_name, str(exc)))
        into.where[key_name] = line


def _missing(path: str, line: int, table: dict[str, Key], got: _Values,
             problems: list[str]) -> bool:
    missing = [k.name for k in table.values() if k.required and k.name not in got.where]
    for name in missing:
        problems.append(problem(path, line, name, "required key missing"))
    return bool(missing)


def _check_main(path: str, main: MainConfig, where: dict[str, int], header: int,
                server_count: int, problems: list[str], warnings: list[str]) -> MainConfig:
    """Cross-key checks of the main section; returns ``main`` with derived defaults filled."""

    def report(key: str, what: str) -> None:
        problems.append(problem(path, where.get(key, header), key, what))

    delay = main.connection_retry_delay
    if not 0.001 <= delay <= 0.999:
        clamped = min(max(delay, 0.001), 0.999)
        warnings.append(problem(path, where.get("connection_retry_delay", header),
                                "connection_retry_delay",
                                f"{delay * 1000:g}ms is outside 1-999ms, using "
                                f"{clamped * 1000:g}ms"))
        delay = clamped
    if main.tls and not (main.tls_cert_file and main.tls_key_file):
        report("tls", "tls is on but tls_cert_file and tls_key_file are not both set")
    if main.failover and not main.failover_script:
        report("failover", "failover is on but failover_script is not set")
    if main.failover and server_count < 2:
        report("failover", "failover needs at least two servers")
    if main.failover_notify_script:
        if not main.failover_script:
            report("failover_notify_script", "needs failover_script")
        elif main.failover_notify_script == main.failover_script:
            report("failover_notify_script", "must differ from failover_script")
    if main.health_check and not main.health_check_user:
        report("health_check", "health_check is on but health_check_user is not set")
    seen: dict[int, str] = {main.port: "port"}
    for name in ("metrics", "management", "console"):
        port = cast(int, getattr(main, name))
        if port and port in seen:
            report(name, f"port {port} is already used by {seen[port]}")
        seen.setdefault(port, name)
    derived: dict[str, Any] = {"connection_retry_delay": delay}
    if main.backlog == 0:
        derived["backlog"] = max(main.max_connections // 4, 128)
    if not main.pidfile:
        derived["pidfile"] = os.path.join(main.unix_socket_dir, f"pgcorral.{main.port}.pid")
    return replace(main, **derived)


def _build_servers(path: str, sections: list[Section], problems: list[str],
                   warnings: list[str]) -> list[ServerConfig]:
    servers: list[ServerConfig] = []
    endpoints: dict[tuple[str, int], str] = {}
    primary = ""
    for section in sections:
        got = _Values()
        _collect(path, section, SERVER_KEYS, got, problems, warnings)
        if _missing(path, section.line, SERVER_KEYS, got, problems):
            continue
        try:
            server = ServerConfig(name=section.name, **cast(dict[str, Any], got.values))
        except TypeError:  # a required key had a bad value, already reported
            continue
        endpoint = (server.host, server.port)
        if endpoint in endpoints:
            problems.append(problem(path, got.where["host"], "host",
                                    f"{server.host}:{server.port} is also server "
                                    f"[{endpoints[endpoint]}]"))
        endpoints.setdefault(endpoint, server.name)
        if server.primary and primary:
            problems.append(problem(path, got.where["primary"], "primary",
                                    f"server [{primary}] is already the primary"))
        elif server.primary:
            primary = server.name
        servers.append(server)
    return servers


def parse_main_config(path: str, text: str, problems: list[str], warnings: list[str]
                      ) -> tuple[MainConfig | None, list[ServerConfig]]:
    """Parse the text of the main configuration file; problems and warnings are appended."""
    sections = read_ini(path, text, problems)
    seen: dict[str, int] = {}
    main_sections: list[Section] = []
    global_sections: list[Section] = []
    server_sections: list[Section] = []
    for section in sections:
        lowered = section.name.lower()
        if lowered in seen:
            problems.append(problem(path, section.line, None,
                                    f"duplicate section [{section.name}] (first at line "
                                    f"{seen[lowered]})"))
            continue
        seen[lowered] = section.line
        if lowered in MAIN_SECTIONS:
            main_sections.append(section)
        elif lowered in GLOBAL_SECTIONS:
            global_sections.append(section)
        else:
            server_sections.append(section)
    if len(main_sections) > 1:
        problems.append(problem(path, main_sections[1].line, None,
                                "only one of [pgcorral] and [pgagroal] may appear"))
    if not main_sections:
        problems.append(problem(path, None, None, "no [pgcorral] or [pgagroal] section"))
    if not server_sections:
        problems.append(problem(path, None, None, "no server section"))
    elif len(server_sections) > MAX_SERVERS:
        problems.append(problem(path, server_sections[MAX_SERVERS].line, None,
                                f"more than {MAX_SERVERS} server sections"))
    main: MainConfig | None = None
    got = _Values()
    for section in main_sections[:1] + global_sections:
        _collect(path, section, MAIN_KEYS, got, problems, warnings)
    header = main_sections[0].line if main_sections else 0
    if main_sections and not _missing(path, header, MAIN_KEYS, got, problems):
        try:
            main = MainConfig(**cast(dict[str, Any], got.values))
        except TypeError:  # a required key had a bad value, already reported
            main = None
    servers = _build_servers(path, server_sections, problems, warnings)
    if main is not None:
        main = _check_main(path, main, got.where, header, len(servers), problems, warnings)
    return main, servers
