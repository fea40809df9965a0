"""Where a decode step's time goes, op by op, at GLM-4.5-Air's shapes (and prefill's expert matmuls).

    python3 scripts/decode_profile.py

Each item runs R times chained inside one evaluation (each repeat depends on
the last, so they cannot overlap), so a time is what the op costs inside a
step, launches included, without the host round trip of an eval of its own.
Weights are random, 4-bit group 64, activations bf16; the router in float32.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

import os
if os.environ.get("SMALL"):
    D, H, E, K, HQ, HKV, HD, DFF = 256, 128, 16, 8, 8, 2, 64, 512
else:
    D, H, E, K, HQ, HKV, HD, DFF = 4096, 1408, 128, 8, 96, 8, 128, 10944


def q4(out, inp, experts=None):
    shape = (out, inp) if experts is None else (experts, out, inp)
    w = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
    return mx.quantize(w, 64, 4)


def timeit(name, fn, x, reps=50, rounds=5):
    """fn: x -> y of x's shape; chained reps times per eval; microseconds per call."""
    def chain(x):
        for _ in range(reps):
            x = fn(x)
        return x
    for _ in range(2):
        mx.eval(chain(x))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval(chain(x))
        best = min(best, time.perf_counter() - t0)
    us = best / reps * 1e6
    print(f"{name:58s} {us:9.1f} us", flush=True)
    return us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    mx.random.seed(0)
    x = (0.1 * mx.random.normal((1, 1, D))).astype(mx.bfloat16)
    res = {}

    def qmm(x, w):
        return mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)

    def back(y):  # fold any output back to x's shape, cheaply, so calls chain
        return (y[..., :D] if y.shape[-1] >= D else mx.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, D - y.shape[-1])]))

    # --- attention projections
    wq, wk, wv, wo = q4(HQ * HD, D), q4(HKV * HD, D), q4(HKV * HD, D), q4(D, HQ * HD)
    wqkv = tuple(mx.concatenate([a, b, c]) for a, b, c in zip(wq, wk, wv))
    mx.eval(wq, wk, wv, wo, wqkv)
    res["qkv separate"] = timeit("q, k, v: three qmm", lambda x: back(qmm(x, wq) + mx.pad(qmm(x, wk) + qmm(x, wv),
                                 [(0, 0), (0, 0), (0, HQ * HD - HKV * HD)])), x)
    res["qkv fused"] = timeit("q|k|v: one qmm on concatenated weights", lambda x: back(qmm(x, wqkv)), x)
    res["o_proj"] = timeit("o_proj qmm (12288 -> 4096)", lambda x: qmm(mx.tile(x, (1, 1, HQ * HD // D)), wo), x)
    norm_w = mx.ones((D,), mx.bfloat16)
    res["rms_norm"] = timeit("rms_norm", lambda x: mx.fast.rms_norm(x, norm_w, 1e-5), x)

    # --- attention at context
    for ctx in (512, a.ctx, 32768):
        kc = (0.1 * mx.random.normal((1, HKV, ctx, HD))).astype(mx.bfloat16)
        vc = (0.1 * mx.random.normal((1, HKV, ctx, HD))).astype(mx.bfloat16)
        mx.eval(kc, vc)

        def attn(x, kc=kc, vc=vc):
            q = mx.tile(x, (1, 1, HQ * HD // D)).reshape(1, 1, HQ, HD).transpose(0, 2, 1, 3)
            o = mx.fast.scaled_dot_product_attention(q, kc, vc, scale=HD**-0.5)
            return o.transpose(0, 2, 1, 3).reshape(1, 1, -1)[..., :D]
        res[f"sdpa {ctx}"] = timeit(f"sdpa, context {ctx}", attn, x)

    # --- router
    wr = 0.02 * mx.random.normal((E, D))
    bias = mx.zeros((E,))

    def route(x):
        s = mx.sigmoid(x.astype(mx.float32) @ wr.T)
        inds = mx.argpartition(-(s + bias), K - 1, axis=-1)[..., :K]
        w = mx.take_along_axis(s, inds, axis=-1)
        return inds, w / w.sum(-1, keepdims=True)

    res["router"] = timeit("router (f32 matmul, sigmoid, top-k, normalise)",
                           lambda x: x + route(x)[1].sum().astype(x.dtype) * 0, x)
    croute = mx.compile(route)
    res["router compiled"] = timeit("router under mx.compile", lambda x: x + croute(x)[1].sum().astype(x.dtype) * 0, x)

    # --- routed experts, one token
    wg, wu, wd = q4(H, D, E), q4(H, D, E), q4(D, H, E)
    wgu = tuple(mx.concatenate([a, b], axis=1) for a, b in zip(wg, wu))
    mx.eval(wg, wu, wd, wgu)
    inds = mx.array([[[3, 17, 29, 40, 77, 90, 101, 127]]], mx.uint32)

    def gq(x, w, i=inds):
        return mx.gather_qmm(x, *w, rhs_indices=i, transpose=True, group_size=64, bits=4)

    def experts3(x):
        xe = mx.expand_dims(x, (-2, -3))
        h = nn.silu(gq(xe, wg)) * gq(xe, wu)
        return gq(h, wd).squeeze(-2).sum(-2)

    def experts2(x):
        xe = mx.expand_dims(x, (-2, -3))
        gu = gq(xe, wgu)
        h = nn.silu(gu[..., :H]) * gu[..., H:]
        return gq(h, wd).squeeze(-2).sum(-2)

    res["experts 3 gather_qmm"] = timeit("routed experts: gate, up, down gather_qmm + swiglu", experts3, x)
    res["experts fused gate|up"] = timeit("routed experts: gate|up fused, down", experts2, x)
    res["one gather_qmm"] = timeit("one gather_qmm (8 of 128, 4096 -> 1408)", lambda x: back(gq(mx.expand_dims(
        x, (-2, -3)), wg).squeeze(-2).sum(-2)), x)
    cexp = mx.compile(experts2)
    res["experts fused compiled"] = timeit("routed experts: fused, under mx.compile", cexp, x)

    # --- shared expert
    sg, su, sd = q4(H, D), q4(H, D), q4(D, H)
    sgu = tuple(mx.concatenate([a, b]) for a, b in zip(sg, su))
    mx.eval(sg, su, sd, sgu)
    res["shared 3 qmm"] = timeit("shared expert: three qmm", lambda x: qmm(nn.silu(qmm(x, sg)) * qmm(x, su), sd), x)
    res["shared fused"] = timeit("shared expert: gate|up fused", lambda x: qmm(
        (lambda gu: nn.silu(gu[..., :H]) * gu[..., H:])(qmm(x, sgu)), sd), x)

    # --- elementwise launches
    res["add"] = timeit("one elementwise add", lambda x: x + 1, x, reps=200)

    # --- prefill: the expert matmuls at many rows
    for T in (512, 4096):
        xs = (0.1 * mx.random.normal((T, D))).astype(mx.bfloat16)
        ti = mx.random.randint(0, E, (T, K)).astype(mx.uint32)
        flat = ti.flatten()
        order = mx.argsort(flat)
        xsort, isort = xs[order // K][:, None, :], flat[order]
        mx.eval(xsort, isort)
        res[f"prefill {T} gather_qmm sorted"] = timeit(
            f"prefill {T}: gate gather_qmm over {T * K} sorted rows",
            lambda z: z + 0 * gq(xsort, wg, isort)[0, 0, :1].astype(z.dtype).sum(), x, reps=5, rounds=3)
        wdq = mx.dequantize(*wg, group_size=64, bits=4)
        mx.eval(wdq)
        res[f"prefill {T} gather_mm bf16"] = timeit(
            f"prefill {T}: gate gather_mm on dequantized bf16 experts",
            lambda z: z + 0 * mx.gather_mm(xsort, wdq.swapaxes(-1, -2), rhs_indices=isort,
                                           sorted_indices=True)[0, 0, :1].astype(z.dtype).sum(), x, reps=5, rounds=3)
        res[f"prefill {T} dequantize"] = timeit(
            f"prefill {T}: dequantize all 128 gate experts (bf16)",
            lambda z: z + 0 * mx.dequantize(*wg, group_size=64, bits=4)[0, 0, :1].sum(), x, reps=5, rounds=3)
        dense = q4(H * 8, D)
        mx.eval(dense)
        res[f"prefill {T} dense qmm"] = timeit(
            f"prefill {T}: one dense qmm [{T} x 4096] x [4096 x {H * 8}] (same FLOPs)",
            lambda z: z + 0 * qmm(xs, dense)[:1, :1].sum(), x, reps=5, rounds=3)
    import json
    print(json.dumps(res))


if __name__ == "__main__":
    main()
