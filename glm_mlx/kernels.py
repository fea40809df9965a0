"""Custom kernels: one body for Metal and CUDA, a pure-MLX reference for each.

`gather_qmv`: y[r] = W[inds[r]] @ x[r or 0] for a handful of rows (decode),
W affine-quantized in MLX's layout (4 or 8 bits, groups along the input).
One simdgroup (Metal) / warp (CUDA), 32 lanes, computes one output: its
lanes stride over the packed words of the row, dequantize them in registers,
and sum with the group's scale and bias; one reduction across the lanes.
MLX 0.32.4's CUDA gather_qmm took 77 µs for 8 experts of the Air's gate
projection, whose 11.5 MB need 4 µs at the card's bandwidth
(scripts/decode_profile.py): reading the weights once is all this does.

The body is shared: each backend supplies the same few names (tid, lane,
warp, bx, by, BF16(p, i), SIMD_SUM(v)) in its prologue and header, so the
body tested on the NVIDIA machine is the one a Mac runs. The dispatch picks
the backend's kernel, or the reference where there is none (the CPU).
"""

from __future__ import annotations

import mlx.core as mx

WARPS = 8  # outputs per threadgroup of 256 threads

# One lane's share of a quantized row's dot product with x[xbase : xbase + K]: the
# lanes stride over the packed words; each word dequantized in registers.
_DOT = """
template <int K, int GROUP, int BITS, typename S, typename X>
FN float dot_row(const DEV uint* w, const DEV S* scales, const DEV S* biases, ulong row,
                 const DEV X* x, ulong xbase, uint lane) {
    const uint vpw = 32 / BITS, wpr = K / vpw, mask = (1u << BITS) - 1u;
    float acc = 0.0f;
    for (uint q = lane; q < wpr; q += 32) {
        uint word = w[row * wpr + q];
        ulong g = row * (K / GROUP) + (q * vpw) / GROUP;
        float dot = 0.0f, xs = 0.0f;
        for (uint j = 0; j < vpw; j++) {
            float xv = ld(x, xbase + q * vpw + j);
            dot += (float)((word >> (BITS * j)) & mask) * xv;
            xs += xv;
        }
        acc += BF16(scales, g) * dot + BF16(biases, g) * xs;
    }
    return acc;
}
"""

# y[r, n] = W[inds[r]][n] . x[r or 0]
_BODY = """
    uint n = bx * WARPS + warp, r = by;
    if (n < N) {
        ulong row = (ulong)inds[r] * N + n;
        float part = dot_row<K, GROUP, BITS>(w, scales, biases, row, x, (ulong)(XROWS == 1 ? 0 : r) * K, lane);
        float acc = SIMD_SUM(part);
        if (lane == 0) y[(ulong)r * N + n] = acc;
    }
"""

# h[r, n] = silu(G[inds[r]][n] . x) * (U[inds[r]][n] . x): a routed expert's first half, one launch
_SWIGLU_BODY = """
    uint n = bx * WARPS + warp, r = by;
    if (n < N) {
        ulong row = (ulong)inds[r] * N + n;
        float g = dot_row<K, GROUP, BITS>(gw, gs, gb, row, x, 0, lane);
        float u = dot_row<K, GROUP, BITS>(uw, us, ub, row, x, 0, lane);
        g = SIMD_SUM(g);
        u = SIMD_SUM(u);
        if (lane == 0) y[(ulong)r * N + n] = g / (1.0f + exp(-g)) * u;
    }
"""

# y[n] = sum_r weights[r] * (D[inds[r]][n] . h[r]): the second half and the weighted sum, one launch
_DOWN_BODY = """
    uint n = bx * WARPS + warp;
    if (n < N) {
        float acc = 0.0f;
        for (uint r = 0; r < ROWS; r++) {
            ulong row = (ulong)inds[r] * N + n;
            acc += weights[r] * dot_row<K, GROUP, BITS>(w, scales, biases, row, h, (ulong)r * K, lane);
        }
        acc = SIMD_SUM(acc);  // the weighted sum is linear: reduce the lanes once
        if (lane == 0) y[n] = acc;
    }
"""

_CUDA_HEADER = """
typedef unsigned int uint;
typedef unsigned long long ulong;
#define FN __device__ __forceinline__
#define DEV
#define BF16(p, i) __uint_as_float(((unsigned int)reinterpret_cast<const unsigned short*>(p)[i]) << 16)
FN float glm_simd_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
#define SIMD_SUM(v) glm_simd_sum(v)
FN float ld(const float* p, ulong i) { return p[i]; }
FN float ld(const __nv_bfloat16* p, ulong i) { return BF16(p, i); }
"""
_CUDA_PROLOGUE = """
    uint tid = threadIdx.x, lane = tid % 32, warp = tid / 32, bx = blockIdx.x, by = blockIdx.y;
"""
_METAL_HEADER = """
#define FN inline
#define DEV device
#define BF16(p, i) as_type<float>(((uint)((const device ushort*)(p))[i]) << 16)
#define SIMD_SUM(v) simd_sum(v)
inline float ld(const device float* p, ulong i) { return p[i]; }
inline float ld(const device bfloat16_t* p, ulong i) { return BF16(p, i); }
"""
_METAL_PROLOGUE = """
    uint lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
    uint bx = threadgroup_position_in_grid.x, by = threadgroup_position_in_grid.y;
"""

_kernels: dict[tuple[str, str], object] = {}


