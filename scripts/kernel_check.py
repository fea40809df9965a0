"""Each custom kernel against its pure-MLX reference on this machine's GPU, and its speed beside MLX's own op.

    python3 scripts/kernel_check.py

Prints, per shape, the worst relative error against the reference (the
tolerance is stated; every rows-per-threadgroup setting checked) and
microseconds per call (50 calls in one evaluation, run one after another as
a step's kernels are) for the kernel at each `--rpw` setting and for MLX's
gather_qmm / SwitchGLU on the same operands. The calls cycle through copies
of the weights (other experts, or other copies of a dense layer) that
together are several times the card's cache, as a model's layers are: a
kernel timed on weights read a moment ago reads them from the cache, faster
than a decode step ever does.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import numpy as np

from glm_mlx.experts import QuantizedSwitchLinear, SwitchGLU, prefilling
from glm_mlx import kernels
from glm_mlx.kernels import (
    backend,
    dequantize,
    gather_qmv,
    gather_qmv_reference,
    grouped_qmm,
    grouped_qmm_reference,
    linear_decode,
    linear_decode_reference,
    moe_decode,
    moe_decode_reference,
    qkv_decode,
    qkv_decode_cached,
    qkv_decode_reference,
    router_logits,
    router_logits_reference,
    router_select,
    router_select_reference,
    tile_map,
)
from glm_mlx.model import MLP
from decode_trace import device_kernels

RPWS, SPLITS = [kernels.RPW], [None]
TOL = 1e-4  # float32 sums in another order than the reference's (both dequantize in float32)
TOL_BF16 = 2**-8  # outputs rounded to bf16 by both: sums in another order may round one step apart
VERBOSE = SMALL = DEVICE_TIME = False
TOL_GROUPED = 2**-7  # bf16 out, and SwiGLU of gate and up each rounded to bf16: one step of each apart


CACHE_BYTES = 256e6  # the copies of a layer's weights a timing cycles through, together (H100's L2: 50 MB)


def copies(gb: float) -> int:
    """How many copies of `gb` gigabytes of weights exceed CACHE_BYTES."""
    return max(2, -int(-CACHE_BYTES // (gb * 1e9)))


def expert_sets(E: int, M: int, n: int) -> list[mx.array]:
    """n disjoint sets of M of E expert ids, each sorted: calls cycling through them read other experts."""
    perm = mx.random.permutation(E).tolist()
    return [mx.array(sorted(perm[j * M:(j + 1) * M]), mx.uint32) for j in range(n)]


def per_call(fn, reps=50, rounds=5):
    """Microseconds per call of fn(i) -> array for i = 0 .. reps - 1 (fn cycles through copies of its
    weights): `reps` independent calls in one evaluation (run one after another on the stream, as a
    step's kernels are), best of `rounds`. With DEVICE_TIME, the device's time in the calls' kernels
    (CUPTI): wall time includes the host's encoding, about as long as a small kernel on CUDA."""
    mx.eval([fn(i) for i in range(reps)])
    best = float("inf")
    for _ in range(rounds):
        outs = [fn(i) for i in range(reps)]
        if DEVICE_TIME:
            ks = device_kernels(lambda: mx.eval(outs))
            if ks is None:
                raise SystemExit("--device-time needs torch with CUDA beside MLX's")
            best = min(best, sum(e["dur"] for e in ks) * 1e-6)
            continue
        t0 = time.perf_counter()
        mx.eval(outs)
        best = min(best, time.perf_counter() - t0)
    return best / reps * 1e6


def settings():
    """(label, RPW, SPLIT) for each setting swept: rows per row set, simdgroups per row set (None: the
    dispatch's choice)."""
    return [(f"r{r}s{s or 'auto'}", r, s) for r in RPWS for s in SPLITS]


def sweep(fn) -> dict[str, float]:
    """fn's time at each setting, the module's defaults restored after."""
    default, out = (kernels.RPW, kernels.SPLIT), {}
    for label, kernels.RPW, kernels.SPLIT in settings():
        out[label] = per_call(fn)
    kernels.RPW, kernels.SPLIT = default
    return out


def worst(fn, want) -> float:
    """The worst relative error of fn() against `want` over every setting."""
    default, errs = (kernels.RPW, kernels.SPLIT), []
    for _, kernels.RPW, kernels.SPLIT in settings():
        errs.append((mx.abs(fn(0) - want).max() / mx.abs(want).max()).item())
    kernels.RPW, kernels.SPLIT = default
    return max(errs)


def rand(shape, scale=None) -> mx.array:
    return (mx.random.normal(shape) * (shape[-1] ** -0.5 if scale is None else scale)).astype(mx.bfloat16)


def quantized_linear(shape, bias=False, bits=4) -> nn.QuantizedLinear:
    lin = nn.QuantizedLinear(shape[1], shape[0], bias=bias, group_size=64, bits=bits)
    lin.weight, lin.scales, lin.biases = mx.quantize(rand(shape), 64, bits)
    if bias:
        lin.bias = rand((shape[0],), 0.1)
    return lin


def quantized_experts(E: int, H: int, D: int, bits: int = 4) -> SwitchGLU:
    """E SwiGLU experts D -> H -> D, random, quantized to `bits`."""
    glu = SwitchGLU(D, H, E)
    for p in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(glu, p)
        q = QuantizedSwitchLinear(E, lin.weight.shape[-1], lin.weight.shape[-2], 64, bits)
        q.weight, q.scales, q.biases = mx.quantize(rand(lin.weight.shape), 64, bits)
        setattr(glu, p, q)
    return glu


def quantized_mlps(n: int, H: int, D: int) -> list[MLP]:
    """n copies of a shared expert D -> H -> D, random, 4-bit."""
    mlps = [MLP(D, H) for _ in range(n)]
    for m in mlps:
        for p in ("gate_proj", "up_proj", "down_proj"):
            setattr(m, p, quantized_linear(getattr(m, p).weight.shape))
    return mlps


def rms_norm(D: int) -> nn.RMSNorm:
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = (1 + 0.1 * mx.random.normal((D,))).astype(mx.bfloat16)
    return norm


def report(rows: list, name: str, err: float, ours: dict[int, float], mlx: float, mlx_name: str, gb: float,
           tol: float = TOL):
    best = min(ours, key=ours.get)
    rows.append(dict(name=name, worst_rel_err=err, tol=tol, ok=err < tol, ours_us=ours, mlx_us=mlx, weight_gb=gb))
    times = " ".join(f"{r} {t:5.1f}" for r, t in ours.items())
    print(f"{name:42s} worst rel err {err:.1e} ({'ok' if err < tol else 'FAIL'} < {tol:.1e}) | ours us: {times} "
          f"(best {gb / ours[best] * 1e6:5.0f} GB/s) | {mlx_name} {mlx:6.1f} us ({gb / mlx * 1e6:5.0f} GB/s)",
          flush=True)


def check_dequantize(rows: list):
    """A projection's experts dequantized whole (what a prefill chunk does), against mx.dequantize."""
    for E, N, K, bits in ((128, 1408, 4096, 4), (128, 4096, 1408, 4), (128, 1408, 4096, 8)):
        n = copies(E * N * K * bits / 8 / 1e9)
        ws = [mx.quantize(rand((E, N, K)), 64, bits) for _ in range(n)]
        mx.eval(ws)
        want = mx.dequantize(*ws[0], 64, bits).astype(mx.float32)
        got = dequantize(*ws[0], 64, bits).astype(mx.float32)
        err = (mx.abs(got - want) / (mx.abs(want) + 1e-30)).max().item()  # elementwise: one rounding apart
        gb = (E * N * K * bits / 8 + 2 * ws[0][1].nbytes + E * N * K * 2) / 1e9  # read codes, scales, biases; write
        report(rows, f"dequantize {E} x {N} x {K}, {bits}-bit", err,
               {kernels.RPW: per_call(lambda i: dequantize(*ws[i % n], 64, bits), reps=10)},
               per_call(lambda i: mx.dequantize(*ws[i % n], 64, bits), reps=10), "mx.dequantize", gb, 2**-7)


def routing(T: int, E: int, k: int, kind: str, seed: int = 0) -> mx.array:
    """[T, k] distinct experts a row: 'uniform', or 'skewed' (Zipf popularity, as a random-weight router's
    choice is: a few experts take many rows, some none)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** (0.0 if kind == "uniform" else 1.0)
    p = p / p.sum()
    return mx.array(np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)]).astype(np.uint32))


def seconds(fn, rounds: int = 5) -> float:
    """Best wall time of mx.eval(fn()) over `rounds`, after two warm-up calls (new shapes compile)."""
    for _ in range(2):
        mx.eval(fn())
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def check_grouped(rows: list):
    """Air's routed experts over a prefill chunk's rows on tensor cores (grouped_qmm: gate, up and
    SwiGLU in one launch, down in a second) against grouped_qmm_reference, at each tile setting
    (rows a tile, and 4-bit codes dequantized two at a time or one), with the two launches timed
    (tile map included); then the whole SwitchGLU call (sort, tile map, both launches, back in
    order) timed beside the path it replaces (the experts dequantized whole and multiplied by
    gather_mm, or the padded batch) and beside gather_qmm's (mlx-lm's), gate alone."""
    D, H, E, k = (256, 128, 4, 2) if SMALL else (4096, 1408, 128, 8)
    default = (kernels.GROUPED_BM, kernels.GROUPED_FAST)
    for bits in (4, 8):
        glu = quantized_experts(E, H, D, bits)
        mx.eval(glu.parameters())
        for T in (8, 40) if SMALL else (512, 2048):
            for kind in ("uniform", "skewed"):
                x = rand((T, D), 1.0)
                inds = routing(T, E, k, kind)
                flat = inds.flatten()
                order = mx.argsort(flat).astype(mx.uint32)
                idx = flat[order]
                src = order // k
                h_ref = grouped_qmm_reference(x, glu.gate_proj, idx, src, None, glu.up_proj)
                y_ref = grouped_qmm_reference(h_ref, glu.down_proj, idx, None, order)
                mx.eval(h_ref, y_ref)
                name = f"experts {bits}-bit, {T} tokens ({T * k} rows), {kind}"
                for bm, fast in ((32, True), (64, True), (32, False)) if bits == 4 else ((32, True), (64, True)):
                    kernels.GROUPED_BM, kernels.GROUPED_FAST = bm, fast

                    def launches():
                        maps = tile_map(idx, E)
                        return (grouped_qmm(x, glu.gate_proj, idx, maps, src=src, up=glu.up_proj),
                                grouped_qmm(h_ref, glu.down_proj, idx, maps, dst=order))

                    h, y = launches()
                    mx.eval(h, y)
                    mx.synchronize()
                    errs = [(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()
                             / mx.abs(b.astype(mx.float32)).max()).item() for a, b in ((h, h_ref), (y, y_ref))]
                    t = seconds(launches)
                    ok = max(errs) < TOL_GROUPED
                    label = f"{name}, {bm}-row tiles{'' if fast or bits == 8 else ', codes one at a time'}"
                    rows.append(dict(name=label, worst_rel_err_glu=errs[0], worst_rel_err_down=errs[1],
                                     tol=TOL_GROUPED, ok=ok, launches_ms=t * 1e3))
                    print(f"{label:66s} worst rel err glu {errs[0]:.1e} down {errs[1]:.1e} ({'ok' if ok else 'FAIL'}"
                          f" < {TOL_GROUPED:.1e}) | both launches {t * 1e3:6.2f} ms", flush=True)
                kernels.GROUPED_BM, kernels.GROUPED_FAST = default
                xs, ins = x[None], inds[None]

                def call(grouped: bool):
                    real = SwitchGLU._grouped
                    if not grouped:
                        SwitchGLU._grouped = lambda self, *a: None
                    try:
                        with prefilling():
                            return glu(xs, ins)
                    finally:
                        SwitchGLU._grouped = real

                ours, before = call(True), call(False)
                end_to_end = (mx.linalg.norm((ours - before).astype(mx.float32))
                              / mx.linalg.norm(before.astype(mx.float32))).item()
                t_ours, t_before = seconds(lambda: call(True)), seconds(lambda: call(False))
                t_qmm = seconds(lambda: mx.gather_qmm(
                    x[src][:, None, :], glu.gate_proj.weight, glu.gate_proj.scales, glu.gate_proj.biases,
                    rhs_indices=idx, transpose=True, group_size=64, bits=bits, sorted_indices=True))
                rows.append(dict(name=name, vs_previous_path_rel=end_to_end, switchglu_ours_ms=t_ours * 1e3,
                                 switchglu_previous_ms=t_before * 1e3, gather_qmm_gate_only_ms=t_qmm * 1e3))
                print(f"{name:66s} SwitchGLU ms: ours {t_ours * 1e3:6.2f}, previous path {t_before * 1e3:6.2f} "
                      f"(relative difference {end_to_end:.1e}); gather_qmm, gate alone {t_qmm * 1e3:6.2f}", flush=True)


def check_attention(rows: list):
    """The Air's attention projections: q|k|v with biases, the input norm and RoPE in one launch; o_proj
    with the residual in one."""
    D, NQ, NK = 4096, 12288, 1024
    n = copies((NQ + 2 * NK) * D * 0.5625 / 1e9)
    qkv = [tuple(quantized_linear((m, D), bias=True) for m in (NQ, NK, NK)) for _ in range(n)]
    os_ = [quantized_linear((D, NQ)) for _ in range(copies(NQ * D * 0.5625 / 1e9))]
    x, a, res = rand((D,), 1.0), rand((NQ,), 1.0), rand((D,), 1.0)
    mx.eval([[m.parameters() for m in t] for t in qkv], [o.parameters() for o in os_], x, a, res)
    shapes = ((1, 96, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))
    q, k, v = qkv[0]
    norm = rms_norm(D)

    def flat(ts):
        return mx.concatenate([t.reshape(-1) for t in ts]).astype(mx.float32)
    gb = sum(val.nbytes for m in (q, k, v) for _, val in tree_flatten(m.parameters())) / 1e9
    # RoPE as the Air's (64 of 128 dims, base 1e6) at a short and a long position; without RoPE and the
    # norm (GLM-4.5 normalises q and k per head first, so RoPE stays outside)
    for label, nm, rope in (("norm, RoPE at 1000", norm, (64, 1e6, 1000)),
                            ("norm, RoPE at 120000", norm, (64, 1e6, mx.array(120000, mx.int32))),
                            ("norm, no RoPE", norm, None), ("no norm, no RoPE", None, None)):
        want = flat(qkv_decode_reference(x, q, k, v, shapes, nm, rope))
        err = worst(lambda i: flat(qkv_decode(x, q, k, v, shapes, nm, rope)), want)

        def mlx_qkv(i, nm=nm, rope=rope):
            xn = x[None] if nm is None else nm(x[None])
            out = [m(xn).reshape(shape) for m, shape in zip(qkv[i % n], shapes)]
            if rope is not None:
                out[:2] = [mx.fast.rope(t, rope[0], traditional=False, base=rope[1], scale=1.0, offset=rope[2])
                           for t in out[:2]]
            return out
        report(rows, f"Air q|k|v + biases, {label}", err,
               sweep(lambda i, nm=nm, rope=rope: qkv_decode(x, *qkv[i % n], shapes, nm, rope)),
               per_call(mlx_qkv), "MLX ops", gb, TOL_BF16)
    # The launch that also writes k and v into the KV cache's buffers (qkv_decode_cached), at the start, middle
    # and last position of a cache: q and the written rows against the reference, every other row untouched
    for at, cap in ((0, 256), (1000, 1024), (4095, 4096)):
        rope = (64, 1e6, mx.array(at, mx.int32))
        want = flat(qkv_decode_reference(x, q, k, v, shapes, norm, rope))

        def cached(i, rope=rope, at=at, cap=cap):
            kc, vc = (mx.full((1, 8, cap, 128), 7.0, mx.bfloat16) for _ in range(2))
            gq, gk, gv, _ = qkv_decode_cached(x, q, k, v, shapes, norm, rope, kc, vc, mx.zeros_like(kc[:, :, :1]))
            # the launch first: MLX does not know it writes gk and gv, so a copy of their rows in the same
            # graph (flat's reshape) may run before it (as the model's attention, which takes gq, cannot)
            mx.eval(gq)
            return flat((gq, gk[:, :, at : at + 1], gv[:, :, at : at + 1])), (kc, vc), (gk, gv)
        err = worst(lambda i: cached(i)[0], want)
        _, given, back = cached(0)
        rest = mx.concatenate([c[:, :, :at] for c in back] + [c[:, :, at + 1:] for c in back], axis=2)
        untouched, in_place = bool((rest == 7.0).all().item()), all(g is b for g, b in zip(given, back))
        rows.append(dict(name=f"Air q|k|v writing the KV cache, position {at} of {cap}", worst_rel_err=err,
                         tol=TOL_BF16, ok=err <= TOL_BF16 and untouched, others_untouched=untouched,
                         in_place=in_place))
        print(f"Air q|k|v writing the KV cache at {at} of {cap}: worst relative error {err:.1e} (tolerance "
              f"{TOL_BF16:.1e}), other positions untouched: {untouched}, written in place: {in_place}", flush=True)
    o = os_[0]
    want = linear_decode_reference(a, o, res).astype(mx.float32)
    err = worst(lambda i: linear_decode(a, o, res).astype(mx.float32), want)
    gb = sum(val.nbytes for _, val in tree_flatten(o.parameters())) / 1e9
    report(rows, "Air o_proj + residual, 12288 -> 4096", err,
           sweep(lambda i: linear_decode(a, os_[i % len(os_)], res)),
           per_call(lambda i: res + os_[i % len(os_)](a[None])[0]), "QuantizedLinear + add", gb, TOL_BF16)


def check_decode_attention(rows: list):
    """One token's attention over the KV cache's buffers in place (kernels.decode_attention, tensor cores),
    against attention in float32 on the same bf16 numbers; beside it mx.fast's (cuDNN's) over the slices
    a cache hands out, its error and its time. Air's heads (96 over 8 kv heads, head_dim 128) at positions
    from the first to the last of a buffer, and the small shape's (8 over 2, 64)."""
    for HQ, HKV, D, at, cap in ((96, 8, 128, 0, 256), (96, 8, 128, 1, 256), (96, 8, 128, 300, 512),
                                (96, 8, 128, 4095, 4352), (96, 8, 128, 32767, 33024), (8, 2, 64, 100, 256)):
        gb = 2 * HKV * (at + 1) * D * 2 / 1e9
        n = copies(2 * HKV * cap * D * 2 / 1e9)  # copies of the buffers a timing cycles through
        q = rand((1, HQ, 1, D), 1.0)
        bufs = [(rand((1, HKV, cap, D), 1.0), rand((1, HKV, cap, D), 1.0)) for _ in range(n)]
        pos = kernels.position(at)  # as the model's step hands it over: not an array the host writes
        mx.eval(q, bufs)
        scale = D**-0.5
        kc, vc = bufs[0]
        want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kc[:, :, : at + 1].astype(mx.float32),
                                                    vc[:, :, : at + 1].astype(mx.float32), scale=scale)

        def err(got):
            return (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item()
        ours = per_call(lambda i: kernels.decode_attention(q, *bufs[i % n], pos, scale))
        theirs = per_call(lambda i: mx.fast.scaled_dot_product_attention(
            q, bufs[i % n][0][:, :, : at + 1], bufs[i % n][1][:, :, : at + 1], scale=scale))
        e_ours = err(kernels.decode_attention(q, kc, vc, pos, scale))
        e_theirs = err(mx.fast.scaled_dot_product_attention(q, kc[:, :, : at + 1], vc[:, :, : at + 1], scale=scale))
        name = f"attention {HQ}/{HKV} heads x {D}, {at + 1} of {cap} positions"
        rows.append(dict(name=name, worst_rel_err=e_ours, tol=TOL_BF16, ok=e_ours < TOL_BF16, ours_us=ours,
                         mlx_us=theirs, mlx_rel_err=e_theirs, kv_gb=gb))
        print(f"{name:48s} worst rel err {e_ours:.1e} ({'ok' if e_ours < TOL_BF16 else 'FAIL'} < {TOL_BF16:.1e}; "
              f"mx.fast's {e_theirs:.1e}) | ours {ours:6.1f} us ({gb / ours * 1e6:5.0f} GB/s) | mx.fast over "
              f"slices {theirs:6.1f} us ({gb / theirs * 1e6:5.0f} GB/s)", flush=True)


def main():
    global RPWS, SPLITS, SMALL, VERBOSE, CACHE_BYTES, DEVICE_TIME
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpw", default=str(kernels.RPW), help="rows per row set to time, e.g. 4,8")
    ap.add_argument("--split", default="auto", help="simdgroups per row set to time, e.g. auto,1,2,4,8")
    ap.add_argument("--dequantize", action="store_true", help="check the experts' dequantize only")
    ap.add_argument("--grouped", action="store_true", help="check the prefill's grouped experts (tensor cores) only")
    ap.add_argument("--small", action="store_true", help="--grouped at a small shape first")
    ap.add_argument("--verbose", action="store_true", help="say each step as it runs")
    ap.add_argument("--attention", action="store_true", help="check the attention projections and the attention only")
    ap.add_argument("--footprint", type=float, default=CACHE_BYTES / 1e9,
                    help="GB of weight copies a timing cycles through (a model's layers: Air's 46 are ~7 GB)")
    ap.add_argument("--device-time", action="store_true", help="time the kernels on the device (CUPTI, through "
                    "torch), not the calls' wall time")
    a = ap.parse_args()
    DEVICE_TIME = a.device_time
    RPWS = [int(r) for r in a.rpw.split(",")]
    SMALL, VERBOSE, CACHE_BYTES = a.small, a.verbose, a.footprint * 1e9
    SPLITS = [None if s == "auto" else int(s) for s in a.split.split(",")]
    mx.random.seed(0)
    print(mx.default_device(), "kernel backend:", backend())
    rows = []
    if a.grouped:
        check_grouped(rows)
        print(json.dumps(rows))
        return
    if a.attention:
        check_attention(rows)
        check_decode_attention(rows)
        print(json.dumps(rows))
        return
    check_dequantize(rows)
    if a.dequantize:
        print(json.dumps(rows))
        return
    # (name, experts, N, K, x rows, chosen rows, bits)
    for name, E, N, K, xr, M, bits in (("Air gate/up: 8 of 128, 4096 -> 1408", 128, 1408, 4096, 1, 8, 4),
                                       ("Air down: 8 of 128, 1408 -> 4096", 128, 4096, 1408, 8, 8, 4),
                                       ("Air q|k|v dense, 4096 -> 14336", 1, 14336, 4096, 1, 1, 4),
                                       ("Air o_proj dense, 12288 -> 4096", 1, 4096, 12288, 1, 1, 4),
                                       ("Air shared gate, 8-bit, 4096 -> 1408", 1, 1408, 4096, 1, 1, 8),
                                       ("GLM-4.5 gate: 8 of 160, 5120 -> 1536", 160, 1536, 5120, 1, 8, 4)):
        gb = (M * N * K * bits / 8 + 2 * M * N * K / 64 * 2) / 1e9
        E = E if E > 1 else copies(gb)  # a dense layer: copies of it stacked as "experts"
        W = (mx.random.normal((E, N, K)) * K**-0.5).astype(mx.bfloat16)
        w, s, b = mx.quantize(W, 64, bits)
        del W
        x = mx.random.normal((xr, K)).astype(mx.bfloat16)
        sets = expert_sets(E, M, min(copies(gb), E // M))
        mx.eval(w, s, b, x, sets)
        want = gather_qmv_reference(x, w, s, b, sets[0], 64, bits)
        err = worst(lambda i: gather_qmv(x, w, s, b, sets[i % len(sets)], 64, bits), want)
        ours = sweep(lambda i: gather_qmv(x, w, s, b, sets[i % len(sets)], 64, bits))
        xe = x[:, None, :] if xr == M else mx.broadcast_to(x, (M, K))[:, None, :]
        mlx = per_call(lambda i: mx.gather_qmm(xe, w, s, b, rhs_indices=sets[i % len(sets)], transpose=True,
                                               group_size=64, bits=bits))
        report(rows, name, err, ours, mlx, "mlx gather_qmm", gb)
    # A token's MLP block: routed experts, shared expert and residual in two launches, against MLX's path
    # (SwitchGLU's gather_qmm x3 and swiglu, the weighted sum, the shared MLP's three qmm, the adds)
    for name, E, H, D in (("Air MoE block: 8 of 128 + shared + residual", 128, 1408, 4096),
                          ("GLM-4.5 MoE block: 8 of 160 + shared + residual", 160, 1536, 5120)):
        glu = quantized_experts(E, H, D)
        gb = (sum(q.weight.nbytes + q.scales.nbytes + q.biases.nbytes for q in (glu.gate_proj, glu.up_proj,
                                                                               glu.down_proj)) * 9 / E) / 1e9
        n = min(copies(gb), E // 8)
        shared, sets = quantized_mlps(n, H, D), expert_sets(E, 8, n)
        mx.eval(glu.parameters(), [m.parameters() for m in shared], sets)
        x, res, norm = rand((D,), 1.0), rand((D,), 1.0), rms_norm(D)
        wts = mx.softmax(mx.random.normal((8,)))
        want = moe_decode_reference(x, glu, sets[0], wts, shared[0], res, norm).astype(mx.float32)
        err = worst(lambda i: moe_decode(x, glu, sets[0], wts, shared[0], res, norm).astype(mx.float32), want)

        def mlx_block(i):
            xn = norm(x)
            out = glu(xn[None, None], sets[i % n][None, None])
            return res + (out * wts[None, None, :, None].astype(out.dtype)).sum(-2).reshape(-1) + shared[i % n](xn)
        ours = sweep(lambda i: moe_decode(x, glu, sets[i % n], wts, shared[i % n], res, norm))
        report(rows, name + " + norm", err, ours, per_call(mlx_block), "MLX ops", gb, TOL_BF16)
    check_attention(rows)
    check_decode_attention(rows)
    # The router's logits with the norm, float32 weights
    for name, E, D in (("Air router logits + norm, 128 x 4096", 128, 4096), ("GLM-4.5 router logits + norm, 160 x 5120",
                                                                           160, 5120)):
        ws = [mx.random.normal((E, D)) * D**-0.5 for _ in range(copies(E * D * 4 / 1e9))]
        x, norm = rand((D,), 1.0), rms_norm(D)
        mx.eval(ws, x)
        want = router_logits_reference(x, ws[0], norm)
        err = worst(lambda i: router_logits(x, ws[0], norm), want)
        report(rows, name, err, sweep(lambda i: router_logits(x, ws[i % len(ws)], norm)),
               per_call(lambda i: ws[i % len(ws)] @ norm(x).astype(mx.float32)), "MLX ops", E * D * 4 / 1e9)
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
        ours = per_call(lambda i: router_select(logits, bias, topk, True, scale)[1])
        report(rows, name, err, {kernels.RPW: ours}, per_call(lambda i: mlx_router()[1]), "MLX ops", 0.0)
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
