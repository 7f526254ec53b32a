"""Layering: the protocol package and the pool policy do no I/O and keep no time of their own.

Every module is parsed with ``ast`` (imports inside functions and ``from x import y`` forms
included), and the packages are also imported in a fresh interpreter to catch what they pull in
indirectly.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pgcorral

PACKAGE = Path(pgcorral.__file__).resolve().parent
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "time", "selectors", "uvloop"})
# What each package must not import, directly or through pgcorral modules.
FORBIDDEN = {
    "protocol": IO_MODULES,
    "pool": frozenset({"asyncio", "socket", "ssl", "selectors", "uvloop"}),
}


def imported_modules(source: str, filename: str = "<test>") -> set[str]:
    """Top-level names of every module ``source`` imports, however it imports them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            # __import__("socket"), importlib.import_module("socket")
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name in ("__import__", "import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found


def modules_of(package: str) -> list[Path]:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"no modules under {package}"
    return files


def test_checker_sees_every_import_form() -> None:
    source = """
import os.path
import asyncio.events as ev
from socket import socket
from ssl import *
from . import sibling
from .time import x
def later():
    import selectors
    from uvloop import loop
    __import__("time")
    importlib.import_module("http.client")
"""
    assert imported_modules(source) == {"os", "asyncio", "socket", "ssl", "selectors",
                                        "uvloop", "time", "http"}


@pytest.mark.parametrize(
    "path",
    [p for pkg in FORBIDDEN for p in modules_of(pkg)],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_module_imports_no_io(path: Path) -> None:
    package = path.relative_to(PACKAGE).parts[0]
    found = imported_modules(path.read_text(encoding="utf-8"), str(path))
    bad = sorted(found & FORBIDDEN[package])
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_pulls_in_no_io_indirectly(package: str) -> None:
    """Import every module of the package in a fresh interpreter and look at sys.modules.

    ``time`` is left out here: the interpreter itself loads it at start-up.
    """
    names = [
        "pgcorral." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(
            ".__init__")
        for p in modules_of(package)
    ]
    watched = sorted(FORBIDDEN[package] - {"time"})
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + f"print(','.join(m for m in {watched!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "", f"{package} pulls in {result.stdout.strip()}"


def _runtime_imports(path: Path) -> set[str]:
    """pgcorral modules ``path`` imports at run time (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.startswith("pgcorral"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pgcorral"))
    return found


def _module_name(path: Path) -> str:
    return "pgcorral." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(
        ".__init__")


def test_pipelines_decide_without_the_network_layer() -> None:
    """pipelines/ holds pure decisions: it imports nothing from net/ (not even for types)."""
    for path in modules_of("pipelines"):
        source = path.read_text(encoding="utf-8")
        assert "pgcorral.net" not in source, f"{path.name} refers to pgcorral.net"


def test_no_import_cycle() -> None:
    """The run-time imports between pgcorral's modules form no cycle."""
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(p) for p in paths}
    graph = {_module_name(p): {m for m in _runtime_imports(p) if m in names} for p in paths}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
