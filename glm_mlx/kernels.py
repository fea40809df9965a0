"""Custom kernels for one token (decode): one body for Metal and CUDA, a pure-MLX reference for each;
and, for a prefill on CUDA, the routed experts on tensor cores (`grouped_qmm`, at the end).

A decode step on MLX's CUDA backend is bound by the host: each op costs a few
µs to build and encode whatever its size (scripts/launch_probe.py), and MLX's
quantized matmul reads at half the card's bandwidth (scripts/kernel_check.py).
So a decoder layer here is a handful of launches, each reading its weights
once at close to the card's bandwidth:

- `qkv_decode`: the input RMSNorm, the q, k and v projections, their biases
  and RoPE, one launch;
- `linear_decode`: a projection plus the residual (o_proj), one launch;
- `router_logits`: the post-attention RMSNorm and the router's logits, one
  launch; `router_select`: the router's sigmoid, correction bias, top-k,
  normalisation and scaling over them, one launch of one simdgroup;
- `moe_decode`: the norm, the routed experts' gate, up and SwiGLU for the
  chosen experts and the shared expert in one launch, their down projections,
  the router's weighted sum, the shared expert's and the residual in a second
  (a dense MLP is the same with no routed experts);
- `gather_qmv`: y[r] = W[inds[r]] @ x[r or 0], the building block, on its own.

Weights are affine-quantized in MLX's layout (4 or 8 bits, groups along the
input). A threadgroup of WARPS simdgroups (Metal) / warps (CUDA) computes RPW
outputs: its lanes stride over the rows 32 values at a time (one 16-byte load
a row at 4 bits; groups a multiple of 32), load each x chunk once for all RPW
rows, dequantize the words in registers and sum with
the group's scale and bias; one reduction across the lanes and one across
the simdgroups per output. All the simdgroups of a threadgroup share its rows
so that a launch has thousands of threadgroups reading at once: read from the
card's memory rather than its cache, fewer in flight leave it idle.

`grouped_qmm` (prefill, CUDA only) multiplies rows sorted by expert with their experts' 4-bit
weights on tensor cores (mma.sync), dequantizing tile by tile: no Metal twin, since the
instructions differ (a Mac's prefill keeps dequantize + gather_mm). Its reference,
`grouped_qmm_reference`, is what CI tests; scripts/kernel_check.py --grouped checks the kernel
against it on the GPU machine. Likewise `decode_attention` (one token's attention over the KV
cache's buffers in place, its length read on the device, CUDA only: a Mac keeps mx.fast's), against
`decode_attention_reference` (scripts/kernel_check.py --attention).

The decode bodies are shared: each backend supplies the same few names (tid, lane,
warp, bx, by, BF16_BITS(v), AS_FLOAT(u), SIMD_SUM/MAX/MIN(v), first(p), put_input(p, i, v), the
address-space words DEV, LOC, TGMEM and TG, BARRIER) in its prologue and header, so the body
tested on the NVIDIA machine is the one a Mac runs. The dispatch picks the
backend's kernel, or the reference where there is none (the CPU) or where the kernel failed its
self-check: the first time a process wants it, it runs on small inputs against its reference
(enabled, PROBES; the verdict cached by glm_mlx/selfcheck.py). scripts/metal_compile.py compiles
the Metal sources MLX writes for them, scripts/cuda_compile.py the CUDA ones.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys

import mlx.core as mx
import numpy as np

from . import selfcheck

WARPS = 8  # simdgroups (warps) per threadgroup of 256 threads
RPW = 8  # output rows per row set: x is loaded once for all of them (scripts/kernel_check.py --rpw)
# Simdgroups a launch aims for (_split): 132 SMs x 32 on an H100. Since the 16-byte body, q|k|v and
# the up half take ~128 registers a thread, so an SM holds 16 of theirs and a launch of 4096 runs in
# two waves (scripts/cuda_compile.py; BENCHMARKS.md, session 16): to be swept on the GPU, not guessed.
WARPS_IN_FLIGHT = 4096
SPLIT = None  # simdgroups per row set, None for _split's choice (scripts/kernel_check.py --split)

# One lane's share of R quantized rows' dot products with x[xbase : xbase + K], weighted by
# wt, for one chunk c of 32 values (16 bytes per row at 4 bits, 32 at 8).
# The lanes of a row set take chunks sid, sid + 32 * SPLIT, ...: each row's bytes are read
# contiguously by the whole set, and each x chunk (four 16-byte loads of bf16, or eight of
# float) serves all R rows. Dequantized in registers:
# sum_j (scale * q_j + bias) * x_j = scale * sum_j q_j x_j + bias * sum_j x_j.
_DOT = """
// An input's element as a float: a float, or a bf16's bits shifted into a float's top half.
FN float to_f(float v) { return v; }
FN float to_f(BF16_T v) { return AS_FLOAT((uint)BF16_BITS(v) << 16); }
// Inputs come in any address space: MLX's Metal signature puts one of fewer than 8 elements (a placeholder
// the launch does not read, a tiny model's) in constant memory, the rest in device memory. The vector
// loads below take device memory; their templates take any pointer, an element at a time.
FN void ld8(const DEV float* p, ulong i, LOC float* v) {
    float4 a = ((const DEV float4*)(p + i))[0], b = ((const DEV float4*)(p + i))[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
FN void ld8(const DEV BF16_T* p, ulong i, LOC float* v) {
    uint4 a = ((const DEV uint4*)(p + i))[0];
    uint u[4] = {a.x, a.y, a.z, a.w};
    for (int j = 0; j < 4; j++) {
        v[2 * j] = AS_FLOAT(u[j] << 16);
        v[2 * j + 1] = AS_FLOAT(u[j] & 0xffff0000u);
    }
}
template <typename P>
FN void ld8(P p, ulong i, LOC float* v) {
    for (int j = 0; j < 8; j++) v[j] = to_f(p[i + j]);
}
template <typename P> FN float ld1(P p, ulong i) { return to_f(p[i]); }
// Four 32-bit words from word i of w, and two.
FN uint4 ld4(const DEV uint* w, ulong i) { return *(const DEV uint4*)(w + i); }
template <typename P> FN uint4 ld4(P w, ulong i) {
    uint4 v;
    v.x = w[i]; v.y = w[i + 1]; v.z = w[i + 2]; v.w = w[i + 3];
    return v;
}
FN uint2 ld2(const DEV uint* w, ulong i) { return *(const DEV uint2*)(w + i); }
template <typename P> FN uint2 ld2(P w, ulong i) {
    uint2 v;
    v.x = w[i]; v.y = w[i + 1];
    return v;
}
template <typename T> FN void put(DEV T* p, ulong i, float v) { p[i] = T(v); }
// 8 bf16 values packed in a 16-byte word of threadgroup memory.
FN void ld8(const TG uint4* p, ulong i, LOC float* v) {
    uint4 a = p[i];
    uint u[4] = {a.x, a.y, a.z, a.w};
    for (int j = 0; j < 4; j++) {
        v[2 * j] = AS_FLOAT(u[j] << 16);
        v[2 * j + 1] = AS_FLOAT(u[j] & 0xffff0000u);
    }
}
// Two floats rounded to bf16 (to nearest, ties to even), packed in a word: a low, b high.
FN uint bf16x2(float a, float b) {
    uint u = AS_UINT(a), v = AS_UINT(b);
    return ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) | ((v + 0x7fffu + ((v >> 16) & 1u)) & 0xffff0000u);
}
// Eight floats rounded to bf16, packed in a 16-byte word.
FN uint4 bf16x8(LOC const float* v) {
    uint4 o;
    o.x = bf16x2(v[0], v[1]);
    o.y = bf16x2(v[2], v[3]);
    o.z = bf16x2(v[4], v[5]);
    o.w = bf16x2(v[6], v[7]);
    return o;
}
// A code q < 2^23 as a float, exactly: its bits set in the mantissa of 2^23, and 2^23 taken away.
// Two full-rate instructions where NVIDIA's int-to-float conversion runs at a quarter of the rate;
// on the H100 the matvecs measured the same either way (BENCHMARKS.md, session 16): not their bound.
FN float code_f(uint q) { return AS_FLOAT(q | 0x4B000000u) - 8388608.0f; }
// Chunk c of a quantized row w (its 8 codes: one 32-bit word at 4 bits, two at 8) as floats in q.
template <int BITS, typename P>
FN void codes8(P w, ulong c, LOC float* q) {
    if (BITS == 4) {
        uint word = w[c];
        for (int j = 0; j < 8; j++) q[j] = code_f((word >> (4 * j)) & 15u);
    } else {
        uint2 word = ld2(w, 2 * c);
        for (int j = 0; j < 4; j++) q[j] = code_f((word.x >> (8 * j)) & 255u);
        for (int j = 0; j < 4; j++) q[4 + j] = code_f((word.y >> (8 * j)) & 255u);
    }
}
// x's chunk c of 8 values (from xbase + 8 c) as floats in v: from the threadgroup's normalised
// copy xn when NORM, else from x.
template <bool NORM, typename XP>
FN void ld_x8(XP x, ulong xbase, uint c, const TG uint4* xn, LOC float* v) {
    if (NORM) ld8(xn, c, v);
    else ld8(x, xbase + c * 8, v);
}
// x's chunk c of 32 values (from xbase + 32 c), the same way. Returns their sum.
template <bool NORM, typename XP>
FN float ld_x(XP x, ulong xbase, uint c, const TG uint4* xn, LOC float* v) {
    float s = 0.0f;
    for (int k = 0; k < 4; k++) {
        LOC float* p = v + 8 * k;
        ld_x8<NORM>(x, xbase, c * 4 + k, xn, p);
        s += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
    return s;
}
// A chunk's 32 codes (4 words at 4 bits, 8 at 8) dotted with its 32 values xv (summing to xs), with
// no conversion: each code's bits shifted to the top of the mantissa of 1.0 (one shift, one and-or)
// make 1 + q / 16 (1 + q / 256 at 8 bits), so sum_j q_j x_j = 16 (sum_j (1 + q_j / 16) x_j - xs).
// Three instructions a code where code_f and its product take four (scripts/cuda_compile.py --sass).
// Measured on the H100 no faster and no slower (scripts/qmv_probe.py, BENCHMARKS.md session 17: the
// bound is the reads' latency, not the instructions); kept as the body the session's runs measured.
// The offset costs the float32 sums 4 (8) of their 24 bits; bf16's output keeps 8.
FN float m1(uint v, uint mask) { return AS_FLOAT((v & mask) | 0x3F800000u); }
template <int BITS>
FN float codes_dot(LOC const uint* u, LOC const float* xv, float xs) {
    float a = 0.0f;
    if (BITS == 4) {  // code j of a word (bits 4j..) at bits 19..22
        for (int k = 0; k < 4; k++) {
            uint w = u[k];
            LOC const float* x = xv + 8 * k;
            a += m1(w << 19, 0x780000u) * x[0];
            a += m1(w << 15, 0x780000u) * x[1];
            a += m1(w << 11, 0x780000u) * x[2];
            a += m1(w << 7, 0x780000u) * x[3];
            a += m1(w << 3, 0x780000u) * x[4];
            a += m1(w >> 1, 0x780000u) * x[5];
            a += m1(w >> 5, 0x780000u) * x[6];
            a += m1(w >> 9, 0x780000u) * x[7];
        }
        return 16.0f * (a - xs);
    }
    for (int k = 0; k < 8; k++) {  // 8 bits: code j (bits 8j..) at bits 15..22
        uint w = u[k];
        LOC const float* x = xv + 4 * k;
        a += m1(w << 15, 0x7F8000u) * x[0];
        a += m1(w << 7, 0x7F8000u) * x[1];
        a += m1(w >> 1, 0x7F8000u) * x[2];
        a += m1(w >> 9, 0x7F8000u) * x[3];
    }
    return 256.0f * (a - xs);
}
// One lane's share of R quantized rows' dot products with x, for one chunk c of 32 values xv
// (summing to xs; in one group, GROUP a multiple of 32), weighted by wt. Rows row0, row0 + 1, ...,
// the second half of them `gap` further on (a RoPE pair's second row: 0 elsewhere). Each row's
// chunk is one 16-byte load at 4 bits (two at 8), and all R rows' loads, scales and biases are
// issued before any arithmetic: read a word (8 codes) a row at a time, a 46-layer Air step kept the
// H100 busy 8894 us, this way 7735-8038 (BENCHMARKS.md, session 16; the down half alone slower).
template <int K, int GROUP, int BITS, int R, typename WP, typename SP>
FN void dot_chunk(WP w, SP scales, SP biases, ulong row0, uint gap, uint rows,
                  uint c, LOC const float* xv, float xs, float wt, LOC float* acc) {
    const uint wpr = K * BITS / 32;  // words per row
    uint4 wa[R], wb[R];
    float sc[R], bi[R];
    for (int r = 0; r < R; r++) {
        if ((uint)r < rows) {
            ulong row = row0 + r + (r >= R / 2 ? gap : 0);
            ulong at = row * wpr + c * BITS;  // the chunk's first word
            wa[r] = ld4(w, at);
            if (BITS == 8) wb[r] = ld4(w, at + 4);
            ulong g = row * (K / GROUP) + (c * 32) / GROUP;
            sc[r] = ld1(scales, g);
            bi[r] = ld1(biases, g);
        }
    }
    for (int r = 0; r < R; r++) {
        if ((uint)r < rows) {
            uint u[8];
            u[0] = wa[r].x; u[1] = wa[r].y; u[2] = wa[r].z; u[3] = wa[r].w;
            if (BITS == 8) { u[4] = wb[r].x; u[5] = wb[r].y; u[6] = wb[r].z; u[7] = wb[r].w; }
            acc[r] += wt * (sc[r] * codes_dot<BITS>(u, xv, xs) + bi[r] * xs);
        }
    }
}
// A row set's R rows' dot products with x[xbase : xbase + K] (the normalised copy xn when NORM):
// this lane's chunks of them.
template <int K, int GROUP, int BITS, int R, bool NORM, typename WP, typename SP, typename XP>
FN void dot_rows(WP w, SP scales, SP biases, ulong row0, uint gap, uint rows,
                 XP x, ulong xbase, const TG uint4* xn, uint sid, uint threads, LOC float* acc) {
    for (uint c = sid; c < K / 32; c += threads) {
        float xv[32];
        float xs = ld_x<NORM>(x, xbase, c, xn, xv);
        dot_chunk<K, GROUP, BITS, R>(w, scales, biases, row0, gap, rows, c, xv, xs, 1.0f, acc);
    }
}
// v summed over the threadgroup's W simdgroups (through sh [W]), for every thread.
template <int W>
FN float group_total(float v, TG float* sh, uint lane, uint warp) {
    v = SIMD_SUM(v);
    if (lane == 0) sh[warp] = v;
    BARRIER;
    float t = 0.0f;
    for (int j = 0; j < W; j++) t += sh[j];
    return t;
}
// x [K] through RMSNorm (weights nw, eps) into xn [K / 8] as bf16 (as a bf16 model's norm hands
// it on, rounded once), by the whole threadgroup of W simdgroups in one read of x (sums through sh [W]).
template <int K, int W, typename XP, typename NP>
FN void stage_norm(XP x, NP nw, float eps, TG uint4* xn, TG float* sh,
                   uint tid, uint lane, uint warp) {
    const uint T = 32 * W, C = (K / 8 + T - 1) / T;  // chunks per thread
    float v[C * 8], n[C * 8], s = 0.0f;
    for (uint i = 0; i < C; i++) {  // x and the weights read at once, before the sum's barrier
        if (tid + i * T < K / 8) {
            ld8(x, (tid + i * T) * 8, v + i * 8);
            ld8(nw, (tid + i * T) * 8, n + i * 8);
        }
    }
    for (uint i = 0; i < C; i++) {
        if (tid + i * T < K / 8) {
            for (int j = 0; j < 8; j++) s += v[i * 8 + j] * v[i * 8 + j];
        }
    }
    float f = RSQRT(group_total<W>(s, sh, lane, warp) / K + eps);
    for (uint i = 0; i < C; i++) {
        uint c = tid + i * T;
        if (c < K / 8) {
            float o[8];
            for (int j = 0; j < 8; j++) o[j] = v[i * 8 + j] * f * n[i * 8 + j];
            xn[c] = bf16x8(o);
        }
    }
    BARRIER;
}
// Each of R accumulators summed over the S simdgroups of a row set (across lanes, then across
// the simdgroups through sh [WARPS * R]); the set's thread sid < R gets row sid's total.
template <int R, int S>
FN float set_sum(LOC float* acc, TG float* sh, uint lane, uint warp, uint sid) {
    for (int i = 0; i < R; i++) {
        float v = SIMD_SUM(acc[i]);
        if (lane == 0) sh[warp * R + i] = v;
    }
    BARRIER;
    float t = 0.0f;
    if (sid < (uint)R) {  // the set's first simdgroup
        for (int j = 0; j < S; j++) t += sh[(warp + j) * R + sid];
    }
    return t;
}
"""

# A threadgroup's WARPS simdgroups make WARPS / SPLIT row sets of RPW rows, n0 .. n0 + RPW; the
# SPLIT simdgroups of a set share its rows, each lane (sid in the set) taking a part of the
# sums. More simdgroups on a row set keep more reads in flight where rows are few (dispatch:
# _split), fewer waste less on the reductions where rows are many. The accumulators zeroed.
_ROWS = """
    const uint threads = 32 * SPLIT;
    uint sid = tid % threads;
    uint n0 = (bx * (WARPS / SPLIT) + warp / SPLIT) * RPW;
    float acc[RPW];
    for (int i = 0; i < RPW; i++) acc[i] = 0.0f;
    TGMEM float sh[WARPS * RPW];
    TGMEM uint4 sh_none[1];  // no normalised copy of x (ld_x's NORM off)
"""

# x [K] normalised (RMSNorm: weights nw, epsilon the float whose bits are EPS) into threadgroup memory when
# NORM: read from there.
_NORM_X = """
    TGMEM float shn[WARPS];
    TGMEM uint4 xn[NORM ? K / 8 : 1];
    if (NORM) stage_norm<K, WARPS>(x, nw, AS_FLOAT((uint)EPS), xn, shn, tid, lane, warp);
"""

# y[r, n] = W[inds[r]][n] . x[r or 0]
_QMV_BODY = _ROWS + """
    uint r = by;
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    dot_rows<K, GROUP, BITS, RPW, false>(w, scales, biases, (ulong)inds[r] * N + n0, 0, rows, x,
                                             (ulong)(XROWS == 1 ? 0 : r) * K, sh_none, sid, threads, acc);
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) y[(ulong)r * N + n0 + sid] = v;
"""

# q|k|v = Wq x' + bq | Wk x' + bk | Wv x' + bv, x' = x normalised (RMSNorm, weights nw) when NORM:
# (with CACHE, k and v also written into the KV cache buffers kc, vc at position pos[0]: inputs the
# launch writes, which MLX does not know; qkv_decode_cached says why that is safe; `after` is not read)
# rows [0, NQ) of q, then NK of k, NK of v (NQ and NK multiples of RPW: a threadgroup's rows lie
# in one projection). With ROPE > 0, q and k leave RoPE'd at position pos[0] (rotate-half over
# the first ROPE of each head's HD rows, base 2^LBASE, LBASE a float's bits): row d pairs with d + ROPE / 2, so a
# row set there takes RPW / 2 rows of each half (gap: from the first to the second) and a pair
# meets in one simdgroup.
_QKV_BODY = _ROWS + _NORM_X + """
    uint part = n0 < NQ ? 0 : (n0 < NQ + NK ? 1 : 2);
    uint m0 = n0 - (part == 0 ? 0 : (part == 1 ? NQ : NQ + NK));
    uint rows = n0 < NQ + 2 * NK ? min((uint)RPW, (part == 0 ? NQ : NK) - m0) : 0;
    uint hm = m0 % HD, gap = 0;
    bool rot = ROPE > 0 && part < 2 && hm < ROPE;
    if (rot) {
        m0 += (hm / RPW) * (RPW / 2) - hm;
        gap = ROPE / 2 - RPW / 2;
    }
    if (part == 0) dot_rows<K, GROUP, BITS, RPW, NORM>(qw, qs, qb, m0, gap, rows, x, 0, xn, sid, threads, acc);
    else if (part == 1) dot_rows<K, GROUP, BITS, RPW, NORM>(kw, ks, kb, m0, gap, rows, x, 0, xn, sid, threads, acc);
    else dot_rows<K, GROUP, BITS, RPW, NORM>(vw, vs, vb, m0, gap, rows, x, 0, xn, sid, threads, acc);
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    ulong m = m0 + sid + (sid >= RPW / 2 ? gap : 0);
    if (BIAS && sid < rows) v += ld1(part == 0 ? qbias : (part == 1 ? kbias : vbias), m);
    float o = SIMD_SHUFFLE_XOR(v, RPW / 2);  // the pair's other row (lanes sid and sid ^ RPW / 2)
    if (rot && sid < rows) {
        float d = (float)((m % HD) % (ROPE / 2));
        float th = (float)first(pos) * EXP2(-d / (float)(ROPE / 2) * AS_FLOAT((uint)LBASE));
        float c = cos(th), s = sin(th);
        v = sid < RPW / 2 ? v * c - o * s : v * c + o * s;
    }
    if (sid < rows) {
        if (part == 0) put(yq, m, v);
        else if (part == 1) put(yk, m, v);
        else put(yv, m, v);
        if (CACHE && part > 0) {  // k and v also into the KV cache [1, NK / HD, kc_shape[2], HD] at pos[0]
            ulong at = ((ulong)(m / HD) * kc_shape[2] + (ulong)first(pos)) * HD + m % HD;
            put_input(part == 1 ? kc : vc, at, v);
        }
    }
"""

# h[r, n] = silu(G_r[n] . x') * (U_r[n] . x'), x' = x normalised when NORM (as in q|k|v): rows
# r < ROWS are routed experts inds[r] (gw.. [E, N, K]), row ROWS the shared expert (sgw.. [N, K])
# when SHARED: one launch.
_UP_BODY = _ROWS + _NORM_X + """
    TGMEM float sh2[WARPS * RPW];
    uint r = by;
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    float u[RPW];
    for (int i = 0; i < RPW; i++) u[i] = 0.0f;
    if (r < ROWS) {  // a loop for each: one with both kinds of projection in it ran slower
        ulong row0 = (ulong)inds[r] * N + n0;
        for (uint c = sid; c < K / 32; c += threads) {
            float xv[32];
            float xs = ld_x<NORM>(x, 0, c, xn, xv);
            dot_chunk<K, GROUP, BITS, RPW>(gw, gs, gb, row0, 0, rows, c, xv, xs, 1.0f, acc);
            dot_chunk<K, GROUP, BITS, RPW>(uw, us, ub, row0, 0, rows, c, xv, xs, 1.0f, u);
        }
    } else {
        for (uint c = sid; c < K / 32; c += threads) {
            float xv[32];
            float xs = ld_x<NORM>(x, 0, c, xn, xv);
            dot_chunk<K, SGROUP, SBITS, RPW>(sgw, sgs, sgb, n0, 0, rows, c, xv, xs, 1.0f, acc);
            dot_chunk<K, SGROUP, SBITS, RPW>(suw, sus, sub, n0, 0, rows, c, xv, xs, 1.0f, u);
        }
    }
    float g = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    float v = set_sum<RPW, SPLIT>(u, sh2, lane, warp, sid);
    if (sid < rows) y[(ulong)r * N + n0 + sid] = g / (1.0f + exp(-g)) * v;
"""

# y[n] = res[n] + sum_{r < ROWS} weights[r] * (D_r[n] . h[r]) + (S[n] . h[ROWS]): the routed experts'
# down projections and weighted sum, the shared expert's (or any one projection's) and the residual.
# The threadgroup's lanes take the (expert, chunk) pairs in turn.
_DOWN_BODY = _ROWS + """
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    for (uint i = sid; i < ROWS * (K / 32); i += threads) {
        uint r = i / (K / 32), c = i - r * (K / 32);
        float xv[32];
        float xs = ld_x<false>(h, (ulong)r * K, c, sh_none, xv);
        dot_chunk<K, GROUP, BITS, RPW>(w, scales, biases, (ulong)inds[r] * N + n0, 0, rows, c, xv, xs,
                                           weights[r], acc);
    }
    if (SHARED) dot_rows<K, SGROUP, SBITS, RPW, false>(sw, ss, sb, n0, 0, rows, h, (ulong)ROWS * K, sh_none, sid,
                                                           threads, acc);
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) put(y, n0 + sid, v + (RES ? ld1(res, n0 + sid) : 0.0f));
"""

# logits[n] = W[n] . x', x' = x normalised when NORM (as in q|k|v): the router's, its weights
# [E, K] float32.
_LOGITS_BODY = _ROWS + _NORM_X + """
    uint rows = n0 < N ? min((uint)RPW, N - n0) : 0;
    for (uint c = sid; c < K / 8; c += threads) {
        float xv[8], wv[8];
        ld_x8<NORM>(x, 0, c, xn, xv);
        for (int i = 0; i < RPW; i++) {
            if ((uint)i < rows) {
                ld8(w, (ulong)(n0 + i) * K + c * 8, wv);
                float d = 0.0f;
                for (int j = 0; j < 8; j++) d += wv[j] * xv[j];
                acc[i] += d;
            }
        }
    }
    float v = set_sum<RPW, SPLIT>(acc, sh, lane, warp, sid);
    if (sid < rows) y[n0 + sid] = v;
