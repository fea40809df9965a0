"""Recipes: which tensor groups get which precision.

A recipe maps each group of the model (routed experts, attention, ...) to
either a quantization (bits, group size) or a float dtype ("source" keeps the
checkpoint's own). The converter asks `precision(recipe, module)` for every
weight matrix; the chosen precision is written to the model folder's manifest
so loading rebuilds the same layers.

The default, `mixed`, was chosen by measurement (scripts/quality.py, table in
the README): routed experts, most of the weights, at 4 bits; everything a
token always passes through at 8 bits; the router exactly as the source holds
it, since a flipped expert choice costs more than any rounding: its stored
values in their own dtype (bf16 in every published checkpoint; loading
computes with them in float32, as transformers does), float32 only where
they were dequantized from fp8 or packed bits and no narrower dtype holds
them exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    bits: int | None = None  # None: not quantized
    group_size: int = 64
    dtype: str = "source"  # float dtype when not quantized: "source", "bfloat16", "float32"

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size} if self.bits else {"dtype": self.dtype}


SOURCE = Precision()
F32 = Precision(dtype="float32")
Q4 = Precision(bits=4)
Q8 = Precision(bits=8)

GROUPS = ("experts", "shared_experts", "dense_mlp", "attention", "router", "embed", "lm_head",
          "mtp_proj", "other")

RECIPES: dict[str, dict[str, Precision]] = {
    "none": {},
    # every linear at 4 bits, group 64, as mlx-lm's --quantize does (its router is not a Linear)
    "uniform4": {g: Q4 for g in ("experts", "shared_experts", "dense_mlp", "attention", "embed",
                                 "lm_head", "mtp_proj")},
    "mixed": {"experts": Q4, "shared_experts": Q8, "dense_mlp": Q8, "attention": Q8, "embed": Q8,
              "lm_head": Q8, "mtp_proj": Q8, "router": SOURCE},
}
DEFAULT_RECIPE = "mixed"


def group_of(module: str) -> str:
    """The recipe group of a module path in Hugging Face naming."""
    if re.search(r"\.mlp\.experts(\.\d+)?\.", module + "."):
        return "experts"
    if ".mlp.shared_experts." in module + ".":
        return "shared_experts"
    if module.endswith(".mlp.gate"):
        return "router"
    if ".self_attn." in module:
        return "attention"
    if re.search(r"\.mlp\.(gate|up|down)_proj$", module):
        return "dense_mlp"
    if module.endswith("embed_tokens"):
        return "embed"
    if module == "lm_head" or module.endswith("shared_head.head"):
        return "lm_head"
    if module.endswith("eh_proj"):
        return "mtp_proj"
    return "other"


def precision(recipe: str, module: str, in_dims: int | None = None) -> Precision:
    """Precision of `module`'s weight; a quantization that does not divide
    the input width falls back to the source precision."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    p = RECIPES[recipe].get(group_of(module), SOURCE)
    if p.bits and in_dims is not None and in_dims % p.group_size:
        return SOURCE
    return p
