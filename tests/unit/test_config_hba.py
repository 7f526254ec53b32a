"""Parsing of the hba file."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pgcorral.config import HbaRule, load_config
from pgcorral.config.hba import parse_hba
from pgcorral.errors import ConfigError

CONF = "[pgagroal]\nhost = *\nport = 2345\n[primary]\nhost = localhost\nport = 5432\n"


def parse(text: str) -> list[HbaRule]:
    problems: list[str] = []
    rules = parse_hba("hba", text, problems)
    assert problems == []
    return rules


def bad(text: str) -> list[str]:
    problems: list[str] = []
    parse_hba("hba", text, problems)
    return problems


def test_all_types_and_methods() -> None:
    rules = parse(
        "# comment\n"
        "host all all all trust\n"
        "hostssl db1 alice 10.0.0.0/8 scram-sha-256  # trailing comment\n"
        "  HOSTNOSSL\tdb2\tbob\t2001:db8::/32\tPassword\n"
        "local all postgres md5\n"
        "host admin admin 192.168.1.7 reject\n"
        "host all all ::1 all\n"
    )
    assert [(r.line, r.type, r.database, r.user, r.address, r.method) for r in rules] == [
        (2, "host", "all", "all", "all", "trust"),
        (3, "hostssl", "db1", "alice", "10.0.0.0/8", "scram-sha-256"),
        (4, "hostnossl", "db2", "bob", "2001:db8::/32", "password"),
        (5, "local", "all", "postgres", "", "md5"),
        (6, "host", "admin", "admin", "192.168.1.7", "reject"),
        (7, "host", "all", "all", "::1", "all"),
    ]
    assert [r.network for r in rules] == [
        None,
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        None,
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
    ]


def test_host_bits_are_masked() -> None:
    (rule,) = parse("host all all 10.1.2.3/8 trust\n")
    assert rule.network == ipaddress.ip_network("10.0.0.0/8")
    assert rule.address == "10.1.2.3/8"


def test_empty_and_large_files() -> None:
    assert parse("") == []
    assert parse("# only comments\n\n   \n") == []
    assert len(parse("host all all all trust\n" * 200)) == 200


@pytest.mark.parametrize(("line", "problem"), [
    ("hots all all all trust", "hba:1: type: 'hots' is not one of host, hostssl, hostnossl, local"),
    ("host all all all md6", "hba:1: method: 'md6' is not one of trust, reject, password, md5, "
                             "scram-sha-256, all, cert"),
    ("host all all example.com trust", "hba:1: address: 'example.com' is not 'all', an IP "
                                       "address or a CIDR network"),
    ("host all all samenet trust", "hba:1: address: 'samenet' is not 'all', an IP address or a "
                                   "CIDR network"),
    ("host all all 10.0.0.0/33 trust", "hba:1: address: '10.0.0.0/33' is not 'all', an IP "
                                       "address or a CIDR network"),
    ("host all all trust", "hba:1: fields: expected 5 fields (TYPE DATABASE USER ADDRESS "
                           "METHOD [clientcert=...]), got 4"),
    ("host all all all trust extra", "hba:1: fields: expected 5 fields (TYPE DATABASE USER "
                                     "ADDRESS METHOD [clientcert=...]), got 6"),
    ("local all all all trust", "hba:1: fields: expected 4 fields (local DATABASE USER "
                                "METHOD), got 5"),
    ("host", "hba:1: fields: expected 5 fields (TYPE DATABASE USER ADDRESS METHOD "
             "[clientcert=...]), got 1"),
    ("host all all all cert", "hba:1: method: cert authentication is only supported on hostssl "
                              "lines"),
    ("host all all all md5 clientcert=verify-ca", "hba:1: clientcert: clientcert can only be "
                                                  "configured for hostssl lines"),
    ("hostssl all all all md5 clientcert=maybe", "hba:1: clientcert: 'maybe' is not one of "
                                                 "verify-ca, verify-full"),
    ("hostssl all all all cert clientcert=verify-ca", "hba:1: clientcert: clientcert only "
                                                      "accepts verify-full with cert "
                                                      "authentication"),
    ("hostssl all all all md5 map=x", "hba:1: map: unknown authentication option (pgcorral "
                                      "knows clientcert only)"),
])
def test_bad_lines(line: str, problem: str) -> None:
    assert bad(line + "\n") == [problem]


def test_clientcert_and_cert() -> None:
    rules = parse_hba("hba", "hostssl all all all md5 clientcert=verify-ca\n"
                             "hostssl all all all scram-sha-256 clientcert=VERIFY-FULL\n"
                             "hostssl all all all cert\n"
                             "hostssl all all all cert clientcert=verify-full\n"
                             "hostssl all all all trust\n", [])
    assert [(r.method, r.clientcert) for r in rules] == [
        ("md5", "verify-ca"), ("scram-sha-256", "verify-full"), ("cert", "verify-full"),
        ("cert", "verify-full"), ("trust", "")]


def test_every_bad_field_reported() -> None:
    assert bad("host all all nowhere nomethod\nhost all all all trust\nx\n") == [
        "hba:1: address: 'nowhere' is not 'all', an IP address or a CIDR network",
        "hba:1: method: 'nomethod' is not one of trust, reject, password, md5, scram-sha-256, all, "
        "cert",
        "hba:3: type: 'x' is not one of host, hostssl, hostnossl, local",
    ]


def test_load_reports_hba_problems_with_main_ones(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(CONF + "tls = maybe\n")
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all all nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf), str(hba))
    assert info.value.problems == [
        f"{conf}:7: tls: 'maybe' is not one of disable, prefer, require, verify-ca, verify-full",
        f"{hba}:1: method: 'nope' is not one of trust, reject, password, md5, scram-sha-256, "
        "all, cert",
    ]


def test_missing_hba_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(CONF)
    with pytest.raises(ConfigError) as info:
        load_config(str(conf), str(tmp_path / "nope"))
    assert info.value.problems == [f"{tmp_path / 'nope'}: cannot read: No such file or directory"]


def test_empty_hba_file_loads(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(CONF)
    hba = tmp_path / "hba.conf"
    hba.write_text("")
    assert load_config(str(conf), str(hba)).hba == ()
