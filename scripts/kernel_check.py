"""Each custom kernel against its pure-MLX reference on this machine's GPU, and its speed beside MLX's own op.

    python3 scripts/kernel_check.py

Prints, per shape, the worst relative error against the reference (the
tolerance is stated) and microseconds per call (chained in one evaluation,
as inside a decode step) for the kernel and for MLX's gather_qmm /
quantized_matmul on the same operands.
"""

from __future__ import annotations

import json
import time

import mlx.core as mx

from glm_mlx.experts import QuantizedSwitchLinear, SwitchGLU
from glm_mlx.kernels import backend, gather_qmv, gather_qmv_reference, moe_decode, moe_decode_reference

TOL = 1e-4  # float32 sums in another order than the reference's (both dequantize in float32)


def per_call(fn, reps=50, rounds=5):
    def chain():
        y = None
        for _ in range(reps):
            y = fn(y)
        return y
    mx.eval(chain())
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval(chain())
        best = min(best, time.perf_counter() - t0)
    return best / reps * 1e6


def main():
    mx.random.seed(0)
    print(mx.default_device(), "kernel backend:", backend())
    rows = []
    # (name, experts, N, K, x rows, chosen rows, bits)
    for name, E, N, K, xr, M, bits in (("Air gate/up: 8 of 128, 4096 -> 1408", 128, 1408, 4096, 1, 8, 4),
                                       ("Air down: 8 of 128, 1408 -> 4096", 128, 4096, 1408, 8, 8, 4),
                                       ("Air q|k|v dense, 4096 -> 14336", 1, 14336, 4096, 1, 1, 4),
                                       ("Air o_proj dense, 12288 -> 4096", 1, 4096, 12288, 1, 1, 4),
                                       ("Air shared gate, 8-bit, 4096 -> 1408", 1, 1408, 4096, 1, 1, 8),
                                       ("GLM-4.5 gate: 8 of 160, 5120 -> 1536", 160, 1536, 5120, 1, 8, 4)):
        W = (mx.random.normal((E, N, K)) * K**-0.5).astype(mx.bfloat16)
        w, s, b = mx.quantize(W, 64, bits)
        del W
        x = mx.random.normal((xr, K)).astype(mx.bfloat16)
        inds = mx.array(sorted(mx.random.permutation(E)[:M].tolist()) if E > 1 else [0], mx.uint32)
        mx.eval(w, s, b, x, inds)
        got, want = gather_qmv(x, w, s, b, inds, 64, bits), gather_qmv_reference(x, w, s, b, inds, 64, bits)
        err = (mx.abs(got - want).max() / mx.abs(want).max()).item()
        ours = per_call(lambda y: gather_qmv(x if y is None else x + 0 * y[:xr, :1].astype(x.dtype), w, s, b,
                                             inds, 64, bits))
        xe = x[:, None, :] if xr == M else mx.broadcast_to(x, (M, K))[:, None, :]
        mlx = per_call(lambda y: mx.gather_qmm(xe if y is None else xe + 0 * y[:1, :1, :1], w, s, b,
                                               rhs_indices=inds, transpose=True, group_size=64, bits=bits))
        gb = (M * N * K * bits / 8 + 2 * M * N * K / 64 * 2) / 1e9
        row = dict(name=name, worst_rel_err=err, ok=err < TOL, ours_us=ours, mlx_us=mlx, weight_gb=gb,
                   ours_gbps=gb / ours * 1e6)
        rows.append(row)
        print(f"{name:42s} worst rel err {err:.1e} ({'ok' if err < TOL else 'FAIL'} < {TOL:g}) | "
              f"ours {ours:7.1f} us ({gb / ours * 1e6:6.0f} GB/s) | mlx gather_qmm {mlx:7.1f} us", flush=True)
    # A token's routed experts: two launches against SwitchGLU's path (gather_qmm x3, swiglu, weighted sum)
    for name, E, H, D in (("Air routed experts, 8 of 128", 128, 1408, 4096),
                          ("GLM-4.5 routed experts, 8 of 160", 160, 1536, 5120)):
        glu = SwitchGLU(D, H, E)
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(glu, p)
            Wt = (mx.random.normal(lin.weight.shape) * lin.weight.shape[-1] ** -0.5).astype(mx.bfloat16)
            q = QuantizedSwitchLinear(E, Wt.shape[-1], Wt.shape[-2], 64, 4)
            q.weight, q.scales, q.biases = mx.quantize(Wt, 64, 4)
            setattr(glu, p, q)
        mx.eval(glu.parameters())
        x = mx.random.normal((D,)).astype(mx.bfloat16)
        inds = mx.array(sorted(mx.random.permutation(E)[:8].tolist()), mx.uint32)
        wts = mx.softmax(mx.random.normal((8,)))
        got = moe_decode(x, glu.gate_proj, glu.up_proj, glu.down_proj, inds, wts)
        want = moe_decode_reference(x, glu.gate_proj, glu.up_proj, glu.down_proj, inds, wts)
        err = (mx.abs(got - want).max() / mx.abs(want).max()).item()

        def switch(y):
            xi = x if y is None else x + 0 * y[:1].astype(x.dtype)
            out = glu(xi[None, None], inds[None, None])
            return (out * wts[None, None, :, None].astype(out.dtype)).sum(-2).reshape(-1)
        ours = per_call(lambda y: moe_decode(x if y is None else x + 0 * y[:1].astype(x.dtype), glu.gate_proj,
                                             glu.up_proj, glu.down_proj, inds, wts))
        mlx = per_call(switch)
        rows.append(dict(name=name, worst_rel_err=err, ok=err < TOL, ours_us=ours, mlx_us=mlx))
        print(f"{name:42s} worst rel err {err:.1e} ({'ok' if err < TOL else 'FAIL'} < {TOL:g}) | "
              f"fused {ours:7.1f} us | SwitchGLU + weighted sum {mlx:7.1f} us", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
