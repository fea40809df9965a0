"""Each custom kernel against its pure-MLX reference on this machine's GPU, and its speed beside MLX's own op.

    python3 scripts/kernel_check.py

Prints, per shape, the worst relative error against the reference (the
tolerance is stated; every rows-per-simdgroup setting checked) and
microseconds per call (50 calls in one evaluation, run one after another as
a step's kernels are) for the kernel at each `--rpw` setting and for MLX's
gather_qmm / SwitchGLU on the same operands.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from glm_mlx.experts import QuantizedSwitchLinear, SwitchGLU
from glm_mlx import kernels
from glm_mlx.kernels import (
    backend,
    gather_qmv,
    gather_qmv_reference,
    linear_decode,
    linear_decode_reference,
    moe_decode,
    moe_decode_reference,
    qkv_decode,
    qkv_decode_reference,
    router_select,
    router_select_reference,
)
from glm_mlx.model import MLP

RPWS = [kernels.RPW]
TOL = 1e-4  # float32 sums in another order than the reference's (both dequantize in float32)
TOL_BF16 = 2**-8  # outputs rounded to bf16 by both: sums in another order may round one step apart


def per_call(fn, reps=50, rounds=5):
    """Microseconds per call of fn() -> array: `reps` independent calls in one evaluation
    (run one after another on the stream, as a step's kernels are), best of `rounds`."""
    mx.eval([fn() for _ in range(reps)])
    best = float("inf")
    for _ in range(rounds):
        outs = [fn() for _ in range(reps)]
        t0 = time.perf_counter()
        mx.eval(outs)
        best = min(best, time.perf_counter() - t0)
    return best / reps * 1e6


def sweep(fn) -> dict[int, float]:
    """fn's time at each rows-per-simdgroup setting, kernels.RPW left at its default."""
    default, out = kernels.RPW, {}
    for r in RPWS:
        kernels.RPW = r
        out[r] = per_call(fn)
    kernels.RPW = default
    return out


def worst(fn, want) -> float:
    """The worst relative error of fn() against `want` over every rows-per-simdgroup setting."""
    default, errs = kernels.RPW, []
    for r in RPWS:
        kernels.RPW = r
        errs.append((mx.abs(fn() - want).max() / mx.abs(want).max()).item())
    kernels.RPW = default
    return max(errs)


def rand(shape, scale=None) -> mx.array:
    return (mx.random.normal(shape) * (shape[-1] ** -0.5 if scale is None else scale)).astype(mx.bfloat16)


def quantized_linear(shape, bias=False, bits=4) -> nn.QuantizedLinear:
    lin = nn.QuantizedLinear(shape[1], shape[0], bias=bias, group_size=64, bits=bits)
    lin.weight, lin.scales, lin.biases = mx.quantize(rand(shape), 64, bits)
    if bias:
        lin.bias = rand((shape[0],), 0.1)
    return lin


def report(rows: list, name: str, err: float, ours: dict[int, float], mlx: float, mlx_name: str, gb: float,
           tol: float = TOL):
    best = min(ours, key=ours.get)
    rows.append(dict(name=name, worst_rel_err=err, tol=tol, ok=err < tol, ours_us=ours, mlx_us=mlx, weight_gb=gb))
    times = " ".join(f"rpw{r} {t:6.1f}" for r, t in ours.items())
    print(f"{name:42s} worst rel err {err:.1e} ({'ok' if err < tol else 'FAIL'} < {tol:.1e}) | ours us: {times} "
          f"(best {gb / ours[best] * 1e6:5.0f} GB/s) | {mlx_name} {mlx:6.1f} us ({gb / mlx * 1e6:5.0f} GB/s)",
          flush=True)


def main():
    global RPWS
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpw", default="1,2,4,8", help="rows per simdgroup to time")
    RPWS = [int(r) for r in ap.parse_args().rpw.split(",")]
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
        want = gather_qmv_reference(x, w, s, b, inds, 64, bits)
        err = worst(lambda: gather_qmv(x, w, s, b, inds, 64, bits), want)
        ours = sweep(lambda: gather_qmv(x, w, s, b, inds, 64, bits))
        xe = x[:, None, :] if xr == M else mx.broadcast_to(x, (M, K))[:, None, :]
        mlx = per_call(lambda: mx.gather_qmm(xe, w, s, b, rhs_indices=inds, transpose=True, group_size=64,
                                             bits=bits))
        gb = (M * N * K * bits / 8 + 2 * M * N * K / 64 * 2) / 1e9
        report(rows, name, err, ours, mlx, "mlx gather_qmm", gb)
    # A token's MLP block: routed experts, shared expert and residual in two launches, against MLX's path
    # (SwitchGLU's gather_qmm x3 and swiglu, the weighted sum, the shared MLP's three qmm, the adds)
    for name, E, H, D in (("Air MoE block: 8 of 128 + shared + residual", 128, 1408, 4096),
                          ("GLM-4.5 MoE block: 8 of 160 + shared + residual", 160, 1536, 5120)):
        glu, shared = SwitchGLU(D, H, E), MLP(D, H)
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(glu, p)
            q = QuantizedSwitchLinear(E, lin.weight.shape[-1], lin.weight.shape[-2], 64, 4)
            q.weight, q.scales, q.biases = mx.quantize(rand(lin.weight.shape), 64, 4)
            setattr(glu, p, q)
            setattr(shared, p, quantized_linear(getattr(shared, p).weight.shape))
        mx.eval(glu.parameters(), shared.parameters())
        x, res = rand((D,), 1.0), rand((D,), 1.0)
        inds = mx.array(sorted(mx.random.permutation(E)[:8].tolist()), mx.uint32)
        wts = mx.softmax(mx.random.normal((8,)))
        want = moe_decode_reference(x, glu, inds, wts, shared, res).astype(mx.float32)
        err = worst(lambda: moe_decode(x, glu, inds, wts, shared, res).astype(mx.float32), want)

        def mlx_block():
            out = glu(x[None, None], inds[None, None])
            return res + (out * wts[None, None, :, None].astype(out.dtype)).sum(-2).reshape(-1) + shared(x)
        ours = sweep(lambda: moe_decode(x, glu, inds, wts, shared, res))
        gb = (sum(q.weight.nbytes + q.scales.nbytes + q.biases.nbytes for q in (glu.gate_proj, glu.up_proj,
                                                                               glu.down_proj)) * 8 / E
              + sum(v.nbytes for _, v in tree_flatten(shared.parameters()))) / 1e9
        report(rows, name, err, ours, per_call(mlx_block), "MLX ops", gb, TOL_BF16)
    # The Air's attention projections: q|k|v with biases in one launch; o_proj with the residual in one
    D, NQ, NK = 4096, 12288, 1024
    q, k, v = (quantized_linear((n, D), bias=True) for n in (NQ, NK, NK))
    o = quantized_linear((D, NQ))
    x, a, res = rand((D,), 1.0), rand((NQ,), 1.0), rand((D,), 1.0)
    mx.eval(q.parameters(), k.parameters(), v.parameters(), o.parameters(), x, a, res)
    shapes = ((1, 96, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))
    want = mx.concatenate([t.reshape(-1) for t in qkv_decode_reference(x, q, k, v, shapes)]).astype(mx.float32)
    err = worst(lambda: mx.concatenate([t.reshape(-1) for t in qkv_decode(x, q, k, v, shapes)]).astype(mx.float32),
                want)
    gb = sum(val.nbytes for m in (q, k, v) for _, val in tree_flatten(m.parameters())) / 1e9
    report(rows, "Air q|k|v + biases, 4096 -> 12288|1024|1024", err, sweep(lambda: qkv_decode(x, q, k, v, shapes)),
           per_call(lambda: [q(x[None]), k(x[None]), v(x[None])]), "3 QuantizedLinear", gb, TOL_BF16)
    want = linear_decode_reference(a, o, res).astype(mx.float32)
    err = worst(lambda: linear_decode(a, o, res).astype(mx.float32), want)
    gb = sum(val.nbytes for _, val in tree_flatten(o.parameters())) / 1e9
    report(rows, "Air o_proj + residual, 12288 -> 4096", err, sweep(lambda: linear_decode(a, o, res)),
           per_call(lambda: res + o(a[None])[0]), "QuantizedLinear + add", gb, TOL_BF16)
    # The router's choice after its logits, one simdgroup
    for name, E, topk, scale in (("Air router select, 8 of 128", 128, 8, 1.0), ("GLM-4.5 router select, 8 of 160",
                                                                               160, 8, 2.5)):
        logits, bias = mx.random.normal((E,)), mx.random.normal((E,)) * 0.1
        wi, ww = router_select_reference(logits, bias, topk, True, scale)
        gi, gw = router_select(logits, bias, topk, True, scale)
        same = mx.array_equal(wi, gi).item()
        err = (mx.abs(gw - ww).max() / mx.abs(ww).max()).item() if same else float("inf")

        def mlx_router():
            scores = mx.sigmoid(logits)
            i = mx.argpartition(-(scores + bias), topk - 1)[:topk]
            w = scores[i]
            return i, w / (w.sum() + 1e-20) * scale
        ours = per_call(lambda: router_select(logits, bias, topk, True, scale)[1])
        report(rows, name, err, {kernels.RPW: ours}, per_call(lambda: mlx_router()[1]), "MLX ops", 0.0)
    # The model's decode through all of them, against its plain MLX path, on the same weights
    import glm_mlx.model as model_mod
    from glm_mlx.bench import bench_config, build_ours, random_weights

    cfg = bench_config("air", 3)
    model = build_ours(cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
    toks = mx.random.randint(0, cfg["vocab_size"], (1, 12))

    def decode():
        cache = model.make_cache()
        mx.eval(model(toks[:, :4], cache))
        return mx.concatenate([model(toks[:, t : t + 1], cache).astype(mx.float32) for t in range(4, 12)], axis=1)
    fused = decode()
    model_mod.FUSED_DECODE = False
    plain = decode()
    model.set_dtype(mx.float32)  # scales, biases, norms and embeddings in float32; codes unchanged
    exact = decode()
    model_mod.FUSED_DECODE = True

    def diff(a):
        return ((mx.linalg.norm(a - exact) / mx.linalg.norm(exact)).item(),
                (a.argmax(-1) == exact.argmax(-1)).mean().item())
    (ef, af), (ep, ap) = diff(fused), diff(plain)
    rows.append(dict(name="Air decode, 3 layers, 8 tokens, against float32", kernels_rel=ef, kernels_argmax=af,
                     mlx_ops_rel=ep, mlx_ops_argmax=ap))
    print(f"Air decode, 3 layers, 8 tokens, against the same model in float32 through MLX's ops: bf16 through the "
          f"kernels: relative difference {ef:.1e}, argmax agreement {af:.0%}; bf16 through MLX's ops: {ep:.1e}, "
          f"{ap:.0%}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
