"""Speculative decoding with the MTP layer: what a pass costs beside plain decode, and the acceptance it needs.

    python3 scripts/mtp_bench.py --shape air --contexts 0,4096 --tokens 32

Builds our model at a bench shape (glm_mlx.bench's random weights, quantized by
the recipe) and gives it a random MTP layer quantized the same way. Then, at
each context (the KV caches filled with random keys and values, as the bench
does):
- plain decode: tokens/s, pipelined as `generate` runs it;
- speculative decoding (`generate.speculative_tokens`) with the drafts forced:
  the MTP layer's head is replaced by an oracle that is always right (every
  pass keeps its draft: two tokens) or always wrong (one token). So the two
  kinds of pass are timed apart: t2 and t1 seconds.

At acceptance a, speculative decoding gives (1 + a) / (a t2 + (1 - a) t1)
tokens/s. The script prints that at a few rates, and the break-even rate
where it equals plain decode. Random weights cannot say what acceptance GLM's
own MTP layer reaches on real text: only the real weights can.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

from glm_mlx import loading
from glm_mlx.bench import _quant_predicate, bench_config, build_ours, decode_seconds, fill_cache, random_weights
from glm_mlx.config import ModelArgs
from glm_mlx.generate import generate_tokens
from glm_mlx.model import MTPLayer


def with_mtp(model, args: ModelArgs, recipe: str, dtype: mx.Dtype):
    """model with a random MTP layer, quantized as the recipe quantizes a decoder layer (and lm_head)."""
    head = MTPLayer(args)
    head.set_dtype(dtype)
    nn.quantize(head, class_predicate=_quant_predicate(recipe, lambda p: p.replace("layer.", "model.layers.1.", 1)
                                                       .replace("shared_head.head", "lm_head")))
    model.mtp = [head]
    loading.prepare_model(model)  # its router in float32, as loading leaves it
    mx.eval(head.parameters())
    return model


PROMPT = [1, 2, 3, 4]


def forced_runs(model, args: ModelArgs, ctx: int, tokens: int, dtype: mx.Dtype, seed: int) -> tuple[float, float]:
    """(t2, t1): seconds a pass takes that keeps its draft and one that rejects it, decoding `tokens`
    tokens after a 4-token prompt at context ctx. First with every draft wrong (one past a plain greedy
    run's next-but-one token); then with the drafts the tokens that run gave. Those come from the
    speculative pass's own two-row arithmetic, which can round differently from plain decode's one-row
    kernels and break bf16 ties the other way: drafted from plain decode, few 'right' drafts survived
    on the GPU. t2 and t1 from the two runs' times and their kept and rejected passes."""
    V, caches = args.vocab_size, []

    def filled(mtp: bool) -> list:
        return fill_cache(model.make_cache(mtp=mtp), args, ctx, tokens + 8, dtype, seed)

    seq = PROMPT + list(generate_tokens(model, PROMPT, filled(False), max_tokens=tokens)) + [0, 0]
    shift = [0]

    def oracle(h):  # the MTP cache holding p pairs, the draft is for position p + 1
        t = (seq[caches[-1][-1].offset + 1 - ctx] + shift[0]) % V
        return ((mx.arange(V) == t).astype(h.dtype) * 100)[None, None]  # one-hot: an eye(V) would be 46 GB

    model.mtp[0].logits = oracle
    runs = []
    for shift[0] in (1, 0):
        caches[:] = [filled(True)]
        mx.clear_cache()
        tally = [0, 0]
        gen = generate_tokens(model, PROMPT, caches[-1], max_tokens=tokens, tally=tally)
        got = [next(gen)]  # the prompt's token: its prefill is not timed
        t0 = time.perf_counter()
        got += list(gen)
        runs.append((time.perf_counter() - t0, tally[1], tally[0] - tally[1]))
        seq[:] = PROMPT + got + [0, 0]  # the right drafts: what the speculative pass itself decodes
    (dw, _, rw), (dr, kr, rr) = runs
    t1 = dw / rw
    return ((dr - rr * t1) / kr if kr else float("nan")), t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--recipe", default="uniform4")
    ap.add_argument("--contexts", default="0,4096")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = bench_config(a.shape, a.layers)
    args = ModelArgs.from_dict(cfg)
    dtype = mx.bfloat16 if mx.default_device() != mx.cpu else mx.float32
    model = with_mtp(build_ours(cfg, random_weights(cfg, a.recipe, a.seed, dtype), a.recipe), args, a.recipe, dtype)
    print(mx.default_device(), f"| shape {a.shape}, {args.num_hidden_layers} layers + MTP, recipe {a.recipe}")
    rows = []
    print("| context | plain tok/s | pass keeping its draft (2 tokens), ms | pass rejecting it (1 token), ms "
          "| spec. tok/s at 50% / 70% / 90% / 100% | break-even acceptance |")
    print("|---:|---:|---:|---:|---|---:|")
    for ctx in (int(c) for c in a.contexts.split(",")):
        for _ in range(2):  # the first run compiles the shapes
            cache = fill_cache(model.make_cache(), args, ctx, a.tokens, dtype, a.seed)
            plain = a.tokens / decode_seconds(lambda y, c: model(y, c, checked=True), cache, a.tokens)
            t2, t1 = forced_runs(model, args, ctx, a.tokens, dtype, a.seed)

        def rate(acc: float) -> float:
            return (1 + acc) / (acc * t2 + (1 - acc) * t1)

        # (1 + a) / (a t2 + (1 - a) t1) = plain  <=>  a (1 - plain (t2 - t1)) = plain t1 - 1
        den = 1 - plain * (t2 - t1)
        even = (plain * t1 - 1) / den if den > 0 else float("inf")
        rows.append(dict(context=ctx, plain_tps=plain, pass_kept_s=t2, pass_rejected_s=t1,
                         spec_tps={str(r): rate(r) for r in (0.5, 0.7, 0.9, 1.0)}, break_even=even))
        print(f"| {ctx} | {plain:.1f} | {t2 * 1e3:.2f} | {t1 * 1e3:.2f} | "
              f"{' / '.join(f'{rate(r):.1f}' for r in (0.5, 0.7, 0.9, 1.0))} | "
              f"{'never' if even > 1 else f'{max(even, 0):.0%}'} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
