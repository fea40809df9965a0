"""Routed experts, stacked [E, out, in] and applied by gathered matmuls.

No per-expert Python loop: one gather_mm / gather_qmm per projection. For
many rows (prefill) the rows are sorted by expert first so each expert's
weights are read once per call. Linear layers become quantized through
`to_quantized`, the hook `mlx.nn.quantize` calls, so one predicate decides
the bits of every layer, experts included.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .kernels import dequantize

SORT_THRESHOLD = 64  # rows x top-k above which sorting by expert pays
# Rows x top-k above which a quantized projection is dequantized whole and applied by
# gather_mm: on MLX 0.32's CUDA backend gather_qmm over 32768 sorted rows took 79 ms
# where dequantizing (1.5 ms) then gather_mm (3.1 ms) took 4.6 (scripts/decode_profile.py).
DEQUANT_ROWS = 1024


class SwitchLinear(nn.Module):
    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, inds: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm takes float32 only; gather the rows' experts instead.
            return x @ w[inds].swapaxes(-1, -2)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedSwitchLinear.from_weight(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, num_experts: int, input_dims: int, output_dims: int, group_size: int = 64,
                 bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        groups = (num_experts, output_dims, input_dims // group_size)
        self.weight = mx.zeros((num_experts, output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales, self.biases = mx.zeros(groups), mx.zeros(groups)
        self.freeze()

    @classmethod
    def from_weight(cls, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        E, out, inp = weight.shape
        q = cls(E, inp, out, group_size, bits, mode)
        q.weight, q.scales, q.biases = mx.quantize(weight, group_size, bits, mode=mode)
        return q

    def __call__(self, x: mx.array, inds: mx.array, sorted_indices: bool = False) -> mx.array:
        if inds.size >= DEQUANT_ROWS and (x.dtype == mx.float32 or mx.default_device() != mx.cpu):
            # prefill: every expert serves many rows, so dequantize once and multiply densely. The
            # dequantized copy waits for x, else MLX may make every layer's at once (it needs no input).
            parts = mx.depends([self.weight, self.scales, self.biases], [x])
            w = (dequantize(*parts, self.group_size, self.bits) if self.mode == "affine"
                 else mx.dequantize(*parts, self.group_size, self.bits, mode=self.mode))
            return mx.gather_mm(x, w.astype(x.dtype).swapaxes(-1, -2), rhs_indices=inds,
                                sorted_indices=sorted_indices)
        return mx.gather_qmm(
            x, self.weight, self.scales, self.biases, rhs_indices=inds, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """SwiGLU experts: y_e = down_e(silu(gate_e(x)) * up_e(x)) for each chosen e."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(num_experts, dim, hidden)
        self.up_proj = SwitchLinear(num_experts, dim, hidden)
        self.down_proj = SwitchLinear(num_experts, hidden, dim)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x [..., D], inds [..., k] -> [..., k, D]."""
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        sort = inds.size >= SORT_THRESHOLD
        idx = inds
        if sort:
            k = inds.shape[-1]
            flat = inds.flatten()
            order = mx.argsort(flat)
            x, idx = x.flatten(0, -3)[order // k], flat[order]  # [N*k, 1, D], [N*k]
        g = self.gate_proj(x, idx, sort)
        # sorted (prefill): up after gate, so at most one projection is dequantized at a time
        h = nn.silu(g) * self.up_proj(mx.depends(x, g) if sort else x, idx, sort)
        y = self.down_proj(h, idx, sort)
        if sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, inds.shape)
        return y.squeeze(-2)
