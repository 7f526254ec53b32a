"""A small fake PostgreSQL server for tests that need a malicious or broken one (docs/SECURITY.md).

``FakeServer`` listens on a loopback port, reads each connection's StartupMessage, and then:

* a connection whose ``user`` has a script in ``scripts`` is played by that script (a function
  of a ``FakeConn``): it sends whatever bytes the test wants (a huge SCRAM nonce, an
  ErrorResponse without a SQLSTATE...) and reads what pgcorral answers;
* every other connection is relayed to ``upstream`` (the real PostgreSQL of the ``pg``
  fixture), so the same pgcorral keeps serving healthy clients through it. A Query whose text
  contains a key of ``replies`` is not relayed: the fake answers it with those bytes instead
  (an ErrorResponse without a ``C`` field after login, for example).

``ssl_reply``: the answer to an SSLRequest (None: ``N``); bytes after it go out in the same write.

Test code only: it shares nothing with pgcorral's protocol package on purpose.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

Script = Callable[["FakeConn"], None]

SSL_REQUEST_CODE = 80877103
PROTOCOL_3 = 196608


def message(type_: bytes, body: bytes) -> bytes:
    return type_ + struct.pack("!i", len(body) + 4) + body


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!i", code) + data)


def sasl_offer(*mechanisms: str) -> bytes:
    return auth(10, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def error_body(**fields: str) -> bytes:
    """An ErrorResponse body from ``S="FATAL", C="28000", M="..."`` style fields."""
    return b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def login_ok() -> bytes:
    """What a trust login ends with: AuthenticationOk, a few ParameterStatus, BackendKeyData,
    ReadyForQuery."""
    return (auth(0) + parameter_status("server_version", "15.0")
            + parameter_status("client_encoding", "UTF8")
            + parameter_status("server_encoding", "UTF8")
            + parameter_status("DateStyle", "ISO, MDY")
            + parameter_status("integer_datetimes", "on")
            + parameter_status("standard_conforming_strings", "on")
            + message(b"K", struct.pack("!ii", 4242, 1234)) + ready())


class FakeConn:
    """One connection from pgcorral, as a script sees it."""

    def __init__(self, sock: socket.socket, startup: dict[str, str]) -> None:
        self.sock = sock
        self.startup = startup
        self.received: list[tuple[bytes, bytes]] = []  # the typed messages pgcorral sent

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[bytes, bytes] | None:
        """pgcorral's next typed message, or None when it closed the connection."""
        header = self._exact(5)
        if header is None:
            return None
        (length,) = struct.unpack("!i", header[1:])
        body = self._exact(length - 4)
        if body is None:
            return None
        self.received.append((header[:1], body))
        return header[:1], body

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Read until pgcorral closes (True) or ``timeout`` passes (False)."""
        self.sock.settimeout(timeout)
        try:
            while self.read() is not None:
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True

    def _exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data


class FakeServer:
    def __init__(self, upstream: tuple[str, int] | None = None,
                 scripts: dict[str, Script] | None = None,
                 replies: dict[bytes, bytes] | None = None,
                 ssl_reply: bytes | None = None) -> None:
        self.upstream = upstream
        self.scripts = scripts or {}
        self.replies = replies or {}
        self.ssl_reply = ssl_reply
        self.played: list[FakeConn] = []  # connections handed to a script, in order
        self.errors: list[BaseException] = []  # exceptions raised by scripts
        self.finished = threading.Event()  # set each time a script returns
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._track(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _startup(self, sock: socket.socket) -> tuple[bytes, dict[str, str]] | None:
        conn = FakeConn(sock, {})
        while True:
            head = conn._exact(8)
            if head is None:
                return None
            length, code = struct.unpack("!ii", head)
            if code == SSL_REQUEST_CODE and length == 8:
                sock.sendall(self.ssl_reply if self.ssl_reply is not None else b"N")
                if self.ssl_reply is not None and self.ssl_reply != b"N":
                    return None  # no TLS here: the test looks at what pgcorral did
                continue
            rest = conn._exact(length - 8)
            if rest is None:
                return None
            strings = rest.rstrip(b"\0").split(b"\0")
            params = {strings[i].decode(): strings[i + 1].decode("utf-8", "replace")
                      for i in range(0, len(strings) - 1, 2)}
            return head + rest, params

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                got = self._startup(sock)
            except OSError:
                return
            if got is None:
                return
            packet, params = got
            script = self.scripts.get(params.get("user", ""))
            if script is None:
                self._relay(sock, packet)
                return
            conn = FakeConn(sock, params)
            self.played.append(conn)
            try:
                script(conn)
            except OSError:
                pass  # pgcorral hung up on the script: what most tests expect
            except BaseException as exc:  # a broken script: the test reports it
                self.errors.append(exc)
            finally:
                self.finished.set()

    def _relay(self, sock: socket.socket, packet: bytes) -> None:
        assert self.upstream is not None, "no upstream to relay a connection to"
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            return
        self._track(up)
        up.settimeout(None)
        sock.settimeout(None)
        write_lock = threading.Lock()
        with up:
            up.sendall(packet)
            back = threading.Thread(target=self._pump_back, args=(up, sock, write_lock),
                                    daemon=True)
            back.start()
            self._pump_forward(sock, up, write_lock)
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_RDWR)
            back.join(10)

    @staticmethod
    def _pump_back(up: socket.socket, sock: socket.socket, write_lock: threading.Lock) -> None:
        """PostgreSQL to pgcorral, as it comes."""
        try:
            while data := up.recv(65536):
                with write_lock:
                    sock.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def _pump_forward(self, sock: socket.socket, up: socket.socket,
                      write_lock: threading.Lock) -> None:
        """pgcorral to PostgreSQL, message by message: a Query holding a key of ``replies`` is
        answered here instead."""
        conn = FakeConn(sock, {})
        while True:
            try:
                got = conn.read()
            except OSError:
                return
            if got is None:
                return
            type_, body = got
            conn.received.clear()
            canned = next((reply for key, reply in self.replies.items()
                           if type_ == b"Q" and key in body), None)
            try:
                if canned is not None:
                    with write_lock:
                        sock.sendall(canned)
                else:
                    up.sendall(message(type_, body))
            except OSError:
                return
