"""CVE classes that need a malicious server (docs/SECURITY.md): pgcorral logs in to a fake
PostgreSQL (tests/fakeserver.py) that sends a huge SCRAM nonce, bad base64, absurd iteration
counts, a wrong server signature, ErrorResponses without a SQLSTATE, empty or unterminated, and
text before TLS. Each must end that client's login with a clear ErrorResponse (a SQLSTATE and a
message), the fake connection closed by pgcorral, a log line, no Traceback (conftest), and
other clients unaffected: ``trustuser`` is relayed by the fake to the real PostgreSQL and must
keep working through the same daemon.

One daemon per pipeline serves every case (a vault user per case, each with its own script), so
the file stays fast; a failing case is named in the assertion message."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from tests.fakeserver import (
    FakeConn,
    FakeServer,
    Script,
    auth,
    error_body,
    login_ok,
    message,
    ready,
    sasl_offer,
)
from tests.pgwire import connect_error, error_fields, read_message, startup_packet
from tests.vaultfiles import write_vault

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

TEST_DB = "pgcorral_test"
TRUST_HBA = "host all all all trust\nlocal all all trust\n"
SALT = base64.b64encode(b"0123456789abcdef").decode()


def _daemon(pgcorral: DaemonFactory, tmp_path: Path, fake: FakeServer, pipeline: str,
            **conf: str) -> Daemon:
    """pgcorral in front of ``fake``; every scripted user is in the vault (pgcorral logs in to
    the fake itself, hba trust: the client is not asked)."""
    users, env = write_vault(tmp_path, {user: "vault-pw" for user in fake.scripts})
    return pgcorral({"pipeline": pipeline, "authentication_timeout": "5", **conf},
                    hba=TRUST_HBA, env=env, args=["-u", users],
                    servers=[("primary", "127.0.0.1", fake.port)])


def _fds(d: Daemon) -> int:
    """Open descriptors of the daemon and its worker processes."""
    pids = [d.pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()]
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def assert_healthy(d: Daemon) -> None:
    """A relayed (well-behaved) login through the same fake and daemon still works."""
    assert d.running(), f"pgcorral died; log:\n{d.log()}"
    with psycopg.connect(d.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# --------------------------------------------------------------------- SCRAM (CVE-2026-6665)


def _client_nonce(initial: bytes) -> bytes:
    """The client nonce of a SASLInitialResponse body (mechanism, length, client-first)."""
    end = initial.index(b"\0")
    return initial[end + 5:].split(b"r=", 1)[1]


def _scram(first: Callable[[bytes], bytes],
           final: Callable[[bytes], bytes] | None = None) -> Script:
    """A SCRAM exchange: server-first from ``first(client nonce)``; if pgcorral answers it,
    server-final from ``final(client-final)`` followed by AuthenticationOk."""

    def play(conn: FakeConn) -> None:
        conn.send(sasl_offer("SCRAM-SHA-256"))
        got = conn.read()
        if got is None:
            return
        assert got[0] == b"p", got
        conn.send(auth(11, first(_client_nonce(got[1]))))
        if final is not None:
            got = conn.read()
            if got is None:
                return
            conn.send(auth(12, final(got[1])) + login_ok())
        conn.wait_closed()

    return play


def _first(extra: bytes = b"x", salt: str = SALT, iterations: str = "4096",
           nonce: bytes | None = None) -> Callable[[bytes], bytes]:
    def build(client_nonce: bytes) -> bytes:
        r = nonce if nonce is not None else client_nonce + extra
        return b"r=" + r + b",s=" + salt.encode() + b",i=" + iterations.encode()

    return build


def _script(*chunks: bytes) -> Script:
    """Send ``chunks`` (one write each), then wait for pgcorral to close."""

    def play(conn: FakeConn) -> None:
        for chunk in chunks:
            conn.send(chunk)
        conn.wait_closed()

    return play


def _offer_then(chunk: bytes) -> Script:
    """Offer SCRAM, read pgcorral's SASLInitialResponse, then send ``chunk``."""

    def play(conn: FakeConn) -> None:
        conn.send(sasl_offer("SCRAM-SHA-256"))
        if conn.read() is not None:
            conn.send(chunk)
        conn.wait_closed()

    return play


