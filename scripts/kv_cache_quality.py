"""The quantized KV cache: its logits against the float cache's, and its memory at 128K tokens.

    PYTHONPATH=. python scripts/kv_cache_quality.py                  # preset "quality", float32
    PYTHONPATH=. python scripts/kv_cache_quality.py --preset air-tiny
    PYTHONPATH=. python scripts/kv_cache_quality.py --model ~/models/glm-4.5-air --dtype bfloat16

Writes the preset's checkpoint to a temporary folder and converts it unquantized
(or loads --model), then feeds the same tokens (text, tokenized) through the
float cache, the 8-bit and 4-bit ones and, for a float32 model, one rounded to
bf16 (the yardstick): a prefill, then one token at a time. Each decode step's
logits are compared with the float cache's. The memory table
builds one layer's cache at 256 tokens at the published shapes, takes its
nbytes and scales it to 131,072 tokens and every layer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import glm_mlx
from convert.convert import convert
from convert.synthetic import PRESETS, make_config, write_checkpoint
from glm_mlx.cache import KVCache, make_caches
from quantize.quality import TEXTS

CONTEXT = 131072  # 128K, GLM-4.5's max_position_embeddings
PUBLISHED = {"GLM-4.5-Air": 46, "GLM-4.5": 92}  # trunk layers; both 8 kv heads of head_dim 128
KV_HEADS, HEAD_DIM = 8, 128


class Bf16Cache(KVCache):
    """A float cache whose keys and values are rounded to bf16: the anchor for a float32 model."""

    def update_and_fetch(self, k, v):
        k, v = super().update_and_fetch(k.astype(mx.bfloat16), v.astype(mx.bfloat16))
        return k.astype(mx.float32), v.astype(mx.float32)


def decode_logits(model, tokens: list[int], prefill: int, cache: list) -> np.ndarray:
    """float64 logits [decode steps, vocab] of each token after the prefill, fed one at a time."""
    mx.eval(model([tokens[:prefill]], cache, checked=True))
    out = []
    for t in tokens[prefill:]:
        logits = model([[t]], cache, checked=True)[0, -1]
        out.append(np.array(logits.astype(mx.float32)))
    return np.stack(out).astype(np.float64)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Relative error ||got - ref|| / ||ref|| over all steps, mean KL(ref || got) in nats, top-1 agreement."""
    lr, lg = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (ref, got))
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    return {"rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), "kl": float(kl.mean()),
            "kl_max": float(kl.max()), "top1": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def quality_table(model, tokens: list[int], prefill: int, float32: bool) -> str:
    ref = decode_logits(model, tokens, prefill, model.make_cache())
    caches = {"8-bit": model.make_cache(8), "4-bit": model.make_cache(4)}
    if float32:  # rounding to bf16 is then an error too: the yardstick
        caches = {"bf16 (rounded)": [Bf16Cache() for _ in model.model.layers], **caches}
    rows = ["| KV cache | logits rel. error | mean KL (nats) | max KL (nats) | top-1 agreement |",
            "|---|---:|---:|---:|---:|"]
    for name, cache in caches.items():
        m = compare(ref, decode_logits(model, tokens, prefill, cache))
        rows.append(f"| {name} | {m['rel_err']:.2e} | {m['kl']:.2e} | {m['kl_max']:.2e} | {m['top1']:.1%} |")
    return "\n".join(rows)


def bytes_per_token(kv_bits: int | None, dtype=mx.bfloat16, probe: int = 256) -> float:
    """One layer's KV cache bytes per token at the published shapes, from a real cache of probe tokens."""
    cache = make_caches(1, HEAD_DIM, kv_bits)[0]
    x = mx.zeros((1, KV_HEADS, probe, HEAD_DIM), dtype)
    mx.eval(cache.update_and_fetch(x, x))
    assert cache.offset == probe and cache.nbytes > 0
    return cache.nbytes / probe  # probe is a whole step: nothing grown beyond it


def memory_table() -> str:
    kinds = {"bf16": None, "8-bit": 8, "4-bit": 4}
    per = {k: bytes_per_token(b) for k, b in kinds.items()}
    rows = ["| model | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name, layers in PUBLISHED.items():
        cells = [f"{per[k] * layers * CONTEXT / 1e9:.2f} GB" + ("" if k == "bf16" else f" ({per[k] / per['bf16']:.0%})")
                 for k in kinds]
        rows.append(f"| {name} ({layers} layers) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quality", choices=list(PRESETS), help="synthetic checkpoint preset")
    p.add_argument("--model", type=Path, help="a glm-mlx model folder instead of a preset")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32: exact on the CPU)")
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--decode", type=int, default=320, help="tokens fed one at a time after the prefill")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="glm-mlx-kv-") as tmp:
        folder = args.model
        if folder is None:
            ckpt = write_checkpoint(Path(tmp) / "checkpoint", make_config(args.preset))
            folder = convert(ckpt, Path(tmp) / "model", "none")
        model, tok = glm_mlx.load(folder, dtype=args.dtype)
        n = args.prefill + args.decode
        text = tok.encode("\n\n".join(TEXTS))
        tokens = (text * -(-n // len(text)))[:n]
        what = args.model or f"preset `{args.preset}` (unquantized weights)"
        print(f"### KV cache quality: {what}, {args.dtype}, head_dim {model.args.head_dim}, "
              f"group {model.make_cache(8)[0].group_size}: prefill {args.prefill} tokens, "
              f"then {args.decode} decoded one at a time, logits against the float cache's\n")
        print(quality_table(model, tokens, args.prefill, args.dtype == "float32"))
    print(f"\n### KV cache memory at 128K tokens ({CONTEXT} tokens, batch 1; 8 kv heads, head_dim 128, "
          "group 64, scales and biases bf16)\n")
    print(memory_table())
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
