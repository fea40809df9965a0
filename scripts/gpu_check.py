"""Our model beside mlx-lm's on the same weights, at GLM-4.5-Air's real layer shapes.

Builds N layers of the Air (random weights, every linear 4-bit group 64, the
router in the checkpoint's bf16 values), loads the identical weights into
mlx-lm's glm4_moe and into ours, and reports the logits' relative difference
and, with the same timing loop for both, prefill and decode tokens/s and peak
memory. A correctness check of the core on the GPU, not the benchmark (that
is `glm-mlx bench`, a later issue).

    python scripts/gpu_check.py --layers 4
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

AIR = dict(model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
           moe_intermediate_size=1408, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
           routed_scaling_factor=1.0, n_group=1, topk_group=1, norm_topk_prob=True, use_qk_norm=False,
           attention_bias=True, rms_norm_eps=1e-5, rope_theta=1e6, partial_rotary_factor=0.5,
           max_position_embeddings=131072, tie_word_embeddings=False, rope_scaling=None,
           num_nextn_predict_layers=0)


def build_mlx_lm(cfg):
    from mlx_lm.models import glm4_moe

    args = glm4_moe.ModelArgs.from_dict(cfg)
    model = glm4_moe.Model(args)
    mx.random.seed(0)

    def randomize(m):  # one module at a time, so memory stays at a layer in bf16
        m.update(tree_map(lambda p: (0.02 * mx.random.normal(p.shape)).astype(mx.bfloat16), m.parameters()))
        mx.eval(m.parameters())

    for layer in model.model.layers:
        randomize(layer)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):  # norms near one
            norm.weight = mx.ones_like(norm.weight)
        nn.quantize(layer, 64, 4)
        mx.eval(layer.parameters())
    for m in (model.model.embed_tokens, model.lm_head):
        randomize(m)
    nn.quantize(model, 64, 4, class_predicate=lambda p, m: p in ("model.embed_tokens", "lm_head"))
    mx.eval(model.parameters())
    return model


def build_ours(cfg, reference):
    from glm_mlx.config import ModelArgs
    from glm_mlx.model import Model

    model = Model(ModelArgs.from_dict(cfg))
    nn.quantize(model, 64, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    weights = [(k.replace(".switch_mlp.", ".experts."), v) for k, v in tree_flatten(reference.parameters())]
    weights = [(k, v.astype(mx.float32) if k.endswith("mlp.gate.weight") else v) for k, v in weights]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def timed(label, model, make_cache, call, prompt_len, decode_steps):
    tokens = mx.random.randint(0, model.args.vocab_size, (1, prompt_len))
    for _ in range(2):  # warm up at the timed shapes (new shapes JIT-compile)
        cache = make_cache()
        mx.eval(call(model, tokens, cache))
        y = mx.array([[1]])
        for _ in range(4):
            mx.eval(call(model, y, cache))
    mx.reset_peak_memory()
    cache = make_cache()
    t0 = time.perf_counter()
    logits = call(model, tokens, cache)
    mx.eval(logits)
    t1 = time.perf_counter()
    y = mx.argmax(logits[:, -1:], axis=-1)
    for _ in range(decode_steps):
        y = mx.argmax(call(model, y, cache)[:, -1:], axis=-1)
        mx.eval(y)
    t2 = time.perf_counter()
    row = dict(label=label, prefill_tps=prompt_len / (t1 - t0), decode_tps=decode_steps / (t2 - t1),
               peak_gb=mx.get_peak_memory() / 1e9)
    print(f"{label:8s} prefill {prompt_len}: {row['prefill_tps']:8.1f} tok/s | decode: {row['decode_tps']:7.1f} tok/s"
          f" | peak {row['peak_gb']:.2f} GB")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="shrink the widths (a quick run on the CPU)")
    a = ap.parse_args()
    from mlx_lm.models.cache import make_prompt_cache

    cfg = dict(AIR, num_hidden_layers=a.layers)
    if a.small:
        cfg.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64, n_routed_experts=16, num_experts_per_tok=4, vocab_size=1024)
    print(mx.default_device(), f"GLM-4.5-Air shape, {a.layers} layers, every linear 4-bit g64")
    ref = build_mlx_lm(cfg)
    ours = build_ours(cfg, ref)
    toks = mx.random.randint(0, cfg["vocab_size"], (1, 64))
    la, lb = ref(toks).astype(mx.float32), ours(toks).astype(mx.float32)
    rel = (mx.linalg.norm(lb - la) / mx.linalg.norm(la)).item()
    agree = (mx.argmax(la, -1) == mx.argmax(lb, -1)).astype(mx.float32).mean().item()
    print(f"logits vs mlx-lm (bf16 compute, same weights): relative difference {rel:.2e}, argmax agreement {agree:.3f}")
    timed("mlx-lm", ref, lambda: make_prompt_cache(ref), lambda m, t, c: m(t, cache=c), a.prompt, a.steps)
    timed("glm-mlx", ours, ours.make_cache, lambda m, t, c: m(t, c, checked=True), a.prompt, a.steps)


if __name__ == "__main__":
    main()
