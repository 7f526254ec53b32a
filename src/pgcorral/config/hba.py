"""Parses the hba file (``pgagroal_hba.conf``) into HbaRules.

Owns the file's syntax only: ``TYPE DATABASE USER ADDRESS METHOD [OPTION...]`` per line (``local
DATABASE USER METHOD`` for Unix sockets), whitespace separated, ``#`` comments. The one option is
PostgreSQL's ``clientcert=verify-ca|verify-full`` on ``hostssl`` lines; the ``cert`` method
(``hostssl`` only) implies ``clientcert=verify-full``. Matching a connection against the
rules is ``pgcorral.security.hba``'s job. Problems are collected as ``path:line: field: what``;
nothing is raised for bad input. Unlike pgagroal, there is no 64-entry limit and an empty file is
allowed (every connection then gets "no hba entry").
"""

from __future__ import annotations

import ipaddress

from pgcorral.config.model import HbaRule, IPNetwork
from pgcorral.config.parse import problem

TYPES = ("host", "hostssl", "hostnossl", "local")
METHODS = ("trust", "reject", "password", "md5", "scram-sha-256", "all", "cert")
CLIENTCERT = ("verify-ca", "verify-full")


def parse_address(text: str) -> IPNetwork | None:
    """``all`` -> None; a CIDR or a bare address (-> /32 or /128) -> its network.

    Raises ValueError for anything else (host names, samehost, samenet...).
    """
    if text.lower() == "all":
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not 'all', an IP address or a CIDR network") from None


def _parse_line(path: str, number: int, fields: list[str], problems: list[str]
                ) -> HbaRule | None:
    conn_type = fields[0].lower()
    if conn_type not in TYPES:
        problems.append(problem(path, number, "type",
                                f"{fields[0]!r} is not one of {', '.join(TYPES)}"))
        return None
    expected = 4 if conn_type == "local" else 5
    options = [f for f in fields[expected:] if "=" in f] if len(fields) > expected else []
    if len(fields) - len(options) != expected:
        layout = "local DATABASE USER METHOD" if conn_type == "local" else \
            "TYPE DATABASE USER ADDRESS METHOD [clientcert=...]"
        problems.append(problem(path, number, "fields",
                                f"expected {expected} fields ({layout}), got {len(fields)}"))
        return None
    database, user = fields[1], fields[2]
    address = "" if conn_type == "local" else fields[3]
    method = fields[expected - 1].lower()
    ok = True
    clientcert = "verify-full" if method == "cert" else ""
    if method == "cert" and conn_type != "hostssl":
        problems.append(problem(path, number, "method",
                                "cert authentication is only supported on hostssl lines"))
        ok = False
    for option in options:
        name, _, value = option.partition("=")
        if name.lower() != "clientcert":
            problems.append(problem(path, number, name,
                                    "unknown authentication option (pgcorral knows "
                                    "clientcert only)"))
            ok = False
        elif conn_type != "hostssl":
            problems.append(problem(path, number, "clientcert",
                                    "clientcert can only be configured for hostssl lines"))
            ok = False
        elif value.lower() not in CLIENTCERT:
            problems.append(problem(path, number, "clientcert",
                                    f"{value!r} is not one of {', '.join(CLIENTCERT)}"))
            ok = False
        elif method == "cert" and value.lower() != "verify-full":
            problems.append(problem(path, number, "clientcert",
                                    "clientcert only accepts verify-full with cert "
                                    "authentication"))
            ok = False
        else:
            clientcert = value.lower()
    network: IPNetwork | None = None
    if address:
        try:
            network = parse_address(address)
        except ValueError as exc:
            problems.append(problem(path, number, "address", str(exc)))
            ok = False
    if method not in METHODS:
        problems.append(problem(path, number, "method",
                                f"{fields[-1]!r} is not one of {', '.join(METHODS)}"))
        ok = False
    if not ok:
        return None
    return HbaRule(line=number, type=conn_type, database=database, user=user, address=address,
                   method=method, network=network, clientcert=clientcert)


def parse_hba(path: str, text: str, problems: list[str]) -> list[HbaRule]:
    """Parse the text of an hba file; problems are appended to ``problems``."""
    rules: list[HbaRule] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        fields = raw_line.split("#", 1)[0].split()
        if not fields:
            continue
        rule = _parse_line(path, number, fields, problems)
        if rule is not None:
            rules.append(rule)
    return rules
