"""Is this the start of a read-only transaction? (issue 13: reads routed to replicas)

In the transaction pipeline a transaction goes to a replica when its first Query declares it
read-only, in one of the spellings drivers send:

- ``BEGIN READ ONLY``, ``BEGIN TRANSACTION ISOLATION LEVEL ... READ ONLY``,
  ``START TRANSACTION READ ONLY`` (psycopg with ``read_only = True``, asyncpg's
  ``transaction(readonly=True)``, SQLAlchemy's ``postgresql_readonly``);
- ``BEGIN; SET TRANSACTION READ ONLY`` sent as one Query.

Only the first statements are read, up to ``LOOK`` bytes; comments before them, a BEGIN sent
alone and a SET TRANSACTION sent in a later message are not recognised (the transaction then
runs on the primary, which is correct, only not balanced). Pure bytes in, bool out.
"""

from __future__ import annotations

import re

#: how much of a Query's text is looked at
LOOK = 256

_BEGIN = re.compile(
    rb"\s*(?:begin(?:\s+(?:work|transaction))?|start\s+transaction)\b([^;]*)"
    rb"(?:;\s*set\s+transaction\b([^;]*))?", re.IGNORECASE)
_READ_ONLY = re.compile(rb"\bread\s+only\b", re.IGNORECASE)
_READ_WRITE = re.compile(rb"\bread\s+write\b", re.IGNORECASE)


def starts_read_only(text: bytes) -> bool:
    """Does the Query text ``text`` (without its NUL) begin a read-only transaction?"""
    if not text:
        return False
    first = text[0]
    # the cheap test first: every spelling starts with b/B/s/S or white space
    if first not in b"bBsS \t\r\n":
        return False
    match = _BEGIN.match(text, 0, LOOK)
    if match is None:
        return False
    modes = match.group(1) or b""
    more = match.group(2)
    if more is not None:
        modes = modes + b" " + more
    # the last access mode written wins, as in PostgreSQL
    ro = [m.start() for m in _READ_ONLY.finditer(modes)]
    rw = [m.start() for m in _READ_WRITE.finditer(modes)]
    if not ro:
        return False
    return not rw or max(ro) > max(rw)


def session_attrs(value: str) -> bool | None:
    """libpq's ``target_session_attrs`` values, as pgcorral routes them: True for a replica
    (read-only, standby, prefer-standby), False for the primary (any, read-write, primary),
    None for a value libpq does not know."""
    value = value.strip().lower()
    if value in ("read-only", "standby", "prefer-standby"):
        return True
    if value in ("any", "read-write", "primary"):
        return False
    return None
