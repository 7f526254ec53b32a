"""match_hba: the first rule that fits a connection wins."""

from __future__ import annotations

from pgcorral.config import HbaRule
from pgcorral.config.hba import parse_hba
from pgcorral.security.hba import match_hba


def rules(text: str) -> list[HbaRule]:
    problems: list[str] = []
    parsed = parse_hba("hba", text, problems)
    assert problems == []
    return parsed


def line_of(rule: HbaRule | None) -> int | None:
    return None if rule is None else rule.line


def tcp(r: list[HbaRule], address: str | None, *, database: str = "db", user: str = "u",
        tls: bool = False, aliases: dict[str, str] | None = None) -> int | None:
    return line_of(match_hba(r, conn_type="host", database=database, user=user, address=address,
                             tls=tls, aliases=aliases))


def test_ipv4() -> None:
    r = rules("host all all 10.0.0.0/8 trust\nhost all all 192.168.1.5 md5\n")
    assert tcp(r, "10.255.0.1") == 1
    assert tcp(r, "192.168.1.5") == 2
    assert tcp(r, "192.168.1.6") is None
    assert tcp(r, "11.0.0.1") is None


def test_ipv6() -> None:
    r = rules("host all all 2001:db8::/32 trust\nhost all all ::1 trust\n")
    assert tcp(r, "2001:db8:1::5") == 1
    assert tcp(r, "::1") == 2
    assert tcp(r, "fe80::1%eth0") is None
    assert tcp(r, "127.0.0.1") is None


def test_ipv4_mapped_ipv6() -> None:
    r = rules("host all all 127.0.0.0/8 trust\nhost all all ::ffff:0:0/96 md5\n")
    assert tcp(r, "::ffff:127.0.0.1") == 1
    assert tcp(r, "::ffff:10.0.0.1") == 2
    assert tcp(r, "10.0.0.1") is None


def test_v4_rule_does_not_match_v6_client() -> None:
    r = rules("host all all 0.0.0.0/0 trust\nhost all all ::/0 reject\n")
    assert tcp(r, "1.2.3.4") == 1
    assert tcp(r, "2001:db8::1") == 2


def test_all_address_and_unparsable_address() -> None:
    r = rules("host all all 10.0.0.0/8 trust\nhost all all all reject\n")
    assert tcp(r, "not an ip") == 2
    assert tcp(r, None) == 2
    assert tcp(r, "") == 2


def test_database_and_user() -> None:
    r = rules("host db1 alice all trust\nhost all bob all md5\nhost db2 all all password\n")
    assert tcp(r, "1.1.1.1", database="db1", user="alice") == 1
    assert tcp(r, "1.1.1.1", database="db1", user="carol") is None
    assert tcp(r, "1.1.1.1", database="db9", user="bob") == 2
    assert tcp(r, "1.1.1.1", database="db2", user="carol") == 3
    assert tcp(r, "1.1.1.1", database="DB2", user="carol") is None


def test_first_match_wins() -> None:
    r = rules("host all all all reject\nhost all all all trust\n")
    assert tcp(r, "1.1.1.1") == 1


def test_local() -> None:
    r = rules("host all all all reject\nlocal all all trust\n")
    assert line_of(match_hba(r, conn_type="local", database="db", user="u", address=None)) == 2
    assert tcp(r, "1.1.1.1") == 1
    assert tcp(rules("local all all trust\n"), "127.0.0.1") is None


def test_hostssl_and_hostnossl() -> None:
    r = rules("hostssl all all all scram-sha-256\nhostnossl all all all reject\n")
    assert tcp(r, "1.1.1.1", tls=True) == 1
    assert tcp(r, "1.1.1.1", tls=False) == 2
    plain = rules("host all all all trust\n")
    assert tcp(plain, "1.1.1.1", tls=True) == 1
    assert tcp(plain, "1.1.1.1", tls=False) == 1
    assert line_of(match_hba(r, conn_type="local", database="d", user="u", address=None,
                             tls=False)) is None


def test_aliases() -> None:
    r = rules("host db1 all all trust\nhost one all all md5\n")
    aliases = {"one": "db1", "uno": "db1"}
    assert tcp(r, "1.1.1.1", database="uno", aliases=aliases) == 1
    assert tcp(r, "1.1.1.1", database="one", aliases=aliases) == 1
    assert tcp(r, "1.1.1.1", database="uno") is None
    only_alias = rules("host one all all md5\n")
    assert tcp(only_alias, "1.1.1.1", database="one", aliases=aliases) == 1
    assert tcp(only_alias, "1.1.1.1", database="db1", aliases=aliases) is None


def test_no_rules() -> None:
    assert tcp([], "1.1.1.1") is None
