"""Leaving a SO_REUSEPORT port without resetting the connections queued on it (rolling restart).

During a rolling restart two pgcorrals listen on one port with SO_REUSEPORT, and the kernel
spreads new connections over their sockets by a hash. When the old one closes its listeners,
the connections already in its accept queue (handshake done, not yet accepted) are reset: under
a steady stream of new connections a client sees one failed connect.

So the old one hands the port over first:

1. ``steer_away``: a classic BPF program attached to each reuseport group (one per address)
   makes the kernel give every new connection to the socket at index ``ours`` of the group,
   where ``ours`` is the number of this process's sockets in it. The group keeps its sockets
   in the order they joined (a socket that leaves is replaced by the last one), so after a
   restart the old process's sockets come first and index ``ours`` is the new process's first
   socket. With no other process on the port the index is past the end and the kernel falls
   back to its hash: nothing changes.
2. ``drained``: the old process goes on accepting until its accept queues are empty (the
   queue length of a listener is ``tcpi_unacked`` of TCP_INFO), bounded by a timeout.
3. ``detach``: the program is taken off the group, then the listeners close at once: the
   window in which a new connection can still land on a closing socket is that of two system
   calls, instead of the whole accept queue.

Linux 5.3+ (SO_DETACH_REUSEPORT_BPF). Where the kernel refuses, the listeners just close, as
before (one log line). Each step is a system call on a listening socket; no asyncio here but
the polling wait.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import time

log = logging.getLogger("pgcorral.main")

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant
_TCP_INFO_LEN = 104
_TCPI_UNACKED = 24  # offset of tcpi_unacked (a listener: its accept queue length)
#: how often the accept queues are looked at while draining, and for how long at most
POLL = 0.005
DRAIN_TIMEOUT = 2.0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _reuseport_tcp(socks: list[socket.socket]) -> list[socket.socket]:
    return [s for s in socks if s.family in (socket.AF_INET, socket.AF_INET6)
            and s.type == socket.SOCK_STREAM
            and s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)]


def steer_away(socks: list[socket.socket]) -> list[socket.socket]:
    """Send new connections of each reuseport group of ``socks`` (this process's listening
    sockets, all of them) to the first socket another process added to the group. The
    sockets the program went on, one per group, for ``detach``; [] if none."""
    groups: dict[tuple[int, str], list[socket.socket]] = {}
    for sock in _reuseport_tcp(socks):
        name = sock.getsockname()
        groups.setdefault((sock.family, f"{name[0]}:{name[1]}"), []).append(sock)
    steered = []
    for group in groups.values():
        program = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, len(group)))
        fprog = _SockFprog(1, program)
        try:
            group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                                ctypes.string_at(ctypes.addressof(fprog),
                                                 ctypes.sizeof(fprog)))
        except OSError as exc:
            log.warning("rolling restart: could not steer new connections to the other "
                        "pgcorral on %s (%s); connections queued at close may be reset",
                        group[0].getsockname(), exc)
            continue
        steered.append(group[0])
    return steered


def queued(sock: socket.socket) -> int:
    """Connections in a TCP listener's accept queue."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


async def drained(socks: list[socket.socket], timeout: float = DRAIN_TIMEOUT) -> bool:
    """Wait until the accept queues of ``socks`` (TCP listeners being accepted from) are
    empty twice in a row, a poll apart (a handshake under way joins the queue in between).
    False if ``timeout`` passed first."""
    tcp = _reuseport_tcp(socks)
    deadline = time.monotonic() + timeout
    empty = 0
    while empty < 2:
        try:
            empty = empty + 1 if not any(queued(s) for s in tcp) else 0
        except OSError:
            return False
        if empty < 2:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL)
    return True


def detach(steered: list[socket.socket]) -> None:
    """Take the program off the groups (their hash spreads connections again): call it right
    before closing the sockets, while they are still in their groups."""
    for sock in steered:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError as exc:
            log.warning("rolling restart: could not detach the steering program from %s: %s",
                        sock.getsockname(), exc)


def listening_sockets(servers: list[asyncio.AbstractServer]) -> list[socket.socket]:
    """Duplicates of the listening sockets of asyncio servers (socket options act on the
    socket; closing a duplicate leaves it open)."""
    socks = []
    for server in servers:
        for sock in getattr(server, "sockets", None) or ():  # (asyncio's and uvloop's have it)
            socks.append(socket.fromfd(sock.fileno(), sock.family, sock.type))
    return socks
