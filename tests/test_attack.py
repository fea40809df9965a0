"""Every hostile-input case of scripts/attacks/ is refused cleanly (scripts/attack.py prints them as a table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from attacks import Lab, load_all  # noqa: E402

CASES = load_all()


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("attack"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.item}-{c.name}" for c in CASES])
def test_refused_cleanly(lab, case):
    case.run(lab)


def test_cases_exist():
    assert len(CASES) >= 1
