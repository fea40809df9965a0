"""Affine group quantization in MLX's packed format, with refined scales.

The output is exactly what `mx.quantize(w, group_size, bits)` produces in
layout (uint32 words, element j of a word in bits [bits*j, bits*(j+1)); bf16
scales and biases, w ~= scale * q + bias), so MLX's quantized matmuls run it
unchanged. What differs is how scale and bias are chosen: min/max gives the
starting grid, then a few rounds of least squares (given the integer codes,
the best scale and bias per group have a closed form; given those, re-round)
lower the squared error of every group. The scales are rounded to bf16
inside the loop, so the error minimised is the error stored.
"""

from __future__ import annotations

import numpy as np

from convert.safetensors_io import bf16_bits


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 64, iters: int = 4, chunk: int = 1 << 22):
    """float32 [..., in] -> (packed uint32 [..., in*bits/32], scales bf16 bits, biases bf16 bits).

    Scales and biases come back as uint16 bf16 bit patterns, [..., in/group_size].
    Works through `chunk` weights at a time, so its temporaries stay small
    beside a 150k x 5k embedding.
    """
    assert w.shape[-1] % group_size == 0 and 32 % bits == 0, (w.shape, group_size, bits)
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, chunk // w.shape[-1])
    parts = [_quantize_rows(rows[i : i + step], bits, group_size, iters) for i in range(0, len(rows), step)]
    return tuple(np.concatenate(p).reshape(*w.shape[:-1], -1) for p in zip(*parts))


def _quantize_rows(w: np.ndarray, bits: int, group_size: int, iters: int):
    shape = w.shape
    g = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, group_size)
    qmax = float(2**bits - 1)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    scale = _bf16_round(np.maximum(hi - lo, 1e-8) / qmax)
    bias = _bf16_round(lo)
    q = np.clip(np.rint((g - bias) / scale), 0, qmax)
    err = ((scale * q + bias - g) ** 2).sum(axis=1, keepdims=True)
    n = float(group_size)
    for _ in range(iters):
        # Least squares for (scale, bias) given q, per group.
        sq, sq2 = q.sum(1, keepdims=True), (q * q).sum(1, keepdims=True)
        sw, sqw = g.sum(1, keepdims=True), (q * g).sum(1, keepdims=True)
        det = n * sq2 - sq * sq
        ok = det > 1e-12
        s_new = np.where(ok, (n * sqw - sq * sw) / np.where(ok, det, 1), scale)
        b_new = np.where(ok, (sw - s_new * sq) / n, bias)
        s_new = _bf16_round(np.where(np.abs(s_new) < 1e-8, scale, s_new))
        b_new = _bf16_round(b_new)
        q_new = np.clip(np.rint((g - b_new) / s_new), 0, qmax)
        e_new = ((s_new * q_new + b_new - g) ** 2).sum(axis=1, keepdims=True)
        better = e_new < err  # keep each group's best grid so far
        scale, bias = np.where(better, s_new, scale), np.where(better, b_new, bias)
        q, err = np.where(better, q_new, q), np.minimum(e_new, err)
    packed = pack(q.astype(np.uint32).reshape(*shape[:-1], shape[-1]), bits)
    gshape = (*shape[:-1], shape[-1] // group_size)
    return packed, bf16_bits(scale).reshape(gshape), bf16_bits(bias).reshape(gshape)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int):
    """The float32 weights a packed tensor stands for (scales/biases as float32)."""
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    q = (packed[..., None] >> shifts) & np.uint32(2**bits - 1)
    q = q.reshape(*packed.shape[:-1], -1).astype(np.float32)
    g = q.reshape(*q.shape[:-1], -1, group_size)
    return (g * scales[..., None] + biases[..., None]).reshape(q.shape)
