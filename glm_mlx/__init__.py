"""glm-mlx: GLM-4.5 and GLM-4.5-Air on Apple silicon with MLX."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path, dtype: str | None = None, adapter: str | Path | None = None,
         expert_memory: str | int | None = None, prefetch: bool | None = None):
    """(model, tokenizer) from a glm-mlx model folder written by `glm-mlx convert`.

    `dtype="float32"` computes in float32 (exact checks on the CPU); by default
    the folder's own precision (bf16) is used. A folder without its manifest,
    or with a file of the wrong size or checksum, is refused with the reason.
    `adapter`: a LoRA adapter folder from `glm-mlx finetune`, refused if it
    was trained on another model. `expert_memory` ("24GB", bytes, or "auto"):
    routed experts never occupy more than that; the others are read from the
    folder when a token needs them (the logits are the resident model's).
    "auto" keeps them all resident when the model fits in this machine's
    memory; None (the default here) always does. `prefetch`: with experts
    offloaded, each layer also reads the experts the next layer's router,
    applied to this layer's input, picks (it pays only when those guesses are
    mostly right; the banks' stats count how many were used). None: the
    offloader's default (off).
    """
    from .loading import load_model
    from .tokenizer import Tokenizer

    path = Path(path).expanduser()
    model, manifest = load_model(path, dtype, expert_memory, prefetch=prefetch)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, Path(adapter).expanduser(), manifest)
    return model, Tokenizer(path)


from .reply import Reply, ReplyStream, ToolCall, parse_reply  # noqa: E402  (pure Python, no MLX)

__all__ = ["load", "parse_reply", "ReplyStream", "Reply", "ToolCall", "__version__"]
