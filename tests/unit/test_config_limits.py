"""Parsing of the databases (limits) file, size resolution, aliases and best_limit_rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgcorral.config import LimitRule, best_limit_rule, load_config
from pgcorral.config.limits import parse_limits
from pgcorral.errors import ConfigError

CONF = "[pgagroal]\nhost = *\nport = 2345\nmax_connections = {}\n[primary]\nhost = h\nport = 1\n"


def parse(text: str, max_connections: int = 100) -> tuple[list[LimitRule], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    rules = parse_limits("dbs", text, max_connections, problems, warnings)
    assert problems == []
    return rules, warnings


def bad(text: str, max_connections: int = 100) -> list[str]:
    problems: list[str] = []
    parse_limits("dbs", text, max_connections, problems, [])
    return problems


def sizes(rules: list[LimitRule]) -> list[tuple[int, int, int]]:
    return [(r.max_size, r.initial_size, r.min_size) for r in rules]


def test_fields_and_defaults() -> None:
    rules, warnings = parse("db1 alice 10\ndb2 bob 10 5\ndb3 carol 10 5 2  # comment\n")
    assert sizes(rules) == [(10, 0, 0), (10, 5, 0), (10, 5, 2)]
    assert warnings == []


def test_all_sizes() -> None:
    rules, _ = parse("db1 alice 10\nall all all\ndb2 all 20 all all\n", max_connections=50)
    assert sizes(rules) == [(10, 0, 0), (20, 0, 0), (20, 20, 20)]
    rules, _ = parse("db1 u ALL all\n", max_connections=7)
    assert sizes(rules) == [(7, 7, 0)]


def test_all_max_size_never_negative() -> None:
    rules, _ = parse("db1 alice 10\nall all all\n", max_connections=10)
    assert sizes(rules) == [(10, 0, 0), (0, 0, 0)]


def test_sizes_clamped_with_warning() -> None:
    rules, warnings = parse("db1 alice 5 8 9\ndb2 bob 10 2 4\n")
    assert sizes(rules) == [(5, 5, 5), (10, 4, 4)]
    assert warnings == [
        "dbs:1: initial_size: 8 is above max_size 5, using 5",
        "dbs:1: min_size: 9 is above max_size 5, using 5",
        "dbs:2: initial_size: 2 is below min_size 4, using 4",
    ]


def test_sum_exceeds_max_connections() -> None:
    assert bad("db1 a 60\ndb2 b 50\nall all all\n") == [
        "dbs: max_size: the sum of max_size (110) exceeds max_connections (100)"]


def test_aliases() -> None:
    rules, _ = parse("db1=one,uno alice 10\ndb1=one bob 5\n")
    assert rules[0].aliases == ("one", "uno")
    assert rules[1].aliases == ("one",)


@pytest.mark.parametrize(("text", "problem"), [
    ("all=x all 5", "dbs:1: aliases: the 'all' entry cannot have aliases"),
    ("db1=db2 a 5\ndb2 b 5", "dbs:1: aliases: alias 'db2' is also a database name in this file"),
    ("db1=x a 5\ndb2=x b 5", "dbs:2: aliases: alias 'x' already names database 'db1'"),
    ("db1=x,x a 5", "dbs:1: aliases: an alias is listed twice"),
    ("db1= a 5", "dbs:1: aliases: invalid alias ''"),
    ("db1=a,,b a 5", "dbs:1: aliases: invalid alias ''"),
    ("db1=all a 5", "dbs:1: aliases: invalid alias 'all'"),
    ("=x a 5", "dbs:1: database: empty database name"),
    ("db1 a", "dbs:1: fields: expected DATABASE[=ALIASES] USER MAX_SIZE [INITIAL_SIZE "
              "[MIN_SIZE]], got 2 fields"),
    ("db1 a 1 1 1 1", "dbs:1: fields: expected DATABASE[=ALIASES] USER MAX_SIZE [INITIAL_SIZE "
                      "[MIN_SIZE]], got 6 fields"),
    ("db1 a ten", "dbs:1: max_size: 'ten' is not a non-negative integer or 'all'"),
    ("db1 a 5 -1", "dbs:1: initial_size: '-1' is not a non-negative integer or 'all'"),
    ("db1 a 5 1 x", "dbs:1: min_size: 'x' is not a non-negative integer or 'all'"),
    ("db1 a \u00b2", "dbs:1: max_size: '\u00b2' is not a non-negative integer or 'all'"),
])
def test_bad_lines(text: str, problem: str) -> None:
    assert bad(text + "\n") == [problem]


def test_duplicate_rule_warns() -> None:
    rules, warnings = parse("db1 a 5\ndb1 a 6\n")
    assert warnings == ["dbs:2: database: db1/a already has a rule at line 1; that one is used"]
    assert best_limit_rule(rules, "db1", "a") is rules[0]


def test_best_limit_rule_order() -> None:
    rules, _ = parse("all all 1\ndb1 all 2\nall alice 3\ndb1=d1 alice 4\n")
    all_all, db_all, all_user, exact = rules
    assert best_limit_rule(rules, "db1", "alice") is exact
    assert best_limit_rule(rules, "d1", "alice") is exact  # alias counts as exact db
    assert best_limit_rule(rules, "db2", "alice") is all_user
    assert best_limit_rule(rules, "db1", "bob") is db_all
    assert best_limit_rule(rules, "d1", "bob") is db_all
    assert best_limit_rule(rules, "db2", "bob") is all_all
    assert best_limit_rule(rules[1:], "db2", "bob") is None
    assert best_limit_rule([], "db1", "alice") is None


def test_user_with_db_all_beats_db_with_user_all() -> None:
    rules, _ = parse("db1 all 2\nall alice 3\n")
    assert best_limit_rule(rules, "db1", "alice") is rules[1]


def test_load_uses_max_connections_and_real_database(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(CONF.format(20))
    dbs = tmp_path / "dbs.conf"
    dbs.write_text("db1=one,uno alice 5\nall all all\n")
    config = load_config(str(conf), limits_path=str(dbs))
    assert sizes(list(config.limits)) == [(5, 0, 0), (15, 0, 0)]
    assert config.real_database("uno") == "db1"
    assert config.real_database("db1") == "db1"
    assert config.real_database("other") == "other"
    assert config.aliases() == {"one": "db1", "uno": "db1"}


def test_load_reports_sum_against_main_max_connections(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(CONF.format(10))
    dbs = tmp_path / "dbs.conf"
    dbs.write_text("db1 alice 11\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf), limits_path=str(dbs))
    assert info.value.problems == [
        f"{dbs}: max_size: the sum of max_size (11) exceeds max_connections (10)"]
