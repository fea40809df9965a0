"""What compiling a decode step's layers buys (glm_mlx.model.COMPILED_DECODE), on this machine.

    python3 scripts/compile_probe.py --layers 8

For N Air-shaped layers (random 4-bit weights), the decode step's graph /
encode / wait split (launch_probe.split) and its pipelined time per step, with
each layer's two halves around the KV cache through mx.compile and without,
alternating over rounds in one process; then the same step's logits both ways.
"""

from __future__ import annotations

import argparse

import mlx.core as mx

import glm_mlx.model as M
from decode_trace import pipelined
from glm_mlx.bench import bench_config, fill_cache, make_runtime, random_weights
from glm_mlx.config import ModelArgs
from launch_probe import split


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cfg = bench_config("air", a.layers)
    args = ModelArgs.from_dict(cfg)
    rt = make_runtime("ours", cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
    cache = fill_cache(rt.make_cache(), args, a.context, 100 * a.rounds, mx.bfloat16, 0)
    y = mx.array([[1]], mx.uint32)
    for r in range(a.rounds):
        for compiled in (False, True):
            M.COMPILED_DECODE = compiled
            s = split(lambda: rt.step(y, cache))
            wall = pipelined(rt.step, cache, 20) * 1e6
            print(f"round {r} {'compiled' if compiled else 'plain':9s} graph {s['graph_us']:7.0f} encode "
                  f"{s['encode_us']:7.0f} wait {s['wait_us']:7.0f} us | pipelined {wall:7.0f} us per step", flush=True)
    outs = []
    for compiled in (False, True):  # the same step both ways, at the same position
        M.COMPILED_DECODE = compiled
        outs.append(rt.step(y, cache).astype(mx.float32))
        mx.eval(outs[-1])
        for c in cache:
            c.offset -= 1
    diff = mx.abs(outs[1] - outs[0]).max().item()
    print(f"compiled vs plain logits: equal {mx.array_equal(*outs).item()}, max abs diff {diff:.3e}")


if __name__ == "__main__":
    main()
