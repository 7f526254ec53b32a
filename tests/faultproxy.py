"""A TCP proxy in front of PostgreSQL for fault tests: it can cut every connection (no FATAL,
as a network failure or a crashed host), black-hole them (stop forwarding, keep the sockets:
a server that stops answering mid-query), and swallow cancel requests without ever closing
their connection (Odyssey's cancel-leak case).

Test code only; threads, loopback only; ``close()`` stops everything it started.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

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
        with self.lock:
            self.socks += [down, up]
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.black_holed.is_set():
                    continue  # swallowed: the other side waits forever
                dst.sendall(data)

    def connections(self) -> int:
        with self.lock:
            return len(self.socks) // 2

    def black_hole(self) -> None:
        self.black_holed.set()

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
