"""MLX's quantized matmul on the GPU against the CPU, same inputs, repeated.

    python3 scripts/cuda_qmm_check.py

Prints the relative difference of three GPU runs for each shape and marks
those that disagree. On MLX 0.32.4's CUDA backend, input width 64 with more
than one row disagrees (see BENCHMARKS.md).
"""

import numpy as np
import mlx.core as mx


def check(name, f, reps=3):
    mx.set_default_device(mx.cpu)
    a = np.array(f().astype(mx.float32))
    mx.set_default_device(mx.gpu)
    rels = [np.linalg.norm(a - np.array(f().astype(mx.float32))) / max(np.linalg.norm(a), 1e-30) for _ in range(reps)]
    bad = max(rels) > 0.05 or not np.isfinite(rels).all()
    print(f"{name:42s} " + " ".join(f"{r:.1e}" for r in rels) + ("  <-- disagrees" if bad else ""))


def main():
    rng = np.random.default_rng(0)
    for K in (64, 128, 256):
        for bits in (4, 8):
            for T in (1, 7, 20):
                x = mx.array(rng.standard_normal((1, T, K)).astype(np.float32))
                w = mx.array(rng.standard_normal((128, K)).astype(np.float32))
                for dt in (mx.float32, mx.bfloat16):
                    q = mx.quantize(w.astype(dt), 64, bits)
                    check(f"qmm K={K} bits={bits} rows={T} {dt}", lambda: mx.quantized_matmul(
                        x.astype(dt), *q, transpose=True, group_size=64, bits=bits))


if __name__ == "__main__":
    main()
