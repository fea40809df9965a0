"""What the RMSNorm and RoPE folded into the decode kernels cost, at the Air's shapes (GPU).

    cd scripts && python3 norm_probe.py

µs per call (kernel_check's per_call: weights cycled past the L2) of the MoE block (8 routed experts,
the shared expert and the residual), the shared expert alone, and q|k|v, each with and without the
norm (and RoPE for q|k|v), twice each.
"""
import mlx.core as mx
from kernel_check import (copies, expert_sets, per_call, quantized_experts, quantized_linear, quantized_mlps, rand,
                          rms_norm)
from glm_mlx.kernels import moe_decode, qkv_decode


mx.random.seed(0)
E, H, D = 128, 1408, 4096
glu, n = quantized_experts(E, H, D), 16
shared = quantized_mlps(n, H, D)
sets = expert_sets(E, 8, n)
x, res, norm = rand((D,), 1.0), rand((D,), 1.0), rms_norm(D)
wts = mx.softmax(mx.random.normal((8,)))
mx.eval(glu.parameters(), [m.parameters() for m in shared], sets, x, res, norm.parameters())
for label, nm in (("moe no norm", None), ("moe norm", norm)):
    for r in range(2):
        us = per_call(lambda i: moe_decode(x, glu, sets[i % n], wts, shared[i % n], res, nm))
        print(label, f"{us:.1f}", flush=True)
for label, nm in (("shared-only no norm", None), ("shared-only norm", norm)):
    print(label, f"{per_call(lambda i: moe_decode(x, None, None, None, shared[i % n], res, nm)):.1f}", flush=True)
NQ, NK = 12288, 1024
nn_ = copies((NQ + 2 * NK) * D * 0.5625 / 1e9)
qkv = [tuple(quantized_linear((m, D), bias=True) for m in (NQ, NK, NK)) for _ in range(nn_)]
mx.eval([[m.parameters() for m in t] for t in qkv])
shapes = ((1, 96, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))
for label, nm, rope in (("qkv plain", None, None), ("qkv norm", norm, None), ("qkv rope", None, (64, 1e6, 1000)),
                        ("qkv norm+rope", norm, (64, 1e6, 1000))):
    for r in range(2):
        print(label, f"{per_call(lambda i: qkv_decode(x, *qkv[i % nn_], shapes, nm, rope)):.1f}", flush=True)