def backend() -> str:
    """'metal', 'cuda' or 'cpu': which kernel gather_qmv runs here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "cpu"


KERNELS = {  # name: (inputs, body)
    "glm_gather_qmv": (["x", "w", "scales", "biases", "inds"], _BODY),
    "glm_gather_swiglu": (["x", "gw", "gs", "gb", "uw", "us", "ub", "inds"], _SWIGLU_BODY),
    "glm_gather_down_sum": (["h", "w", "scales", "biases", "inds", "weights"], _DOWN_BODY),
}


def _kernel(kind: str, name: str):
    """The kernel `name` for backend `kind`, built once. The helper (_DOT) goes in
    the header after the backend's macros; the body is the same for both."""
    if (kind, name) not in _kernels:
        inputs, body = KERNELS[name]
        if kind == "cuda":
            make, prologue, header = mx.fast.cuda_kernel, _CUDA_PROLOGUE, _CUDA_HEADER
        else:
            make, prologue, header = mx.fast.metal_kernel, _METAL_PROLOGUE, _METAL_HEADER
        _kernels[kind, name] = make(name=name, input_names=inputs, output_names=["y"], source=prologue + body,
                                    header=header + _DOT)
    return _kernels[kind, name]


def supported(x: mx.array, w: mx.array, scales: mx.array, group_size: int, bits: int) -> bool:
    """Whether the kernel covers these operands (else use the reference)."""
    return (bits in (4, 8) and x.dtype == mx.bfloat16 and scales.dtype == mx.bfloat16
            and x.shape[-1] % group_size == 0 and group_size % (32 // bits) == 0)


def gather_qmv_reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, inds: mx.array,
                         group_size: int, bits: int) -> mx.array:
    """The same numbers in plain MLX: x [1 or M, K], w [E, N, K*bits/32], inds [M]
    -> [M, N] float32 (weights dequantized, products summed in float32)."""
    f32 = mx.float32
    W = mx.dequantize(w[inds], scales[inds].astype(f32), biases[inds].astype(f32), group_size, bits)
    xs = mx.broadcast_to(x.astype(mx.float32), (inds.size, x.shape[-1]))
    return (W @ xs[..., None]).squeeze(-1)


def gather_qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, inds: mx.array,
               group_size: int, bits: int) -> mx.array:
    """x [1 or M, K] (bf16), w [E, N, K*bits/32] (uint32), scales and biases
    [E, N, K/group] (bf16), inds [M] -> [M, N] float32."""
    kind = backend()
    if kind == "cpu" or not supported(x, w, scales, group_size, bits):
        return gather_qmv_reference(x, w, scales, biases, inds, group_size, bits)
    M, K, N = inds.size, x.shape[-1], w.shape[-2]
    return _launch(kind, "glm_gather_qmv", [x, w, scales, biases, inds.astype(mx.uint32)], K, N, M,
                   group_size, bits, (M, N), XROWS=x.shape[0])


def _launch(kind, name, inputs, K, N, M, group_size, bits, shape, **extra):
    """One output per simdgroup: N outputs (x M rows) over threadgroups of WARPS simdgroups."""
    template = [("K", K), ("N", N), ("GROUP", group_size), ("BITS", bits), ("WARPS", WARPS)]
    return _kernel(kind, name)(
        inputs=inputs, template=template + list(extra.items()),
        grid=((N + WARPS - 1) // WARPS * 32 * WARPS, M, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[shape], output_dtypes=[mx.float32],
    )[0]


def _ref_qmv(x, q, inds):
    """x [1 or M, K] by quantized layer q's experts inds [M] -> [M, N] float32."""
    return gather_qmv_reference(x, q.weight, q.scales, q.biases, inds, q.group_size, q.bits)


def moe_decode_reference(x: mx.array, gate, up, down, inds: mx.array, weights: mx.array) -> mx.array:
    """One token's routed experts, in plain MLX: sum_r weights[r] * down_r(silu(gate_r(x)) * up_r(x)).
    x [K]; gate/up/down quantized switch layers; inds, weights [k] -> [D] float32."""
    x = x.reshape(1, -1)
    g, u = _ref_qmv(x, gate, inds), _ref_qmv(x, up, inds)
    h = g * mx.sigmoid(g) * u  # float32, as the kernel hands it on
    return (weights.astype(mx.float32)[:, None] * _ref_qmv(h, down, inds)).sum(0)


def moe_decode(x: mx.array, gate, up, down, inds: mx.array, weights: mx.array) -> mx.array:
    """The same in two launches on a GPU (the reference elsewhere)."""
    kind = backend()
    ok = all(supported(x, q.weight, q.scales, q.group_size, q.bits) for q in (gate, up))
    ok = ok and down.bits in (4, 8) and down.scales.dtype == mx.bfloat16
    if kind == "cpu" or not ok or (gate.bits, gate.group_size) != (up.bits, up.group_size):
        return moe_decode_reference(x, gate, up, down, inds, weights)
    x = x.reshape(1, -1)
    k, K, H = inds.size, x.shape[-1], gate.weight.shape[-2]
    inds = inds.astype(mx.uint32)
    h = _launch(kind, "glm_gather_swiglu", [x, gate.weight, gate.scales, gate.biases, up.weight, up.scales,
                                            up.biases, inds], K, H, k, gate.group_size, gate.bits, (k, H))
    D = down.weight.shape[-2]
    return _launch(kind, "glm_gather_down_sum", [h, down.weight, down.scales, down.biases, inds,
                                                 weights.astype(mx.float32)], H, D, 1, down.group_size, down.bits,
                   (D,), ROWS=k)
