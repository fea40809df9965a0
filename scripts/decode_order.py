"""Decode speed before and after a long prefill, in one process: does a prefill slow the decode after it?

    python3 scripts/decode_order.py --runtimes ours,mlx-lm --prompt 4096 --context 4096

The bench decodes after its prefills (a chat does too). On MLX's CUDA backend memory is managed
(cudaMallocManaged): a prefill's large temporaries may push the model's pages to the host, and the
decode after it pays for them coming back. This times rounds of pipelined decode steps (as the
bench does) on a fresh model, then after a prefill of `--prompt` tokens, round by round, so a
transient shows as rounds that speed up.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx

from glm_mlx.bench import bench_config, decode_seconds, fill_cache, make_runtime, random_weights
from glm_mlx.config import ModelArgs


def rounds(rt, args, context: int, steps: int, n: int, fresh: bool = True) -> list[float]:
    """Tokens/s of n rounds of `steps` pipelined steps from `context`: each round on a fresh cache
    after emptying MLX's buffer cache (as the bench does), or all on one cache, one after another."""
    out, cache = [], None
    for _ in range(n):
        if fresh or cache is None:
            cache = None
            gc.collect()
            mx.clear_cache()
            cache = fill_cache(rt.make_cache(), args, context, steps * (1 if fresh else n), mx.bfloat16, 0)
        out.append(steps / decode_seconds(rt.step, cache, steps))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--runtimes", default="ours,mlx-lm")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-prefill", action="store_true", help="instead: rounds on fresh caches, then on one cache")
    a = ap.parse_args()
    cfg = bench_config(a.shape, a.layers)
    args = ModelArgs.from_dict(cfg)
    print(mx.default_device(), flush=True)
    for name in a.runtimes.split(","):
        rt = make_runtime(name, cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
        before = rounds(rt, args, a.context, a.steps, a.rounds)
        if a.no_prefill:
            kept = rounds(rt, args, a.context, a.steps, a.rounds, fresh=False)
            print(f"{name}: decode at {a.context}, tok/s a round: fresh caches "
                  + " / ".join(f"{v:.1f}" for v in before) + "; one cache "
                  + " / ".join(f"{v:.1f}" for v in kept), flush=True)
            rt = None
            continue
        tokens = mx.random.randint(0, args.vocab_size, (1, a.prompt), key=mx.random.key(2))
        t0 = time.perf_counter()
        mx.eval(rt.prefill(tokens, rt.make_cache()))
        dt = time.perf_counter() - t0
        after = rounds(rt, args, a.context, a.steps, a.rounds)
        print(f"{name}: decode at {a.context}, tok/s a round: fresh " + " / ".join(f"{v:.1f}" for v in before)
              + f"; after a prefill of {a.prompt} ({a.prompt / dt:.0f} tok/s): "
              + " / ".join(f"{v:.1f}" for v in after) + f"; peak {mx.get_peak_memory() / 1e9:.2f} GB", flush=True)
        rt = None
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
