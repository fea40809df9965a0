"""Is a decode step bound by the host or by the device? Where its time goes, split.

    python3 scripts/launch_probe.py --layers 8

For a decode step of N layers of GLM-4.5-Air's shape (random weights, every
linear 4-bit; ours and mlx-lm's on the same weights), and for a chain of tiny
ops, three times per step, each the best of several steps:
- graph: Python building the lazy graph (the model's __call__);
- encode: `mx.async_eval` returning, i.e. the host turning every op into
  kernels and handing them to the device;
- wait: from there until the result is ready.
When encode is most of the step the device idles between kernels and only
fewer ops help; when wait is, the kernels themselves are the cost. Run it
under MLX_MAX_OPS_PER_BUFFER or MLX_USE_CUDA_GRAPHS to see what the CUDA
backend's batching does.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import mlx.core as mx

from glm_mlx.bench import bench_config, fill_cache, make_runtime, random_weights
from glm_mlx.config import ModelArgs


def split(build, steps: int = 10) -> dict:
    """Best-of-`steps` (graph, encode, wait) microseconds for build() -> arrays."""
    mx.eval(build())
    best = None
    for _ in range(steps):
        t0 = time.perf_counter()
        out = build()
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        t = ((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6)
        best = t if best is None or sum(t) < sum(best) else best
    return dict(zip(("graph_us", "encode_us", "wait_us"), best))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    print(mx.default_device(), "env:", env or "defaults", flush=True)
    rows = {}
    x = mx.zeros((1, 4096), mx.bfloat16)

    def adds(n=200):
        y = x
        for _ in range(n):
            y = y + 1
        return y
    rows["200 chained adds"] = split(adds)

    cfg = bench_config("air", a.layers)
    args = ModelArgs.from_dict(cfg)
    for name in ("ours", "mlx-lm"):
        rt = make_runtime(name, cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
        cache = fill_cache(rt.make_cache(), args, a.context, 64, mx.bfloat16, 0)
        y = mx.array([[1]])
        rows[f"{name}: decode step, {a.layers} layers"] = split(lambda rt=rt, cache=cache: rt.step(y, cache))
        rt = cache = None
        mx.clear_cache()
    for k, r in rows.items():
        total = sum(r.values())
        print(f"{k:36s} graph {r['graph_us']:8.0f} us | encode {r['encode_us']:8.0f} us | wait "
              f"{r['wait_us']:8.0f} us | total {total:8.0f} us ({r['encode_us'] / total:.0%} encoding)", flush=True)
    print(json.dumps({"env": env, "rows": rows}))


if __name__ == "__main__":
    main()
