"""Writes docs/CONFIGURATION.md from the key table in pgcorral.config.keys.

Run from the repository root: ``PYTHONPATH=src python devtools/gen_config_doc.py``.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pgcorral.config.keys import render_reference_markdown  # noqa: E402

TARGET = ROOT / "docs" / "CONFIGURATION.md"


def main() -> None:
    TARGET.write_text(render_reference_markdown(), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
