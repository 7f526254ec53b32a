"""The untyped packets a client may send first: StartupMessage, SSLRequest, GSSENCRequest,
CancelRequest.

``StartupReader`` is fed bytes as they arrive and returns one packet at a time. It applies
PostgreSQL's own guards: a length outside 8..10000 closes the connection silently without
allocating anything, bytes pipelined after an SSLRequest or GSSENCRequest are refused (the
CVE-2021-23214 / CVE-2021-3935 class), protocol 3.x with x > 0 and ``_pq_.`` options are
accepted and reported so that the caller answers NegotiateProtocolVersion.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pgcorral.errors import ClientProtocolError, StartupRejected
from pgcorral.protocol import codes

_I32x2 = struct.Struct("!ii")

#: Newest protocol minor version pgcorral speaks (3.0).
NEWEST_MINOR = 0
#: PostgreSQL's identifier limit: user and database names are cut to 63 bytes, as it does.
NAMEDATALEN = 64
#: PostgreSQL 18 allows cancel keys of up to 256 bytes (protocol 3.2).
MAX_CANCEL_KEY = 256


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class Startup:
    """A StartupMessage. ``params`` excludes ``_pq_.`` options, which are in ``unrecognized``."""

    major: int
    minor: int
    params: dict[str, str]
    unrecognized: tuple[str, ...] = field(default=())

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        return self.params.get("database") or self.params["user"]

    @property
    def needs_negotiation(self) -> bool:
        return self.minor > NEWEST_MINOR or bool(self.unrecognized)


Packet = SSLRequest | GSSENCRequest | CancelRequest | Startup


class StartupReader:
    """Frames the untyped packets of the startup phase."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Bytes received after the last packet returned (pipelined messages)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None when more bytes are needed.

        Raises ``ClientProtocolError`` (silent for framing errors, as PostgreSQL) or
        ``StartupRejected`` with the SQLSTATE PostgreSQL would use.
        """
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from("!i", buf, 0)
        if length < 8 or length > codes.MAX_STARTUP_PACKET_LENGTH:
            raise ClientProtocolError("invalid length of startup packet", silent=True)
        if len(buf) < length:
            return None
        body = bytes(buf[4:length])
        del buf[:length]
        (code,) = struct.unpack_from("!i", body, 0)
        if code in (codes.SSL_REQUEST_CODE, codes.GSSENC_REQUEST_CODE):
            return self._encryption_request(code, length)
        if code == codes.CANCEL_REQUEST_CODE:
            return _cancel_request(body)
        return _startup(code, body)

    def _encryption_request(self, code: int, length: int) -> Packet:
        if length != 8:
            raise ClientProtocolError("invalid length of startup packet", silent=True)
        if self._buf:
            which = "SSL" if code == codes.SSL_REQUEST_CODE else "GSSAPI encryption"
            raise ClientProtocolError(
                f"received unencrypted data after {which} request",
                sqlstate="08P01",
            )
        return SSLRequest() if code == codes.SSL_REQUEST_CODE else GSSENCRequest()


def _cancel_request(body: bytes) -> CancelRequest:
    # body: code(4) pid(4) key(4..256)
    if len(body) < 12 or len(body) > 8 + MAX_CANCEL_KEY:
        raise ClientProtocolError("invalid length of cancel request", silent=True)
    (pid,) = struct.unpack_from("!i", body, 4)
    return CancelRequest(pid=pid, secret=body[8:])


def _startup(code: int, body: bytes) -> Startup:
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise StartupRejected(
            f"unsupported frontend protocol {major}.{minor}: "
            f"server supports 3.0 to 3.{NEWEST_MINOR}",
            sqlstate="0A000",
        )
    payload = body[4:]
    if not payload.endswith(b"\0"):
        raise StartupRejected(
            "invalid startup packet layout: expected terminator as last byte",
            sqlstate="08P01",
        )
    pairs = payload[:-1]  # without the final terminator
    if pairs and not pairs.endswith(b"\0"):
        raise StartupRejected(
            "invalid startup packet layout: expected terminator as last byte",
            sqlstate="08P01",
        )
    strings = pairs[:-1].split(b"\0") if pairs else []
    if len(strings) % 2:
        raise StartupRejected(
            "invalid startup packet layout: expected terminator as last byte",
            sqlstate="08P01",
        )
    params: dict[str, str] = {}
    unrecognized: list[str] = []
    for i in range(0, len(strings), 2):
        name = strings[i].decode("utf-8", "surrogateescape")
        value = strings[i + 1].decode("utf-8", "surrogateescape")
        if not name:
            raise StartupRejected("invalid startup packet layout: empty parameter name")
        if name.startswith("_pq_."):
            unrecognized.append(name)
        else:
            params[name] = value
    for key in ("user", "database"):  # PostgreSQL cuts names to NAMEDATALEN - 1 bytes
        if key in params:
            raw = params[key].encode("utf-8", "surrogateescape")
            if len(raw) > NAMEDATALEN - 1:
                params[key] = raw[:NAMEDATALEN - 1].decode("utf-8", "surrogateescape")
    if not params.get("user"):
        raise StartupRejected(
            "no PostgreSQL user name specified in startup packet", sqlstate="28000"
        )
    return Startup(major, minor, params, tuple(unrecognized))


def parse_options(options: str) -> dict[str, str]:
    """Settings from the ``options`` startup parameter: ``-c name=value`` and ``--name=value``.

    Backslash escapes a space or a backslash, as in PostgreSQL's ``pg_split_opts``. Any other
    switch is refused with 08P01, since pgcorral cannot apply it to a pooled connection.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    in_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
            in_word = True
        elif ch in " \t\n\r\f\v":  # ASCII only, as pg_split_opts
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))

    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            assignment = words[i + 1]
            i += 2
        elif (word.startswith("-c") and len(word) > 2) or (word.startswith("--") and len(word) > 2):
            assignment = word[2:]
            i += 1
        else:
            raise StartupRejected(f"invalid command-line argument for server process: {word}")
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise StartupRejected(f"invalid command-line argument for server process: {word}")
        settings[name.replace("-", "_")] = value
    return settings
