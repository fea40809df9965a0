"""What a QLoRA run needs in memory: arithmetic, checked against a measurement.

    PYTHONPATH=. python scripts/finetune_memory.py

The arithmetic: weights at the recipe's bits (count x bits / 8, group scales
and biases included), plus the LoRA state (float32 factors, their gradients
and AdamW's two moments: 16 bytes a parameter), plus activations. It is
checked on the tiny `quality` fixture (the same code paths, float32 on the
CPU) against MLX's peak-memory counter over two training steps, then applied
to GLM-4.5-Air and GLM-4.5 in bf16 with the default `mixed` recipe.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from glm_mlx.config import ModelArgs

AIR = dict(hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96,
           num_key_value_heads=8, head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, vocab_size=151552)
GLM45 = dict(AIR, hidden_size=5120, num_hidden_layers=92, first_k_dense_replace=3, intermediate_size=12288,
             moe_intermediate_size=1536, n_routed_experts=160)


def linears(a: ModelArgs):
    """(group, in, out, copies) of every weight matrix of the trunk."""
    d, hd = a.hidden_size, a.head_dim
    attn = [(d, a.num_attention_heads * hd), (d, a.num_key_value_heads * hd), (d, a.num_key_value_heads * hd),
            (a.num_attention_heads * hd, d)]
    dense = [(d, a.intermediate_size), (d, a.intermediate_size), (a.intermediate_size, d)]
    m = a.moe_intermediate_size
    moe = [(d, m), (d, m), (m, d)]
    n_moe = a.num_hidden_layers - a.first_k_dense_replace
    out = [("attention", i, o, a.num_hidden_layers) for i, o in attn]
    out += [("dense_mlp", i, o, a.first_k_dense_replace) for i, o in dense]
    out += [("shared_experts", i, o * a.n_shared_experts if o == m else o, n_moe) for i, o in moe]
    out += [("experts", i, o, n_moe * a.n_routed_experts) for i, o in moe]
    out += [("embed", d, a.vocab_size, 1), ("lm_head", d, a.vocab_size, 1), ("router", d, a.n_routed_experts, n_moe)]
    return out


def weight_bytes(a: ModelArgs, float_bytes: int) -> float:
    """The mixed recipe: experts 4-bit, the rest 8-bit (group 64, scale and bias in
    float_bytes each), the router float32; norms and biases ignored (under 0.01%)."""
    total = 0.0
    for group, i, o, n in linears(a):
        bits = {"experts": 4, "router": None}.get(group, 8)
        total += n * i * o * (4 if bits is None else bits / 8 + 2 * float_bytes / 64)
    return total


def lora_params(a: ModelArgs, targets: set[str], rank: int) -> int:
    return sum(n * rank * (i + o) for g, i, o, n in linears(a) if g in targets)


def activation_bytes(a: ModelArgs, tokens: int, float_bytes: int, checkpointed: bool) -> float:
    """Checkpointed, each layer keeps its input and one layer's internals live at a
    time, forward and backward (x2): norms, q/k/v/o, the attention scores (the
    backward of MLX's fused attention materialises them: 3 x heads x T^2), and the
    MoE's gathered rows (k x (2 hidden + 3 expert widths)) and shared expert."""
    d, m, k = a.hidden_size, a.moe_intermediate_size, a.num_experts_per_tok
    attn = 2 * a.num_attention_heads * a.head_dim + 2 * a.num_key_value_heads * a.head_dim
    per_token = 4 * d + attn + k * (2 * d + 3 * m) + 3 * m * a.n_shared_experts + a.n_routed_experts * 2
    inner = 2 * (tokens * float_bytes * per_token + 3 * a.num_attention_heads * tokens * tokens * float_bytes)
    kept = tokens * d * float_bytes * a.num_hidden_layers if checkpointed else 0
    return kept + inner * (1 if checkpointed else a.num_hidden_layers) + tokens * a.vocab_size * 4 * 3


def measure(targets: tuple[str, ...], rank: int, tokens: int, expert_fraction: float | None = None) -> dict:
    """Two steps on the quality fixture; with expert_fraction, the routed experts offloaded to that
    fraction of their bytes (the step then runs layer by layer, checkpointed either way)."""
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint
    from glm_mlx.data import Dataset, Example
    from glm_mlx.finetune import TrainConfig, Trainer
    from glm_mlx.loading import load_model

    d = Path(tempfile.mkdtemp())
    cfg = make_config("quality")
    folder = convert(write_checkpoint(d / "src", cfg, with_mtp=False), d / "m", "mixed")
    manifest = json.loads((folder / "glm_mlx.json").read_text())
    experts = sum(e["stride"] * e["num_experts"] for e in manifest["experts"].values())
    budget = int(experts * expert_fraction) if expert_fraction else None
    model, manifest = load_model(folder, "float32", expert_memory=budget)
    a = model.args
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ds = Dataset([Example([1 + i % 300 for i in range(tokens)], [True] * tokens)], 0, 0)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    cfg = TrainConfig(rank=rank, targets=targets, iters=2, grad_checkpoint=True, max_seq_len=tokens + 1)
    t = Trainer(model, ds, cfg, d / "a", base_manifest=manifest, base_dir=folder, log=lambda s: None)
    t.run()
    n_lora = sum(v.size for _, v in tree_flatten(t.model.trainable_parameters()))
    return {"weights measured": weights, "weights arithmetic": weight_bytes(a, 4),
            "lora params measured": n_lora, "lora params arithmetic": lora_params(a, set(targets), rank),
            "peak measured": mx.get_peak_memory(), "resident before training": base,
            "peak arithmetic": base + 16 * n_lora + activation_bytes(a, tokens - 1, 4, True)}


def main():
    gb = 1e9
    print("## Measured at small size (quality fixture, float32 on the CPU, 2 steps, 512 tokens, checkpointed)\n")
    default = ("attention", "dense_mlp", "shared_experts")
    for targets, fraction in ((default, None), (default + ("experts",), None), (default, 0.2)):
        m = measure(targets, rank=8, tokens=512, expert_fraction=fraction)
        mode = f", experts offloaded to {fraction:.0%} of their bytes" if fraction else ""
        print(f"targets {','.join(targets)}{mode}: " + json.dumps({k: round(v / 1e6, 2) if "params" not in k else v
                                                            for k, v in m.items()}) + "  (MB, parameters)")
    print("\n## GLM-4.5-Air and GLM-4.5, bf16 compute, mixed recipe, rank 8, 4096 tokens a step, checkpointed\n")
    print("| model | weights | LoRA state, default targets | + routed experts | activations | resident total "
          "(default / with experts) | offloaded: non-expert weights + LoRA + activations |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, shape in (("GLM-4.5-Air", AIR), ("GLM-4.5", GLM45)):
        a = ModelArgs.from_dict({"model_type": "glm4_moe", **shape})
        w = weight_bytes(a, 2)
        default = 16 * lora_params(a, {"attention", "dense_mlp", "shared_experts"}, 8)
        experts = 16 * lora_params(a, {"experts"}, 8)
        act = activation_bytes(a, 4096, 2, True)
        expert_w = sum(n * i * o * (4 / 8 + 4 / 64) for g, i, o, n in linears(a) if g == "experts")
        print(f"| {name} | {w / gb:.1f} GB | {default / gb:.2f} GB | {experts / gb:.1f} GB | {act / gb:.1f} GB | "
              f"{(w + default + act) / gb:.1f} / {(w + default + experts + act) / gb:.1f} GB | "
              f"{(w - expert_w + default + act) / gb:.1f} GB + the expert budget |")


if __name__ == "__main__":
    sys.exit(main())