"""

# The router's choice from its logits [E] (float32): scores = sigmoid(logits); the TOPK
# experts of highest score + bias, best first (ties to the lower id); their scores,
# normalised to sum 1 when NORM, times the float whose bits are SCALE. One simdgroup; lane l holds experts
# l, l + 32, ...
_SELECT_BODY = """
    const uint EPL = (E + 31) / 32;
    float sc[EPL], ch[EPL], wv[TOPK];
    for (uint i = 0; i < EPL; i++) {
        uint e = lane + 32 * i;
        float s = e < E ? 1.0f / (1.0f + exp(-logits[e])) : 0.0f;
        sc[i] = s;
        ch[i] = e < E ? s + bias[e] : NEG_INF;
    }
    float total = 0.0f;
    for (uint j = 0; j < TOPK; j++) {
        float best = NEG_INF;
        uint at = 0xffffffffu;
        for (uint i = 0; i < EPL; i++) {
            if (ch[i] > best) { best = ch[i]; at = lane + 32 * i; }
        }
        float top = SIMD_MAX(best);
        uint win = SIMD_MIN(best == top ? at : 0xffffffffu);
        float s = 0.0f;
        for (uint i = 0; i < EPL; i++) {
            if (lane + 32 * i == win) { s = sc[i]; ch[i] = NEG_INF; }
        }
        s = SIMD_SUM(s);
        wv[j] = s;
        total += s;
        if (lane == 0) inds[j] = win;
    }
    if (lane == 0) {
        for (uint j = 0; j < TOPK; j++) weights[j] = (NORM ? wv[j] / (total + 1e-20f) : wv[j]) * AS_FLOAT((uint)SCALE);
    }
