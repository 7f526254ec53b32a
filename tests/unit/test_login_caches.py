"""What a worker keeps between logins: the hba decision per (connection type, database, user,
address), dropped on reload, and the SCRAM verifier of a vault user, which must check a real
client's proof exactly as a freshly built one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pgcorral.config import Config, load_config
from pgcorral.errors import NoHbaEntry
from pgcorral.net import auth
from pgcorral.net.client import ClientConnection
from pgcorral.net.context import Context
from pgcorral.protocol import messages as m
from pgcorral.protocol.scram import DEFAULT_ITERATIONS, ScramVerifier
from pgcorral.protocol.scram_client import ScramClient
from pgcorral.protocol.scram_server import ScramServer
from pgcorral.security.secrets import Secrets


def _config(tmp_path: Path, hba: str) -> Config:
    conf = tmp_path / "pgcorral.conf"
    conf.write_text("[pgcorral]\nhost = 127.0.0.1\nport = 6432\n\n[primary]\nhost = 127.0.0.1\n"
                    "port = 5432\n")
    hba_path = tmp_path / "hba.conf"
    hba_path.write_text(hba)
    return load_config(str(conf), str(hba_path))


def _rule_for(ctx: Context, user: str, database: str, address: str) -> str:
    client = ClientConnection(ctx, "host")
    client.user, client.database, client.address = user, database, address
    return client._hba_rule().method


def test_hba_decisions_are_cached_and_a_reload_drops_them(tmp_path: Path) -> None:
    ctx = Context(_config(tmp_path, "host all alice all trust\nhost all all all md5\n"))
    assert _rule_for(ctx, "alice", "db", "10.0.0.1") == "trust"
    assert _rule_for(ctx, "bob", "db", "10.0.0.1") == "md5"
    assert len(ctx.hba_cache) == 2
    assert _rule_for(ctx, "alice", "db", "10.0.0.1") == "trust"
    assert len(ctx.hba_cache) == 2  # answered from the cache

    ctx.apply(_config(tmp_path, "host all alice all scram-sha-256\n"), Secrets())
    assert not ctx.hba_cache
    assert _rule_for(ctx, "alice", "db", "10.0.0.1") == "scram-sha-256"
    with pytest.raises(NoHbaEntry):
        _rule_for(ctx, "bob", "db", "10.0.0.1")


def _exchange(server: ScramServer, password: str) -> bytes:
    """A real client's SCRAM login against ``server``; the server's last answer."""
    client = ScramClient.from_password(password)
    server.start()
    challenge = server.handle_initial(client.initial())
    final = client.handle_continue(challenge[5:])
    return server.handle_response(final)


def test_the_kept_verifier_is_the_one_built_from_the_vault_password() -> None:
    async def main() -> ScramVerifier:
        return await auth.vault_verifier("carol", "s3cret")

    verifier = asyncio.run(main())
    fresh = ScramVerifier.from_password("s3cret", auth.user_salt("carol"), DEFAULT_ITERATIONS)
    assert verifier == fresh
    assert auth._verifiers[("carol", "s3cret")] is verifier
    # it checks a real client's proof, and refuses a wrong password
    assert _exchange(ScramServer("carol", verifier), "s3cret").endswith(
        m.authentication_ok())
    with pytest.raises(Exception, match="password authentication failed"):
        _exchange(ScramServer("carol", verifier), "wrong")
    # a new password (a reload) is a new key: never the old verifier
    other = asyncio.run(auth.vault_verifier("carol", "n3w"))
    assert other != verifier
    assert auth._verifiers[("carol", "s3cret")] is verifier


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.0.0.1", 5000) if name == "peername" else default


def test_held_bytes_go_out_with_the_next_write_or_before_the_close(tmp_path: Path) -> None:
    """The end of a SCRAM exchange (AuthenticationSASLFinal) and the greeting: one write."""
    async def main() -> None:
        ctx = Context(_config(tmp_path, "host all all all trust\n"))
        client = ClientConnection(ctx, "host")
        transport = _Transport()
        client.connection_made(transport)  # type: ignore[arg-type]
        client.hold(b"final")
        assert transport.out == []
        client.write(b"greeting")
        assert transport.out == [b"finalgreeting"]
        client.hold(b"final")
        client.end("refused")  # nothing else was written: still sent before the close
        assert transport.out == [b"finalgreeting", b"final"]
        assert transport.closed and client not in ctx.clients

    asyncio.run(main())
