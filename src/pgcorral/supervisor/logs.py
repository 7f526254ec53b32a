"""Logging as pgagroal's keys describe it: log_type (console, file, syslog), log_level (fatal ..
debug5, trace), log_path (strftime patterns allowed), log_mode (append or create),
log_line_prefix (strftime), log_rotation_size and log_rotation_age.

pgcorral never logs a password or a secret at any level; trace only adds detail to the
protocol messages pgcorral itself handles.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time

from pgcorral.config import MainConfig

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    "fatal": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
    "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE,
}


class RotatingLog(logging.FileHandler):
    """A log file that starts anew when it passes ``max_bytes`` or ``max_age`` seconds (0 turns
    either off). The old file is kept as ``<name>.<YYYYmmdd-HHMMSS>``."""

    def __init__(self, pattern: str, *, mode: str, max_bytes: int, max_age: float) -> None:
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.opened_at = time.time()
        self.lost = 0  # records that could not be written (a full disk...)
        self.lost_noted = -1e9
        super().__init__(time.strftime(pattern), mode=mode, encoding="utf-8", delay=False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._due():
                self._rotate()
            super().emit(record)
        except Exception:  # logging must never take the pooler down
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be written (ENOSPC...) is dropped: no traceback per record
        (logging's default), one line on stderr a minute at most, with the count lost."""
        self.lost += 1
        now = time.monotonic()
        if now - self.lost_noted >= 60:
            self.lost_noted = now
            with contextlib.suppress(Exception):
                sys.stderr.write(f"pgcorral: cannot write the log {self.baseFilename}: "
                                 f"{sys.exc_info()[1]} ({self.lost} records lost so far)\n")
                sys.stderr.flush()

    def _due(self) -> bool:
        if self.max_age > 0 and time.time() - self.opened_at >= self.max_age:
            return True
        if self.max_bytes > 0 and self.stream is not None:
            return bool(self.stream.tell() >= self.max_bytes)
        return False

    def _rotate(self) -> None:
        self.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = f"{self.baseFilename}.{stamp}", 1
        while os.path.exists(target):
            target, n = f"{self.baseFilename}.{stamp}.{n}", n + 1
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, target)
        self.baseFilename = os.path.abspath(time.strftime(self.pattern))
        self.mode = "a"
        self.opened_at = time.time()
        self.stream = self._open()


def level_of(name: str) -> int:
    return _LEVELS.get(name, logging.DEBUG if name.startswith("debug") else logging.INFO)


def setup_logging(main: MainConfig) -> None:
    """Route every pgcorral logger to the configured place (replacing earlier handlers)."""
    handler: logging.Handler
    if main.log_type == "file":
        handler = RotatingLog(main.log_path, mode="w" if main.log_mode == "create" else "a",
                              max_bytes=main.log_rotation_size,
                              max_age=main.log_rotation_age)
    elif main.log_type == "syslog":
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname).1s %(name)s %(message)s",
        datefmt=main.log_line_prefix or None))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_of(main.log_level))
