"""Peak memory of one MoE layer's routed experts over a prefill chunk, through each way a quantized projection
can go over many rows: dequantized whole then gather_mm (CUDA's choice over experts.DEQUANT_ROWS rows), or
gather_qmm on the rows sorted by expert (Metal's, as mlx-lm).

    python3 scripts/prefill_memory.py --shape air --tokens 2048

No Mac runs here, so this runs on the CPU as a proxy for Metal's memory (float32: the CPU's gather_mm takes no
other dtype, so the dequantized experts are twice what bf16 would hold on a Mac). A 4096-token prompt is
prefilled in chunks of generate.PREFILL_CHUNK (2048) tokens, a layer at a time: one chunk through one layer is
the peak's unit.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from glm_mlx import experts
from glm_mlx.bench import bench_config


def measure(shape: str, tokens: int, whole: bool, seed: int = 0) -> tuple[float, float]:
    """(peak GB above the weights and inputs, seconds) of `tokens` tokens through one layer's routed experts."""
    cfg = bench_config(shape)
    E, D, H, k = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    glu = experts.SwitchGLU(D, H, E)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(glu, name)
        shape_ = lin.weight.shape
        w = mx.random.normal(shape_, key=mx.random.key(seed)) * shape_[-1] ** -0.5
        setattr(glu, name, experts.QuantizedSwitchLinear.from_weight(w, 64, 4))
        mx.eval(getattr(glu, name).parameters())
        del w
    x = mx.random.normal((tokens, D), key=mx.random.key(1))
    inds = mx.random.randint(0, E, (tokens, k), key=mx.random.key(2)).astype(mx.uint32)
    mx.eval(x, inds)
    saved = experts.dequantize_whole, experts.backend
    experts.dequantize_whole = lambda rows, dtype: whole and rows >= experts.DEQUANT_ROWS
    experts.backend = lambda: "metal"  # no padded batches (CUDA's), as on a Mac
    try:
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t = time.perf_counter()
        with experts.prefilling():
            mx.eval(glu(x, inds))
        return (mx.get_peak_memory() - base) / 1e9, time.perf_counter() - t
    finally:
        experts.dequantize_whole, experts.backend = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air", help="a bench shape: small, air, glm45")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens in the chunk (generate.PREFILL_CHUNK: 2048)")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"| {a.shape}, {a.tokens} tokens, float32 on the CPU | peak above weights (GB) | seconds |")
    print("|---|---:|---:|")
    for label, whole in (("dequantized whole + gather_mm (CUDA)", True), ("gather_qmm, rows sorted (Metal)", False)):
        peak, secs = measure(a.shape, a.tokens, whole)
        print(f"| {label} | {peak:.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
