"""What a server connection keeps between clients: the greeting built from its parameters, the
reset request, and the reset checked in callbacks against the bytes of the last checked reset.

The connection runs over a fake transport inside a real event loop; PostgreSQL's replies are
built with the message builders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pgcorral.net.server import ServerConnection, plan_reset
from pgcorral.pool.pool import Slot
from pgcorral.protocol import messages as m

PARAMS = {"application_name": "", "DateStyle": "ISO, MDY", "TimeZone": "UTC"}
REQUESTS = [("application_name", "app")]


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def can_write_eof(self) -> bool:
        return False

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _server() -> tuple[ServerConnection, FakeTransport]:
    lost: list[ServerConnection] = []
    server = ServerConnection(Slot(1, ("db", "user"), None, 0.0), lost.append)
    transport = FakeTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    server.params = dict(PARAMS, application_name="app")  # what the last client asked for
    server.baseline = dict(PARAMS)
    server.status = ord("I")
    server.requests = list(REQUESTS)
    return server, transport


def _message(type_: bytes, body: bytes = b"") -> bytes:
    return m.message(type_, body)


def _reset_replies(notice: bool = False) -> bytes:
    """PostgreSQL's answer to DISCARD ALL plus the re-applied application_name."""
    ready = m.ready_for_query(b"I")
    discard = _message(b"C", b"DISCARD ALL\0") + m.parameter_status("application_name", "")
    if notice:
        discard += m.notice_response("01000", "something to say")
    return (discard + ready + _message(b"1") + _message(b"2")
            + _message(b"D", b"\0\1\0\0\0\3app") + _message(b"C", b"SELECT 1\0")
            + m.parameter_status("application_name", "app") + ready)


def _run(test: Callable[[], Any]) -> None:
    async def main() -> None:
        await test()

    asyncio.run(main())


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_cached_greeting_equals_a_fresh_one_and_follows_the_parameters() -> None:
    async def test() -> None:
        server, _ = _server()
        server._set_params(dict(PARAMS))
        fresh = m.authentication_ok() + b"".join(
            m.parameter_status(k, v) for k, v in PARAMS.items())
        assert server.greeting() == fresh
        assert server.greeting() is server.greeting()  # built once
        server._set_params({**PARAMS, "TimeZone": "Europe/Paris"})
        assert server.greeting() == m.authentication_ok() + b"".join(
            m.parameter_status(k, v) for k, v in server.params.items())
        assert b"Europe/Paris" in server.greeting()

    _run(test)


def test_reset_plan_is_the_request_pgcorral_always_sent() -> None:
    plan = plan_reset(False, "DISCARD ALL", REQUESTS)
    assert plan.payload == m.query("DISCARD ALL") + m.set_config_statement(REQUESTS)
    assert plan.expected_ready == 2
    assert plan.tags == ["DISCARD ALL", "SELECT 1"]
    rollback = plan_reset(True, "discard all;", [])
    assert rollback.payload == m.query("ROLLBACK") + m.query("discard all;")
    assert rollback.tags == ["ROLLBACK", "DISCARD ALL;"]
    other = plan_reset(False, "SELECT pg_advisory_unlock_all()", REQUESTS)
    assert other.payload == m.query("SELECT pg_advisory_unlock_all()")
    assert other.tags is None  # only DISCARD ALL's tags are checked


def test_the_second_identical_reset_is_checked_in_callbacks() -> None:
    async def test() -> None:
        server, transport = _server()
        released: list[bool] = []

        def release(conn: ServerConnection, clean: bool) -> None:
            assert conn is server
            released.append(clean)

        payload = plan_reset(False, "DISCARD ALL", REQUESTS).payload
        replies = _reset_replies()
        # the first reset is checked message by message (a task)
        server.reset_then("DISCARD ALL", 10, release)
        await _settle()
        assert transport.out[-1] == payload
        server.data_received(replies)
        await _settle()
        assert released == [True]
        assert server.params["application_name"] == "app"
        # the same request in the same state: sent at once, compared as the bytes come
        server.reset_then("DISCARD ALL", 10, release)
        assert transport.out[-1] == payload
        server.data_received(replies[:7])
        assert released == [True]
        server.data_received(replies[7:])
        assert released == [True, True]  # no task switch needed
        assert server.status == ord("I")
        assert server._known_replies is not None

    _run(test)


def test_other_bytes_than_last_time_are_checked_message_by_message() -> None:
    async def test() -> None:
        server, _ = _server()
        released: list[bool] = []
        server.reset_then("DISCARD ALL", 10, lambda _, clean: released.append(clean))
        await _settle()
        server.data_received(_reset_replies())
        await _settle()
        # now a notice comes along: a valid reply, but not the known bytes
        server.reset_then("DISCARD ALL", 10, lambda _, clean: released.append(clean))
        server.data_received(_reset_replies(notice=True))
        assert released == [True]
        await _settle()
        assert released == [True, True]
        # and an error: not reusable
        server.reset_then("DISCARD ALL", 10, lambda _, clean: released.append(clean))
        server.data_received(m.error_response("57P01", "terminating") + m.ready_for_query(b"I")
                             + m.ready_for_query(b"I"))
        await _settle()
        assert released == [True, True, False]

    _run(test)


def test_a_reset_in_callbacks_fails_when_the_connection_is_lost_or_times_out() -> None:
    async def test() -> None:
        server, _ = _server()
        released: list[bool] = []
        server.reset_then("DISCARD ALL", 10, lambda _, clean: released.append(clean))
        await _settle()
        server.data_received(_reset_replies())
        await _settle()
        server.reset_then("DISCARD ALL", 10, lambda _, clean: released.append(clean))
        server.data_received(_reset_replies()[:3])
        server.connection_lost(None)
        assert released == [True, False]

        server, transport = _server()
        released.clear()
        server._known_replies = (plan_reset(False, "DISCARD ALL", REQUESTS).payload,
                                 server.params, _reset_replies())
        server.reset_then("DISCARD ALL", 0.01, lambda _, clean: released.append(clean))
        assert released == []
        await asyncio.sleep(0.05)  # the timer aborts the connection
        assert transport.closed and released == [False]

    _run(test)
