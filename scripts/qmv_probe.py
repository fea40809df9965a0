"""Our decode matvec (a lane loads 16 bytes of a row at once) against the one it replaced (a 32-bit word).

    python3 scripts/qmv_probe.py --footprints 0.256,7

At full Air size the decode step is bound by the device (BENCHMARKS.md, session 15), and its
matvecs read at 0.5-1.2 TB/s of 2.77. Until session 16 each lane loaded one 32-bit word (8 codes)
of each of a row set's rows per step, with its group's scale and bias (`word` below, kept here to
compare). kernels._DOT now loads 16 bytes (32 codes) of each row, all rows' loads issued before
any arithmetic. This times, on dense 4-bit (and 8-bit) weights cycled through `footprint` GB of
copies (each its own allocation, or with --stacked slices of one):
- "ours": kernels.gather_qmv, the body every decode matvec is built on (SPLIT by its dispatch);
- "word rRsS": the previous body, R rows per row set, S simdgroups per set;
- MLX's quantized_matmul.
Operands are shaped before the timing, so that a call is one launch. Each is checked against the
float32 reference (worst relative error printed).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from glm_mlx import kernels
from glm_mlx.kernels import gather_qmv, gather_qmv_reference
from kernel_check import per_call

# The previous chunk of 8 values: one 32-bit word of each row at 4 bits (two at 8).
WORD = """
template <int K, int GROUP, int BITS, int R, typename S>
FN void dot_word(const DEV uint* w, const DEV S* scales, const DEV S* biases, ulong row0, uint rows,
                 uint c, LOC const float* xv, float xs, LOC float* acc) {
    const uint wpr = K * BITS / 32;
    for (int r = 0; r < R; r++) {
        if ((uint)r < rows) {
            ulong row = row0 + r;
            ulong g = row * (K / GROUP) + (c * 8) / GROUP;
            float q[8], dot = 0.0f;
            codes8<BITS>(w + row * wpr, c, q);
            for (int j = 0; j < 8; j++) dot += q[j] * xv[j];
            acc[r] += BF16(scales, g) * dot + BF16(biases, g) * xs;
        }
    }
}
"""

WORD_BODY = kernels._ROWS + """
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    for (uint c = sid; c < K / 8; c += threads) {
        float xv[8];
        ld_x8<false>(x, 0, c, sh_none, xv);
        float xs = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
        dot_word<K, GROUP, BITS, RPW>(w, scales, biases, n0, rows, c, xv, xs, acc);
    }
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) y[n0 + sid] = v;
"""

_word = {}


def word(x, w, scales, biases, bits, group, rpw, split):
    """x [1, K] bf16 through dense quantized w [N, K*bits/32] -> [1, N] float32, the previous body."""
    kind = kernels.backend()
    if kind not in _word:
        _word[kind] = kernels.build(kind, "glm_qmv_word", ["x", "w", "scales", "biases"], ["y"], WORD_BODY, WORD)
    N, K, warps = w.shape[0], x.shape[-1], kernels.WARPS
    sets = -(-N // rpw)
    return _word[kind](inputs=[x, w, scales, biases],
                       template=[("K", K), ("N", N), ("GROUP", group), ("BITS", bits), ("WARPS", warps),
                                 ("RPW", rpw), ("SPLIT", split)],
                       grid=(-(-sets * split // warps) * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1),
                       output_shapes=[(1, N)], output_dtypes=[mx.float32])[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--footprints", default="0.256,7")
    ap.add_argument("--settings", default="8x2,8x4,8x8", help="RPWxSPLIT for the previous body")
    ap.add_argument("--stacked", action="store_true", help="the copies sliced from one array each, not their own")
    ap.add_argument("--shapes", default="0,1,2,3", help="which shapes, by index")
    a = ap.parse_args()
    print(mx.default_device())
    settings = [tuple(int(v) for v in s.split("x")) for s in a.settings.split(",")]
    shapes = [("q|k|v 4096 -> 14336, 4-bit", 4096, 14336, 4), ("o_proj 12288 -> 4096, 4-bit", 12288, 4096, 4),
              ("gate|up one expert x8 4096 -> 22528, 4-bit", 4096, 22528, 4), ("q|k|v, 8-bit", 4096, 14336, 8)]
    for fp in (float(f) for f in a.footprints.split(",") if f):
        for name, K, N, bits in (shapes[int(i)] for i in a.shapes.split(",")):
            nbytes = N * K * bits / 8 * (1 + 4 / 64 / bits * 8)
            n = max(2, int(fp * 1e9 / nbytes))
            x = mx.random.normal((1, K)).astype(mx.bfloat16)
            qs = [mx.quantize(mx.random.normal((N, K)).astype(mx.bfloat16) * 0.02, 64, bits) for _ in range(2)]
            mx.eval(qs)
            if a.stacked:  # slices of one allocation for each of weight, scales and biases
                stacks = [mx.stack([qs[i % 2][j] for i in range(n)]) for j in range(3)]
                mx.eval(stacks)
                copies = [tuple(t[i] for t in stacks) for i in range(n)]
            else:  # an allocation for each
                copies = [tuple(mx.array(t) + 0 for t in qs[i % 2]) for i in range(n)]
            experts = [tuple(t[None] for t in c) for c in copies]  # gather_qmv's operands: one expert
            mx.eval(copies, experts)
            zero = mx.array([0], mx.uint32)
            want = gather_qmv_reference(x, qs[0][0][None], qs[0][1][None], qs[0][2][None], zero, 64, bits)
            rows = {}

            def err(y):
                return (mx.abs(y - want).max() / mx.abs(want).max()).item()

            ours = lambda i: gather_qmv(x, *experts[i % n], zero, 64, bits)  # noqa: E731
            rows["ours"] = (per_call(ours), err(ours(0)))
            for rpw, split in settings:
                f = lambda i, r=rpw, s=split: word(x, *copies[i % n], bits, 64, r, s)  # noqa: E731
                rows[f"word r{rpw}s{split}"] = (per_call(f), err(f(0)))
            mlx = lambda i: mx.quantized_matmul(x, *copies[i % n], transpose=True, group_size=64, bits=bits)  # noqa: E731
            rows["mlx"] = (per_call(mlx), err(mlx(0).astype(mx.float32)))
            cells = ", ".join(f"{k} {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s, err {e:.1e})"
                              for k, (us, e) in rows.items())
            print(f"{fp:g} GB, {name}: {cells}", flush=True)
            copies = experts = qs = rows = stacks = None  # freed before the next shape's
            mx.clear_cache()


if __name__ == "__main__":
    main()
