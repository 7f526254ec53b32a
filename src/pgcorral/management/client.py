"""The blocking management client pgcorral-cli uses: connect (local unix socket, or remote TCP
with SCRAM-SHA-256 as an admin), send one request, read one answer.

Failures are ``ManagementError`` with a one-line reason, never a traceback.
"""

from __future__ import annotations

import socket
from typing import Any

from pgcorral.errors import PgCorralError
from pgcorral.management import protocol
from pgcorral.protocol.scram_client import ScramClient

#: Seconds to wait for the daemon to answer.
TIMEOUT = 30.0


class ManagementError(Exception):
    """Could not talk to the daemon; the message is a one-line reason."""


class ManagementClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def local(cls, path: str) -> ManagementClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ManagementError(f"pgcorral is not running (no management socket at {path})")
        except OSError as exc:
            sock.close()
            raise ManagementError(f"cannot connect to {path}: {exc.strerror or exc}")
        return cls(sock)

    @classmethod
    def remote(cls, host: str, port: int, user: str, password: str) -> ManagementClient:
        try:
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            raise ManagementError(f"pgcorral is not running (nothing listens on {host}:{port})")
        except OSError as exc:
            raise ManagementError(f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        client = cls(sock)
        try:
            client._authenticate(user, password)
        except BaseException:
            client.close()
            raise
        return client

    def _authenticate(self, user: str, password: str) -> None:
        scram = ScramClient.from_password(password)
        answer = self.call({"user": user, "sasl": protocol.b64(scram.initial())})
        if answer.get("outcome") != "continue":
            raise ManagementError(str(answer.get("reason", "authentication failed")))
        try:
            final = scram.handle_continue(protocol.unb64(answer.get("sasl")))
            answer = self.call({"sasl": protocol.b64(final)})
            if answer.get("outcome") != "ok":
                raise ManagementError(str(answer.get("reason", "authentication failed")))
            scram.handle_final(protocol.unb64(answer.get("sasl")))
        except (PgCorralError, protocol.FrameError) as exc:
            raise ManagementError(f"the server failed authentication: {exc}") from None

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one frame, read one frame."""
        try:
            self._sock.sendall(protocol.encode(request))
            header = self._read(protocol.HEADER.size)
            return protocol.decode(self._read(protocol.frame_length(header, protocol.MAX_ANSWER)))
        except protocol.FrameError as exc:
            raise ManagementError(f"bad answer from pgcorral: {exc}") from None
        except TimeoutError:
            raise ManagementError("pgcorral did not answer in time") from None
        except OSError as exc:
            raise ManagementError(f"connection to pgcorral failed: {exc.strerror or exc}")

    def command(self, name: str, args: list[str]) -> dict[str, Any]:
        return self.call({"command": name, "args": args})

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ManagementError("pgcorral closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self._sock.close()
