"""The management wire protocol: frames, command names and aliases, the SCRAM exchange fields.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
object. The client sends ``{"command": NAME, "args": [...]}``; the daemon answers one object
``{"outcome": "ok" | "error", "command": NAME, ...}`` (an error has ``reason``). Over remote TCP the
first frames are a SCRAM-SHA-256 exchange (see ``docs/CLI.md``) whose ``sasl`` fields carry the
base64 of the bodies PostgreSQL's SASL messages would carry.

Shared by the daemon and the CLI; no I/O here.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from typing import Any

HEADER = struct.Struct("!I")
#: Largest request the daemon accepts (it reads requests before authentication).
MAX_FRAME = 1 << 20
#: Largest answer: ``stats`` lists every client (about 500 bytes each; 10,000 clients ~ 5 MiB).
MAX_ANSWER = 256 << 20

#: Every command the daemon knows (first word), pgagroal's current names.
COMMANDS = ("ping", "status", "stats", "flush", "enable", "disable", "pause", "resume",
            "kill-client", "shutdown", "switch-to", "clear", "conf")
#: pgagroal 0.5.0 / 1.6 names: alias -> (command, arguments put before the user's).
ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "is-alive": ("ping", ()),
    "details": ("status", ("details",)),
    "flush-idle": ("flush", ("idle",)),
    "flush-gracefully": ("flush", ("gracefully",)),
    "flush-all": ("flush", ("all",)),
    "gracefully": ("shutdown", ("gracefully",)),
    "stop": ("shutdown", ("immediate",)),
    "cancel-shutdown": ("shutdown", ("cancel",)),
    "reload": ("conf", ("reload",)),
    "config-get": ("conf", ("get",)),
    "config-set": ("conf", ("set",)),
    "reset": ("clear", ("prometheus",)),
    "reset-server": ("clear", ("server",)),
}


class FrameError(ValueError):
    """A frame that is too long, not JSON, or not a JSON object."""


def resolve(command: str, args: list[str]) -> tuple[str, list[str]]:
    """The canonical command and arguments for ``command`` (an alias is expanded)."""
    alias = ALIASES.get(command)
    if alias is None:
        return command, list(args)
    return alias[0], [*alias[1], *args]


def encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    limit = MAX_ANSWER if "outcome" in obj else MAX_FRAME
    if len(payload) > limit:
        raise FrameError(f"frame of {len(payload)} bytes is over {limit}")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over {limit}")
    return int(length)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"not a JSON frame: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("a frame must hold a JSON object")
    return obj


def socket_path(unix_socket_dir: str, port: int) -> str:
    """The daemon's local management socket."""
    return os.path.join(unix_socket_dir, f".s.pgcorral.{port}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise FrameError("sasl must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise FrameError("sasl is not valid base64") from None


def message_body(messages: bytes) -> bytes:
    """The body of the first protocol message in ``messages`` (type byte and length removed)."""
    (length,) = struct.unpack_from("!i", messages, 1)
    return messages[5:1 + length]


def ok(command: str, **fields: Any) -> dict[str, Any]:
    return {"outcome": "ok", "command": command, **fields}


def error(command: str, reason: str, **fields: Any) -> dict[str, Any]:
    return {"outcome": "error", "command": command, "reason": reason, **fields}
