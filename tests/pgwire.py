"""A tiny raw protocol-v3 client for tests that must see exact bytes and SQLSTATEs.

libpq-based drivers do not report the SQLSTATE of a failed connection attempt; this does. It is
test code only and shares nothing with pgcorral's own protocol package on purpose: the tests must
not trust the code they test.
"""

from __future__ import annotations

import socket
import struct


def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!i", version)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One typed message, or None when the peer closed the connection."""
    header = _read_exact(sock, 5)
    if header is None:
        return None
    (length,) = struct.unpack("!i", header[1:])
    body = _read_exact(sock, length - 4)
    if body is None:
        return None
    return header[:1], body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.rstrip(b"\0").split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def login(sock: socket.socket, params: dict[str, str]) -> dict[str, str] | None:
    """Send a StartupMessage on ``sock`` (plain or TLS); the fields of the ErrorResponse
    received before ReadyForQuery, or None if the login succeeded."""
    sock.sendall(startup_packet(params))
    while True:
        message = read_message(sock)
        if message is None:
            raise ConnectionError("connection closed without an error or ReadyForQuery")
        type_, body = message
        if type_ == b"E":
            return error_fields(body)
        if type_ == b"Z":
            return None
        if type_ == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise AssertionError("the server asked for a password")


def connect_error(host: str, port: int, params: dict[str, str],
                  timeout: float = 30.0) -> dict[str, str] | None:
    """``login`` on a new plain connection."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return login(sock, params)
