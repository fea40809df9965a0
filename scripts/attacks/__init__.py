"""The hostile-input cases `scripts/attack.py` replays, one module per door.

A case is a function of a `Lab` (a tiny model, its checkpoint, and a way to run the `glm-mlx` command
as a user would, in a subprocess) registered with `@case(item, name, expect)`. It returns the line the
user saw when the input was refused cleanly, and raises `Problem` saying what happened instead: a
traceback, a wrong result, a lost file, a zero exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]


class Problem(Exception):
    """The input was not refused cleanly; the message says what happened instead."""


@dataclass(frozen=True)
class Case:
    item: str  # the numbered item of the hostile-input or new-user issue, e.g. "33.3"
    name: str
    expect: str  # what a clean refusal looks like
    run: Callable[["Lab"], str]


CASES: list[Case] = []


def case(item: str, name: str, expect: str):
    """Register the decorated function as a case."""
    def add(fn: Callable[["Lab"], str]) -> Callable[["Lab"], str]:
        CASES.append(Case(item, name, expect, fn))
        return fn
    return add


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def refused(self, *needles: str) -> str:
        """The one `error:` line of a clean refusal (non-zero exit, no traceback, each needle in the
        line); raises Problem otherwise."""
        if "Traceback" in self.err or "Traceback" in self.out:
            raise Problem("traceback: " + self.err.strip().splitlines()[-1][:200])
        if self.rc == 0:
            raise Problem("exit 0: " + (self.err.strip().splitlines() or ["(nothing on stderr)"])[-1][:200])
        errors = [line for line in self.err.splitlines() if line.startswith("error: ")]
        if len(errors) != 1:
            raise Problem(f"{len(errors)} error lines, rc {self.rc}: {self.err.strip()[-300:]!r}")
        for n in needles:
            if n not in errors[0]:
                raise Problem(f"{n!r} not in {errors[0]!r}")
        return errors[0]

    def ok(self) -> "Run":
        if self.rc != 0 or "Traceback" in self.err:
            raise Problem(f"rc {self.rc}: {self.err.strip()[-300:]}")
        return self


class Lab:
    """A tiny air-tiny checkpoint and its converted folder, made once; fresh copies to break."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="glm-attack-"))
        self._n = 0
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "GLM_MLX_HOME": str(self.root / "home"),
                    "GLM_MLX_CACHE": str(self.root / "cache"), "HF_HUB_OFFLINE": "1"}
        from convert.convert import convert
        from convert.synthetic import make_config, write_checkpoint

        self._ckpt = self.root / "pristine-checkpoint"
        self._model = self.root / "pristine-model"
        if not (self._model / "glm_mlx.json").is_file():
            write_checkpoint(self._ckpt, make_config("air-tiny"))
            convert(self._ckpt, self._model, "mixed")

    def tmp(self) -> Path:
        self._n += 1
        path = self.root / f"case-{self._n}"
        path.mkdir()
        return path

    def checkpoint(self) -> Path:
        """A private copy of the checkpoint."""
        return Path(shutil.copytree(self._ckpt, self.tmp() / "checkpoint"))

    def model(self) -> Path:
        """A private copy of the converted model folder."""
        return Path(shutil.copytree(self._model, self.tmp() / "model"))

    def cli(self, *args, stdin: str | bytes = b"", timeout: float = 300, env: dict | None = None) -> Run:
        """`glm-mlx ARGS` in a subprocess, as a user runs it."""
        p = subprocess.run([sys.executable, "-m", "glm_mlx", *map(str, args)], capture_output=True, cwd=ROOT,
                           input=stdin.encode() if isinstance(stdin, str) else stdin, timeout=timeout,
                           env={**self.env, **(env or {})})
        return Run(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def load_all() -> list[Case]:
    """Every case of every door's module (importing a module registers its cases)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"attacks.{info.name}")
    return CASES
