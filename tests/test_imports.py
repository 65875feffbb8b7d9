"""Import layering: the command line and the reports load no torch to answer --help, and no
module imports the command-line front ends it sits below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "effopd"


def _loads_torch(code: str) -> bool:
    probe = f"import sys\n{code}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["analyze", "--help"], ["report", "--help"],
                                  ["serve-teacher", "--help"]])
def test_help_loads_no_torch(argv):
    code = f"from effopd import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass"
    assert not _loads_torch(code)


def test_reading_a_config_and_the_errors_load_no_torch():
    assert not _loads_torch("import effopd.config, effopd.errors\neffopd.config.list_presets()")
    # a config object is built with its method table, which needs torch: that is the run starting
    assert _loads_torch("import effopd.config\neffopd.config.load_config([], [])")


def _imports(path: Path) -> set[str]:
    """Modules imported anywhere in ``path`` (top level or inside functions), absolute names."""
    tree, pkg = ast.parse(path.read_text()), ".".join(("effopd", *path.relative_to(SRC).parent.parts))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def test_no_module_imports_the_command_line():
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        names = _imports(path)
        if rel != "cli.py" and "effopd.cli" in names:
            offenders.append(f"{rel} imports effopd.cli")
        if rel.startswith("report/") and rel not in ("report/cli.py", "report/__init__.py") and "effopd.report.cli" in names:
            offenders.append(f"{rel} imports effopd.report.cli")
        if rel == "errors.py" and any(n.startswith("effopd") for n in names):
            offenders.append("errors.py imports effopd modules")
    assert not offenders, offenders
