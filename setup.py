"""Build pgcorral: the hot modules compiled with mypyc when possible, pure Python otherwise.

The list of compiled modules is ``pgcorral.build.COMPILED``. Everything else is in
pyproject.toml.

* ``pip install .`` / ``python -m build``: compiled when mypyc (a build requirement) and a C
  compiler work; if compiling fails for any reason the package installs as pure Python (the
  daemon then logs one line saying so, and ``pgcorral -V`` tells).
* ``PGCORRAL_BUILD=pure``: do not try (e.g. the editable install `make venv` does; `make build`
  then compiles in place with ``python setup.py build_ext --inplace``).
* ``PGCORRAL_BUILD=compiled``: compiling must work; a failure fails the build (CI uses this so a
  broken compile cannot pass as the fallback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MODE = os.environ.get("PGCORRAL_BUILD", "auto")  # auto | pure | compiled


def compiled_sources() -> list[str]:
    sys.path.insert(0, str(HERE / "src"))
    try:
        from pgcorral.build import COMPILED
    finally:
        sys.path.pop(0)
    out: list[str] = []
    for entry in COMPILED:
        path = Path("src") / entry
        if path.is_dir():
            out += sorted(str(p) for p in path.glob("*.py"))
        else:
            out.append(str(path))
    return out


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python (no extension at all) when compiling fails."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:  # the modules compile independently: use every CPU
            self.parallel = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "pure Python"
            if MODE == "compiled":
                raise
            self._remove_outputs()
            print(
                f"pgcorral: compiling with mypyc failed ({type(exc).__name__}: {exc}); "
                "installing pure Python",
                file=sys.stderr,
            )

    def _remove_outputs(self) -> None:
        # A half-built set of extensions must not shadow the source: all or none.
        for path in self.get_outputs():
            try:
                os.unlink(path)
            except OSError:
                pass


def ext_modules() -> list[object]:
    if MODE == "pure":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        if MODE == "compiled":
            raise
        print(f"pgcorral: mypyc is not available ({exc}); installing pure Python", file=sys.stderr)
        return []
    old = os.getcwd()
    os.chdir(HERE)
    try:
        # separate=True: one C unit per module, so build_ext compiles them in parallel and a
        # change rebuilds less; opt_level 3 is mypyc's default, spelled out.
        return list(mypycify(compiled_sources(), opt_level="3", separate=True))
    except (Exception, SystemExit) as exc:  # mypyc refusing the code (it exits on type errors)
        if MODE == "compiled":
            raise
        print(f"pgcorral: mypyc could not translate the sources ({exc}); installing pure "
              "Python", file=sys.stderr)
        return []
    finally:
        os.chdir(old)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
