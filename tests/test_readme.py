"""The README's file map names every source module and benchmark script, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mapped() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## File map"):]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.M)


def test_file_map_covers_the_tree():
    mapped = _mapped()
    files = sorted(p.relative_to(ROOT).as_posix() for pattern in ("src/effopd/**/*.py", "benchmarks/*.py")
                   for p in ROOT.glob(pattern))
    # a file is covered when it is named, or a folder holding it is (`src/effopd/report/`)
    missing = [f for f in files if not any(f == m or (m.endswith("/") and f.startswith(m)) for m in mapped)]
    assert not missing, f"README file map lacks {missing}"
    gone = [m for m in mapped if not (ROOT / m).exists()]
    assert not gone, f"README file map names files that do not exist: {gone}"