#: user -> (script, the SQLSTATE the client must get, a piece of the message)
LOGIN_CASES: dict[str, tuple[Script, str, str]] = {
    # CVE-2026-6665: a huge nonce, bad base64, iteration counts 0 / 2^31 / negative, a bad
    # signature; libpq refuses an authentication request over 2000 bytes, and so does pgcorral
    "huge_nonce": (_scram(_first(b"x" * 1_000_000), lambda _: b"v=" + b"A" * 44),
                   "08P01", "invalid authentication request"),
    "nonce_mismatch": (_scram(_first(nonce=b"someone-elses-nonce")), "08P01",
                       "nonce mismatch"),
    "bad_base64_salt": (_scram(_first(salt="!!not*base64!!")), "08P01", "malformed SCRAM"),
    "empty_salt": (_scram(_first(salt="")), "08P01", "malformed SCRAM"),
    "iterations_0": (_scram(_first(iterations="0")), "08P01", "invalid iteration count"),
    "iterations_2p31": (_scram(_first(iterations=str(2**31))), "08P01",
                        "invalid iteration count"),
    "iterations_negative": (_scram(_first(iterations="-1")), "08P01",
                            "invalid iteration count"),
    "iterations_huge": (_scram(_first(iterations="9" * 40)), "08P01", "invalid iteration count"),
    "garbage_first": (_scram(lambda _: b"\xff\xfe garbage"), "08P01", "malformed SCRAM"),
    "empty_continue": (_scram(lambda _: b""), "08P01", "malformed SCRAM"),
    "bad_signature": (_scram(_first(), lambda _: b"v=" + base64.b64encode(b"\0" * 32)),
                      "28000", "incorrect server signature"),
    "bad_base64_signature": (_scram(_first(), lambda _: b"v=***"), "08P01",
                             "malformed server signature"),
    "server_final_error": (_scram(_first(), lambda _: b"e=invalid-proof"), "08P01",
                           "error received from server in SCRAM exchange"),
    "unknown_mechanism": (_script(sasl_offer("SCRAM-SHA-1")), "28000",
                          "none of the server's SASL authentication mechanisms"),
    "malformed_offer": (_script(auth(10, b"SCRAM-SHA-256")), "08P01",
                        "malformed AuthenticationSASL"),
    "continue_first": (_script(auth(11, b"r=abc,s=" + SALT.encode() + b",i=4096")), "28000",
                       "authentication method 11"),
    "unknown_auth_code": (_script(auth(99)), "28000", "authentication method 99"),
    # CVE-2026-6666: ErrorResponse without a SQLSTATE, empty, unterminated
    "error_without_code": (_script(message(b"E", error_body(S="FATAL", M="no code here"))),
                           "XX000", "no code here"),
    "error_without_fields": (_script(message(b"E", b"\0")), "XX000", ""),
    "error_empty": (_script(message(b"E", b"")), "08P01", "malformed message from server"),
    "error_unterminated": (_script(message(b"E", b"SFATAL\0Cxx")), "08P01",
                           "malformed message from server"),
    "error_unterminated_field": (_script(message(b"E", b"SFATAL\0Mno end")), "08P01",
                                 "malformed message from server"),
    "error_mid_scram_without_code": (_offer_then(message(b"E", error_body(S="FATAL", M="x"))),
                                     "XX000", "x"),
    "error_mid_scram_unterminated": (_offer_then(message(b"E", b"Mhalf")), "08P01",
                                     "malformed message from server"),
    "unknown_message": (_script(message(b"Y", b"whatever")), "08P01", "unexpected message"),
    "bad_length": (_script(b"R\xff\xff\xff\xf0" + b"x" * 16), "08P01",
                   "exceeds the limit"),
}


