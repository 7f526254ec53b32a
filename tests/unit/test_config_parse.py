"""Syntax and validation of the main configuration file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgcorral.config import Config, load_config
from pgcorral.config.parse import parse_bool, parse_duration, parse_size
from pgcorral.errors import ConfigError

MAIN = "[pgagroal]\nhost = *\nport = 2345\n"
SERVER = "\n[primary]\nhost = localhost\nport = 5432\n"
PROBLEM_RE = re.compile(r"^[^:]+:\d+: [a-z_]+: .+$")


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "pgcorral.conf"
    path.write_text(text)
    return load_config(str(path))


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "pgcorral.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    prefix = str(path)
    assert all(p.startswith(prefix + ":") for p in info.value.problems), info.value.problems
    return [p[len(prefix):] for p in info.value.problems]


def main_with(tmp_path: Path, *lines: str) -> Config:
    return load(tmp_path, MAIN + "\n".join(lines) + "\n" + SERVER)


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("10", 10.0), ("0", 0.0), ("10s", 10.0), ("10S", 10.0), ("5m", 300.0), ("5M", 300.0),
    ("1h", 3600.0), ("2d", 172800.0), ("1w", 604800.0), ("1W", 604800.0), ("250ms", 0.25),
    ("250MS", 0.25), ("1.5s", 1.5), (" 7 ", 7.0), ("10 s", 10.0),
])
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "-1", "1y", "ten", "1e3", "1s2"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("512", 512), ("512b", 512), ("512B", 512), ("256k", 262144), ("256K", 262144),
    ("1KB", 1024), ("1kb", 1024), ("2M", 2 << 20), ("2mb", 2 << 20), ("1G", 1 << 30),
    ("1gb", 1 << 30),
])
def test_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "1T", "1.5M", "-1", "1 KiB"])
def test_bad_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["on", "ON", "yes", "Yes", "true", "TRUE", "1"])
def test_true(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["off", "Off", "no", "NO", "false", "False", "0"])
def test_false(text: str) -> None:
    assert parse_bool(text) is False


def test_bad_bool(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + "tls = maybe\n" + SERVER) == [
        ":4: tls: 'maybe' is not a boolean (on/off, yes/no, true/false, 1/0)"]


def test_typed_values(tmp_path: Path) -> None:
    main = main_with(tmp_path, "blocking_timeout = 1m", "metrics_cache_max_size = 512K",
                     "keep_alive = no", "max_connections = 40", "pipeline = Transaction",
                     "log_level = DEBUG3", "connection_retry_delay = 100",
                     "max_packet_size = 1M", "workers = 4", "server_connect_timeout = 3s").main
    assert main.blocking_timeout == 60.0
    assert main.metrics_cache_max_size == 512 * 1024
    assert main.keep_alive is False
    assert main.max_connections == 40
    assert main.backlog == 128
    assert main.pipeline == "transaction"
    assert main.log_level == "debug3"
    assert main.connection_retry_delay == pytest.approx(0.1)
    assert main.max_packet_size == 1 << 20
    assert main.workers == 4
    assert main.server_connect_timeout == 3.0


def test_defaults(tmp_path: Path) -> None:
    main = main_with(tmp_path).main
    assert main.unix_socket_dir == "/tmp"
    assert main.pidfile == "/tmp/pgcorral.2345.pid"
    assert main.max_packet_size == 1073741822
    assert main.max_prepared_statements == 200
    assert main.workers == 0  # auto
    assert main.server_connect_timeout == 10.0
    assert main.connection_retry_delay == pytest.approx(0.25)
    assert main.allow_unknown_users is True


def test_explicit_backlog_and_pidfile_kept(tmp_path: Path) -> None:
    main = main_with(tmp_path, "backlog = 5", "pidfile = /run/x.pid").main
    assert (main.backlog, main.pidfile) == (5, "/run/x.pid")


def test_connection_retry_delay_clamped(tmp_path: Path) -> None:
    config = main_with(tmp_path, "connection_retry_delay = 2000")
    assert config.main.connection_retry_delay == pytest.approx(0.999)
    assert config.warnings[0].endswith(
        ":4: connection_retry_delay: 2000ms is outside 1-999ms, using 999ms")


# -- syntax ------------------------------------------------------------------------------------


def test_quotes_and_comments(tmp_path: Path) -> None:
    main = main_with(
        tmp_path,
        "# a comment", "; another comment", "   # indented comment",
        "server_reset_query = \"SELECT 1; -- # not a comment\"  # trailing",
        "log_line_prefix = '%H:%M ; #' ; trailing",
        "health_check_user = probe # trailing comment",
        "log_path = plain;comment",
        "failover_script = ''",
    ).main
    assert main.server_reset_query == "SELECT 1; -- # not a comment"
    assert main.log_line_prefix == "%H:%M ; #"
    assert main.health_check_user == "probe"
    assert main.log_path == "plain"
    assert main.failover_script == ""


def test_empty_value_allowed_for_strings(tmp_path: Path) -> None:
    assert main_with(tmp_path, "server_reset_query =").main.server_reset_query == ""


def test_unterminated_quote(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + "log_path = \"abc\n" + SERVER) == [
        ":4: log_path: unterminated quoted value"]


def test_text_after_quote(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + "log_path = 'a' b\n" + SERVER) == [
        ":4: log_path: unexpected text after the quoted value: 'b'"]


def test_crlf_bom_and_whitespace(tmp_path: Path) -> None:
    text = "\ufeff" + (MAIN + "  idle_timeout=600  \n\t\n" + SERVER).replace("\n", "\r\n")
    assert load(tmp_path, text).main.idle_timeout == 600.0


def test_path_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/corral")
    monkeypatch.setenv("PGC_DIR", "/srv/pgc")
    main = main_with(tmp_path, "unix_socket_dir = $PGC_DIR/sock", "log_path = ~/log/x.log",
                     "pidfile = ${HOME}/p.pid", "tls_ca_file = $HOME/ca.pem",
                     "health_check_user = $HOME").main
    assert main.unix_socket_dir == "/srv/pgc/sock"
    assert main.log_path == "/home/corral/log/x.log"
    assert main.pidfile == "/home/corral/p.pid"
    assert main.tls_ca_file == "/home/corral/ca.pem"
    assert main.health_check_user == "$HOME"  # not a path key


def test_pgcorral_section_and_global_sections(tmp_path: Path) -> None:
    text = ("[pgcorral]\nhost = 0.0.0.0\nport = 6432\n[prometheus]\nmetrics = 9187\n"
            "[health_check]\nhealth_check = on\nhealth_check_user = probe\n" + SERVER)
    config = load(tmp_path, text)
    assert (config.main.host, config.main.metrics) == ("0.0.0.0", 9187)
    assert config.main.health_check is True
    assert [s.name for s in config.servers] == ["primary"]


def test_unknown_keys_warn(tmp_path: Path) -> None:
    config = load(tmp_path, MAIN + "foo = 1\n" + SERVER + "bar = 2\n")
    assert [w.split(":", 1)[1] for w in config.warnings] == [
        "4: foo: unknown main key, ignored", "9: bar: unknown server key, ignored"]


def test_key_case_insensitive(tmp_path: Path) -> None:
    assert main_with(tmp_path, "Idle_Timeout = 5").main.idle_timeout == 5.0


def test_duplicate_key_warns_last_wins(tmp_path: Path) -> None:
    config = main_with(tmp_path, "idle_timeout = 5", "idle_timeout = 6")
    assert config.main.idle_timeout == 6.0
    assert config.warnings[0].endswith(
        ":5: idle_timeout: set again (first at line 4); the last value is used")


def test_servers(tmp_path: Path) -> None:
    config = load(tmp_path, MAIN + SERVER + "primary = on\n"
                  "[replica]\nhost = /var/run/postgresql\nport = 5433\ntls = on\n"
                  "tls_ca_file = ~/ca\nchannel_binding = REQUIRE\n")
    primary, replica = config.servers
    assert primary.primary and not replica.primary
    assert replica.host == "/var/run/postgresql"
    assert replica.tls and replica.channel_binding == "require"
    assert not replica.tls_ca_file.startswith("~")


# -- errors ------------------------------------------------------------------------------------


def test_required_main_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, "[pgagroal]\nlog_type = file\n" + SERVER) == [
        ":1: host: required key missing", ":1: port: required key missing"]


def test_required_server_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + "[s1]\nhost = h\n[s2]\nport = 1\n") == [
        ":4: port: required key missing", ":6: host: required key missing"]


def test_required_keys_not_empty(tmp_path: Path) -> None:
    text = "[pgagroal]\nhost =\nport = 1\n[s]\nhost = ''\nport = 2\n"
    assert problems(tmp_path, text) == [":2: host: must not be empty",
                                        ":5: host: must not be empty"]


def test_keys_before_any_section(tmp_path: Path) -> None:
    assert problems(tmp_path, "host = x\n" + MAIN + SERVER) == [
        ":1: host: key outside any section"]


def test_no_main_section(tmp_path: Path) -> None:
    assert problems(tmp_path, SERVER) == [": no [pgcorral] or [pgagroal] section"]


def test_both_main_sections(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + "[pgcorral]\nport = 1\n" + SERVER) == [
        ":4: only one of [pgcorral] and [pgagroal] may appear"]


def test_duplicate_sections(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + SERVER + SERVER.replace("5432", "5433")) == [
        ":9: duplicate section [primary] (first at line 5)"]


def test_no_server(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN) == [": no server section"]


def test_too_many_servers(tmp_path: Path) -> None:
    servers = "".join(f"[s{i}]\nhost = h\nport = {1000 + i}\n" for i in range(65))
    assert problems(tmp_path, MAIN + servers) == [":196: more than 64 server sections"]
    servers = "".join(f"[s{i}]\nhost = h\nport = {1000 + i}\n" for i in range(64))
    assert len(load(tmp_path, MAIN + servers).servers) == 64


def test_duplicate_endpoint(tmp_path: Path) -> None:
    assert problems(tmp_path, MAIN + SERVER + "[other]\nhost = localhost\nport = 5432\n") == [
        ":9: host: localhost:5432 is also server [primary]"]


def test_two_primaries(tmp_path: Path) -> None:
    text = MAIN + SERVER + "primary = on\n[b]\nhost = h\nport = 1\nprimary = yes\n"
    assert problems(tmp_path, text) == [":12: primary: server [primary] is already the primary"]


def test_bad_values_all_reported(tmp_path: Path) -> None:
    text = MAIN + ("pipeline = fast\nmax_connections = 10001\nidle_timeout = soon\n"
                   "metrics_cache_max_size = 2M\nport = 0\n") + SERVER + "port = x\n"
    assert problems(tmp_path, text) == [
        ":4: pipeline: 'fast' is not one of auto, performance, session, transaction",
        ":5: max_connections: 10001 is above the maximum 10000",
        ":6: idle_timeout: 'soon' is not a duration (a number, optionally with ms, s, m, h, d "
        "or w)",
        ":7: metrics_cache_max_size: 2097152 is above the maximum 1048576",
        ":8: port: 0 is below the minimum 1",
        ":13: port: 'x' is not an integer",
    ]


def test_bad_lines(tmp_path: Path) -> None:
    text = MAIN + "just words\n[]\n[open\n[ok] trailing\n= 3\n" + SERVER
    assert problems(tmp_path, text) == [
        ":4: expected 'key = value', got 'just words'",
        ":5: bad section header '[]'",
        ":6: bad section header '[open'",
        ":7: bad section header '[ok] trailing'",
        ":8: expected 'key = value', got '= 3'",
    ]


def test_cross_key_checks(tmp_path: Path) -> None:
    text = MAIN + ("tls = on\nfailover = on\nfailover_notify_script = /x\nhealth_check = on\n"
                   "console = 9000\nmanagement = 2345\n") + SERVER
    assert problems(tmp_path, text) == [
        ":4: tls: tls is on but tls_cert_file and tls_key_file are not both set",
        ":5: failover: failover is on but failover_script is not set",
        ":5: failover: failover needs at least two servers",
        ":6: failover_notify_script: needs failover_script",
        ":7: health_check: health_check is on but health_check_user is not set",
        ":9: management: port 2345 is already used by port",
    ]


def test_failover_ok(tmp_path: Path) -> None:
    text = MAIN + "failover = on\nfailover_script = /bin/fo\nfailover_notify_script = /bin/n\n"
    text += SERVER + "[b]\nhost = b\nport = 5432\n"
    assert load(tmp_path, text).main.failover is True
    text = text.replace("/bin/n", "/bin/fo")
    assert problems(tmp_path, text) == [
        ":6: failover_notify_script: must differ from failover_script"]


def test_every_problem_has_line_and_key(tmp_path: Path) -> None:
    text = MAIN + "tls = x\nport = -1\nlog_type = tty\nlog_path = 'x\n" + SERVER + "port = 0\n"
    found = problems(tmp_path, text)
    assert len(found) == 5
    for line in found:
        assert PROBLEM_RE.match("f" + line), line


@pytest.mark.parametrize("make", ["missing", "directory", "latin1"])
def test_cannot_read(tmp_path: Path, make: str) -> None:
    path = tmp_path / "pgcorral.conf"
    if make == "directory":
        path.mkdir()
    elif make == "latin1":
        path.write_bytes(b"# caf\xe9\n" + (MAIN + SERVER).encode())
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    (line,) = info.value.problems
    assert line.startswith(f"{path}: cannot read: ")
    if make == "missing":
        assert line == f"{path}: cannot read: No such file or directory"
