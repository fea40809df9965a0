"""The KV cache: one per attention layer, grown in steps, updated in place."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [B, H, T, D]; return everything cached so far."""
        prev, T = self.offset, k.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            B, H, _, D = k.shape
            n = ((prev + T + self.step - 1) // self.step) * self.step
            grow = lambda old, new: (  # noqa: E731
                mx.zeros((B, H, n, D), new.dtype)
                if old is None
                else mx.concatenate([old[..., :prev, :], mx.zeros((B, H, n - prev, D), new.dtype)], axis=2)
            )
            self.keys, self.values = grow(self.keys, k), grow(self.values, v)
        self.offset += T
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> None:
        """Forget the last n positions (for a rejected draft or an edited turn)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        return None if self.keys is None else (self.keys, self.values)
