"""Who has which prepared statement (protocol/statements.py): the registry's names, a server
connection's LRU with its pending Closes, a client's names."""

from __future__ import annotations

from pgcorral.protocol.statements import (
    NAME_PREFIX,
    ClientStatements,
    ServerStatements,
    StatementRegistry,
)


def test_registry_names_each_identity_once_for_the_process() -> None:
    registry = StatementRegistry()
    assert registry.lookup(b"SELECT 1\0\0\0") is None
    first = registry.name_for(b"SELECT 1\0\0\0")
    assert first == f"{NAME_PREFIX}1"
    assert registry.name_for(b"SELECT 2\0\0\0") == f"{NAME_PREFIX}2"
    assert registry.name_for(b"SELECT 1\0\0\0") == first
    assert registry.lookup(b"SELECT 1\0\0\0") == first and len(registry) == 2
    assert not registry.known  # filled by the reply plan when a server accepts a Parse


def test_server_statements_are_an_lru_bounded_by_capacity() -> None:
    server = ServerStatements(2)
    assert server.add("pgc_1") == [] and server.add("pgc_2") == []
    server.touch("pgc_1")
    assert server.names() == ["pgc_2", "pgc_1"]
    assert server.add("pgc_3") == ["pgc_2"]  # least recently used goes
    assert "pgc_2" not in server and len(server) == 2
    server.discard("pgc_3")
    server.discard("pgc_3")  # absent: nothing to do
    assert server.names() == ["pgc_1"]


def test_server_clear_forgets_pending_closes_too() -> None:
    server = ServerStatements(1)
    server.add("pgc_1")
    server.pending_close.update(dict.fromkeys(server.add("pgc_2")))
    assert server.clear() == ["pgc_2", "pgc_1"]
    assert len(server) == 0 and not server.pending_close


def test_client_statements_map_client_names_to_identities() -> None:
    client = ClientStatements()
    client.names[b"s1"] = ("pgc_1", b"SELECT 1\0\0\0")
    assert b"s1" in client and b"s2" not in client and len(client) == 1
