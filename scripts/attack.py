"""Replay every kind of hostile input and fault against a tiny model; print case, expected refusal, outcome.

    python scripts/attack.py              # every case
    python scripts/attack.py -k manifest  # the cases whose item or name contains a word

The cases live in scripts/attacks/, one module per door (convert, load, CLI, chat, fine-tune); each
runs `glm-mlx` in a subprocess as a user would and passes only when the input is refused in one clear
line and nothing is lost or silently wrong. tests/test_attack.py runs the same cases under pytest.
Exits 1 when any case is not refused cleanly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from attacks import Lab, Problem, load_all  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose item or name contains this")
    args = ap.parse_args()
    cases = [c for c in load_all() if args.k.lower() in f"{c.item} {c.name}".lower()]
    lab = Lab()
    rows, failed = [], 0
    for c in sorted(cases, key=lambda c: (tuple(int(p) for p in c.item.split(".")), c.name)):
        t = time.perf_counter()
        try:
            outcome = "refused: " + c.run(lab)
        except Problem as e:
            outcome, failed = f"NOT REFUSED: {e}", failed + 1
        rows.append((c.item, c.name, c.expect, outcome, time.perf_counter() - t))
        print(f"{c.item:6} {c.name[:48]:48} {outcome[:110]}", file=sys.stderr)
    print("\n| item | case | expected | outcome |\n|---|---|---|---|")
    for item, name, expect, outcome, _ in rows:
        print(f"| {item} | {name} | {expect} | {outcome.replace('|', '/')} |")
    print(f"\n{len(rows) - failed} of {len(rows)} refused cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
