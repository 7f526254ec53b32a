"""protocol.readonly: which first Query starts a read-only transaction."""

from __future__ import annotations

import pytest

from pgcorral.protocol.readonly import session_attrs, starts_read_only


@pytest.mark.parametrize("text", [
    b"BEGIN READ ONLY", b"begin read only;", b"  BEGIN TRANSACTION READ ONLY",
    b"START TRANSACTION READ ONLY", b"start transaction isolation level repeatable read, "
    b"read only", b"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;",
    b"BEGIN; SET TRANSACTION READ ONLY", b"BEGIN;SET TRANSACTION READ ONLY; SELECT 1",
    b"BEGIN WORK READ\n ONLY", b"BEGIN READ WRITE READ ONLY",
])
def test_read_only_starts(text: bytes) -> None:
    assert starts_read_only(text)


@pytest.mark.parametrize("text", [
    b"", b"BEGIN", b"BEGIN READ WRITE", b"SELECT 1", b"BEGIN; SELECT 'read only'",
    b"BEGIN READ ONLY READ WRITE", b"SET TRANSACTION READ ONLY", b"beginning read only",
    b"/* x */ BEGIN READ ONLY", b"START TRANSACTION", b"BEGIN; INSERT INTO t VALUES (1)",
    b"BEGIN; SET TRANSACTION READ WRITE",
])
def test_not_read_only(text: bytes) -> None:
    assert not starts_read_only(text)


def test_session_attrs() -> None:
    assert session_attrs("read-only") is True
    assert session_attrs(" Standby ") is True
    assert session_attrs("prefer-standby") is True
    assert session_attrs("read-write") is False
    assert session_attrs("any") is False
    assert session_attrs("primary") is False
    assert session_attrs("bogus") is None
