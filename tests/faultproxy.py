"""A TCP proxy in front of PostgreSQL for fault tests: it can cut every connection (no FATAL,
as a network failure or a crashed host), black-hole them (stop forwarding, keep the sockets:
a server that stops answering mid-query; ``heal()`` ends the episode), and swallow cancel
requests without ever closing their connection (Odyssey's cancel-leak case).

Test code only; threads, loopback only; ``close()`` stops everything it started.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_CANCEL_CODE = 80877102


class FaultProxy:
    def __init__(self, target_port: int, *, leak_cancels: bool = False) -> None:
        self.target = target_port
        self.leak_cancels = leak_cancels
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.leaked: list[socket.socket] = []  # cancel connections held open, never answered
        self.black_holed = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._start, args=(down,), daemon=True).start()

    def _start(self, down: socket.socket) -> None:
        if self.leak_cancels:
            down.settimeout(5)
            with contextlib.suppress(OSError):
                first = down.recv(16, socket.MSG_PEEK)
                if len(first) >= 8 and struct.unpack("!ii", first[:8]) == (16, _CANCEL_CODE):
                    with self.lock:
                        self.leaked.append(down)  # read nothing, answer nothing, close never
                    return
            down.settimeout(None)
        try:
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            down.close()
            return
        for s in (down, up):  # (Nagle's delays would slow every round trip to ~40 ms)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.socks += [down, up]
        pair = [down, up, 2]  # the sockets and their pumps still running
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: list[Any]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.black_holed.is_set():
                    continue  # swallowed: the other side waits forever
                dst.sendall(data)
        with contextlib.suppress(OSError):  # the end of one side reaches the other (a
            dst.shutdown(socket.SHUT_WR)   # cancel's answer is its server closing)
        with self.lock:
            pair[2] -= 1
            last = pair[2] == 0
            if last:
                self.socks = [s for s in self.socks if s is not pair[0] and s is not pair[1]]
        if last:
            pair[0].close()
            pair[1].close()

    def connections(self) -> int:
        with self.lock:
            return len(self.socks) // 2

    def black_hole(self) -> None:
        self.black_holed.set()

    def heal(self) -> None:
        """End a black-hole episode as a network partition ends for TCP connections that
        timed out: every connection is cut (their lost bytes cannot be replayed), and new
        connections are forwarded again."""
        self.cut()
        self.black_holed.clear()

    def cut(self) -> None:
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):  # (close alone does not wake a recv)
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()
        with self.lock:
            leaked, self.leaked = self.leaked, []
        for s in leaked:
            s.close()


class ProxyProcess:
    """A FaultProxy in a process of its own (``python -m tests.faultproxy PORT``), driven by
    lines on its stdin: for load in the calling process, whose threads would otherwise share
    one GIL with the proxy's (the soak's asyncio clients ran 15 times slower so)."""

    def __init__(self, target_port: int) -> None:

        root = str(Path(__file__).resolve().parent.parent)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.faultproxy",
                                      str(target_port)], cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def _command(self, what: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def black_hole(self) -> None:
        self._command("black_hole")

    def heal(self) -> None:
        self._command("heal")

    def cut(self) -> None:
        self._command("cut")

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # its end of input: it closes everything and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # (our own child, by its PID)
            self.proc.wait()
        self.proc.stdout.close()


def _serve(target_port: int) -> None:
    proxy = FaultProxy(target_port)
    print(proxy.port, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in ("black_hole", "heal", "cut"):
            getattr(proxy, command)()
        print("ok", flush=True)
    proxy.close()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
