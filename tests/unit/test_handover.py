"""supervisor.handover on real loopback sockets: two SO_REUSEPORT listeners on one port stand for
the old and the new pgcorral of a rolling restart."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from pgcorral.supervisor import handover


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    old = _listener()
    new = _listener(old.getsockname()[1])
    yield old, new
    old.close()
    new.close()


def _connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def _wait_queued(socks: list[socket.socket], total: int) -> None:
    """The handshakes are done by the kernel at once on loopback; wait for the count anyway."""
    for _ in range(1000):
        if sum(handover.queued(s) for s in socks) == total:
            return
        time.sleep(0.001)
    raise AssertionError([handover.queued(s) for s in socks])


def test_without_steering_the_kernel_spreads_connections(
        pair: tuple[socket.socket, socket.socket]) -> None:
    old, new = pair
    clients = _connect(old.getsockname()[1], 40)
    _wait_queued([old, new], 40)
    assert handover.queued(old) > 0 and handover.queued(new) > 0  # 2**-39 to fail by chance
    for c in clients:
        c.close()


def test_steered_connections_all_go_to_the_other_process(
        pair: tuple[socket.socket, socket.socket]) -> None:
    old, new = pair
    steered = handover.steer_away([old])
    assert steered == [old]
    clients = _connect(old.getsockname()[1], 40)
    _wait_queued([old, new], 40)
    assert handover.queued(old) == 0 and handover.queued(new) == 40
    handover.detach(steered)  # the hash spreads again
    clients += _connect(old.getsockname()[1], 40)
    _wait_queued([old, new], 80)
    assert handover.queued(old) > 0
    for c in clients:
        c.close()


def test_alone_on_the_port_steering_changes_nothing() -> None:
    only = _listener()
    try:
        steered = handover.steer_away([only])  # index 1 is past the end: the hash decides
        clients = _connect(only.getsockname()[1], 5)
        _wait_queued([only], 5)
        handover.detach(steered)
        for c in clients:
            c.close()
    finally:
        only.close()


def test_drained_waits_for_the_accept_queue_to_empty(
        pair: tuple[socket.socket, socket.socket]) -> None:
    old, _new = pair
    clients: list[socket.socket] = []
    while handover.queued(old) == 0:  # some land on the old one
        clients += _connect(old.getsockname()[1], 1)
    assert asyncio.run(handover.drained([old], timeout=0.05)) is False  # nobody accepts

    async def accept_then_drained() -> bool:
        old.setblocking(False)
        accepted = []

        def take() -> None:
            while True:
                try:
                    accepted.append(old.accept()[0])
                except BlockingIOError:
                    return

        asyncio.get_running_loop().add_reader(old.fileno(), take)
        try:
            return await handover.drained([old], timeout=5)
        finally:
            asyncio.get_running_loop().remove_reader(old.fileno())
            for a in accepted:
                a.close()

    assert asyncio.run(accept_then_drained()) is True
    assert handover.queued(old) == 0
    for c in clients:
        c.close()


def test_sockets_of_other_kinds_are_left_alone() -> None:
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEPORT
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    try:
        assert handover.steer_away([plain]) == []
    finally:
        plain.close()
