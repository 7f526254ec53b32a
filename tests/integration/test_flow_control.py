"""Flow control: a client that reads slowly makes pgcorral stop reading from PostgreSQL, so a big
result never piles up in pgcorral's memory; and the stream stays correct."""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from tests.pgwire import read_message, startup_packet

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory

USER = {"user": "trustuser", "database": "pgcorral_test"}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_keeps_pgcorral_memory_bounded(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with socket.create_connection((d.host, d.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(startup_packet(USER))
        while (message := read_message(sock)) is not None and message[0] != b"Z":
            pass
        before = _rss_kib(d.pid)
        sql = b"select repeat('x', 10000) from generate_series(1, 30000)\0"  # ~300 MB
        sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        # read nothing for a while: PostgreSQL keeps producing, pgcorral must not buffer it all
        deadline = time.monotonic() + 2.0
        peak = before
        while time.monotonic() < deadline:
            peak = max(peak, _rss_kib(d.pid))
            time.sleep(0.05)
        assert peak - before < 64 * 1024, f"pgcorral grew by {(peak - before) // 1024} MiB"
        # then read everything: the whole result arrives intact
        rows = 0
        while (message := read_message(sock)) is not None:
            if message[0] == b"D":
                rows += 1
                assert len(message[1]) == 2 + 4 + 10000
            elif message[0] == b"Z":
                break
        assert rows == 30000
