"""The command itself: version, help, the module entry point, and option validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import glm_mlx
from glm_mlx.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_short_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"glm-mlx {glm_mlx.__version__}"
    for args in (["-h"], ["generate", "-h"], ["finetune", "-h"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)


def test_python_dash_m():
    p = subprocess.run([sys.executable, "-m", "glm_mlx", "--version"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"glm-mlx {glm_mlx.__version__}", p.stderr
