"""The GLM-4.5 family's config.json, read in either published style."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("glm4_moe",)


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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])

    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        """Build from config.json; unknown keys are ignored, both rope styles read."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {mt!r} is not a GLM-4.5 model (expected 'glm4_moe')"
            )
        cfg = dict(cfg)
        # Newer transformers nest rope settings under rope_parameters.
        rp = cfg.get("rope_parameters") or {}
        for k in ("rope_theta", "partial_rotary_factor"):
            if k not in cfg and k in rp:
                cfg[k] = rp[k]
        rope_type = rp.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            args = cls(**{k: v for k, v in cfg.items() if k in names})
        except TypeError as e:
            raise ValueError(f"config.json: {e}") from None
        if args.n_routed_experts % args.n_group or args.topk_group > args.n_group:
            raise ValueError("config.json: n_routed_experts must divide into n_group groups")
        if args.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {args.hidden_act!r} is not supported")
        return args

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace
