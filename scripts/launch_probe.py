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

`--profile N` then runs cProfile over N of our steps' graph building and prints
Python's functions by their own time: what the host spends before encoding.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import mlx.core as mx

import glm_mlx.model as model_mod

from glm_mlx.bench import bench_config, decode_seconds, fill_cache, make_runtime, random_weights
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


def profile(build, steps: int, top: int = 25) -> None:
    """cProfile over `steps` calls of build() (each result evaluated outside the profile)."""
    mx.eval(build())
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        out = build()
        prof.disable()
        mx.eval(out)
    print(f"Python's time building {steps} steps, by function (tottime: its own; cumtime: with its calls):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--runtimes", default="ours,mlx-lm")
    ap.add_argument("--profile", type=int, default=0, help="cProfile this many of our steps' graph building")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of 32 pipelined steps to time")
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
    for name in a.runtimes.split(","):
        rt = make_runtime(name, cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
        # ours: with one token's k and v written by its q|k|v launch and with the cache's own writes,
        # alternated (model.KV_IN_KERNEL), twice each
        variants = [("", None)] if name != "ours" else [(" (k, v in the q|k|v launch)", True),
                                                        (" (the cache's writes)", False)] * 2
        cache = fill_cache(rt.make_cache(), args, a.context, len(variants) * (64 + 32 * a.rounds) + a.profile,
                           mx.bfloat16, 0)
        y = mx.array([[1]])
        for label, kv in variants:
            if kv is not None:
                model_mod.KV_IN_KERNEL = kv
            key = f"{name}{label}: decode step, {a.layers} layers"
            r = split(lambda rt=rt, cache=cache: rt.step(y, cache))
            # the same step pipelined as the bench decodes (the host builds step n + 1 while the device runs n)
            r["pipelined_us"] = sorted(decode_seconds(rt.step, cache, 32) / 32 * 1e6 for _ in range(a.rounds))
            print(f"{name}{label}: pipelined, us a step over {a.rounds} rounds of 32: "
                  + " / ".join(f"{t:.0f}" for t in r["pipelined_us"]), flush=True)
            rows[key + ("" if key not in rows else ", again")] = r
        model_mod.KV_IN_KERNEL = True
        if a.profile and name == "ours":
            profile(lambda rt=rt, cache=cache: rt.step(y, cache), a.profile)
        rt = cache = None
        mx.clear_cache()
    for k, r in rows.items():
        r = {part: us for part, us in r.items() if part != "pipelined_us"}
        total = sum(r.values())
        print(f"{k:36s} graph {r['graph_us']:8.0f} us | encode {r['encode_us']:8.0f} us | wait "
              f"{r['wait_us']:8.0f} us | total {total:8.0f} us ({r['encode_us'] / total:.0%} encoding)", flush=True)
    print(json.dumps({"env": env, "rows": rows}))


if __name__ == "__main__":
    main()
