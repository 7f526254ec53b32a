"""Memory per idle client, with and without TLS toward the clients.

    .venv/bin/python bench/tls_memory.py [--clients 500] [--rounds 2]

Starts a throwaway PostgreSQL 15 (devtools.pgcluster) and, for each mode, a pgcorral with
``workers = 1`` and ``pipeline = transaction`` (an idle client then holds no server
connection: what is measured is the client's own cost). Each round opens ``--clients`` raw
sockets that complete the startup (plain, or SSLRequest + TLS 1.3 with the test PKI of
devtools.certs) and stay idle, and reads RSS and PSS of pgcorral's processes
(``/proc/PID/smaps_rollup``, the whole process tree) before and after. 50 clients come and go
first so that one-time allocations (the server connection, caches, the TLS context's first
sessions) are not counted. Prints KiB per client for each mode, and TLS over plain; then
(``--churn``) how much pgcorral grew after rounds of clients that log in and leave.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.certs import Pki, make_test_pki  # noqa: E402
from devtools.pgcluster import PgCluster, find_free_port  # noqa: E402

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
WARMUP = 50


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


def read_until_ready(sock: socket.socket) -> None:
    """Read the login's messages up to ReadyForQuery; fail on an ErrorResponse."""
    buf = b""
    while True:
        while len(buf) >= 5:
            type_, length = buf[:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            if type_ == b"E":
                raise RuntimeError(f"login refused: {buf[5:1 + length]!r}")
            if type_ == b"Z":
                return
            buf = buf[1 + length:]
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("closed during the login")
        buf += chunk


def open_client(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if ctx is not None:
        sock.sendall(SSL_REQUEST)
        if sock.recv(1) != b"S":
            raise RuntimeError("TLS refused")
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(startup_packet("postgres", "postgres"))
    read_until_ready(sock)
    return sock


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        sock.close()
    socks.clear()


def tree(pid: int) -> list[int]:
    pids = [pid]
    for p in pids:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB, summed over the process tree of ``pid``."""
    rss = pss = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name == "Rss":
                        rss += int(rest.split()[0])
                    elif name == "Pss":
                        pss += int(rest.split()[0])
        except OSError:
            pass
    return rss, pss


class Pgcorral:
    def __init__(self, directory: Path, pg_port: int, tls: Pki | None) -> None:
        self.port = find_free_port()
        conf = {"host": "127.0.0.1", "port": str(self.port), "unix_socket_dir": str(directory),
                "log_type": "console", "log_level": "warn", "workers": "1",
                "pipeline": "transaction", "max_connections": "4"}  # fmt: skip
        if tls is not None:
            conf.update(tls="on", tls_cert_file=str(tls.server.cert),
                        tls_key_file=str(tls.server.key))
        text = "[pgcorral]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
        text += f"\n[primary]\nhost = 127.0.0.1\nport = {pg_port}\n"
        (directory / "pgcorral.conf").write_text(text)
        (directory / "hba.conf").write_text("host all all all trust\n")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        self.log = open(directory / "pgcorral.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgcorral", "-c", str(directory / "pgcorral.conf"),
             "-a", str(directory / "hba.conf")],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgcorral exited: {(directory / 'pgcorral.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pgcorral did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def measure(pg_port: int, directory: Path, pki: Pki | None, ctx: ssl.SSLContext | None,
            clients: int, rounds: int) -> list[tuple[float, float, float]]:  # fmt: skip
    """KiB per client of each round: RSS and PSS while the clients are connected, and the PSS
    still held once they left (one more login makes sure pgcorral saw them go)."""
    daemon = Pgcorral(directory, pg_port, pki)
    socks: list[socket.socket] = []
    results: list[tuple[float, float, float]] = []
    try:
        socks += [open_client(daemon.port, ctx) for _ in range(WARMUP)]
        close_all(socks)
        for _ in range(rounds):
            rss0, pss0 = memory_kib(daemon.proc.pid)
            socks += [open_client(daemon.port, ctx) for _ in range(clients)]
            rss1, pss1 = memory_kib(daemon.proc.pid)
            close_all(socks)
            socks.append(open_client(daemon.port, ctx))
            _, pss2 = memory_kib(daemon.proc.pid)
            close_all(socks)
            results.append(((rss1 - rss0) / clients, (pss1 - pss0) / clients,
                            (pss2 - pss0) / clients))
    finally:
        close_all(socks)
        daemon.stop()
    return results


def churn(pg_port: int, directory: Path, pki: Pki | None, ctx: ssl.SSLContext | None,
          clients: int, rounds: int) -> list[float]:  # fmt: skip
    """MiB pgcorral grew by (PSS) after each round of ``clients`` that log in and leave: what
    closed connections leave behind (flat once the allocator reuses its memory)."""
    daemon = Pgcorral(directory, pg_port, pki)
    socks: list[socket.socket] = []
    grown: list[float] = []
    try:
        base = memory_kib(daemon.proc.pid)[1]
        for _ in range(rounds):
            socks += [open_client(daemon.port, ctx) for _ in range(clients)]
            close_all(socks)
            socks.append(open_client(daemon.port, ctx))  # pgcorral saw the others go
            close_all(socks)
            grown.append((memory_kib(daemon.proc.pid)[1] - base) / 1024)
    finally:
        close_all(socks)
        daemon.stop()
    return grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--churn", type=int, default=8, metavar="ROUNDS",
                        help="rounds of --clients that log in and leave (0: none)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pgcorral-tlsmem-"))
    os.chmod(tmp, 0o755)
    cluster = PgCluster(tmp / "pg")
    try:
        cluster.init(settings={"max_connections": "50"},
                     hba_lines=["local all all trust", "host all all 127.0.0.1/32 trust"])
        cluster.start()
        pki = make_test_pki(tmp / "pki")
        tls13 = ssl.create_default_context(cafile=str(pki.ca_file))
        tls13.minimum_version = ssl.TLSVersion.TLSv1_3
        tls12 = ssl.create_default_context(cafile=str(pki.ca_file))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        rows: dict[str, list[tuple[float, float, float]]] = {}
        modes = (("plain", None, None), ("TLS 1.3", pki, tls13), ("TLS 1.2", pki, tls12))
        for mode, use_pki, use_ctx in modes:
            d = tmp / mode.replace(" ", "")
            d.mkdir()
            rows[mode] = measure(cluster.port, d, use_pki, use_ctx, args.clients, args.rounds)
        print(f"idle clients: {args.clients} per round, {args.rounds} rounds, workers = 1, "
              f"pipeline = transaction; KiB per client, each round: RSS and PSS while "
              f"connected, PSS still held after they left")
        for mode, results in rows.items():
            cells = "  |  ".join(f"RSS {r:5.1f}  PSS {p:5.1f}  held {h:5.1f}"
                                 for r, p, h in results)
            print(f"  {mode:8s} {cells}")
        # round 1 is the cost: later rounds reuse what the earlier clients left free
        plain = rows["plain"][0]
        for mode in ("TLS 1.3", "TLS 1.2"):
            tls = rows[mode][0]
            print(f"  {mode} - plain (round 1): PSS {tls[1] - plain[1]:+.1f} KiB per "
                  f"client" + (f", {tls[1] / plain[1]:.1f}x plain" if plain[1] > 0 else ""))
        if args.churn:
            print(f"churn: PSS growth (MiB) after each round of {args.clients} clients that "
                  f"logged in and left")
            for mode, use_pki, use_ctx in modes[:2]:
                d = tmp / ("churn-" + mode.replace(" ", ""))
                d.mkdir()
                grown = churn(cluster.port, d, use_pki, use_ctx, args.clients, args.churn)
                print(f"  {mode:8s} " + " ".join(f"{g:5.1f}" for g in grown))
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
