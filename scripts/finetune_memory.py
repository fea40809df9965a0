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
from glm_mlx.finetune import activation_bytes, linears, lora_params, weight_bytes

AIR = dict(hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96,
           num_key_value_heads=8, head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, vocab_size=151552)
GLM45 = dict(AIR, hidden_size=5120, num_hidden_layers=92, first_k_dense_replace=3, intermediate_size=12288,
             moe_intermediate_size=1536, n_routed_experts=160)


def measure(targets: tuple[str, ...], rank: int, tokens: int, expert_fraction: float | None = None) -> dict:
    """Two steps on the quality fixture; with expert_fraction, the routed experts offloaded to that
    fraction of their bytes (the step then runs layer by layer, checkpointed either way)."""
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint
    from glm_mlx.data import Dataset, Example
    from glm_mlx.finetune import TrainConfig, Trainer
    from glm_mlx.loading import expert_bytes, load_model, verify_folder

    d = Path(tempfile.mkdtemp())
    cfg = make_config("quality")
    folder = convert(write_checkpoint(d / "src", cfg, with_mtp=False), d / "m", "mixed")
    budget = int(expert_bytes(verify_folder(folder)) * expert_fraction) if expert_fraction else None
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
