"""Garbage in the configuration files gives a Config or a ConfigError, never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcorral.config import Config, load_config
from pgcorral.errors import ConfigError

FRAGMENTS = [
    "[pgagroal]", "[pgcorral]", "[primary]", "[prometheus]", "[health_check]", "[", "]",
    "host = *", "port = 2345", "port = 5432", "host = localhost", "max_connections = 10",
    "tls = on", "failover = on", "primary = on", "connection_retry_delay = 0",
    "pipeline = session", "idle_timeout = 5m", "metrics = 2345", "log_path = $HOME/x",
    "host all all all trust", "local all all md5", "hostssl db u ::1 all",
    "db1=a,b alice 10 5 2", "all all all", "db1 bob all all all", "all=x all 1",
]
ALPHABET = "[]=#;'\" \t\\abcdehlmoprstu019.:/,-%$~\u00e9\u00b2\x00"
LINE = st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=ALPHABET, max_size=30),
                 st.text(max_size=20))
FILE = st.lists(LINE, max_size=12).map("\n".join)


def load(conf: str, hba: str, limits: str) -> Config | ConfigError:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, text in (("c.conf", conf), ("hba.conf", hba), ("db.conf", limits)):
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            paths.append(str(path))
        try:
            return load_config(*paths)
        except ConfigError as exc:
            return exc


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(conf=FILE, hba=FILE, limits=FILE)
def test_garbage_gives_config_or_config_error(conf: str, hba: str, limits: str) -> None:
    result = load(conf, hba, limits)
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(p and "\n" not in p for p in result.problems)
    else:
        assert result.servers


@settings(max_examples=100, deadline=None, database=None)
@given(extra=st.lists(LINE, max_size=15).map("\n".join))
def test_garbage_after_valid_config(extra: str) -> None:
    base = "[pgagroal]\nhost = *\nport = 2345\n[primary]\nhost = h\nport = 1\n"
    result = load(base + extra, "host all all all trust\n" + extra, "all all all\n" + extra)
    assert isinstance(result, Config | ConfigError)