"""

# Quantized weights w [rows, K * BITS / 32] with scales, biases [rows, K / GROUP] as bf16 [rows, K]:
# a thread dequantizes 8 values (one 32-bit word at 4 bits, two at 8) and writes them in one
# 16-byte store, scale * q + bias in float32, rounded once.
_DEQUANT_BODY = """
    ulong c = (ulong)bx * 32 * WARPS + tid;  // chunk of 8 values
    if (c < (ulong)ROWS * (K / 8)) {
        ulong row = c / (K / 8), g = row * (K / GROUP) + (c - row * (K / 8)) * 8 / GROUP;
        float sc_ = ld1(scales, g), bi = ld1(biases, g), q[8];
        codes8<BITS>(w, c, q);
        for (int j = 0; j < 8; j++) q[j] = sc_ * q[j] + bi;
        ((DEV uint4*)y)[c] = bf16x8(q);
    }
"""

# Prefill, CUDA only: y[r] = W_{idx[r]} x[r] for rows sorted by expert, on tensor cores (mma.sync
# m16n8k16, bf16 in, float32 sums), the weights dequantized from 4 or 8 bits into shared memory tile
# by tile. No synchronisation with the host: a launch has a block row for each possible tile (at
# most rows / BM + experts); block row b finds its expert by a binary search of tiles [E + 1]
# (expert e's tiles are tiles[e] .. tiles[e + 1]) and its rows from starts [E + 1] (expert e's rows
# are starts[e] .. starts[e + 1]); the rest return at once. A block: BM rows x BN outputs, 4 warps
# side by side along the outputs, BK inputs a step, the next step's operands read into registers
# while this step's are multiplied. GLU: the gate (w, s, b) and up (w2, s2, b2) projections at once,
# h = silu(g) * u written (g and u rounded to bf16 first, as separate projections would hand them
# on). GATHER: row r's input is x[src[r]]; SCATTER: its output goes to y[dst[r]].
_GROUPED_BODY = """
    const int BK = 64, LDS = BK / 2 + 4;  // words a tile row takes in shared memory: BK bf16 + 8 (no bank conflicts)
    const int NB = GLU ? 2 : 1, MT = BM / 16, WN = BN / 4, NT = WN / 8;
    const int AC = BM * BK / 8 / 128, BC = BN * BK / 8 / 128;  // 8-value chunks a thread moves a step
    const int WPC = BITS / 4;  // 32-bit words of codes per chunk
    TGMEM uint4 As4[BM * LDS / 4];
    TGMEM uint4 Bs4[NB * BN * LDS / 4];
    uint* As = (uint*)As4;
    uint* Bs = (uint*)Bs4;
    uint g8 = lane / 4, t4 = lane % 4;
    uint b = by, n0 = bx * BN;
    if (b >= tiles[E]) return;
    int lo = 0, hi = E;
    while (lo < hi) {  // the last expert whose tiles start at or before b
        int mid = (lo + hi + 1) / 2;
        if (tiles[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    uint e = lo, rs = starts[e] + (b - tiles[e]) * BM, re = min(rs + BM, starts[e + 1]);
    const DEV uint* wm[2] = {w, w2};
    const DEV BF16_T* sm[2] = {s, s2};
    const DEV BF16_T* bm[2] = {bb, bb2};
    uint4 ra[AC];
    uint rw[NB][BC][WPC];
    uint rsc[NB][BC], rbi[NB][BC];  // the chunks' scales and biases, bf16 bits
    float acc[NB][MT][NT][4];
    for (int m = 0; m < NB; m++)
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < NT; j++)
                for (int q = 0; q < 4; q++) acc[m][i][j][q] = 0.0f;
    for (uint k0 = 0; k0 < K; k0 += BK) {
        if (k0 == 0) {  // this step's operands into registers (later steps: read during the previous one)
            grouped_load<K, N, GROUP, BITS, BM, BN, BK, NB, AC, BC, GATHER>(x, src, wm, sm, bm, e, rs, re, n0, k0, tid,
                                                                          ra, rw, rsc, rbi);
        }
        BARRIER;  // the previous step's multiplications are done with the tiles
        for (int j = 0; j < AC; j++) {
            uint c = tid + j * 128;
            As4[((c / (BK / 8)) * LDS + (c % (BK / 8)) * 4) / 4] = ra[j];
        }
        for (int m = 0; m < NB; m++) {
            for (int j = 0; j < BC; j++) {
                uint c = tid + j * 128;
                uint4 v;
                if (BITS == 4 && FAST) {
                    v = dq4(rw[m][j][0], rsc[m][j], rbi[m][j]);
                } else {
                    float q[8], sc = AS_FLOAT(rsc[m][j] << 16), bi = AS_FLOAT(rbi[m][j] << 16);
                    for (int i = 0; i < 8; i++) {
                        uint code = (rw[m][j][i * WPC / 8] >> ((i * BITS) % 32)) & ((1u << BITS) - 1);
                        q[i] = sc * (float)code + bi;
                    }
                    v = bf16x8(q);
                }
                Bs4[(m * BN * LDS + (c / (BK / 8)) * LDS + (c % (BK / 8)) * 4) / 4] = v;
            }
        }
        BARRIER;
        if (k0 + BK < K) {
            grouped_load<K, N, GROUP, BITS, BM, BN, BK, NB, AC, BC, GATHER>(x, src, wm, sm, bm, e, rs, re, n0, k0 + BK,
                                                                          tid, ra, rw, rsc, rbi);
        }
        for (int kk = 0; kk < BK / 16; kk++) {
            uint af[MT][4];
            for (int i = 0; i < MT; i++) {
                uint a = (i * 16 + g8) * LDS + kk * 8 + t4;
                af[i][0] = As[a];
                af[i][1] = As[a + 8 * LDS];
                af[i][2] = As[a + 4];
                af[i][3] = As[a + 8 * LDS + 4];
            }
            for (int m = 0; m < NB; m++) {
                for (int j = 0; j < NT; j++) {
                    uint a = m * BN * LDS + (warp * WN + j * 8 + g8) * LDS + kk * 8 + t4;
                    uint b0 = Bs[a], b1 = Bs[a + 4];
                    for (int i = 0; i < MT; i++) mma_bf16(acc[m][i][j], af[i], b0, b1);
                }
            }
        }
    }
    for (int i = 0; i < MT; i++) {
        for (int half = 0; half < 2; half++) {
            uint r = rs + i * 16 + g8 + half * 8;
            if (r >= re) continue;
            ulong o = (ulong)(SCATTER ? dst[r] : r) * N;
            for (int j = 0; j < NT; j++) {
                uint col = n0 + warp * WN + j * 8 + 2 * t4;
                float v0 = acc[0][i][j][2 * half], v1 = acc[0][i][j][2 * half + 1];
                if (GLU) {
                    v0 = rbf16(v0); v1 = rbf16(v1);
                    v0 = v0 / (1.0f + exp(-v0)) * rbf16(acc[NB - 1][i][j][2 * half]);
                    v1 = v1 / (1.0f + exp(-v1)) * rbf16(acc[NB - 1][i][j][2 * half + 1]);
                }
                ((DEV uint*)y)[(o + col) / 2] = bf16x2(v0, v1);
            }
        }
    }
"""

_CUDA_MMA = """
// c += a (16 x 16, row-major fragments) * b (16 x 8, column-major fragments): one warp, bf16 in, float32 sums.
// A thread (g = lane / 4, t = lane % 4) holds a's rows g and g + 8 at columns 2t, 2t + 1 (a[0], a[1]) and
// 2t + 8, 2t + 9 (a[2], a[3]); b's rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) at column g; c's rows g
// (c[0], c[1]) and g + 8 (c[2], c[3]) at columns 2t, 2t + 1. Two bf16 a word, the lower index low.
FN void mma_bf16(float* c, const uint* a, uint b0, uint b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes from device memory to threadgroup memory, asynchronously (cp.async: committed in groups,
// waited for with cp.async.wait_group).
FN void cp_async16(uint4* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n"
                 :: "r"((uint)__cvta_generic_to_shared(dst)), "l"(src));
}
"""

_CUDA_GROUPED = """
FN uint fma_bf16x2(uint a, uint b, uint c) {  // a * b + c on two bf16 pairs, rounded once
    uint d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// 8 4-bit codes (value i at bits 4i) as scale * q + bias in bf16 (s, b: bf16 bits), in order, two at a
// time: a code or'd into 128.0's mantissa is 128 + q exactly, less 128 is q, then one fma rounds.
FN uint4 dq4(uint w, uint s, uint b) {
    const uint MAGIC = 0x43004300u, ONE = 0x3f803f80u, NEG = 0xc300c300u;  // 128, 1 and -128, twice
    uint s2 = s | (s << 16), b2 = b | (b << 16), p[4];
    for (int i = 0; i < 4; i++) {  // p[i]: codes i and i + 4
        p[i] = fma_bf16x2(fma_bf16x2(((w >> (4 * i)) & 0x000f000fu) | MAGIC, ONE, NEG), s2, b2);
    }
    uint4 o;
    o.x = __byte_perm(p[0], p[1], 0x5410);
    o.y = __byte_perm(p[2], p[3], 0x5410);
    o.z = __byte_perm(p[0], p[1], 0x7632);
    o.w = __byte_perm(p[2], p[3], 0x7632);
    return o;
}
FN float rbf16(float v) {  // v rounded to bf16 (to nearest, ties to even)
    uint u = __float_as_uint(v);
    return __uint_as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}
// One step's operands into registers: BM rows of x (zeros past the tile's rows) and, for each of NB
// projections, BN rows' codes with their groups' scales and biases.
template <int K, int N, int GROUP, int BITS, int BM, int BN, int BK, int NB, int AC, int BC, bool GATHER>
FN void grouped_load(const BF16_T* x, const uint* src, const uint* const* wm, const BF16_T* const* sm,
                     const BF16_T* const* bm, uint e, uint rs, uint re, uint n0, uint k0, uint tid,
                     uint4* ra, uint (*rw)[BC][BITS / 4], uint (*rsc)[BC], uint (*rbi)[BC]) {
    for (int j = 0; j < AC; j++) {
        uint c = tid + j * 128, r = rs + c / (BK / 8);
        ulong row = r < re ? (GATHER ? src[r] : r) : 0;
        uint4 z = {0u, 0u, 0u, 0u};
        ra[j] = r < re ? ((const uint4*)(x + row * K + k0))[c % (BK / 8)] : z;
    }
    for (int m = 0; m < NB; m++) {
        for (int j = 0; j < BC; j++) {
            uint c = tid + j * 128;
            ulong row = (ulong)e * N + n0 + c / (BK / 8), k = k0 + (c % (BK / 8)) * 8;
            const uint* wr = wm[m] + row * (K * BITS / 32) + k * BITS / 32;
            for (int i = 0; i < BITS / 4; i++) rw[m][j][i] = wr[i];
            ulong gi = row * (K / GROUP) + k / GROUP;
            rsc[m][j] = ((const unsigned short*)sm[m])[gi];
            rbi[m][j] = ((const unsigned short*)bm[m])[gi];
        }
    }
}
"""

# One token's attention on tensor cores, over the KV cache's buffers in place (CUDA; decode_attention).
# Each kv head's G query heads (G <= 16, the rows of an mma, zeros past G) against its keys 16
# positions (a tile) at a time: S = q k^T in two mmas a 16-value step of head_dim, an online softmax in
# base 2 on S's fragments (scale * log2(e) = SC), then o += P v, P's fragments reused from S's as
# FlashAttention-2 does. A sum over head_dim or over positions may take its terms in any order, so the
# fragments take the cache's words as 16-byte runs of rows, with no ldmatrix:
# - keys: the thread (g, t) takes row g of each 8-position half of a tile at dims 32s + 8t .. + 7; the
#   words go to k-steps 2s and 2s + 1, and q's fragments take the same dims;
# - values: rows 2t, 2t + 1, 2t + 8, 2t + 9 of a tile at dims 8(g + 8u) .. + 7; their e-th values pair
#   up as b's for the output's column tile e + 8u, column g: dim 64u + 8g + e.
# Each warp copies its tiles (cp.async) into a ring of STAGES tiles of its own in threadgroup memory,
# whole rows at a time (512 contiguous bytes an instruction), each 16-byte run of a row to the slot its
# column XOR swz's pattern of the row says: the fragments' reads then take 8 distinct slots of the 8
# (all 32 banks) a quarter-warp. One __syncwarp a tile, no barrier: STAGES - 1 tiles are on their way
# while the warp computes one. Copying whole rows rather than each thread the runs it reads took 32K
# positions from 70 to 54 us a call (scripts/attention_probe.py, BENCHMARKS.md, session 24). The warps of
# all the kv head's threadgroups (gridDim.x of them, WARPS_A warps each) take its tiles in turn up to
# pos[0]; a threadgroup's warps merge their (max, sum, o) in the same memory, out unnormalised in float32
# for glm_attention_merge. D: head_dim (64 or 128), HKV kv heads.
_ATTN_BODY = """
    uint g = lane / 4, t = lane % 4, CAP = kc_shape[2], last = ((uint)pos[0] + 16) / 16, L = (uint)pos[0] + 1;
    uint W = gridDim.x * WARPS_A, first = bx * WARPS_A + warp;
    TGMEM uint4 ring[WARPS_A * STAGES * 32 * (D / 8)];
    uint4* mine = ring + warp * STAGES * 32 * (D / 8);  // a slot: a tile's 16 key rows, then its 16 value rows
    const BF16_T* kb = kc + (ulong)by * CAP * D;
    const BF16_T* vb = vc + (ulong)by * CAP * D;
    auto swz = [&](uint row, uint col) {  // where a row's run `col` lies in a slot's keys or values
        return row * (D / 8) + (col ^ ((((row >> 1) & 3u) << 1) ^ ((row & 1u) << 2)));
    };
    auto issue = [&](uint tile, uint slot) {
        if (tile < last) {
            uint4* r = mine + slot * 32 * (D / 8);
            for (int j = 0; j < D / 16; j++) {
                uint c = lane + 32 * j, row = c / (D / 8), col = c % (D / 8);
                ulong at = (ulong)min(tile * 16 + row, CAP - 1) * D + 8 * col;
                cp_async16(r + swz(row, col), kb + at);
                cp_async16(r + 16 * (D / 8) + swz(row, col), vb + at);
            }
        }
        asm volatile("cp.async.commit_group;\\n" ::);
    };
    for (int st = 0; st < STAGES - 1; st++) issue(first + st * W, st);
    uint4 z = {0u, 0u, 0u, 0u};
    uint qa[D / 16][4];
    for (int s = 0; s < D / 32; s++) {
        uint4 r0 = g < G ? ((const uint4*)(q + ((ulong)by * G + g) * D + 32 * s + 8 * t))[0] : z;
        uint4 r1 = g + 8 < G ? ((const uint4*)(q + ((ulong)by * G + g + 8) * D + 32 * s + 8 * t))[0] : z;
        qa[2 * s][0] = r0.x; qa[2 * s][1] = r1.x; qa[2 * s][2] = r0.y; qa[2 * s][3] = r1.y;
        qa[2 * s + 1][0] = r0.z; qa[2 * s + 1][1] = r1.z; qa[2 * s + 1][2] = r0.w; qa[2 * s + 1][3] = r1.w;
    }
    float o[D / 8][4], m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    uint k = 0;
    for (uint tile = first; tile < last; tile += W, k++) {
        // tile k in, from every lane; and every lane done with tile k - 1's slot, refilled next
        asm volatile("cp.async.wait_group %0;\\n" :: "n"(STAGES - 2));
        __syncwarp();
        issue(tile + (STAGES - 1) * W, (k + STAGES - 1) % STAGES);
        const uint4* r = mine + (k % STAGES) * 32 * (D / 8);
        uint p0 = tile * 16;
        float sc[2][4];
        for (int n = 0; n < 2; n++) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
            for (int s = 0; s < D / 32; s++) {
                uint4 kw = r[swz(8 * n + g, 4 * s + t)];
                mma_bf16(sc[n], qa[2 * s], kw.x, kw.y);
                mma_bf16(sc[n], qa[2 * s + 1], kw.z, kw.w);
            }
            for (int e = 0; e < 4; e++) {
                sc[n][e] = p0 + 8 * n + 2 * t + (e & 1) < L ? sc[n][e] * AS_FLOAT((uint)SC) : NEG_INF;
            }
        }
        float x0 = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
        float x1 = fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]));
        x0 = fmaxf(x0, SIMD_SHUFFLE_XOR(x0, 1)); x0 = fmaxf(x0, SIMD_SHUFFLE_XOR(x0, 2));
        x1 = fmaxf(x1, SIMD_SHUFFLE_XOR(x1, 1)); x1 = fmaxf(x1, SIMD_SHUFFLE_XOR(x1, 2));
        float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1), a0 = EXP2(m0 - n0), a1 = EXP2(m1 - n1);
        m0 = n0; m1 = n1;
        for (int n = 0; n < 2; n++) {
            sc[n][0] = EXP2(sc[n][0] - n0); sc[n][1] = EXP2(sc[n][1] - n0);
            sc[n][2] = EXP2(sc[n][2] - n1); sc[n][3] = EXP2(sc[n][3] - n1);
        }
        l0 = l0 * a0 + sc[0][0] + sc[0][1] + sc[1][0] + sc[1][1];
        l1 = l1 * a1 + sc[0][2] + sc[0][3] + sc[1][2] + sc[1][3];
        uint pa[4] = {bf16x2(sc[0][0], sc[0][1]), bf16x2(sc[0][2], sc[0][3]), bf16x2(sc[1][0], sc[1][1]),
                      bf16x2(sc[1][2], sc[1][3])};
        for (int u = 0; u < D / 64; u++) {
            const uint4* rv = r + 16 * (D / 8);
            uint4 v0 = rv[swz(2 * t, g + 8 * u)], v1 = rv[swz(2 * t + 1, g + 8 * u)];
            uint4 v2 = rv[swz(2 * t + 8, g + 8 * u)], v3 = rv[swz(2 * t + 9, g + 8 * u)];
            uint w0[4] = {v0.x, v0.y, v0.z, v0.w}, w1[4] = {v1.x, v1.y, v1.z, v1.w};
            uint w2[4] = {v2.x, v2.y, v2.z, v2.w}, w3[4] = {v3.x, v3.y, v3.z, v3.w};
            for (int e = 0; e < 8; e++) {
                float* c = o[e + 8 * u];
                c[0] *= a0; c[1] *= a0; c[2] *= a1; c[3] *= a1;
                uint sel = e & 1 ? 0x7632u : 0x5410u;
                mma_bf16(c, pa, __byte_perm(w0[e / 2], w1[e / 2], sel), __byte_perm(w2[e / 2], w3[e / 2], sel));
            }
        }
    }
    asm volatile("cp.async.wait_all;\\n" ::);
    l0 += SIMD_SHUFFLE_XOR(l0, 1); l0 += SIMD_SHUFFLE_XOR(l0, 2);
    l1 += SIMD_SHUFFLE_XOR(l1, 1); l1 += SIMD_SHUFFLE_XOR(l1, 2);
    BARRIER;
    float* so = (float*)ring;
    float* sm = so + WARPS_A * 16 * D;
    float* sl = sm + WARPS_A * 16;
    for (int u = 0; u < D / 64; u++) {
        for (int e = 0; e < 8; e++) {
            uint d = 64 * u + 16 * t + e;
            float* w = so + (warp * 16 + g) * D;
            w[d] = o[e + 8 * u][0]; w[d + 8] = o[e + 8 * u][1];
            w[8 * D + d] = o[e + 8 * u][2]; w[8 * D + d + 8] = o[e + 8 * u][3];
        }
    }
    if (t == 0) {
        sm[warp * 16 + g] = m0; sm[warp * 16 + g + 8] = m1;
        sl[warp * 16 + g] = l0; sl[warp * 16 + g + 8] = l1;
    }
    BARRIER;
    for (uint i = tid; i < G * D; i += WARPS_A * 32) {
        uint r = i / D, d = i % D;
        float M = NEG_INF, acc = 0.0f, sum = 0.0f;
        for (int w = 0; w < WARPS_A; w++) M = fmaxf(M, sm[w * 16 + r]);
        for (int w = 0; w < WARPS_A; w++) {
            float f = M == NEG_INF ? 0.0f : EXP2(sm[w * 16 + r] - M);
            acc += so[(w * 16 + r) * D + d] * f;
            sum += sl[w * 16 + r] * f;
        }
        ulong h = (ulong)bx * HKV * G + by * G + r;
        po[h * D + d] = acc;
        if (d == 0) { pml[2 * h] = M; pml[2 * h + 1] = sum; }
    }
