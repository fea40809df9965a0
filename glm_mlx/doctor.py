"""`glm-mlx doctor`: what a bug report needs, in lines a user can paste.

The platform, MLX and its device, the memory (Metal's recommended working set on a Mac) and the wired
limit, which path each custom kernel takes here and why (its self-check's verdict), and a 5-token greedy
decode of a built-in tiny model through this machine's path against the reference path.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import mlx.core as mx

from . import kernels, memory, selfcheck


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def tiny_decode(steps: int = 5, seed: int = 0) -> tuple[list[int], mx.array]:
    """A new tiny model (bench's small shape, 2 layers, 4-bit, bf16; its compiled traces its own): greedy
    tokens and their logits [steps + 1, vocab] (float32) for a 6-token prompt and `steps` decode steps."""
    from .bench import bench_config, build_ours, random_weights
    from .generate import prefill

    cfg = bench_config("small", 2)
    m = build_ours(cfg, random_weights(cfg, "uniform4", seed, mx.bfloat16), "uniform4")
    cache = m.make_cache()
    logits = [prefill(m, mx.arange(1, 7)[None] % cfg["vocab_size"], cache).reshape(1, -1)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[-1], axis=-1).item()))
        logits.append(m(mx.array([[tokens[-1]]]), cache, checked=True).reshape(1, -1))
    return tokens, mx.concatenate(logits).astype(mx.float32)


def _wired_limit() -> str:
    limit = memory.working_set()
    if limit is None:
        return "not used (no Metal: nothing is paged out from under the GPU)"
    current = mx.set_wired_limit(0)
    mx.set_wired_limit(current)
    return f"{memory.gb(current)} now; chat, generate, finetune and bench raise it to {memory.gb(limit)} while they run"


def report() -> list[str]:
    """The doctor's lines."""
    info = mx.device_info()
    kind = kernels.backend()
    lines = [
        f"glm-mlx {_version('glm-mlx')}, mlx {mx.__version__}, mlx-lm {_version('mlx-lm')}, "
        f"Python {platform.python_version()}",
        f"platform: {platform.platform()} ({platform.machine()})",
        f"device: {mx.default_device()}, {info.get('device_name', 'unknown')} (kernels: {kind})",
    ]
    ram = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines.append(f"memory: {memory.gb(ram)}")
    if (ws := memory.working_set()) is not None:
        lines.append(f"Metal's recommended working set: {memory.gb(ws)}")
    lines.append(f"wired limit: {_wired_limit()}")
    unknown = selfcheck.unknown_names((*kernels.KERNELS, *kernels.CUDA_KERNELS))
    lines.append(f"GLM_MLX_KERNELS: {os.environ.get('GLM_MLX_KERNELS') or '(unset)'}"
                 + (f" (names no kernel: {', '.join(unknown)})" if unknown else "")
                 + f"; verdicts cached in {selfcheck.verdicts_file()}")
    lines.append("kernels:")
    for name in (*kernels.KERNELS, *kernels.CUDA_KERNELS):
        v = kernels.verdict(name)
        path = ("kernel (self-check passed" + (", cached verdict)" if v.cached else ")") if v.ok
                else f"reference ({v.reason})")
        lines.append(f"  {name:22s} {path}")
    fast, fast_logits = tiny_decode()
    with kernels.reference_only():
        ref, ref_logits = tiny_decode()
    diff = mx.abs(fast_logits - ref_logits).max().item()
    scale = mx.abs(ref_logits).max().item()
    same = fast == ref and diff <= 0.02 * scale + 1e-3
    lines.append(f"5-token decode of a tiny model: {'ok' if same else 'MISMATCH'}: tokens {fast} "
                 f"{'==' if fast == ref else '!='} reference {ref}, max logit difference {diff:.3g} "
                 f"(largest logit {scale:.3g})")
    if not same:
        lines.append(f"  this machine's path disagrees with the reference: {selfcheck.REPORT}; "
                     "GLM_MLX_KERNELS=off runs the reference path meanwhile")
    return lines
