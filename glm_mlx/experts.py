"""Routed experts, stacked [E, out, in] and applied by gathered matmuls.

No per-expert Python loop: one gather_mm / gather_qmm per projection. For
many rows (prefill) the rows are sorted by expert first so each expert's
weights are read once per call. Linear layers become quantized through
`to_quantized`, the hook `mlx.nn.quantize` calls, so one predicate decides
the bits of every layer, experts included.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kernels import backend, dequantize, grouped_fits, grouped_qmm, tile_map

SORT_THRESHOLD = 64  # rows x top-k above which sorting by expert pays
# Rows x top-k above which a quantized projection is dequantized whole and applied by
# gather_mm: on MLX 0.32's CUDA backend gather_qmm over 32768 sorted rows took 79 ms
# where dequantizing (1.5 ms) then gather_mm (3.1 ms) took 4.6 (scripts/decode_profile.py).
DEQUANT_ROWS = 1024
# With the router's choice on the host (prefilling), as many rows: each expert's rows padded to the
# most any expert has and multiplied as one batched matmul, where the padding multiplies the rows at
# most PAD_WASTE times. On the H100 a padded batch 12x the rows (random-weight routing is that uneven)
# still beat gather_mm's grouped GEMM, which reads the dequantized experts at 0.7 TB/s: Air's 8 layers
# prefilling 512 tokens were busy 47 against 69 ms (scripts/decode_trace.py --prefill 512). Not on
# Metal: unmeasured there, where the padding's FLOPs cost more than the reads they save.
# Over PAD_ROWS rows the padding's FLOPs and memory outgrow the reads saved: Air's 4096-token
# prefill (chunks of 2048: 16384 rows) fell from 2441 to 2047 tok/s with its peak up 5.5 GB.
PAD_WASTE, PAD_ROWS = 16.0, 8192


def dequantize_whole(rows: int, dtype: mx.Dtype) -> bool:
    """Whether a quantized projection over `rows` rows (x top-k) is dequantized whole and multiplied by
    gather_mm rather than by gather_qmm. On CUDA from DEQUANT_ROWS (measured there); on the CPU for float32
    inputs (gather_mm's only dtype there). Never on Metal: unmeasured on a Mac, so it keeps mlx-lm's choice,
    gather_qmm on the rows sorted by expert; dequantizing whole would hold Air's experts of one projection
    in bf16 (1.5 GB) per layer and chunk (scripts/prefill_memory.py measures the difference)."""
    if rows < DEQUANT_ROWS:
        return False
    kind = backend()
    return kind == "cuda" or (kind == "cpu" and dtype == mx.float32)


class Switch:
    """A process-wide flag, true only within `with switch.on():` (restored on the way out, nested or not)."""

    def __init__(self):
        self.value = False

    def __bool__(self) -> bool:
        return self.value

    @contextlib.contextmanager
    def on(self):
        prev, self.value = self.value, True
        try:
            yield
        finally:
            self.value = prev


# Within prefilling(): a prefill, evaluated layer by layer and never differentiated. Routed experts
# over many rows may then take kernels with no gradient (CUDA: grouped_qmm), or read the router's
# choice on the host (one synchronisation a layer: such a prefill has one anyway) to multiply each
# expert's rows as a padded dense batch. Never under mx.compile or a gradient (a training step).
PREFILL = Switch()
prefilling = PREFILL.on


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

    def dense(self, dtype: mx.Dtype, after: mx.array) -> mx.array:
        """The experts' weights [E, out, in] in dtype."""
        return self.weight.astype(dtype)

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
        if dequantize_whole(inds.size, x.dtype):
            # prefill: every expert serves many rows, so dequantize once and multiply densely
            return mx.gather_mm(x, self.dense(x.dtype, x).swapaxes(-1, -2), rhs_indices=inds,
                                sorted_indices=sorted_indices)
        return mx.gather_qmm(
            x, self.weight, self.scales, self.biases, rhs_indices=inds, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )


    def dense(self, dtype: mx.Dtype, after: mx.array) -> mx.array:
        """The experts' weights dequantized whole [E, out, in] in dtype, made once `after` is: else MLX
        may make every layer's at once (the copy needs no input). The order costs no gradient: through
        `after` one would reach the dequantize kernel, which has none (a training step on CUDA)."""
        parts = mx.depends([self.weight, self.scales, self.biases], [mx.stop_gradient(after)])
        w = (dequantize(*parts, self.group_size, self.bits) if self.mode == "affine"
             else mx.dequantize(*parts, self.group_size, self.bits, mode=self.mode))
        return w.astype(dtype)


class SwitchGLU(nn.Module):
    """SwiGLU experts: y_e = down_e(silu(gate_e(x)) * up_e(x)) for each chosen e."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(num_experts, dim, hidden)
        self.up_proj = SwitchLinear(num_experts, dim, hidden)
        self.down_proj = SwitchLinear(num_experts, hidden, dim)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x [..., D], inds [..., k] -> [..., k, D]."""
        sort = inds.size >= SORT_THRESHOLD
        idx = inds
        y = None
        if sort:
            k = inds.shape[-1]
            flat = inds.flatten()
            order = mx.argsort(flat)
            idx = flat[order]  # [N*k]
            y = self._grouped(x.reshape(-1, x.shape[-1]), order, idx, k)
            if y is not None:
                return y.reshape(*inds.shape, y.shape[-1])
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        if sort:
            x = x.flatten(0, -3)[order // k]  # [N*k, 1, D]
            y = self._padded(x, idx)
        if y is None:
            g = self.gate_proj(x, idx, sort)
            # sorted (prefill): up after gate, so at most one projection is dequantized at a time
            h = nn.silu(g) * self.up_proj(mx.depends(x, g) if sort else x, idx, sort)
            y = self.down_proj(h, idx, sort)
        if sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, inds.shape)
        return y.squeeze(-2)

    def _grouped(self, x: mx.array, order: mx.array, idx: mx.array, k: int) -> mx.array | None:
        """Tokens x [T, D] through their experts in two launches on tensor cores (CUDA, prefilling()):
        gate, up and SwiGLU on the rows sorted by expert (order: the sort of the flattened choice, idx:
        the sorted ids), then down, written back in the rows' own order: [T * k, D]. None where it
        does not apply (see grouped_fits; LoRA-wrapped projections)."""
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if (not PREFILL or any(type(p) is not QuantizedSwitchLinear for p in projs) or not grouped_fits(x, *projs)
                or (self.gate_proj.bits, self.gate_proj.group_size) != (self.up_proj.bits, self.up_proj.group_size)):
            return None
        maps = tile_map(idx, self.gate_proj.weight.shape[0])
        order = order.astype(mx.uint32)
        h = grouped_qmm(x, self.gate_proj, idx, maps, src=order // k, up=self.up_proj)
        return grouped_qmm(h, self.down_proj, idx, maps, dst=order)

    def _padded(self, x: mx.array, idx: mx.array) -> mx.array | None:
        """Rows x [M, 1, D] sorted by their experts idx [M] through them as a batched matmul: each
        expert's rows padded with zeros to the most any expert has ([E, cap, D], the padding never
        read back). None where it does not apply: not prefilling(), rows outside DEQUANT_ROWS ..
        PAD_ROWS, Metal, LoRA-wrapped projections, or routing so uneven that the padding would
        multiply the rows more than PAD_WASTE times."""
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if (not PREFILL or not DEQUANT_ROWS <= idx.size <= PAD_ROWS or backend() == "metal"
                or any(type(p) not in (SwitchLinear, QuantizedSwitchLinear) for p in projs)):
            return None
        E, M, D = self.gate_proj.weight.shape[0], idx.size, x.shape[-1]
        ids = np.array(idx).astype(np.int64)  # the host reads the choice: one synchronisation
        counts = np.bincount(ids, minlength=E)
        cap = int(counts.max())
        if E * cap > PAD_WASTE * M:
            return None
        first = np.cumsum(counts) - counts  # each expert's first row in the sorted order
        slot = mx.array((ids * cap + np.arange(M) - first[ids]).astype(np.uint32))
        xp = mx.zeros((E * cap, D), x.dtype)
        xp[slot] = x.reshape(M, D)
        xp = xp.reshape(E, cap, D)
        g = xp @ self.gate_proj.dense(x.dtype, xp).swapaxes(-1, -2)  # one projection dequantized at a time
        h = nn.silu(g) * (xp @ self.up_proj.dense(x.dtype, g).swapaxes(-1, -2))
        y = h @ self.down_proj.dense(x.dtype, h).swapaxes(-1, -2)  # [E, cap, D]
        return y.reshape(E * cap, D)[slot][:, None, :]
