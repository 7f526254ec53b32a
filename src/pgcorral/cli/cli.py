"""``pgcorral-cli``: placeholder until its issue lands (see docs/ROADMAP.md).

It answers ``-V`` and ``--help``, and refuses every command with exit code 2 and a one-line
reason, so that scripts never mistake it for a working tool.
"""

from __future__ import annotations

import sys

from pgcorral import __version__

_PROG = "pgcorral-cli"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-V", "--version"):
        print(f"{_PROG} {__version__}")
        return 0
    if not args or args[0] in ("-?", "-h", "--help"):
        print(f"usage: {_PROG} [-V] [-?] COMMAND ...")
        print("No command is implemented yet in this version.")
        return 0
    print(f"{_PROG}: {args[0]}: not implemented in this version", file=sys.stderr)
    return 2
