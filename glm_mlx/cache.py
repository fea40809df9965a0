"""The KV cache: one per attention layer, grown in steps, updated in place.

`KVCache` holds keys and values in the compute dtype. `QuantizedKVCache` holds
them affine-quantized over head_dim, as `mx.quantize` gives them (packed
uint32, scales, biases), at 8 or 4 bits: at head_dim 128 and groups of 64
that is 17/32 or 9/32 of bf16's bytes, for long contexts. `attend` is the
attention over either.
"""

from __future__ import annotations

import mlx.core as mx

KV_BITS = (8, 4)


def _room(old: mx.array | None, shape: tuple, dtype: mx.Dtype, prev: int, n: int) -> mx.array:
    """A buffer of n positions shaped [B, H, n, D] (shape: [B, H, T, D]) in dtype, old's first prev
    positions kept: row-contiguous, as a launch that writes into it needs (kernels.qkv_decode_cached)."""
    B, H, _, D = shape
    if old is None:
        return mx.zeros((B, H, n, D), dtype)
    return mx.concatenate([old[..., :prev, :], mx.zeros((B, H, n - prev, D), dtype)], axis=2)


class KVCache:
    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0
        self.written = None  # the last launch that wrote into the buffers: its k (kernels.qkv_decode_cached)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [B, H, T, D]; return everything cached so far."""
        prev, T = self.offset, k.shape[2]
        self.settle()
        keys, values = self.room(k.shape, k.dtype)
        keys[..., prev : prev + T, :] = k
        values[..., prev : prev + T, :] = v
        self.advance(keys, values, T)
        return self.fetch()

    def room(self, shape: tuple, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The key and value buffers, grown to hold T more positions (shape: [B, H, T, D])."""
        prev, T = self.offset, shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            self.settle()
            n = -(-(prev + T) // self.step) * self.step
            self.keys, self.values = _room(self.keys, shape, dtype, prev, n), _room(self.values, shape, dtype, prev, n)
        return self.keys, self.values

    def last_write(self, shape: tuple, dtype: mx.Dtype) -> mx.array:
        """What a launch that writes into the buffers takes to come after the previous one (its k, shaped
        [1, H, 1, D]): that k, or zeros of its shape where the buffers' last writer was an op of MLX's."""
        return self.written if self.written is not None else mx.zeros(shape, dtype)

    def settle(self) -> None:
        """Wait for the launches that wrote into the buffers, before an op of MLX's reads them: MLX orders
        that op after the buffers' makers, not after those launches (kernels.qkv_decode_cached)."""
        if self.written is not None:
            mx.eval(self.written)
            self.written = None

    def advance(self, keys: mx.array, values: mx.array, T: int, written: mx.array | None = None) -> None:
        """Take back the buffers (from room) with T positions written at the offset (by a launch whose
        output `written` is, when it wrote into them itself)."""
        self.keys, self.values, self.written = keys, values, written
        self.offset += T

    def fetch(self) -> tuple[mx.array, mx.array]:
        """Everything cached so far: views of the buffers' first offset positions."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> None:
        """Forget the last n positions (for a rejected draft or an edited turn)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        return None if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held (the whole grown buffer, not just the first offset positions)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


Quantized = tuple[mx.array, mx.array, mx.array]  # mx.quantize's (packed uint32, scales, biases)


class QuantizedKVCache:
    """Keys and values quantized over head_dim at `bits` (8 or 4), one scale and
    bias per `group_size` elements; same interface as KVCache, but what
    update_and_fetch returns is quantized: read it with `attend`."""

    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64):
        if bits not in KV_BITS:
            raise ValueError(f"kv_bits must be 8 or 4, not {bits}")
        self.bits, self.group_size = bits, group_size
        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[Quantized, Quantized]:
        """Quantize and append k, v [B, H, T, D]; return everything cached so far, quantized."""
        assert k.shape[-1] % self.group_size == 0, f"head_dim {k.shape[-1]} is not in groups of {self.group_size}"
        prev, T = self.offset, k.shape[2]
        qk = mx.quantize(k, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(v, group_size=self.group_size, bits=self.bits)
        if self.keys is None or prev + T > self.keys[0].shape[2]:
            n = -(-(prev + T) // self.step) * self.step
            old_k, old_v = self.keys or (None,) * 3, self.values or (None,) * 3
            self.keys = tuple(_room(o, x.shape, x.dtype, prev, n) for o, x in zip(old_k, qk))
            self.values = tuple(_room(o, x.shape, x.dtype, prev, n) for o, x in zip(old_v, qv))
        self.offset += T
        for buf, x in zip(self.keys + self.values, qk + qv):
            buf[..., prev : self.offset, :] = x
        end = self.offset
        return tuple(a[..., :end, :] for a in self.keys), tuple(a[..., :end, :] for a in self.values)

    def trim(self, n: int) -> None:
        """Forget the last n positions (for a rejected draft or an edited turn)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> tuple[Quantized, Quantized] | None:
        return None if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held (the whole grown buffer, not just the first offset positions)."""
        return 0 if self.keys is None else sum(a.nbytes for a in self.keys + self.values)


def make_caches(n: int, head_dim: int, kv_bits: int | None = None) -> list[KVCache] | list[QuantizedKVCache]:
    """n float caches, or n quantized to kv_bits (8 or 4) in groups of 64 (32 where head_dim needs it)."""
    if kv_bits is None:
        return [KVCache() for _ in range(n)]
    group = next((g for g in (64, 32) if head_dim % g == 0), None)
    if group is None:  # mx.quantize's smallest group is 32
        raise ValueError(f"a quantized KV cache needs head_dim a multiple of 32; this model's is {head_dim}")
    return [QuantizedKVCache(kv_bits, group) for _ in range(n)]


def attend(q: mx.array, k, v, cache, scale: float, causal: bool) -> mx.array:
    """Attention of queries q [B, Hq, T, D] over the keys and values the cache
    returned (the last T of them are q's own positions): mx.fast's kernel over
    float ones, `quantized_attention` over a QuantizedKVCache's."""
    if isinstance(cache, QuantizedKVCache):
        return quantized_attention(q, k, v, scale, causal, cache.group_size, cache.bits)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)


def quantized_attention(q: mx.array, k: Quantized, v: Quantized, scale: float, causal: bool,
                        group_size: int, bits: int) -> mx.array:
    """softmax(q k^T * scale) v with k, v quantized [B, Hkv, S, ...]: the two
    products are quantized matmuls, so keys and values are never dequantized
    whole. Equals mx.fast's attention over mx.dequantize(k), mx.dequantize(v)."""
    B, Hq, T, D = q.shape
    Hkv, S = k[0].shape[1], k[0].shape[2]
    # GQA: the query heads that share a kv head are a [groups, T] batch against it (broadcast, not repeated)
    q = (q * scale).reshape(B, Hkv, Hq // Hkv, T, D)
    k, v = (tuple(mx.expand_dims(a, 2) for a in t) for t in (k, v))
    s = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    if causal:  # query t is at position S - T + t: the cache held S - T before this chunk
        s = mx.where(mx.arange(S - T, S)[:, None] >= mx.arange(S), s, mx.finfo(s.dtype).min)
    p = mx.softmax(s, axis=-1, precise=True)  # summed in float32 even for bf16 scores
    o = mx.quantized_matmul(p, *v, transpose=False, group_size=group_size, bits=bits)
    return o.reshape(B, Hq, T, D)
