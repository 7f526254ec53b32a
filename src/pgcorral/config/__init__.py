"""Configuration: the key table, the parsers of pgagroal's files, and the frozen snapshot.

``load_config`` reads ``pgcorral.conf`` (or an unchanged ``pgagroal.conf``), the hba file and the
databases file, and returns one immutable ``Config`` or raises ``ConfigError`` listing every
problem. Nothing here opens sockets or applies a configuration.
"""

from pgcorral.config.keys import KEYS, Key
from pgcorral.config.limits import best_limit_rule
from pgcorral.config.load import load_config
from pgcorral.config.model import Config, HbaRule, LimitRule, MainConfig, ServerConfig

__all__ = [
    "KEYS",
    "Config",
    "HbaRule",
    "Key",
    "LimitRule",
    "MainConfig",
    "ServerConfig",
    "best_limit_rule",
    "load_config",
]