"""

# The splits of glm_attention combined: o = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max m_s
# (NSMAX splits or fewer); a threadgroup of MT threads a query head, in its dtype. The first warp weighs the
# splits; then MT / D threads a dim each sum a share of them.
_ATTN_MERGE_BODY = """
    uint NS = pml_shape[0], HQ = pml_shape[1];
    TGMEM float f[NSMAX], part[MT];
    if (warp == 0) {  // each lane weighs the splits s = lane mod 32
        float M = NEG_INF, sum = 0.0f;
        for (uint s = lane; s < NS; s += 32) M = fmaxf(M, pml[2 * ((ulong)s * HQ + bx)]);
        M = SIMD_MAX(M);
        for (uint s = lane; s < NS; s += 32) {
            ulong a = 2 * ((ulong)s * HQ + bx);
            f[s] = EXP2(pml[a] - M);
            sum += pml[a + 1] * f[s];
        }
        sum = SIMD_SUM(sum);
        for (uint s = lane; s < NS; s += 32) f[s] /= sum;
    }
    BARRIER;
    uint d = tid % D, share = tid / D;
    float acc = 0.0f;
    for (uint s = share; s < NS; s += MT / D) acc += po[((ulong)s * HQ + bx) * D + d] * f[s];
    part[tid] = acc;
    BARRIER;
    if (tid < D) {
        for (uint s = 1; s < MT / D; s++) acc += part[s * D + tid];
        y[(ulong)bx * D + tid] = acc;
    }
