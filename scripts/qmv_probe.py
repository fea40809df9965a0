"""Our decode matvec against variants of its body: what bounds it, the memory or the instructions.

    python3 scripts/qmv_probe.py --footprints 7 --device-time

At full Air size the decode step is bound by the device (BENCHMARKS.md, session 15), and its
matvecs read at 0.5-1.2 TB/s of 2.77. Until session 16 each lane loaded one 32-bit word (8 codes)
of each of a row set's rows per step, with its group's scale and bias (`word` below, kept here to
compare). kernels._DOT now loads 16 bytes (32 codes) of each row, all rows' loads issued before
any arithmetic. This times, on dense 4-bit (and 8-bit) weights cycled through `footprint` GB of
copies (each its own allocation, or with --stacked slices of one):
- "ours rRsS": kernels.gather_qmv, the body every decode matvec is built on, R rows per row set,
  S simdgroups per set (auto: the dispatch's choice);
- "exact": the same loads, each code converted to float (code_f) and its products summed, as in
  session 16: four instructions a code where kernels.codes_dot takes three. Measured the same
  (BENCHMARKS.md, session 17): the instructions are not what bounds the matvecs;
- "loads": the same loads and x, next to no arithmetic (wrong numbers): the memory's bound for
  this pattern of reads. Ours near "loads" means the instructions are not what bounds it;
- "pipe": ours with each lane's next chunk's loads issued before this chunk's arithmetic. Faster
  alone (o_proj 29.5 -> 20.2 us at 4 rows a set), slower in the model when put in the kernels
  (BENCHMARKS.md, session 17);
- "word rRsS": the body before session 16, a 32-bit word of a row at a time;
- MLX's quantized_matmul.
With --device-time each is the device's time in its kernels (CUPTI, through torch), not the wall
time, which on CUDA includes the host's encoding of each launch.
Operands are shaped before the timing, so that a call is one launch. Each is checked against the
float32 reference (worst relative error printed).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from glm_mlx import kernels
from glm_mlx.kernels import gather_qmv, gather_qmv_reference

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
            acc[r] += ld1(scales, g) * dot + ld1(biases, g) * xs;
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

# The 16-byte body's loads with session 16's arithmetic ("exact"), or with next to none ("loads").
CHUNKS = """
template <int K, int GROUP, int BITS, int R, typename S>
FN void chunk_loads(const DEV uint* w, const DEV S* scales, const DEV S* biases, ulong row0, uint rows, uint c,
                    LOC uint4* wa, LOC uint4* wb, LOC float* sc, LOC float* bi) {
    for (int r = 0; r < R; r++) {
        if ((uint)r < rows) {
            ulong row = row0 + r;
            const DEV uint4* p = (const DEV uint4*)(w + row * (K * BITS / 32)) + c * (BITS / 4);
            wa[r] = p[0];
            if (BITS == 8) wb[r] = p[1];
            ulong g = row * (K / GROUP) + (c * 32) / GROUP;
            sc[r] = ld1(scales, g);
            bi[r] = ld1(biases, g);
        }
    }
}
// The chunk's loads, then per row session 16's arithmetic (NONE false) or next to none (NONE true).
template <int K, int GROUP, int BITS, int R, bool NONE, typename S>
FN void chunk_probe(const DEV uint* w, const DEV S* scales, const DEV S* biases, ulong row0, uint rows, uint c,
                    LOC const float* xv, float xs, LOC float* acc) {
    uint4 wa[R], wb[R];
    float sc[R], bi[R];
    chunk_loads<K, GROUP, BITS, R>(w, scales, biases, row0, rows, c, wa, wb, sc, bi);
    for (int r = 0; r < R; r++) {
        if ((uint)r < rows) {
            uint u[8];
            u[0] = wa[r].x; u[1] = wa[r].y; u[2] = wa[r].z; u[3] = wa[r].w;
            if (BITS == 8) { u[4] = wb[r].x; u[5] = wb[r].y; u[6] = wb[r].z; u[7] = wb[r].w; }
            if (NONE) {
                uint h = u[0] ^ u[1] ^ u[2] ^ u[3];
                if (BITS == 8) h ^= u[4] ^ u[5] ^ u[6] ^ u[7];
                acc[r] += sc[r] * AS_FLOAT(h & 0x3FFFFFFFu) * xv[r % 32] + bi[r] * xs;
                continue;
            }
            float dot = 0.0f;
            for (int k = 0; k < BITS; k++)
                for (int j = 0; j < 32 / BITS; j++)
                    dot += code_f((u[k] >> (BITS * j)) & ((1u << BITS) - 1u)) * xv[k * (32 / BITS) + j];
            acc[r] += sc[r] * dot + bi[r] * xs;
        }
    }
}
"""

# A lane's next chunk's loads issued before this chunk's arithmetic ("pipe"): the reads of one
# overlap the sums of the other, for two chunks' worth of registers.
PIPE = """
template <int K, int GROUP, int BITS, int R, typename S>
FN void rows_pipe(const DEV uint* w, const DEV S* scales, const DEV S* biases, ulong row0, uint rows,
                  const DEV BF16_T* x, const TG uint4* xn, uint sid, uint threads, LOC float* acc) {
    uint4 wa[R], wb[R];
    float sc[R], bi[R];
    if (sid < K / 32) chunk_loads<K, GROUP, BITS, R>(w, scales, biases, row0, rows, sid, wa, wb, sc, bi);
    for (uint c = sid; c < K / 32; c += threads) {
        uint4 na[R], nb[R];
        float nsc[R], nbi[R];
        if (c + threads < K / 32) chunk_loads<K, GROUP, BITS, R>(w, scales, biases, row0, rows, c + threads, na, nb,
                                                                 nsc, nbi);
        float xv[32];
        float xs = ld_x<false>(x, 0, c, xn, xv);
        for (int r = 0; r < R; r++) {
            if ((uint)r < rows) {
                uint u[8];
                u[0] = wa[r].x; u[1] = wa[r].y; u[2] = wa[r].z; u[3] = wa[r].w;
                if (BITS == 8) { u[4] = wb[r].x; u[5] = wb[r].y; u[6] = wb[r].z; u[7] = wb[r].w; }
                acc[r] += sc[r] * codes_dot<BITS>(u, xv, xs) + bi[r] * xs;
            }
        }
        for (int r = 0; r < R; r++) {
            wa[r] = na[r];
            wb[r] = nb[r];
            sc[r] = nsc[r];
            bi[r] = nbi[r];
        }
    }
}
"""

PIPE_BODY = kernels._ROWS + """
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    rows_pipe<K, GROUP, BITS, RPW>(w, scales, biases, n0, rows, x, sh_none, sid, threads, acc);
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) y[n0 + sid] = v;
"""

CHUNK_BODY = kernels._ROWS + """
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    for (uint c = sid; c < K / 32; c += threads) {
        float xv[32];
        float xs = ld_x<false>(x, 0, c, sh_none, xv);
        chunk_probe<K, GROUP, BITS, RPW, NONE>(w, scales, biases, n0, rows, c, xv, xs, acc);
    }
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) y[n0 + sid] = v;
"""

_built = {}


def variant(name: str, x, w, scales, biases, bits, group, rpw, split):
    """x [1, K] bf16 through dense quantized w [N, K*bits/32] -> [1, N] float32, through a variant body:
    "word" (WORD), "exact" or "loads" (CHUNKS), "pipe" (PIPE)."""
    kind = kernels.backend()
    if (kind, name) not in _built:
        body = {"word": WORD_BODY, "pipe": PIPE_BODY}.get(name) or CHUNK_BODY.replace(
            "NONE", {"exact": "false", "loads": "true"}[name])
        _built[kind, name] = kernels.build(kind, f"glm_qmv_{name}", ["x", "w", "scales", "biases"], ["y"], body,
                                           WORD + CHUNKS + PIPE)
    N, K, warps = w.shape[0], x.shape[-1], kernels.WARPS
    sets = -(-N // rpw)
    return _built[kind, name](inputs=[x, w, scales, biases],
                              template=[("K", K), ("N", N), ("GROUP", group), ("BITS", bits), ("WARPS", warps),
                                        ("RPW", rpw), ("SPLIT", split)],
                              grid=(-(-sets * split // warps) * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1),
                              output_shapes=[(1, N)], output_dtypes=[mx.float32])[0]


def settings(text: str) -> list[tuple[int, int | None]]:
    """"8x2,4xauto" -> [(8, 2), (4, None)]: rows per row set x simdgroups per set."""
    return [(int(r), None if sp == "auto" else int(sp)) for r, sp in (t.split("x") for t in text.split(",") if t)]


def main():
    import kernel_check

    ap = argparse.ArgumentParser()
    ap.add_argument("--footprints", default="7")
    ap.add_argument("--ours", default="8xauto,4xauto,8x1,4x1", help="RPWxSPLIT settings for ours")
    ap.add_argument("--variants", default="exact,loads,pipe:4xauto", help="bodies beside ours, each at its own setting "
                    "(pipe:4xauto) or ours' first")
    ap.add_argument("--word", default="8x2", help="RPWxSPLIT settings for the body before session 16")
    ap.add_argument("--stacked", action="store_true", help="the copies sliced from one array each, not their own")
    ap.add_argument("--shapes", default="0,1,2,3", help="which shapes, by index")
    ap.add_argument("--device-time", action="store_true", help="the kernels' device time (CUPTI), not wall time")
    a = ap.parse_args()
    kernel_check.DEVICE_TIME = a.device_time
    print(mx.default_device(), "device time" if a.device_time else "wall time")
    shapes = [("q|k|v 4096 -> 14336, 4-bit", 4096, 14336, 4), ("o_proj 12288 -> 4096, 4-bit", 12288, 4096, 4),
              ("gate|up one expert x8 4096 -> 22528, 4-bit", 4096, 22528, 4), ("q|k|v, 8-bit", 4096, 14336, 8),
              ("down one expert x8 1408 -> 32768, 4-bit", 1408, 32768, 4)]
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

            saved = kernels.RPW, kernels.SPLIT
            for rpw, split in settings(a.ours):
                kernels.RPW, kernels.SPLIT = rpw, split
                ours = lambda i: gather_qmv(x, *experts[i % n], zero, 64, bits)  # noqa: E731
                rows[f"ours r{rpw}s{split or 'auto'}"] = (kernel_check.per_call(ours), err(ours(0)))
            kernels.RPW, kernels.SPLIT = saved
            for v in (v for v in a.variants.split(",") if v):  # "name" or "name:RPWxSPLIT"
                v, _, setting = v.partition(":")
                rpw, split = settings(setting or a.ours)[0]
                split = split or kernels._split(-(-N // rpw), K, 64)
                f = lambda i, v=v, r=rpw, s=split: variant(v, x, *copies[i % n], bits, 64, r, s)  # noqa: E731
                rows[f"{v} r{rpw}s{split}"] = (kernel_check.per_call(f), err(f(0)))
            for rpw, split in settings(a.word):
                f = lambda i, r=rpw, s=split: variant("word", x, *copies[i % n], bits, 64, r, s)  # noqa: E731
                rows[f"word r{rpw}s{split}"] = (kernel_check.per_call(f), err(f(0)))
            mlx = lambda i: mx.quantized_matmul(x, *copies[i % n], transpose=True, group_size=64, bits=bits)  # noqa: E731
            rows["mlx"] = (kernel_check.per_call(mlx), err(mlx(0).astype(mx.float32)))
            cells = ", ".join(f"{k} {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s, err {e:.1e})"
                              for k, (us, e) in rows.items())
            print(f"{fp:g} GB, {name}: {cells}", flush=True)
            copies = experts = qs = rows = stacks = None  # freed before the next shape's
            mx.clear_cache()


if __name__ == "__main__":
    main()
