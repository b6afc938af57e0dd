"""Layout: the maths package loads no training code, and no entry point imports the top-level CLI back."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return set(out.stdout.split())


def test_mixing_imports_neither_torch_nor_training():
    loaded = _loaded("megareweight.mixing")
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}
    assert not {m for m in loaded if m.startswith("megareweight.train") or m.startswith("megareweight.autoscale")}
    assert "megareweight.config" not in loaded


@pytest.mark.parametrize("module", ["megareweight.autoscale.cli", "megareweight.train.__main__"])
def test_subcommand_modules_do_not_import_the_top_level_cli(module):
    assert "megareweight.cli" not in _loaded(module)
