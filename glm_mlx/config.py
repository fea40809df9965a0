"""The GLM-4.5 family's config.json, read in either published style."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("glm4_moe",)
# fields that count something: at least 1, or at least 0
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok", "head_dim",
            "n_group", "topk_group", "max_position_embeddings")
NON_NEGATIVE = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    model_type: str = "glm4_moe"
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads  # else from_dict refuses the config
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])

    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Build from config.json; unknown keys are ignored, both rope styles read. A value of the wrong
        JSON type, or one no model can have (0 heads, a NaN), is a ValueError naming `source` and the field."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: not a JSON object")
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {mt!r} is not a GLM-4.5 model (expected 'glm4_moe')"
            )
        cfg = dict(cfg)
        # Newer transformers nest rope settings under rope_parameters.
        rp = cfg.get("rope_parameters") or {}
        if not isinstance(rp, dict):
            raise ValueError(f"{source}: rope_parameters must be an object, not {rp!r}"[:300])
        for k in ("rope_theta", "partial_rotary_factor"):
            if k not in cfg and k in rp:
                cfg[k] = rp[k]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in cfg.items():
            if k in fields and not _has_type(v, fields[k].type):
                raise ValueError(f"{source}: {k} must be {_TYPE_WORDS[fields[k].type]}, not {v!r}"[:300])
        rope_type = rp.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported")
        if missing := [k for k, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING
                       and k not in cfg]:
            raise ValueError(f"{source}: no {', '.join(missing)}")
        args = cls(**{k: v for k, v in cfg.items() if k in fields})
        if problem := args._problem():
            raise ValueError(f"{source}: {problem}")
        return args

    def _problem(self) -> str | None:
        """What makes these values unusable (a count below 1, a NaN, heads that do not divide), or None."""
        if self.head_dim is None:
            return (f"no head_dim, and hidden_size {self.hidden_size} does not divide into "
                    f"num_attention_heads {self.num_attention_heads} heads")
        for k in POSITIVE + NON_NEGATIVE:
            if getattr(self, k) < (k in POSITIVE):
                return f"{k} must be {'at least 1' if k in POSITIVE else 'at least 0'}, not {getattr(self, k)}"
        for k, n in (("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size),
                     ("intermediate_size", self.intermediate_size), ("moe_intermediate_size", self.moe_intermediate_size),
                     ("n_routed_experts", self.n_routed_experts),
                     ("num_attention_heads x head_dim", self.num_attention_heads * self.head_dim),
                     ("num_key_value_heads x head_dim", self.num_key_value_heads * self.head_dim)):
            if n >= 1 << 31:
                return f"{k} {n} is more than an MLX array's dimension holds (2^31 - 1)"
        for k in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            if not getattr(self, k) > 0:
                return f"{k} must be a positive number, not {getattr(self, k)}"
        if not 0 < self.partial_rotary_factor <= 1:
            return f"partial_rotary_factor must be in (0, 1], not {self.partial_rotary_factor}"
        if self.rope_dims < 2 or self.rope_dims % 2:
            return (f"head_dim {self.head_dim} x partial_rotary_factor {self.partial_rotary_factor} gives "
                    f"{self.rope_dims} rotary dims: it must be even and at least 2")
        if self.num_attention_heads % self.num_key_value_heads:
            return (f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads {self.num_key_value_heads}")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            return "n_routed_experts must divide into n_group groups, topk_group of them at most n_group"
        if self.num_experts_per_tok > self.n_routed_experts // self.n_group * self.topk_group:
            return (f"num_experts_per_tok {self.num_experts_per_tok} is more than the experts a token may choose "
                    f"from ({self.n_routed_experts} in {self.n_group} groups, {self.topk_group} used)")
        if self.hidden_act != "silu":
            return f"hidden_act {self.hidden_act!r} is not supported"
        if any(not 0 <= t < self.vocab_size for t in self.eos_token_id):
            return f"eos_token_id {self.eos_token_id} holds an id outside the vocabulary ({self.vocab_size})"
        return None

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace


def _has_type(v, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation (a bool is not an int; a float is finite)."""
    if v is None:
        return "None" in annotation
    if annotation.startswith("int"):
        return isinstance(v, int) and not isinstance(v, bool)
    if annotation == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if annotation == "bool":
        return isinstance(v, bool)
    if annotation == "str":
        return isinstance(v, str)
    if annotation.startswith("dict"):
        return isinstance(v, dict)
    if annotation == "list[int]":  # eos_token_id: one id or a list of them
        return all(isinstance(t, int) and not isinstance(t, bool) for t in (v if isinstance(v, list) else [v]))
    raise AssertionError(f"no check for {annotation}")


_TYPE_WORDS = {"int": "an integer", "int | None": "an integer", "float": "a finite number", "bool": "true or false",
               "str": "a string", "dict | None": "an object or null", "list[int]": "a token id or a list of them"}
