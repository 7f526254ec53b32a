"""Matches a connection against the hba rules: the first rule that fits wins.

Owns only the matching (connection type and TLS, database with aliases, user, client address,
including IPv4-mapped IPv6). Parsing the hba file is ``pgcorral.config.hba``'s job; acting on the
method (trust, reject, password...) is the authentication code's job.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from pgcorral.config.model import HbaRule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _client_addresses(address: str | None) -> tuple[IPAddress, ...]:
    """The client address and, for an IPv4-mapped IPv6 address, its IPv4 form too."""
    if not address:
        return ()
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return ()
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return (parsed, parsed.ipv4_mapped)
    return (parsed,)


def _type_matches(rule: HbaRule, conn_type: str, tls: bool) -> bool:
    if conn_type == "local":
        return rule.type == "local"
    if rule.type == "host":
        return True
    if rule.type == "hostssl":
        return tls
    if rule.type == "hostnossl":
        return not tls
    return False


def match_hba(rules: Sequence[HbaRule], *, conn_type: str, database: str, user: str,
              address: str | None, tls: bool = False,
              aliases: Mapping[str, str] | None = None) -> HbaRule | None:
    """The first rule that fits the connection, or None ("no hba entry").

    ``conn_type`` is ``'host'`` (TCP; ``address`` is the client IP) or ``'local'`` (Unix socket).
    ``aliases`` maps a database alias to its real name: a rule naming the real database also
    matches a client that names one of its aliases.
    """
    real = aliases.get(database) if aliases else None
    candidates = _client_addresses(address) if conn_type == "host" else ()
    for rule in rules:
        if not _type_matches(rule, conn_type, tls):
            continue
        if rule.database not in ("all", database) and (real is None or rule.database != real):
            continue
        if rule.user not in ("all", user):
            continue
        if conn_type == "host" and rule.network is not None:
            network = rule.network
            if not any(a.version == network.version and a in network for a in candidates):
                continue
        return rule
    return None
