"""The Mac's memory rules: a model's memory wired while it runs, and a warning when it cannot fit.

macOS pages out GPU memory that is not wired, and a large model's weights paged out slow decode by orders
of magnitude. So, as mlx-lm's generate does, chat, generate, finetune and bench raise MLX's wired limit to
Metal's recommended working set while they run (`wired`), and put it back on the way out. Where the model
and its KV cache need more than that, they say so first, with the `--expert-memory` that would fit.
Elsewhere (the CPU, CUDA) there is no working set to mind and nothing changes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

FIT = 0.9  # of the working set, the most the model and its KV cache should take (the rest: activations)


def working_set() -> int | None:
    """Metal's recommended working set in bytes, or None where MLX runs on something else."""
    if not mx.metal.is_available():
        return None
    return int(mx.device_info()["max_recommended_working_set_size"])


def model_bytes(model) -> tuple[int, int]:
    """(every resident array's bytes, the routed experts' share of them)."""
    total = experts = 0
    for name, a in tree_flatten(model.parameters()):
        total += a.nbytes
        experts += a.nbytes if ".experts." in name else 0
    return total, experts


def kv_bytes(args, tokens: int, kv_bits: int | None = None) -> int:
    """A KV cache's bytes for `tokens` tokens (bf16, or kv_bits with a group scale and bias per 64)."""
    per = 2.0 if kv_bits is None else kv_bits / 8 + 4 / 64
    return int(2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * tokens * per)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@contextlib.contextmanager
def wired(model, tokens: int = 0, kv_bits: int | None = None,
          say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
    """Within: on a Mac, MLX's wired limit at Metal's recommended working set (restored after), after a
    warning when the model and a KV cache of `tokens` tokens need more than FIT of it (model None: the
    caller builds its models inside, as bench does; no warning)."""
    limit = working_set()
    if limit is None:
        yield
        return
    total, experts = model_bytes(model) if model is not None else (0, 0)
    need = total + (kv_bytes(model.args, tokens, kv_bits) if model is not None else 0)
    if need > FIT * limit:
        room = FIT * limit - (need - experts)
        fix = (f"; --expert-memory {room / 1e9:.0f}GB keeps the routed experts within it (the rest read from disk)"
               if room >= 1e9 else "; it does not fit even with every routed expert offloaded")
        say(f"warning: the model ({gb(total)}) and its KV cache for {tokens} tokens ({gb(need - total)}) need "
            f"{gb(need)}, more than {FIT:.0%} of this Mac's GPU working set ({gb(limit)}): macOS will page it and "
            f"decode will crawl{fix}")
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
