"""Child processes: start and stop them by PID, their environment, log tails, one-line outputs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .common import log


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without libpq variables (PGHOST, PGPORT...) that could redirect us."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") or k.startswith("PGCORRAL_")}
    env.update(extra)
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:]) or "<the log is empty>"


class Processes:
    """Every long-running child we start, so cleanup can stop exactly those, by PID."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(list(args), **kw)
        self._procs.append((name, proc))
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        stop_process(proc, sig)
        self.forget(proc)

    def stop_all(self) -> None:
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                log(f"stopping {name} (pid {proc.pid})")
            stop_process(proc, signal.SIGTERM)
        self._procs.clear()


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Signal one process by its PID, wait, escalate to SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


PROCS = Processes()


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP handler: unwind like Ctrl-C, so that cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def first_line(cmd: Sequence[str], env: dict[str, str] | None = None) -> str | None:
    """The first line a command prints (e.g. --version), or None when it fails."""
    try:
        res = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=30, check=False,
            env=clean_env(**(env or {})),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    out = (res.stdout or res.stderr).strip()
    return out.splitlines()[0] if out else None
