"""The layering contract (pyproject.toml [tool.importlinter], docs/architecture.md):
protocol is the leaf, cpm ↛ knexad, knexad ↛ cpm, p2p knows neither, harness.netlab
knows no KNEXA package. Checked with
import-linter on every default run, so a stray import fails CI, not a later review."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_layers_hold() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    result = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 kept, 0 broken" in result.stdout, result.stdout[-2000:]
