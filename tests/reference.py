"""The reference every numeric test checks against: transformers' Glm4MoeForCausalLM.

Loaded in float32 with eager attention and the eager (per-expert loop) MoE,
the slowest and plainest paths transformers has, once per checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Glm4MoeForCausalLM

_MODELS: dict[str, Glm4MoeForCausalLM] = {}


def reference_model(ckpt_dir) -> Glm4MoeForCausalLM:
    """The checkpoint in transformers, float32, eval mode; cached per folder."""
    key = str(Path(ckpt_dir).resolve())
    if key not in _MODELS:
        # The MTP layer's keys load as "unexpected" and transformers prints a
        # table of them on every load; they are expected here.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model = Glm4MoeForCausalLM.from_pretrained(
                key, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def reference_logits(ckpt_dir, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of token ids [B, T] (no padding, positions 0..T-1)."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 2, f"tokens must be [B, T], got shape {tokens.shape}"
    model = reference_model(ckpt_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits
    return logits.float().numpy()
