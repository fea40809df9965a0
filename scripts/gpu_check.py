"""Our model beside mlx-lm's on the same weights, at GLM-4.5-Air's real layer shapes.

Now a thin wrapper over `glm-mlx bench` (glm_mlx/bench.py), kept so the
commands in BENCHMARKS.md still run: N layers of the Air, random weights,
every linear 4-bit group 64, the logits of both compared, prefill at one
prompt length and decode after an empty context and after one of that length.

    PYTHONPATH=. python scripts/gpu_check.py --layers 4
"""

from __future__ import annotations

import argparse
import sys

from glm_mlx.bench import render, run_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="shrink the widths (a quick run on the CPU)")
    a = ap.parse_args()
    r = run_bench("small" if a.small else "air", a.layers, "uniform4", [a.prompt], [0, a.prompt], a.steps,
                  log=lambda s: print(s, file=sys.stderr))
    print(render(r))


if __name__ == "__main__":
    main()