def _login(d: Daemon, user: str) -> tuple[dict[str, str] | None, float]:
    """The fields of the ErrorResponse ending a login as ``user`` (None: it succeeded), and
    how long it took."""
    started = time.monotonic()
    error = connect_error(d.host, d.port, {"user": user, "database": TEST_DB}, timeout=15)
    return error, time.monotonic() - started


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_hostile_server_during_login(pgcorral: DaemonFactory, pg: PgCluster, tmp_path: Path,
                                     pipeline: str) -> None:
    fake = FakeServer(("127.0.0.1", pg.port), {user: case[0] for user, case in
                                               LOGIN_CASES.items()})
    with fake:
        d = _daemon(pgcorral, tmp_path, fake, pipeline)
        assert_healthy(d)
        fds_before = _fds(d)
        failures: list[str] = []
        for user, (_, sqlstate, text) in LOGIN_CASES.items():
            played = len(fake.played)
            error, took = _login(d, user)
            if error is None:
                failures.append(f"{user}: the login succeeded")
                continue
            if error.get("C") != sqlstate or text not in error.get("M", ""):
                failures.append(f"{user}: got {error}, expected {sqlstate} with {text!r}")
            if took > 4:
                failures.append(f"{user}: the error came after {took:.1f} s")
            # pgcorral hung up on the fake (the script's wait_closed returned)
            deadline = time.monotonic() + 5
            while len(fake.played) == played or not fake.finished.is_set():
                if time.monotonic() > deadline:
                    failures.append(f"{user}: the fake server was never reached or not closed")
                    break
                time.sleep(0.01)
            fake.finished.clear()
            assert_healthy(d)
        assert not fake.errors, fake.errors
        assert not failures, "\n".join(failures) + "\n" + d.log()[-3000:]
        log = d.log()
        assert "server refused client" in log or "refusing client" in log
        # nothing kept: no more descriptors than before (one pooled server connection or so)
        deadline = time.monotonic() + 10
        while _fds(d) > fds_before + 2:
            assert time.monotonic() < deadline, f"{_fds(d)} descriptors, {fds_before} before"
            time.sleep(0.05)


# ------------------------------------------- an ErrorResponse without SQLSTATE after login


def _raw_query(d: Daemon, text: str) -> list[tuple[bytes, bytes]]:
    """Log in as trustuser on a raw socket and send one Query; the messages received up to
    ReadyForQuery or the close."""
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "trustuser", "database": TEST_DB}))
        while (got := read_message(sock)) is not None and got[0] != b"Z":
            assert got[0] != b"E", error_fields(got[1])
        body = text.encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)
        out: list[tuple[bytes, bytes]] = []
        try:
            while (got := read_message(sock)) is not None:
                out.append(got)
                if got[0] == b"Z":
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return out


#: marker in the query text -> the reply the fake sends instead of PostgreSQL's
BAD_REPLIES = {
    b"cve_no_code": message(b"E", error_body(S="ERROR", M="no code here")) + ready(),
    b"cve_no_fields": message(b"E", b"\0") + ready(),
    b"cve_empty_error": message(b"E", b"") + ready(),
    b"cve_unterminated": message(b"E", b"SERROR\0Mno end") + ready(),
    b"cve_fatal_no_code": message(b"E", error_body(S="FATAL", M="bye, no code")),
}


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_bad_error_response_after_login(pgcorral: DaemonFactory, pg: PgCluster,
                                        tmp_path: Path, pipeline: str) -> None:
    """CVE-2026-6666 on the data path: PostgreSQL's replies are relayed, so the client sees
    exactly the bad ErrorResponse (or, where pgcorral reads the reply itself, an error of its
    own); pgcorral survives and other clients are served."""
    fake = FakeServer(("127.0.0.1", pg.port), {"nobody": _script()}, replies=BAD_REPLIES)
    with fake:
        d = _daemon(pgcorral, tmp_path, fake, pipeline)
        with psycopg.connect(d.dsn(), autocommit=True) as bystander:
            assert bystander.execute("select 1").fetchone() == (1,)
            for marker in BAD_REPLIES:
                got = _raw_query(d, f"select '{marker.decode()}'")
                types = [t for t, _ in got]
                assert b"E" in types, (marker, got)
                assert bystander.execute("select 2").fetchone() == (2,), marker
                assert_healthy(d)


# ----------------------------------------------------- text before TLS (CVE-2024-10977)


INJECTED = "Your password expired: log in again at http://evil.example"


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_server_text_before_tls_is_not_shown(pgcorral: DaemonFactory, mode: str) -> None:
    """An ErrorResponse in place of the answer to SSLRequest was not authenticated by TLS (a
    man in the middle may have written it): the client gets pgcorral's own words, as libpq
    since CVE-2024-10977, never the injected text."""
    fake = FakeServer(ssl_reply=message(b"E", error_body(S="FATAL", C="28000", M=INJECTED)))
    with fake:
        d = pgcorral({}, servers=[("primary", "127.0.0.1", fake.port)],
                     server_conf={"tls": mode})
        error = connect_error(d.host, d.port, {"user": "trustuser", "database": TEST_DB})
        assert error is not None and error["C"] == "08006", error
        assert "server sent an error response during SSL exchange" in error["M"], error
        assert "evil" not in str(error)
        # the operator's log has it (quoted), the line about the client does not
        d.wait_for_log("server sent an error response during SSL exchange (not shown")
        assert all("evil" not in line for line in d.log().splitlines()
                   if "refusing client" in line), d.log()
        assert d.running()