"""

_CUDA_HEADER = """
typedef unsigned int uint;
typedef unsigned long long ulong;
#define FN __device__ __forceinline__
#define DEV
#define LOC
#define BF16_T __nv_bfloat16
#define AS_FLOAT(u) __uint_as_float(u)
#define AS_UINT(f) __float_as_uint(f)
#define BF16_BITS(v) __bfloat16_as_ushort(v)
// An input's first element; an input written in place (the KV cache), given as the const pointer MLX passes.
template <typename T> FN T first(const T* p) { return p[0]; }
template <typename T> FN void put_input(const T* p, ulong i, float v) { const_cast<T*>(p)[i] = T(v); }
FN float glm_simd_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
FN float glm_simd_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
FN uint glm_simd_min(uint v) {
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
#define SIMD_SUM(v) glm_simd_sum(v)
#define SIMD_MAX(v) glm_simd_max(v)
#define SIMD_MIN(v) glm_simd_min(v)
#define NEG_INF __int_as_float(0xff800000)
#define TGMEM __shared__
#define TG
#define BARRIER __syncthreads()
#define SIMD_SHUFFLE_XOR(v, m) __shfl_xor_sync(0xffffffffu, v, m)
#define RSQRT(v) rsqrtf(v)
#define EXP2(v) exp2f(v)
"""
_CUDA_PROLOGUE = """
    uint tid = threadIdx.x, lane = tid % 32, warp = tid / 32, bx = blockIdx.x, by = blockIdx.y;
"""
_METAL_HEADER = """
#define FN inline
#define DEV device
#define LOC thread
#define BF16_T bfloat16_t
#define AS_FLOAT(u) as_type<float>(u)
#define AS_UINT(f) as_type<uint>(f)
#define BF16_BITS(v) as_type<ushort>(v)
// An input's first element, where MLX passes a pointer to device or constant memory, or (a 0-dim input) a
// reference; an input written in place (the KV cache): in device memory, or a placeholder of fewer than 8
// elements in constant memory, which the launch does not write (its CACHE is 0).
template <typename T> FN T first(const device T* p) { return p[0]; }
template <typename T> FN T first(const constant T* p) { return p[0]; }
template <typename T> FN T first(const constant T& v) { return v; }
template <typename T> FN void put_input(const device T* p, ulong i, float v) { ((device T*)p)[i] = T(v); }
template <typename T> FN void put_input(const constant T* p, ulong i, float v) {}
#define SIMD_SUM(v) simd_sum(v)
#define SIMD_MAX(v) simd_max(v)
#define SIMD_MIN(v) simd_min(v)
#define NEG_INF (-INFINITY)
#define TGMEM threadgroup
#define TG threadgroup
#define BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)
#define SIMD_SHUFFLE_XOR(v, m) simd_shuffle_xor(v, m)
#define RSQRT(v) rsqrt(v)
#define EXP2(v) exp2(v)
"""
_METAL_PROLOGUE = """
    uint lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
    uint tid = thread_index_in_threadgroup;
    uint bx = threadgroup_position_in_grid.x, by = threadgroup_position_in_grid.y;
"""

_kernels: dict[tuple[str, str], object] = {}


_gpu_kind: list[str] = []


def backend() -> str:
    """'metal', 'cuda' or 'cpu': whose kernels run on the default device (asked once per process;
    each decode op asks)."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if not _gpu_kind:
        cuda = getattr(mx, "cuda", None)
        _gpu_kind.append("metal" if mx.metal.is_available() else
                         "cuda" if cuda is not None and cuda.is_available() else "cpu")
    return _gpu_kind[0]


KERNELS = {  # name: (inputs, outputs, body)
    "glm_gather_qmv": (["x", "w", "scales", "biases", "inds"], ["y"], _QMV_BODY),
    "glm_qkv": (["x", "qw", "qs", "qb", "qbias", "kw", "ks", "kb", "kbias", "vw", "vs", "vb", "vbias", "nw", "pos",
                 "kc", "vc", "after"], ["yq", "yk", "yv"], _QKV_BODY),
    "glm_expert_up": (["x", "gw", "gs", "gb", "uw", "us", "ub", "inds", "sgw", "sgs", "sgb", "suw", "sus", "sub", "nw"],
                      ["y"], _UP_BODY),
    "glm_router_logits": (["x", "w", "nw"], ["y"], _LOGITS_BODY),
    "glm_expert_down": (["h", "w", "scales", "biases", "inds", "weights", "sw", "ss", "sb", "res"], ["y"],
                        _DOWN_BODY),
    "glm_router_select": (["logits", "bias"], ["inds", "weights"], _SELECT_BODY),
    "glm_dequantize": (["w", "scales", "biases"], ["y"], _DEQUANT_BODY),
}
CUDA_KERNELS = {  # with no Metal twin (tensor-core instructions): the dispatch asks for them on CUDA only.
    # name: (inputs, outputs, body, the helpers it needs beside the shared ones)
    "glm_grouped_qmm": (["x", "src", "dst", "tiles", "starts", "w", "s", "bb", "w2", "s2", "bb2"], ["y"],
                        _GROUPED_BODY, _CUDA_MMA + _CUDA_GROUPED),
    "glm_attention": (["q", "kc", "vc", "pos"], ["po", "pml"], _ATTN_BODY, _CUDA_MMA),
    "glm_attention_merge": (["po", "pml"], ["y"], _ATTN_MERGE_BODY, ""),
}


def build(kind: str, name: str, inputs: list, outputs: list, body: str, header: str = ""):
    """A kernel for backend `kind` from a shared body: the backend's prologue before it, and in the
    header its macros, then the helpers (_DOT), then `header` (a CUDA-only kernel's tensor-core helpers,
    or a script's variants). Comments and indentation are left out of what MLX is handed: it handles
    the text on every launch, at about 0.25 us a kilobyte on the GPU machine's host, and a decode step
    launches 275 (scripts/encode_probe.py, BENCHMARKS.md, session 22)."""
    if kind == "cuda":
        make, prologue, macros = mx.fast.cuda_kernel, _CUDA_PROLOGUE, _CUDA_HEADER
    else:
        make, prologue, macros = mx.fast.metal_kernel, _METAL_PROLOGUE, _METAL_HEADER
    return make(name=name, input_names=inputs, output_names=outputs, source=_compact(prologue + body),
                header=_compact(macros + _DOT + header))


def _compact(code: str) -> str:
    """code without its // comments, blank lines and indentation (none of the kernels' text has // in a
    string; preprocessor lines keep their own line)."""
    lines = (re.sub(r"\s*//.*$", "", line).strip() for line in code.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def _kernel(kind: str, name: str):
    """The kernel `name` for backend `kind`, built once."""
    if (kind, name) not in _kernels:
        _kernels[kind, name] = build(kind, name, *(KERNELS[name] if name in KERNELS else CUDA_KERNELS[name]))
    return _kernels[kind, name]


def source(kind: str, name: str) -> str:
    """What kernel `name` hands MLX on backend `kind` (its body and header as build gives them): what its
    self-check's verdict is cached against."""
    inputs, outputs, body, *header = KERNELS[name] if name in KERNELS else CUDA_KERNELS[name]
    prologue, macros = (_CUDA_PROLOGUE, _CUDA_HEADER) if kind == "cuda" else (_METAL_PROLOGUE, _METAL_HEADER)
    return "\n".join([name, ",".join(inputs), ",".join(outputs), prologue + body, macros + _DOT + "".join(header)])


_verdicts: dict[str, "selfcheck.Verdict"] = {}


def enabled(*names: str) -> bool:
    """Whether the dispatch may launch these kernels: each passed its self-check on this backend (run the
    first time a process asks, or read from the cache), and GLM_MLX_KERNELS does not turn it off. A dict
    lookup a call once known."""
    for name in names:
        v = _verdicts.get(name)
        if v is None:
            v = _verdicts[name] = _check(name)
        if not v.ok:
            return False
    return True


@contextlib.contextmanager
def reference_only():
    """Within: every kernel off, the reference path taken (glm-mlx doctor's comparison)."""
    saved = dict(_verdicts)
    _verdicts.clear()
    _verdicts.update({n: selfcheck.Verdict(False, "the reference path asked for") for n in (*KERNELS, *CUDA_KERNELS)})
    try:
        yield
    finally:
        _verdicts.clear()
        _verdicts.update(saved)


def verdict(name: str) -> "selfcheck.Verdict":
    """Kernel `name`'s verdict on this backend (checked now if not yet)."""
    enabled(name)
    return _verdicts[name]


def _check(name: str) -> "selfcheck.Verdict":
    kind = backend()
    if not _verdicts and (unknown := selfcheck.unknown_names((*KERNELS, *CUDA_KERNELS))):  # once a process
        print(f"glm-mlx: GLM_MLX_KERNELS names no kernel {', '.join(unknown)}; the kernels are "
              f"{', '.join((*KERNELS, *CUDA_KERNELS))} (or off for all)", file=sys.stderr)
    if kind == "cpu":
        return selfcheck.Verdict(False, "the CPU has no custom kernels")
    if kind == "metal" and name in CUDA_KERNELS:
        return selfcheck.Verdict(False, "CUDA only (tensor-core instructions); Metal keeps MLX's own op")
    if selfcheck.forced_off(name):
        return selfcheck.Verdict(False, "turned off by GLM_MLX_KERNELS")
    device = str(mx.device_info().get("device_name", "unknown"))
    key = selfcheck.key(mx.__version__, device, source(kind, name))
    v = selfcheck.lookup(key)
    if v is None:
        _verdicts[name] = selfcheck.Verdict(True, "")  # while its probe runs, the dispatch takes it
        try:
            err, tol = PROBES[name]()
            v = selfcheck.Verdict(bool(err <= tol), "" if err <= tol else
                                  f"wrong numbers: max error {err:.3g} against a tolerance of {tol:.3g}")
        except Exception as e:  # a build or launch failure of any kind: the kernel is off, the reason said
            v = selfcheck.Verdict(False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        selfcheck.store(key, v)
    if not v.ok:
        selfcheck.say_off(name, kind, v)
    return v


def _rand(shape: tuple, seed: int) -> mx.array:
    """Normal noise from its own key: a probe leaves the process's random state (a user's --seed) alone."""
    return mx.random.normal(shape, key=mx.random.key(seed))


def _layer(E: int | None, N: int, K: int, bits: int, bias: bool = False, seed: int = 0):
    """A quantized linear layer (stacked over E experts when E), bf16 scales, as a model folder holds one."""
    from mlx import nn

    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    if E is None:
        layer = nn.QuantizedLinear(K, N, bias=bias, group_size=64, bits=bits)
    else:
        layer = QuantizedSwitchLinear(K, N, E, bias=False, group_size=64, bits=bits)
    w = _rand((E, N, K) if E else (N, K), seed) * K ** -0.5
    layer.weight, layer.scales, layer.biases = mx.quantize(w, 64, bits)
    layer.scales, layer.biases = layer.scales.astype(mx.bfloat16), layer.biases.astype(mx.bfloat16)
    if bias:
        layer.bias = (_rand((N,), seed + 100) * 0.1).astype(mx.bfloat16)
    return layer


def _glu(E: int | None, H: int, K: int, bits: int, seed: int):
    from mlx import nn

    m = nn.Module()
    m.gate_proj, m.up_proj = _layer(E, H, K, bits, seed=seed), _layer(E, H, K, bits, seed=seed + 1)
    m.down_proj = _layer(E, K, H, bits, seed=seed + 2)
    return m


def _norm(K: int):
    from mlx import nn

    norm = nn.RMSNorm(K, eps=1e-5)
    norm.weight = (1 + 0.1 * _rand((K,), 7)).astype(mx.bfloat16)
    return norm


def _error(got, want) -> tuple[float, float]:
    """(max |got - want|, the tolerance: 2% of want's largest magnitude plus 1e-3); NaN never passes."""
    got, want = [mx.concatenate([mx.array(t).astype(mx.float32).reshape(-1) for t in
                                 (v if isinstance(v, (tuple, list)) else (v,))]) for v in (got, want)]
    err = mx.abs(got - want).max().item()
    return (err if err == err else float("inf")), 0.02 * mx.abs(want).max().item() + 1e-3


def _probe_gather_qmv():
    x = _rand((1, 256), 11).astype(mx.bfloat16)
    errs = []
    for bits in (4, 8):
        layer = _layer(3, 64, 256, bits)
        args = (x, *_q(layer), mx.array([2, 0], mx.uint32), 64, bits)
        errs.append(_error(gather_qmv(*args), gather_qmv_reference(*args)))
    return max(errs)


def _probe_linear():
    x, res = (_rand((1, 1, n), n).astype(mx.bfloat16) for n in (256, 64))
    return max(_error(linear_decode(x, layer, res), linear_decode_reference(x, layer, res))
               for layer in (_layer(None, 64, 256, 4), _layer(None, 64, 256, 8)))


def _probe_moe():
    x, res = (_rand((1, 1, 256), i).astype(mx.bfloat16) for i in (12, 13))
    errs = []
    for bits in (4, 8):
        experts, shared, norm = _glu(4, 128, 256, bits, 1), _glu(None, 128, 256, bits, 5), _norm(256)
        inds, weights = mx.array([3, 1], mx.uint32), mx.array([0.7, 0.3])
        errs.append(_error(moe_decode(x, experts, inds, weights, shared, res, norm),
                           moe_decode_reference(x, experts, inds, weights, shared, res, norm)))
    return max(errs)


def _probe_qkv():
    x = _rand((1, 1, 256), 14).astype(mx.bfloat16)
    q, k, v = (_layer(None, n, 256, 4, bias=True, seed=i) for i, n in enumerate((256, 64, 64)))
    shapes = ((1, 4, 1, 64), (1, 1, 1, 64), (1, 1, 1, 64))
    args = (x, q, k, v, shapes, _norm(256), (32, 10000.0, position(5)))
    return _error(qkv_decode(*args), qkv_decode_reference(*args))


def _probe_router_logits():
    x, w = _rand((1, 1, 256), 15).astype(mx.bfloat16), _rand((16, 256), 16) * 0.1
    norm = _norm(256)
    return _error(router_logits(x, w, norm), router_logits_reference(x, w, norm))


def _probe_router_select():
    logits, bias = _rand((16,), 17), _rand((16,), 18) * 0.1
    got, want = router_select(logits, bias, 4, True, 2.5), router_select_reference(logits, bias, 4, True, 2.5)
    if not mx.array_equal(got[0], want[0]).item():
        return float("inf"), 0.0
    return _error(got[1], want[1])


def _probe_dequantize():
    errs = []
    for bits in (4, 8):
        w, s, b = _q(_layer(2, 64, 256, bits))
        errs.append(_error(dequantize(w, s, b, 64, bits), mx.dequantize(w, s, b, 64, bits)))
    return max(errs)


def _probe_grouped():
    layer = _layer(4, GROUPED_BN, 128, 4)
    x, idx = _rand((8, 128), 19).astype(mx.bfloat16), mx.array([0, 0, 1, 1, 1, 2, 3, 3], mx.uint32)
    return _error(grouped_qmm(x, layer, idx, tile_map(idx, 4)), grouped_qmm_reference(x, layer, idx))


def _probe_attention():
    q = _rand((1, 8, 1, 64), 20).astype(mx.bfloat16)
    keys, values = (_rand((1, 2, 64, 64), i).astype(mx.bfloat16) for i in (21, 22))
    pos = position(37)
    return _error(decode_attention(q, keys, values, pos, 0.125), decode_attention_reference(q, keys, values, pos, 0.125))


# Each kernel's probe: (max error against its reference, tolerance) on small inputs through its dispatch.
# glm_expert_down is checked alone (linear_decode) before glm_expert_up, which needs it.
PROBES = {
    "glm_gather_qmv": _probe_gather_qmv, "glm_expert_down": _probe_linear, "glm_expert_up": _probe_moe,
    "glm_qkv": _probe_qkv, "glm_router_logits": _probe_router_logits, "glm_router_select": _probe_router_select,
    "glm_dequantize": _probe_dequantize, "glm_grouped_qmm": _probe_grouped, "glm_attention": _probe_attention,
    "glm_attention_merge": _probe_attention,
}


def _split(sets: int, values: int, per_lane: int) -> int:
    """Simdgroups per row set (SPLIT, a power of two up to WARPS), for `sets` row sets each summing
    `values` products: doubled while fewer than WARPS_IN_FLIGHT simdgroups would run and each lane
    of the doubled set still gets `per_lane` values or more."""
    s = 1
    while s < WARPS and sets * s < WARPS_IN_FLIGHT and values >= 64 * s * per_lane:
        s *= 2
    return SPLIT or s


def _run(kind: str, name: str, inputs: list, rows: int, M: int, outputs: list, terms: int = 1, per_lane: int = 64,
         **template):
    """`rows` outputs (x M) in row sets of RPW, each summing `terms` dot products of length K; a lane
    takes chunks of 32 values (8 for the router's float weights: per_lane 8), two or more."""
    sets = -(-rows // RPW)
    split = _split(sets * M, terms * template["K"], per_lane)
    return _kernel(kind, name)(
        inputs=inputs, template=list({**template, "WARPS": WARPS, "RPW": RPW, "SPLIT": split}.items()),
        grid=(-(-sets * split // WARPS) * 32 * WARPS, M, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[shape for shape, _ in outputs], output_dtypes=[dt for _, dt in outputs])


_dummies: dict = {}


def _dummy(dtype) -> mx.array:
    """A one-element array of dtype, built once: an input a launch does not read."""
    if dtype not in _dummies:
        _dummies[dtype] = mx.zeros((1,), dtype)
        mx.eval(_dummies[dtype])
    return _dummies[dtype]


_positions: list = [mx.arange(0), None, None]  # 0, 1, 2, ... (computed on the device, grown by doubling); n, its view


def position(n: int) -> mx.array:
    """n as a scalar int32 array that the host never writes: a view of a table of positions the device
    computed, one view a step for all the layers. Each layer's q|k|v launch reads its position from memory.
    On MLX's CUDA backend an array the host makes, of 8 bytes or less, lies in one pool of managed memory
    that the host writes each time it makes one, and the launches that read from it there waited: with
    the norms' epsilon and RoPE's base also read so, q|k|v took 37-42 us a call where it now takes 23-26
    (BENCHMARKS.md, session 22)."""
    if n >= _positions[0].size:
        _positions[:] = [mx.arange(max(4096, 1 << n.bit_length()), dtype=mx.int32), None, None]
    if _positions[1] != n:  # one view a step for all the layers (two ops; `[n]` would gather, a kernel)
        _positions[1:] = [n, _positions[0][n : n + 1].reshape(())]
    return _positions[2]


def _as(a: mx.array, dtype) -> mx.array:
    """a in dtype, with no op when it already is."""
    return a if a.dtype == dtype else a.astype(dtype)


def _q(layer) -> tuple:
    """A quantized layer's (weight, scales, biases); read as dict items, not attributes (a
    module's __getattr__ is slow, and a decode step asks a few hundred times)."""
    return layer["weight"], layer["scales"], layer["biases"]


def _fits(layer, K: int) -> bool:
    """Whether the kernels take this layer (quantized, input width K) on a bf16 input."""
    if "scales" not in layer or layer.bits not in (4, 8) or layer.group_size % 32 or K % layer.group_size:
        return False
    w, s, _ = _q(layer)
    return s.dtype == mx.bfloat16 and w.shape[-1] * 32 // layer.bits == K


def _gpu(x: mx.array) -> str | None:
    """The backend whose kernels take one token's input x, or None (the CPU, or x not bf16 or not a
    multiple of 8 wide)."""
    kind = backend()
    return kind if kind != "cpu" and x.dtype == mx.bfloat16 and x.size % 8 == 0 else None


# --- references (plain MLX, float32 sums) ---------------------------------------

def gather_qmv_reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, inds: mx.array,
                         group_size: int, bits: int) -> mx.array:
    """x [1 or M, K], w [E, N, K*bits/32], inds [M] -> [M, N] float32 (weights
    dequantized, products summed in float32)."""
    f32 = mx.float32
    W = mx.dequantize(w[inds], scales[inds].astype(f32), biases[inds].astype(f32), group_size, bits)
    xs = mx.broadcast_to(x.astype(mx.float32), (inds.size, x.shape[-1]))
    return (W @ xs[..., None]).squeeze(-1)


def _ref(x: mx.array, layer, inds: mx.array | None = None) -> mx.array:
    """x [1 or M, K] through quantized `layer` -> [M, N] float32: experts inds of a stacked
    layer, or a plain one (inds None)."""
    w, s, b = _q(layer)
    if inds is None:
        w, s, b, inds = w[None], s[None], b[None], mx.zeros((x.shape[0],), mx.uint32)
    return gather_qmv_reference(x, w, s, b, inds, layer.group_size, layer.bits)


def _swiglu_ref(x: mx.array, glu, inds: mx.array | None = None) -> mx.array:
    g, u = _ref(x, glu.gate_proj, inds), _ref(x, glu.up_proj, inds)
    return g * mx.sigmoid(g) * u  # float32, as the kernel hands it on


def moe_decode_reference(x: mx.array, experts, inds: mx.array | None, weights: mx.array | None, shared=None,
                         residual: mx.array | None = None, norm=None) -> mx.array:
    """One token's MLP block in plain MLX: sum_r weights[r] * down_r(silu(gate_r(x)) * up_r(x)) over the
    routed `experts` inds (a stacked SwiGLU, or None), plus the `shared` SwiGLU's output (or None), plus
    `residual`; x normalised first by the RMSNorm `norm` when given. x [..., K] (one token) -> [..., D]:
    float32, or shaped and typed like the residual."""
    flat = _normed(x.reshape(1, -1), norm)
    y = mx.zeros((1,), mx.float32)
    if experts is not None:
        h = _swiglu_ref(flat, experts, inds.reshape(-1))
        y = y + (weights.reshape(-1, 1).astype(mx.float32) * _ref(h, experts.down_proj, inds.reshape(-1))).sum(0)
    if shared is not None:
        y = y + _ref(_swiglu_ref(flat, shared), shared.down_proj)[0]
    return _plus(y, x, residual)


def _plus(y: mx.array, x: mx.array, residual: mx.array | None) -> mx.array:
    """One token's y [N] float32 shaped _shape(x, residual, N): residual + y in the residual's dtype
    (summed in float32, rounded once), or y."""
    if residual is None:
        return y.reshape(_shape(x, None, y.size))
    return (y + residual.astype(mx.float32)).astype(residual.dtype)


def _shape(x: mx.array, residual: mx.array | None, N: int) -> tuple:
    """A block's output shape for one token x [..., K]: the residual's, else x's with N last."""
    return residual.shape if residual is not None else (*x.shape[:-1], N)


def linear_decode_reference(x: mx.array, layer, residual: mx.array | None = None) -> mx.array:
    """residual + layer(x) for one token x [..., K] -> [..., N] (float32 without a residual)."""
    return _plus(_ref(x.reshape(1, -1), layer)[0], x, residual)


def qkv_decode_reference(x: mx.array, q, k, v, shapes: tuple, norm=None,
                         rope: tuple | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v projections (with their biases, if any) of one token x [..., K], normalised first by the
    RMSNorm `norm` when given, in x's dtype, shaped `shapes` ([1, heads, 1, head_dim]); q and k RoPE'd
    when `rope` is (dims, base, offset: an int or an int array), rotate-half. Summed and rotated in
    float32, rounded once."""
    xf = _normed(x.reshape(1, -1), norm)
    out = []
    for layer, shape in zip((q, k, v), shapes):
        y = _ref(xf, layer)[0]
        if "bias" in layer:
            y = y + layer.bias.astype(mx.float32)
        out.append(y.reshape(shape))
    if rope is not None:
        dims, base, offset = rope
        out[:2] = [mx.fast.rope(t, dims, traditional=False, base=base, scale=1.0, offset=offset) for t in out[:2]]
    return tuple(t.astype(x.dtype) for t in out)


def router_logits_reference(x: mx.array, weight: mx.array, norm=None) -> mx.array:
    """The router's logits [E] (float32) for one token x [..., K], normalised first by `norm` when given."""
    return weight.astype(mx.float32) @ _normed(x.reshape(-1), norm)


def _normed(x: mx.array, norm) -> mx.array:
    """x through the RMSNorm `norm` when given (in float32, then rounded once to x's dtype, as the
    kernels hand it on), as float32."""
    if norm is None:
        return x.astype(mx.float32)
    y = mx.fast.rms_norm(x.astype(mx.float32), norm["weight"].astype(mx.float32), norm.eps)
    return y.astype(x.dtype).astype(mx.float32)


def router_select_reference(logits: mx.array, bias: mx.array, k: int, norm: bool, scale: float,
                            lead: tuple = ()):
    """The router's choice from one token's float32 logits (E of them, any shape): (expert ids
    [*lead, k] uint32, best first; their sigmoid scores, normalised to sum 1 when `norm`, times
    `scale`, float32)."""
    scores = mx.sigmoid(logits.reshape(-1).astype(mx.float32))
    inds = mx.argsort(-(scores + bias.astype(mx.float32)))[:k].astype(mx.uint32)
    w = scores[inds]
    if norm:
        w = w / (w.sum() + 1e-20)
    return inds.reshape(*lead, k), (w * scale).reshape(*lead, k)


# --- the dispatch: the backend's kernel, else the reference ----------------------

def gather_qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, inds: mx.array,
               group_size: int, bits: int) -> mx.array:
    """x [1 or M, K] (bf16), w [E, N, K*bits/32] (uint32), scales and biases
    [E, N, K/group] (bf16), inds [M] -> [M, N] float32."""
    kind = _gpu(x)
    ok = bits in (4, 8) and group_size % 32 == 0 and x.shape[-1] % group_size == 0 and scales.dtype == mx.bfloat16
    if kind is None or not ok or not enabled("glm_gather_qmv"):
        return gather_qmv_reference(x, w, scales, biases, inds, group_size, bits)
    M, K, N = inds.size, x.shape[-1], w.shape[-2]
    return _run(kind, "glm_gather_qmv", [x, w, scales, biases, _as(inds, mx.uint32)], N, M,
                [((M, N), mx.float32)], K=K, N=N, GROUP=group_size, BITS=bits, XROWS=x.shape[0])[0]


def moe_decode(x: mx.array, experts, inds: mx.array | None, weights: mx.array | None, shared=None,
               residual: mx.array | None = None, norm=None) -> mx.array:
    """moe_decode_reference's numbers in two launches on a GPU: the routed experts' and the shared
    expert's SwiGLU halves in one, their down projections, weighted sum and the residual in the other.
    The operands go in as they are (the kernels read them flat): a reshape is an op to build and encode."""
    kind, K = _gpu(x), x.size
    glus = [m for m in (experts, shared) if m is not None]
    H = glus[0]["gate_proj"]["weight"].shape[-2] if glus else 0
    ok = kind is not None and glus and H % 8 == 0 and enabled("glm_expert_down", "glm_expert_up")
    for m in glus if ok else ():
        g, u, d = m["gate_proj"], m["up_proj"], m["down_proj"]
        ok = ok and (_fits(g, K) and _fits(u, K) and _fits(d, H) and g["weight"].shape[-2] == u["weight"].shape[-2] == H
                     and (g.bits, g.group_size) == (u.bits, u.group_size))
    nw = _norm_input(norm, K)
    if not ok or nw is None:
        return moe_decode_reference(x, experts, inds, weights, shared, residual, norm)
    k = inds.size if experts is not None else 0
    rows = k + (shared is not None)  # h's rows: the routed experts', then the shared expert's
    lead = experts if experts is not None else shared
    side = shared if shared is not None else experts
    inds = _as(inds, mx.uint32) if experts is not None else _dummy(mx.uint32)
    g, u, sg, su = lead["gate_proj"], lead["up_proj"], side["gate_proj"], side["up_proj"]
    h = _run(kind, "glm_expert_up", [x, *_q(g), *_q(u), inds, *_q(sg), *_q(su), nw[0]], H, rows,
             [((rows, H), mx.float32)], K=K, N=H, GROUP=g.group_size, BITS=g.bits,
             SGROUP=sg.group_size, SBITS=sg.bits, ROWS=k, NORM=int(norm is not None), EPS=nw[1])[0]
    d, sd = lead["down_proj"], side["down_proj"]
    D = d["weight"].shape[-2]
    wts = _as(weights, mx.float32) if experts is not None else _dummy(mx.float32)
    return _run(kind, "glm_expert_down", [h, *_q(d), inds, wts, *_q(sd), _res(residual)], D, 1,
                [_out(x, residual, D)], terms=rows, K=H, N=D, GROUP=d.group_size,
                BITS=d.bits, SGROUP=sd.group_size, SBITS=sd.bits, ROWS=k, SHARED=int(shared is not None),
                RES=int(residual is not None))[0]


def _res(residual: mx.array | None) -> mx.array:
    """A down kernel's residual input, or a placeholder it does not read."""
    return residual if residual is not None else _dummy(mx.float32)


def _out(x: mx.array, residual: mx.array | None, N: int) -> tuple:
    """A down kernel's output: shaped _shape(x, residual, N), in the residual's dtype, else float32."""
    return _shape(x, residual, N), residual.dtype if residual is not None else mx.float32


def linear_decode(x: mx.array, layer, residual: mx.array | None = None) -> mx.array:
    """residual + layer(x) for one token x [..., K] -> [..., N] (float32 without a residual; else shaped
    and typed like the residual), one launch on a GPU."""
    kind, K = _gpu(x), x.size
    if kind is None or not _fits(layer, K) or "bias" in layer or not enabled("glm_expert_down"):
        return linear_decode_reference(x, layer, residual)
    N = layer["weight"].shape[-2]
    return _run(kind, "glm_expert_down", [x, _dummy(mx.uint32), _dummy(mx.bfloat16),
                                          _dummy(mx.bfloat16), _dummy(mx.uint32), _dummy(mx.float32),
                                          *_q(layer), _res(residual)], N, 1,
                [_out(x, residual, N)], K=K, N=N,
                GROUP=layer.group_size, BITS=layer.bits, SGROUP=layer.group_size, SBITS=layer.bits, ROWS=0,
                SHARED=1, RES=int(residual is not None))[0]


def _qkv_launch(x: mx.array, q, k, v, shapes: tuple, norm, rope: tuple | None,
                cache: tuple | None = None) -> tuple | None:
    """The q|k|v launch's (q, k, v); with cache = (kc, vc, after), k and v written into kc and vc too (after:
    an input the launch does not read, to be ordered after it). None where the kernel does not take these
    operands (then the callers compute the reference)."""
    kind, K = _gpu(x), x.size
    NQ, NK, HD = q["weight"].shape[0], k["weight"].shape[0], shapes[0][-1]
    bias = ["bias" in p for p in (q, k, v)]
    nw = _norm_input(norm, K)
    ok = (kind is not None and nw is not None and all(_fits(p, K) for p in (q, k, v)) and v["weight"].shape[0] == NK
          and enabled("glm_qkv")
          and NQ % RPW == 0 and NK % RPW == 0 and len(set(bias)) == 1
          and len({(p.bits, p.group_size) for p in (q, k, v)}) == 1
          and (cache is None or all(c.dtype == x.dtype for c in cache)))
    if rope is not None:  # a row set takes RPW / 2 rows of each half of a head's rotated part
        ok = ok and rope[0] % RPW == 0 and rope[0] <= HD and HD % RPW == 0 and NQ % HD == 0 and NK % HD == 0
    if not ok:
        return None
    b = [p["bias"] if bias[0] else _dummy(mx.float32) for p in (q, k, v)]
    dims, base, offset = rope if rope is not None else (0, 1.0, None)
    pos = (_dummy(mx.int32) if offset is None else offset.astype(mx.int32) if isinstance(offset, mx.array)
           else position(int(offset)))
    kc, vc, after = cache if cache is not None else (_dummy(x.dtype), _dummy(x.dtype), _dummy(x.dtype))
    return tuple(_run(kind, "glm_qkv", [x, *_q(q), b[0], *_q(k), b[1], *_q(v), b[2], nw[0], pos, kc, vc, after],
                      NQ + 2 * NK, 1, [(shape, x.dtype) for shape in shapes], K=K, NQ=NQ, NK=NK, GROUP=q.group_size,
                      BITS=q.bits, BIAS=int(bias[0]), NORM=int(norm is not None), EPS=nw[1],
                      LBASE=_bits(math.log2(base)), ROPE=dims, HD=HD, CACHE=int(cache is not None)))


def qkv_decode(x: mx.array, q, k, v, shapes: tuple, norm=None,
               rope: tuple | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """qkv_decode_reference's numbers in one launch on a GPU, the norm and RoPE included."""
    out = _qkv_launch(x, q, k, v, shapes, norm, rope)
    return out if out is not None else qkv_decode_reference(x, q, k, v, shapes, norm, rope)


def qkv_decode_cached(x: mx.array, q, k, v, shapes: tuple, norm, rope: tuple, keys: mx.array,
                      values: mx.array, after: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(q, keys, values, written): qkv_decode's q, and the KV cache's buffers [1, kv heads, capacity,
    head_dim] with this token's k and v at position rope[2] (an int array). On a GPU the q|k|v launch
    writes them into the buffers it is given and hands those back: the two cache writes (a slice update
    each, two ops to build and encode a layer, of a step's 513; BENCHMARKS.md, session 18) go. Elsewhere,
    slice updates of the reference's k and v.

    MLX does not know that a launch writes its inputs, so this holds only as KVCache uses it:
    - the buffers are row-contiguous (KVCache makes them so; MLX would otherwise hand the kernel a
      copy) and held by the cache (so never donated to another op);
    - MLX orders a CUDA graph's kernels by the buffers they write: a reader of the cache's buffers comes
      after the ops that made them, not after a launch that wrote into them. So everything that reads
      them later must also read an output of the launch. This token's attention takes q. The next
      launch takes `written` (this launch's k, [1, kv heads, 1, head_dim]) as `after` (KVCache.last_write),
      and so the next token's attention comes after this launch through that launch's q; without it, steps
      built lazily over known tokens read positions not yet written (BENCHMARKS.md, session 22). The
      cache's own ops on its buffers (growing them, a prompt's slice updates) evaluate `written` first.
    `after`: the previous launch's `written` (any array of its shape before the first)."""
    out = _qkv_launch(x, q, k, v, shapes, norm, rope, (keys, values, after))
    if out is not None:
        return out[0], keys, values, out[1]
    qn, kn, vn = qkv_decode_reference(x, q, k, v, shapes, norm, rope)
    pos = rope[2].reshape(1).astype(mx.int32)
    return qn, mx.slice_update(keys, kn, pos, axes=(2,)), mx.slice_update(values, vn, pos, axes=(2,)), kn


def attention_fits(heads: int, kv_heads: int, head_dim: int, dtype) -> bool:
    """Whether decode_attention's kernel takes one token's attention of this shape (CUDA, bf16, a kv
    head's query heads the 16 rows of an mma or fewer, head_dim 64 or 128)."""
    return (backend() == "cuda" and dtype == mx.bfloat16 and heads % kv_heads == 0 and heads // kv_heads <= 16
            and head_dim in (64, 128) and enabled("glm_attention", "glm_attention_merge"))


def decode_attention_reference(q: mx.array, keys: mx.array, values: mx.array, pos: mx.array,
                               scale: float) -> mx.array:
    """One token's attention: q [1, heads, 1, head_dim] over the first pos + 1 positions of the KV cache's
    buffers [1, kv heads, capacity, head_dim] (pos: this token's position, an int array, as position()
    gives it), mx.fast's with the positions past it masked."""
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mx.arange(keys.shape[2]) <= pos)


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, pos: mx.array, scale: float) -> mx.array:
    """decode_attention_reference's numbers in two launches on tensor cores, reading the buffers in place
    and the length from the device (attention_fits says when: CUDA only; a Mac keeps mx.fast's over
    slices, Metal's own; the reference elsewhere).
    What it replaces per layer on the GPU machine: two slices of the buffers and cuDNN's attention,
    which its host encodes at 23-35 us a call against about 8 for a launch of ours
    (scripts/encode_probe.py, BENCHMARKS.md, session 23).
    The grid depends on the buffers' capacity only, not on the length, so one trace serves until they
    grow; the second launch combines the threadgroups' results. As the model uses it, the q|k|v launch
    that wrote this token's k and v gave q, so this runs after it."""
    _, HQ, _, D = q.shape
    HKV, CAP = keys.shape[1], keys.shape[2]
    if not attention_fits(HQ, HKV, D, q.dtype) or keys.dtype != q.dtype or values.dtype != q.dtype:
        return decode_attention_reference(q, keys, values, pos, scale)
    # threadgroups a kv head: its tiles shared by up to ATTENTION_SPLITS x ATTENTION_WARPS warps, two tiles each
    # or more
    splits = max(1, min(ATTENTION_BLOCKS // HKV, ATTENTION_SPLITS, -(-CAP // (32 * ATTENTION_WARPS))))
    po, pml = _kernel("cuda", "glm_attention")(
        inputs=[q, keys, values, _as(pos, mx.int32)],
        template=[("D", D), ("G", HQ // HKV), ("HKV", HKV), ("SC", _bits(scale * math.log2(math.e))),
                  ("WARPS_A", ATTENTION_WARPS), ("STAGES", ATTENTION_STAGES)],
        grid=(splits * 32 * ATTENTION_WARPS, HKV, 1), threadgroup=(32 * ATTENTION_WARPS, 1, 1),
        output_shapes=[(splits, HQ, D), (splits, HQ, 2)], output_dtypes=[mx.float32, mx.float32])
    return _kernel("cuda", "glm_attention_merge")(
        inputs=[po, pml], template=[("D", D), ("MT", ATTENTION_MERGE_THREADS), ("NSMAX", ATTENTION_SPLITS)],
        grid=(HQ * ATTENTION_MERGE_THREADS, 1, 1), threadgroup=(ATTENTION_MERGE_THREADS, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


# decode_attention's shape: warps a threadgroup, tiles each warp's ring holds (2 or more; threadgroup memory:
# ATTENTION_WARPS * ATTENTION_STAGES * head_dim * 64 bytes, 48 KB or less), threadgroups in all, threads a
# query head in the merge, and the most threadgroups a kv head (the merge holds a weight for each). On H100
# (132 SMs) at Air's heads, 256 threadgroups (32 splits a kv head) beat 512 and 1024 at 4K and 32K positions:
# the merge reads half what it did; 2 warps of 2 tiles as 2 of 3 and 1 of 3 or 4 (scripts/attention_probe.py,
# BENCHMARKS.md, session 24).
ATTENTION_WARPS, ATTENTION_STAGES, ATTENTION_BLOCKS, ATTENTION_MERGE_THREADS, ATTENTION_SPLITS = 2, 2, 256, 1024, 128


def router_logits(x: mx.array, weight: mx.array, norm=None) -> mx.array:
    """router_logits_reference's numbers in one launch on a GPU, the norm included."""
    kind, K = _gpu(x), x.size
    nw = _norm_input(norm, K)
    if (kind is None or nw is None or weight.dtype != mx.float32 or weight.shape[-1] != K
            or not enabled("glm_router_logits")):
        return router_logits_reference(x, weight, norm)
    E = weight.shape[0]
    return _run(kind, "glm_router_logits", [x, weight, nw[0]], E, 1, [((E,), mx.float32)], per_lane=8, K=K, N=E,
                NORM=int(norm is not None), EPS=nw[1])[0]


def _bits(v: float) -> int:
    """A float32's bits as an int: how a float goes in as a template argument (AS_FLOAT((uint)V) in the body).
    Constants go in so, not as one-element arrays: MLX's CUDA backend keeps arrays of 8 bytes or less in
    one shared pool of managed memory that the host writes whenever it makes one (each layer's position,
    each step), and a launch that read one there waited for it (BENCHMARKS.md, session 22)."""
    return int(np.float32(v).view(np.int32))


def _norm_input(norm, K: int) -> tuple[mx.array, int] | None:
    """A kernel's RMSNorm weights and epsilon (its _bits), a placeholder without a norm; None for a norm the
    kernels do not take."""
    if norm is None:
        return _dummy(mx.float32), 0
    w = norm["weight"]
    if w.size != K or w.dtype not in (mx.bfloat16, mx.float32):
        return None
    return w, _bits(norm.eps)


def router_select(logits: mx.array, bias: mx.array, k: int, norm: bool, scale: float, lead: tuple = ()):
    """router_select_reference's choice in one launch (one simdgroup) on a GPU."""
    kind = backend()
    E = logits.size
    if (kind == "cpu" or E > 32 * 16 or logits.dtype != mx.float32 or bias.dtype != mx.float32
            or not enabled("glm_router_select")):
        return router_select_reference(logits, bias, k, norm, scale, lead)
    return tuple(_kernel(kind, "glm_router_select")(
        inputs=[logits, bias],
        template=[("E", E), ("TOPK", k), ("NORM", int(norm)), ("SCALE", _bits(scale))], grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(*lead, k)] * 2, output_dtypes=[mx.uint32, mx.float32]))


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """mx.dequantize's weights (affine, bf16 scales: bf16 out) in one launch on a GPU, at close to the
    card's bandwidth (a prefill dequantizes every expert of a projection per chunk); mx.dequantize
    elsewhere."""
    kind = backend()
    K = w.shape[-1] * 32 // bits if bits in (4, 8) else 0
    if (kind == "cpu" or not K or scales.dtype != mx.bfloat16 or group_size % 8 or K % group_size
            or not enabled("glm_dequantize")):
        return mx.dequantize(w, scales, biases, group_size, bits)
    rows, threads = w.size // w.shape[-1], 32 * WARPS
    return _kernel(kind, "glm_dequantize")(
        inputs=[w, scales, biases], template=[("K", K), ("GROUP", group_size), ("BITS", bits), ("ROWS", rows),
                                               ("WARPS", WARPS)],
        grid=(-(-rows * K // 8 // threads) * threads, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=[(*w.shape[:-1], K)], output_dtypes=[mx.bfloat16])[0]


# --- prefill: experts on tensor cores (CUDA) ------------------------------------

# A block's rows (a tile: 32 or 64) and outputs in glm_grouped_qmm. On the H100 (scripts/kernel_check.py
# --grouped), Air's experts over 2048 tokens took 4.4-4.6 ms in 64-row tiles against 5.6-5.7 in 32;
# over 512 tokens the two were equal (2.2-2.6 ms).
GROUPED_BM, GROUPED_BN = 64, 128
# 4-bit codes dequantized two at a time in bf16 (dq4), else one at a time in float32: 2.3 against
# 6.0 ms over 512 tokens. 8-bit codes go one at a time, and there the kernel lost to dequantizing
# whole then gather_mm (6.5 against 5.7 ms): grouped_fits takes 4-bit experts only.
GROUPED_FAST = True


def tile_map(idx: mx.array, E: int, bm: int | None = None) -> tuple[mx.array, mx.array]:
    """For rows sorted by expert (idx [M], ascending), (tiles, starts) [E + 1] uint32: expert e's rows
    are starts[e] .. starts[e + 1] and its tiles of bm rows tiles[e] .. tiles[e + 1]. Made on the
    device: no synchronisation. bm: GROUPED_BM unless given."""
    bm = bm or GROUPED_BM
    bounds = mx.arange(E + 1, dtype=mx.uint32)
    starts = (idx.astype(mx.uint32)[None, :] < bounds[:, None]).astype(mx.uint32).sum(axis=1)
    counts = starts[1:] - starts[:-1]
    tiles = mx.concatenate([mx.zeros((1,), mx.uint32), mx.cumsum((counts + bm - 1) // bm)])
    return tiles.astype(mx.uint32), starts.astype(mx.uint32)


def grouped_qmm_reference(x: mx.array, layer, idx: mx.array, src: mx.array | None = None,
                          dst: mx.array | None = None, up=None) -> mx.array:
    """Rows sorted by expert through stacked quantized experts, in plain MLX: row r is x[src[r]] (x[r]
    without src) times expert idx[r]'s weights (dequantized in float32, rounded to x's dtype, as a
    tensor-core tile holds them), summed in float32, rounded to x's dtype; with `up`,
    silu(gate) * up of the two projections (each rounded first, as separate projections hand them
    on); row r's output at dst[r] (r without dst). [M, K] -> [M, N]. Each expert's run of rows is
    one float32 matmul (not gather_mm: on MLX 0.32.4's CUDA backend its float32 form gave wrong
    numbers, and faulted at Air's shapes)."""
    f32 = mx.float32
    xs = (x if src is None else x[src]).astype(f32)
    ids = np.array(idx)
    cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), ids.size]

    def proj(lin):
        w, s, b = _q(lin)
        return mx.concatenate([xs[a:z] @ mx.dequantize(w[int(ids[a])], s[int(ids[a])].astype(f32),
                                                       b[int(ids[a])].astype(f32), lin.group_size,
                                                       lin.bits).astype(x.dtype).astype(f32).T
                               for a, z in zip(cuts, cuts[1:])])

    y = proj(layer)
    if up is not None:
        g, u = (t.astype(x.dtype).astype(f32) for t in (y, proj(up)))
        y = g * mx.sigmoid(g) * u
    y = y.astype(x.dtype)
    return y if dst is None else y[mx.argsort(dst)]


def grouped_fits(x: mx.array, *layers) -> bool:
    """Whether glm_grouped_qmm takes these stacked projections on x: CUDA, bf16, affine 4 bits (8 bits
    runs, checked, but slower than the path it would replace), inputs a multiple of 64 wide, outputs of
    GROUPED_BN."""
    if backend() != "cuda" or x.dtype != mx.bfloat16 or not enabled("glm_grouped_qmm"):
        return False
    for lin in layers:
        w, s, _ = _q(lin)
        K = w.shape[-1] * 32 // lin.bits if lin.bits == 4 else 0
        if (getattr(lin, "mode", "affine") != "affine" or not K or K % 64 or K % lin.group_size
                or lin.group_size % 8 or w.shape[-2] % GROUPED_BN or s.dtype != mx.bfloat16):
            return False
    return True


def grouped_qmm(x: mx.array, layer, idx: mx.array, maps: tuple[mx.array, mx.array], src: mx.array | None = None,
                dst: mx.array | None = None, up=None) -> mx.array:
    """grouped_qmm_reference's numbers, one launch on tensor cores (CUDA; grouped_fits says when).
    maps: tile_map(idx, E)."""
    w, s, b = _q(layer)
    E, N = w.shape[0], w.shape[-2]
    K, M = x.shape[-1], idx.size
    w2, s2, b2 = _q(up) if up is not None else (_dummy(mx.uint32), _dummy(mx.bfloat16), _dummy(mx.bfloat16))
    blocks = -(-M // GROUPED_BM) + min(E, M)  # tiles there can be: rows / BM, plus one part-filled per expert
    return _kernel("cuda", "glm_grouped_qmm")(
        inputs=[x, src if src is not None else _dummy(mx.uint32), dst if dst is not None else _dummy(mx.uint32),
                *maps, w, s, b, w2, s2, b2],
        template=[("K", K), ("N", N), ("E", E), ("GROUP", layer.group_size), ("BITS", layer.bits),
                  ("BM", GROUPED_BM), ("BN", GROUPED_BN), ("FAST", int(GROUPED_FAST)), ("GLU", int(up is not None)),
                  ("GATHER", int(src is not None)), ("SCATTER", int(dst is not None))],
        grid=(N // GROUPED_BN * 128, blocks, 1), threadgroup=(128, 1, 1),
        output_shapes=[(M, N)], output_dtypes=[x.dtype])[0]
