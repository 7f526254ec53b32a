"""Several pgcorral processes on one port (``so_reuseport``): rolling restarts without downtime.

A new pgcorral (new version, new configuration) starts on the port of the running one; the
kernel spreads new connections over both (SO_REUSEPORT). The old one is told ``shutdown
wait_for_clients`` (or ``SHUTDOWN WAIT_FOR_CLIENTS`` in the admin console): it closes its
listeners at once, so new clients reach only the new one, lets its clients finish in their own
time (none is told to leave), and exits when the last has gone.

During the overlap a client's cancel request (a new connection) may land on the other process.
Each process therefore listens on a peer socket, ``<unix_socket_dir>/.s.PGCORRAL.<port>.<pid>``
(this module), and forwards a CancelRequest whose key none of its own clients has to every
other peer socket of the same port there. The receiving process looks the key up among its own
clients only (it never forwards a peer's request again), in constant time like any cancel, so a
key matches in exactly one process. The unix socket of the port itself (``.s.PGSQL.<port>``) is
taken over by the newest process; the old one leaves the path alone when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import struct
from collections.abc import Callable
from typing import Final

log: Final = logging.getLogger("pgcorral.peers")

#: CancelRequest: length 16, code 80877102, pid, secret
_CANCEL: Final = struct.Struct("!iiI4s")
_CANCEL_CODE: Final = 80877102
PEER_TIMEOUT: Final = 2.0


def peer_path(unix_socket_dir: str, port: int, pid: int | None = None) -> str:
    return os.path.join(unix_socket_dir, f".s.PGCORRAL.{port}.{pid or os.getpid()}")


def other_peers(unix_socket_dir: str, port: int) -> list[str]:
    """The peer sockets of other live processes on ``port`` (stale ones are removed)."""
    own = peer_path(unix_socket_dir, port)
    found = []
    for path in glob.glob(os.path.join(glob.escape(unix_socket_dir), f".s.PGCORRAL.{port}.*")):
        if path == own:
            continue
        try:
            pid = int(path.rsplit(".", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone
            continue
        except PermissionError:
            pass  # alive, another user's
        found.append(path)
    return found


async def send_to_peers(unix_socket_dir: str, port: int, pid: int, secret: bytes) -> int:
    """Forward a CancelRequest to every other process on the port; how many got it."""
    request = _CANCEL.pack(16, _CANCEL_CODE, pid & 0xFFFFFFFF, secret)
    sent = 0
    for path in other_peers(unix_socket_dir, port):
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                _, writer = await asyncio.open_unix_connection(path)
                writer.write(request)
                await writer.drain()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            sent += 1
        except (OSError, TimeoutError) as exc:
            log.info("could not forward a cancel request to peer %s: %s", path, exc)
    if sent:
        log.info("cancel request for pid %d matched no client here; forwarded to %d other "
                 "pgcorral process(es) on port %d", pid, sent, port)
    return sent


class PeerListener:
    """This process's peer socket: CancelRequests forwarded by the other processes on the
    port go to ``on_cancel(pid, secret)``."""

    def __init__(self, unix_socket_dir: str, port: int,
                 on_cancel: Callable[[int, bytes], None]) -> None:
        self.path = peer_path(unix_socket_dir, port)
        self._on_cancel = on_cancel
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead process of our pid's
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o700)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                data = await reader.readexactly(_CANCEL.size)
            length, code, pid, secret = _CANCEL.unpack(data)
            if length == 16 and code == _CANCEL_CODE:
                signed = pid - (1 << 32) if pid >= 1 << 31 else pid
                self._on_cancel(signed, secret)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def take_over_unix_socket(path: str) -> None:
    """``so_reuseport``: the port's unix socket path, in use by a running pgcorral, becomes
    ours (the old process keeps its clients; new ones connect to us)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        log.info("unix socket %s taken over from the pgcorral already on this port "
                 "(so_reuseport)", path)


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the unix socket ``path`` unless another process has taken it over since."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


__all__ = ["PeerListener", "other_peers", "peer_path", "send_to_peers",
           "take_over_unix_socket", "unlink_if_ours"]
