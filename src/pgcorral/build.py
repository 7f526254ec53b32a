"""Which implementation runs: the mypyc-compiled hot modules, or the pure-Python source.

The ``.py`` files are the one implementation. ``pip install .`` (setup.py) compiles the modules
named in ``COMPILED`` with mypyc when it can, and installs them beside the source; Python then
imports the compiled ``.so`` in place of the ``.py``. Without a C compiler (or with
``PGCORRAL_BUILD=pure``) the same package installs as pure Python. The daemon says which one
runs in one log line at startup, and ``pgcorral -V`` prints it.

This module is never compiled itself (it inspects the others) and imports nothing heavy.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

#: The packages setup.py hands to mypyc: the protocol core, the relay and login paths, the
#: pipelines and the pool. Config, security, management, supervisor and the CLIs run once per
#: start or per command and stay interpreted (as does this module). So does errors.py: its
#: exception classes carry their SQLSTATE as class attributes, which mypyc's native exception
#: classes do not give their instances (every ``exc.sqlstate`` failed), and errors are off the
#: hot path.
COMPILED = (
    "pgcorral/protocol",
    "pgcorral/net",
    "pgcorral/pipelines",
    "pgcorral/pool",
)

#: Modules whose form decides what ``kind()`` reports (one per compiled package).
_PROBES = (
    "pgcorral.protocol.framing",
    "pgcorral.net.endpoint",
    "pgcorral.pipelines.session",
    "pgcorral.pool.pool",
)

_EXTENSION_SUFFIXES = (".so", ".pyd")


@dataclass(frozen=True)
class BuildInfo:
    compiled: tuple[str, ...]  # probe modules loaded from a compiled extension
    pure: tuple[str, ...]  # probe modules loaded from .py source
    stale: tuple[str, ...]  # compiled, but the .py beside it is newer (a source checkout)

    @property
    def kind(self) -> str:
        if not self.compiled:
            return "pure Python"
        if self.pure:
            return "partly compiled with mypyc; pure Python: " + ", ".join(self.pure)
        return "compiled with mypyc"

    def describe(self) -> str:
        text = self.kind
        if self.stale:
            text += "; STALE compiled modules (rebuild with `make build`): " + ", ".join(
                self.stale
            )
        return text


def _is_extension(path: str | None) -> bool:
    return bool(path) and str(path).endswith(_EXTENSION_SUFFIXES)


def _in_checkout() -> bool:
    """True when this package is a source checkout's ``src/pgcorral`` (an in-place build).

    Installed packages are left out: an installer may write the .so before the .py."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.basename(root) == "src" and os.path.exists(
        os.path.join(os.path.dirname(root), "pyproject.toml")
    )


def _stale_modules(src: str) -> list[str]:
    """The modules of COMPILED (under ``src``) whose .py is newer than their compiled form, or
    that have none: the in-place build predates an edit.

    With ``separate=True`` mypyc puts a module's code in ``<name>__mypyc.*.so`` beside a small
    shim ``<name>.*.so`` that the linker leaves untouched when only the code changed: the
    newest of the two counts."""
    stale: list[str] = []
    for entry in COMPILED:
        path = os.path.join(src, entry)
        sources = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
                   if os.path.isdir(path) else [path])
        for source in sources:
            directory, base = os.path.split(source[:-3])
            built = [os.path.join(directory, f) for f in os.listdir(directory)
                     if f.endswith(_EXTENSION_SUFFIXES)
                     and (f.startswith(base + ".") or f.startswith(base + "__mypyc."))]
            try:
                if not built or os.stat(source).st_mtime > max(
                        os.stat(p).st_mtime for p in built):
                    stale.append(os.path.relpath(source[:-3], src).replace(os.sep, "."))
            except OSError:
                continue
    return stale


def info() -> BuildInfo:
    compiled: list[str] = []
    pure: list[str] = []
    stale: list[str] = []
    for name in _PROBES:
        path = getattr(importlib.import_module(name), "__file__", None)
        if path is not None and _is_extension(path):
            compiled.append(name)
        else:
            pure.append(name)
    if compiled and _in_checkout():
        stale = _stale_modules(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return BuildInfo(tuple(compiled), tuple(pure), tuple(stale))


def startup_line() -> str | None:
    """The one log line the daemon writes about its build: None when fully compiled."""
    build = info()
    if build.compiled and not build.pure and not build.stale:
        return None
    if not build.compiled:
        return (
            "pgcorral: running pure Python (no compiled modules; `pip install .` with a C "
            "compiler builds them)"
        )
    return "pgcorral: " + build.describe()
