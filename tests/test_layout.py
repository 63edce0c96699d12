"""Project layout rules: the library never imports pipelines; the CLI imports torch lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_medseg_never_imports_pipelines():
    offenders = []
    for path in (ROOT / "medseg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "pipelines"]
    assert not offenders


def test_modules_stay_small():
    big = [
        p.name
        for p in [*ROOT.glob("medseg/**/*.py"), *ROOT.glob("pipelines/*.py")]
        if len(p.read_text().splitlines()) > 500
    ]
    assert not big


def test_cli_help_does_not_import_torch():
    code = "import sys, pipelines.cli; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
