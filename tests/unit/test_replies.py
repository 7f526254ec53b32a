"""Replies: following the server's answers to the requests pgcorral sends on its own behalf."""

from __future__ import annotations

import pytest

from pgcorral.errors import ServerProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol import messages as m
from pgcorral.protocol.framing import MessageReader
from pgcorral.protocol.replies import EXTENDED_ROW_REPLIES, UTILITY_REPLIES, Replies


def messages(*wires: bytes) -> list[tuple[int, bytes]]:
    reader = MessageReader()
    reader.feed(b"".join(wires))
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    assert len(reader) == 0
    return out


def command_complete(tag: str) -> bytes:
    return m.message(b"C", tag.encode() + b"\0")


# The server's answer to "ROLLBACK" then "DISCARD ALL" sent as two Query messages, outside a
# transaction: a warning, the tags, a ParameterStatus from the reset, two ReadyForQuery.
RESET_REPLY = messages(
    m.notice_response("25P01", "there is no transaction in progress", severity="WARNING"),
    command_complete("ROLLBACK"),
    m.ready_for_query(b"I"),
    command_complete("DISCARD ALL"),
    m.parameter_status("application_name", ""),
    m.ready_for_query(b"I"),
)


def test_normal_reset_reply() -> None:
    replies = Replies(expected_ready=2)
    done = [replies.feed(t, b) for t, b in RESET_REPLY]
    assert done == [False, False, False, False, False, True]
    assert replies.done
    assert replies.ready == 2
    assert replies.tags == ["ROLLBACK", "DISCARD ALL"]
    assert replies.params == {"application_name": ""}
    assert replies.status == codes.TX_IDLE
    assert replies.error is None


def test_initial_state() -> None:
    replies = Replies(expected_ready=1)
    assert not replies.done
    assert replies.status == -1
    assert (replies.tags, replies.params, replies.error) == ([], {}, None)
    assert Replies(expected_ready=0).done


def test_error_is_recorded_once_and_status_follows_the_last_ready() -> None:
    replies = Replies(expected_ready=2)
    stream = messages(
        m.error_response("42601", "syntax error", severity="ERROR"),
        m.ready_for_query(b"E"),
        m.error_response("25P02", "current transaction is aborted", severity="ERROR"),
        m.parameter_status("TimeZone", "UTC"),
        m.parameter_status("TimeZone", "Europe/Paris"),
        m.message(b"A", b"\0\0\0\x01chan\0payload\0"),
        m.message(b"I"),
        m.ready_for_query(b"T"),
    )
    results = [replies.feed(t, b) for t, b in stream]
    assert results[-1] is True
    assert results[:-1] == [False] * (len(stream) - 1)
    assert replies.error is not None
    assert replies.error["C"] == "42601"
    assert replies.error["M"] == "syntax error"
    assert replies.params == {"TimeZone": "Europe/Paris"}
    assert replies.status == codes.TX_IN_BLOCK
    assert replies.tags == []


@pytest.mark.parametrize(
    "wire",
    [
        m.message(b"D", b"\0\x01\0\0\0\x011"),  # DataRow
        m.message(b"T", b"\0\x01a\0" + b"\0" * 18),  # RowDescription
        m.message(b"G", b"\0\0\0"),  # CopyInResponse
        m.message(b"H", b"\0\0\0"),  # CopyOutResponse
        m.message(b"1"),  # ParseComplete
        m.message(b"R", b"\0\0\0\0"),  # Authentication
        m.message(b"\xff"),
    ],
    ids=["DataRow", "RowDescription", "CopyInResponse", "CopyOutResponse", "ParseComplete",
         "Authentication", "0xff"],
)
def test_unexpected_message_raises(wire: bytes) -> None:
    replies = Replies(expected_ready=2)
    replies.feed(*messages(command_complete("ROLLBACK"))[0])
    [(type_, body)] = messages(wire)
    with pytest.raises(ServerProtocolError) as info:
        replies.feed(type_, body)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("type_", "body"),
    [
        (codes.READY_FOR_QUERY, b""),
        (codes.READY_FOR_QUERY, b"II"),
        (codes.COMMAND_COMPLETE, b"ROLLBACK"),
        (codes.PARAMETER_STATUS, b"name\0"),
        (codes.PARAMETER_STATUS, b"a\0b\0c\0"),
        (codes.ERROR_RESPONSE, b"Mtext"),
        (codes.ERROR_RESPONSE, b""),
    ],
)
def test_malformed_reply_raises(type_: int, body: bytes) -> None:
    replies = Replies(expected_ready=1)
    with pytest.raises(ServerProtocolError) as info:
        replies.feed(type_, body)
    assert "malformed reply" in info.value.message
    assert replies.ready == 0


def test_extended_row_replies() -> None:
    """Parse/Bind/Execute/Sync of a one-row SELECT: ParseComplete, BindComplete, DataRow."""
    replies = Replies(expected_ready=1, allowed=EXTENDED_ROW_REPLIES)
    stream = messages(
        m.message(b"1"), m.message(b"2"), m.message(b"D", b"\0\x01\0\0\0\x01x"),
        m.parameter_status("search_path", "s"), command_complete("SELECT 1"),
        m.ready_for_query(b"I"),
    )
    assert [replies.feed(t, b) for t, b in stream] == [False] * 5 + [True]
    assert replies.tags == ["SELECT 1"]
    assert replies.params == {"search_path": "s"}
    with pytest.raises(ServerProtocolError):
        Replies(1, EXTENDED_ROW_REPLIES).feed(codes.ROW_DESCRIPTION, b"\0\0")


def test_allowed_sets() -> None:
    assert codes.DATA_ROW not in UTILITY_REPLIES
    assert codes.ROW_DESCRIPTION not in UTILITY_REPLIES
    assert codes.ROW_DESCRIPTION not in EXTENDED_ROW_REPLIES
    assert UTILITY_REPLIES < EXTENDED_ROW_REPLIES
