"""Reloading the configuration files: read them again, keep what needs a restart.

Shared by the one-process daemon (``supervisor.main``) and the supervisor of several workers
(``supervisor.multi``). A broken file raises ConfigError with every problem logged, and the
caller keeps the running configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from pgcorral.config import KEYS, Config
from pgcorral.errors import ConfigError
from pgcorral.security.secrets import Secrets

log = logging.getLogger("pgcorral.main")

ReloadConfig = Callable[[], tuple[Config, Secrets]]


def reload_files(reload_config: ReloadConfig, running: Config) -> tuple[Config, Secrets]:
    """The files read again, restart-only keys kept as they run; ConfigError (each problem
    logged) when a file is broken."""
    try:
        config, secrets = reload_config()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload failed, keeping the running configuration: %s", problem)
        raise
    for warning in config.warnings:
        log.warning("%s", warning)
    return keep_restart_only(running, config), secrets


def keep_restart_only(old: Config, new: Config) -> Config:
    """The reloaded configuration with every restart-only key (and the server sections) kept
    as they run now; each change that needs a restart is logged, not applied."""
    kept: dict[str, object] = {}
    for key in KEYS:
        if key.section == "main" and not key.reloadable:
            before, after = getattr(old.main, key.name), getattr(new.main, key.name)
            if before != after:
                log.warning("%s: changed from %r to %r: restart required, not applied",
                            key.name, before, after)
                kept[key.name] = before
    servers = new.servers
    if [(s.name, s.host, s.port) for s in old.servers] != [
            (s.name, s.host, s.port) for s in new.servers]:
        log.warning("server sections changed: restart required, not applied")
        servers = old.servers
    return dataclasses.replace(new, main=dataclasses.replace(new.main, **kept),  # type: ignore[arg-type]
                               servers=servers)
