"""The cancel-key table of one worker: the BackendKeyData pgcorral handed to each client.

Session pooling: the key is the real backend pid and a pooler-issued secret. Transaction
pooling: a virtual pid (no Linux process has it) and a secret; a cancel for it goes to the
backend that runs the client's transaction at that moment. Each worker issues virtual pids from
its own range, so a pid names one client across all workers (real pids are unique anyway), and
a CancelRequest that reaches another worker is handed to every worker to look up.

Lookups compare the secret in constant time, also when the pid is unknown. Real backend secrets
never leave pgcorral. A key is dropped when its client leaves.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import Generic, TypeVar

#: Virtual pids start above Linux's largest pid_max (2**22).
VIRTUAL_PID_BASE = 1 << 22
#: Virtual pids per worker (worker i issues from BASE + i * SPAN); 1024 workers fit below 2**31.
VIRTUAL_PID_SPAN = 1 << 21
_UNKNOWN = b"\0\0\0\0"

C = TypeVar("C")


class CancelKeys(Generic[C]):
    def __init__(self, worker: int = 0) -> None:
        self._keys: dict[int, tuple[bytes, C]] = {}  # pid -> (secret bytes, client)
        self._first = VIRTUAL_PID_BASE + worker * VIRTUAL_PID_SPAN
        self._last = self._first + VIRTUAL_PID_SPAN - 1
        self._next = self._first

    def __len__(self) -> int:
        return len(self._keys)

    def issue(self, client: C, pid: int) -> int:
        """A pooler-issued secret (signed 32 bits) for the key ``(pid, secret)``."""
        secret = secrets.randbits(32) - (1 << 31)
        self._keys[pid] = (struct.pack("!i", secret), client)
        return secret

    def issue_virtual(self, client: C) -> tuple[int, int]:
        """A virtual pid unique among this worker's live clients, and its secret."""
        pid = self._next
        while pid in self._keys:
            pid = pid + 1 if pid < self._last else self._first
        self._next = pid + 1 if pid < self._last else self._first
        return pid, self.issue(client, pid)

    def drop(self, client: C, pid: int) -> None:
        entry = self._keys.get(pid)
        if entry is not None and entry[1] is client:
            del self._keys[pid]

    def match(self, pid: int, secret: bytes) -> C | None:
        """The client whose key is ``(pid, secret)``, compared in constant time; else None."""
        entry = self._keys.get(pid)
        matches = hmac.compare_digest(secret, entry[0] if entry is not None else _UNKNOWN)
        return entry[1] if entry is not None and matches else None
