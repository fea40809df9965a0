"""Shared fixtures: tiny checkpoints generated once per session, converted once per recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from convert.convert import convert  # noqa: E402
from convert.synthetic import make_config, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glm")


@pytest.fixture(scope="session")
def checkpoint(workdir):
    """checkpoint(preset, style="published", fmt="bf16") -> folder, written once."""
    made = {}

    def get(preset: str, style: str = "published", fmt: str = "bf16") -> Path:
        key = (preset, style, fmt)
        if key not in made:
            made[key] = write_checkpoint(workdir / f"ckpt-{preset}-{style}-{fmt}", make_config(preset),
                                         config_style=style, weight_format=fmt)
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted(workdir, checkpoint):
    """converted(preset, recipe="none", style="published", fmt="bf16") -> model folder."""
    made = {}

    def get(preset: str, recipe: str = "none", style: str = "published", fmt: str = "bf16") -> Path:
        key = (preset, recipe, style, fmt)
        if key not in made:
            made[key] = convert(checkpoint(preset, style, fmt), workdir / f"model-{'-'.join(key)}", recipe)
        return made[key]

    return get
