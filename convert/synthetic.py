"""Tiny GLM-4.5-family checkpoints in the published Hugging Face layout.

Every test, and the README's quick start (`glm-mlx demo`), starts from a
checkpoint written here: the file names, tensor names, dtypes, sharding,
config.json, tokenizer files and chat template of zai-org/GLM-4.5-Air and
zai-org/GLM-4.5, at sizes a 2-core CPU runs in milliseconds. Writing one needs
numpy only (no torch, no transformers), so the quick start works from a bare
install.

Layout, as published:
- bf16 weights (the router's e_score_correction_bias in float32), sharded over
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`;
  tensors are cut into shards by byte count, so one layer may straddle two.
- Routed experts one tensor per expert and projection:
  `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`.
- The MTP layer is `model.layers.{num_hidden_layers}.*`: a full MoE decoder
  layer plus `embed_tokens`, `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`
  and `shared_head.head`. GLM-4.5 and GLM-4.5-Air ship the layer's own
  `embed_tokens` too (llama.cpp's converter lists `blk.46.nextn.embed_tokens`
  for the Air); GLM-4.6 dropped it. transformers' Glm4MoeForCausalLM does not
  build this layer: its keys load as "unexpected".

FP8 (`weight_format="fp8"`), in the style of zai-org/GLM-4.5-Air-FP8: a
compressed-tensors checkpoint ("quant_method": "compressed-tensors",
"format": "float-quantized"), every Linear weight float8 e4m3fn with one
float32 scale per output row (`weight_scale`, shape [out, 1], "strategy":
"channel"), activations dynamic per token. Evidence, the repo itself not
being reachable from here: a loader's test for that release describes
exactly this channel-fp8 form, Habana's vLLM notes that GLM-4.5 FP8 takes the
compressed-tensors path with a per-channel dequant, and an llm-compressor
script copies "the exact ignore list from the original" model, which we
follow: lm_head, embed_tokens (the MTP layer's too), norms, attention biases,
every `mlp.gate` and its correction bias, and the MTP `eh_proj` stay bf16;
the MTP `shared_head.head` is quantized. The scales are absmax/448 of each
row of the bf16 weights, so the FP8 checkpoint is a quantization of the bf16
one written with the same seed.

`config_style="rope_parameters"` writes what newer transformers save:
`rope_parameters` {rope_type, rope_theta, partial_rotary_factor} instead of
top-level rope_theta / partial_rotary_factor / rope_scaling, and `dtype`
instead of `torch_dtype`.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from convert.safetensors_io import DTYPES, bf16_bits, write_safetensors

# ---------------------------------------------------------------- tokenizer

# GLM-4.5's added tokens, in its order (ids 151329.. there, right after our
# byte-level BPE here). Those in NOT_SPECIAL are added tokens with
# "special": false, as in GLM's tokenizer.json: decoding with
# skip_special_tokens keeps the reasoning and tool-call markup.
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "/nothink", "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
]
NOT_SPECIAL = {
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
}

# The pre-tokenizer split of GLM-4's tokenizer.json (cl100k's pattern).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_MERGES = 96
# Text the merges are learnt from, so that common English and chat words come
# out as a few tokens; any text still round-trips through the 256 byte tokens.
_CORPUS = """\
The user asks the assistant what the weather is like in the city today, and the
assistant calls the weather tool with the name of the city. The tool returns the
temperature and the assistant answers the user. This is a tiny model for tests:
it has the same tensors as the real one, with only a few of the parameters, and
the text that it generates is noise. Think about the question, then answer it.
def main():
    print("hello world")
    return 0
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _learn_merges(n: int) -> list[tuple[str, str]]:
    b2u = _bytes_to_unicode()
    pieces = re.findall(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]+|\s+", _CORPUS)
    words = Counter(tuple(b2u[b] for b in p.encode()) for p in pieces)
    merges = []
    for _ in range(n):
        pairs: Counter = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # ties broken by text: deterministic
        merges.append(best)
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = _learn_merges(_NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


_VOCAB, _MERGES = _bpe()
TOKENIZER_SIZE = len(_VOCAB) + len(SPECIAL_TOKENS)
# Like GLM's 151552 embedding rows for 151365 tokens: a few rows no token uses.
VOCAB_SIZE = -(-TOKENIZER_SIZE // 64) * 64


def special_token_ids() -> dict[str, int]:
    """Each GLM special token's id in the synthetic tokenizer."""
    return {t: len(_VOCAB) + i for i, t in enumerate(SPECIAL_TOKENS)}


def _added_token(content: str, i: int) -> dict:
    return {
        "id": i, "content": content, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": content not in NOT_SPECIAL,
    }


def tokenizer_json() -> dict:
    """The tokenizer.json of a byte-level BPE with GLM's added tokens."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(t, i) for t, i in special_token_ids().items()],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": _VOCAB, "merges": [list(m) for m in _MERGES],
        },
    }


def chat_template() -> str:
    """GLM-4.5's chat template, shipped with the package."""
    return importlib.resources.files("convert").joinpath("glm45_chat_template.jinja").read_text("utf-8")


def _tokenizer_files(template: str) -> dict[str, dict]:
    ids = special_token_ids()
    special = [t for t in SPECIAL_TOKENS if t not in NOT_SPECIAL]
    config = {
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token(t, i).items() if k != "id"} for t, i in ids.items()
        },
        "additional_special_tokens": special,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "extra_special_tokens": {},
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    token = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {
        "additional_special_tokens": special,
        "eos_token": token("<|endoftext|>"),
        "pad_token": token("<|endoftext|>"),
    }
    return {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": config,
            "special_tokens_map.json": special_map}


# ---------------------------------------------------------------- configs

def _eos_ids() -> list[int]:
    ids = special_token_ids()
    return [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]


# GLM-4.5-Air's config.json, field for field, at tiny sizes.
_AIR_TINY = {
    "architectures": ["Glm4MoeForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "pad_token_id": special_token_ids()["<|endoftext|>"],
    "eos_token_id": _eos_ids(),
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "partial_rotary_factor": 0.5,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "model_type": "glm4_moe",
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.0,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "use_qk_norm": False,
    "vocab_size": VOCAB_SIZE,
}

PRESETS: dict[str, dict] = {
    "air-tiny": _AIR_TINY,
    # GLM-4.5's differences from the Air: qk-norm, scaling 2.5, three dense
    # layers; grouped routing (4 groups, best 2) so that path runs too.
    "glm45-tiny": {
        **_AIR_TINY,
        "first_k_dense_replace": 3, "num_hidden_layers": 5, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "use_qk_norm": True,
    },
    # Routed experts ~90% of the weights, as in the real models (Air: ~94%),
    # so quantization quality is measured where the bytes are.
    "quality": {
        **_AIR_TINY,
        "hidden_size": 256, "num_hidden_layers": 4, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "intermediate_size": 512, "moe_intermediate_size": 128,
        "n_routed_experts": 64, "num_experts_per_tok": 4,
    },
}


def make_config(preset: str, **overrides) -> dict:
    """A preset's config.json (published style) with fields replaced."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **overrides}


def _styled(config: dict, style: str) -> dict:
    if style == "published":
        return dict(config)
    if style != "rope_parameters":
        raise ValueError(f"config_style {style!r}: expected 'published' or 'rope_parameters'")
    out = {k: v for k, v in config.items()
           if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype")}
    out["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": config["rope_theta"],
        "partial_rotary_factor": config["partial_rotary_factor"],
    }
    out["dtype"] = config.get("torch_dtype", "bfloat16")
    return out


# ---------------------------------------------------------------- weights

def _layer(p: str, c: dict, moe: bool):
    """(name, shape, std) for one decoder layer; std None is an RMSNorm weight."""
    h = c["hidden_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]  # transformers' default when absent
    nq, nkv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    yield f"{p}.input_layernorm.weight", (h,), None
    for proj, n in (("q", nq), ("k", nkv), ("v", nkv)):
        yield f"{p}.self_attn.{proj}_proj.weight", (n, h), h ** -0.5
        if c["attention_bias"]:
            yield f"{p}.self_attn.{proj}_proj.bias", (n,), 0.1
    yield f"{p}.self_attn.o_proj.weight", (h, nq), 0.7 * nq ** -0.5
    if c["use_qk_norm"]:
        yield f"{p}.self_attn.q_norm.weight", (d,), None
        yield f"{p}.self_attn.k_norm.weight", (d,), None
    yield f"{p}.post_attention_layernorm.weight", (h,), None
    if not moe:
        yield from _mlp(f"{p}.mlp", h, c["intermediate_size"])
        return
    e, m = c["n_routed_experts"], c["moe_intermediate_size"]
    # Router logits of std ~2: each token's experts differ. The load is uneven,
    # as with any router whose correction bias was not tuned to balance it.
    yield f"{p}.mlp.gate.weight", (e, h), 2.0 * h ** -0.5
    yield f"{p}.mlp.gate.e_score_correction_bias", (e,), 0.05
    yield from _mlp(f"{p}.mlp.shared_experts", h, m * c["n_shared_experts"])
    for i in range(e):
        yield from _mlp(f"{p}.mlp.experts.{i}", h, m)


def _mlp(p: str, h: int, inter: int):
    yield f"{p}.gate_proj.weight", (inter, h), h ** -0.5
    yield f"{p}.up_proj.weight", (inter, h), h ** -0.5
    yield f"{p}.down_proj.weight", (h, inter), 0.7 * inter ** -0.5


def _tensors(c: dict, with_mtp: bool):
    """Every tensor in file order; the MTP layer last, so leaving it out
    changes no other tensor's values."""
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    yield "model.embed_tokens.weight", (v, h), 1.0
    for i in range(n):
        yield from _layer(f"model.layers.{i}", c, i >= c["first_k_dense_replace"])
    yield "model.norm.weight", (h,), None
    if not c["tie_word_embeddings"]:
        # Logits of std ~3: peaked next-token distributions.
        yield "lm_head.weight", (v, h), 3.0 * h ** -0.5
    if with_mtp:
        for k in range(c.get("num_nextn_predict_layers", 0)):
            p = f"model.layers.{n + k}"
            yield f"{p}.embed_tokens.weight", (v, h), 1.0
            yield f"{p}.enorm.weight", (h,), None
            yield f"{p}.hnorm.weight", (h,), None
            yield f"{p}.eh_proj.weight", (h, 2 * h), (2 * h) ** -0.5
            yield from _layer(p, c, True)
            yield f"{p}.shared_head.norm.weight", (h,), None
            yield f"{p}.shared_head.head.weight", (v, h), 3.0 * h ** -0.5


def layout(config: dict, with_mtp: bool = True):
    """(name, shape) of every tensor the published checkpoint of `config` holds, in file order
    (`config` with every field ModelArgs has); what a converter checks a source against."""
    for name, shape, _ in _tensors(config, with_mtp):
        yield name, shape


def count_params(config: dict, with_mtp: bool = False) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) of a config."""
    total = experts = 0
    for name, shape, _ in _tensors(config, with_mtp):
        size = int(np.prod(shape))
        total += size
        experts += size * (".mlp.experts." in name)
    return total, experts


def _fp8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Which weights the FP8 release stores in e4m3 (see the module docstring)."""
    keep = ("embed_tokens.weight", "lm_head.weight", ".mlp.gate.weight", ".eh_proj.weight")
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(keep)


def encode_fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> float8 e4m3fn bit patterns (uint8): round to nearest even,
    saturate to +-448, NaN -> 0x7f. Subnormals below 2**-6 are kept."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(np.nan_to_num(x, nan=0.0)), np.float32(448.0))
    # e = floor(log2 a), clamped to the smallest normal exponent (-6) so the
    # subnormals share its 2**-9 step.
    _, e2 = np.frexp(a)
    e = np.where(a < 2.0 ** -6, -6, e2.astype(np.int32) - 1)
    q = np.rint(np.ldexp(a, 3 - e)).astype(np.int32)  # mantissa with the hidden bit, 8..16
    # (e + 6) * 8 + q: the exponent field is e + 7 and q carries the hidden bit,
    # so a round-up to q = 16 lands on the next binade by itself.
    bits = ((e + 6) * 8 + q).astype(np.uint8)
    bits = np.where(np.signbit(x), bits | np.uint8(0x80), bits)
    return np.where(np.isnan(x), np.uint8(0x7F), bits).astype(np.uint8)


def _quant_config(ignore: list[str]) -> dict:
    scheme = {"actorder": None, "block_structure": None, "group_size": None,
              "num_bits": 8, "observer_kwargs": {}, "symmetric": True, "type": "float"}
    return {
        "config_groups": {"group_0": {
            "input_activations": {**scheme, "dynamic": True, "observer": None, "strategy": "token"},
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {**scheme, "dynamic": False, "observer": "minmax", "strategy": "channel"},
        }},
        "format": "float-quantized",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def _stored(name: str, shape: tuple[int, ...], weight_format: str):
    """The (name, dtype, shape) entries one weight is stored as."""
    if name.endswith("e_score_correction_bias"):
        return [(name, "F32", shape)]  # float32 in the published files
    if weight_format == "fp8" and _fp8_quantized(name, shape):
        return [(name, "F8_E4M3", shape), (name.removesuffix("weight") + "weight_scale", "F32", (shape[0], 1))]
    return [(name, "BF16", shape)]


def _values(specs, seed: int, weight_format: str):
    """The stored arrays of `specs`, in _stored's order, drawn in one
    sequence from `seed` whatever the format."""
    rng = np.random.default_rng(seed)
    for name, shape, std in specs:
        if std is None:
            w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            w = np.float32(std) * rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("e_score_correction_bias"):
            yield w
            continue
        bits = bf16_bits(w)
        if weight_format == "fp8" and _fp8_quantized(name, shape):
            wb = (bits.astype(np.uint32) << 16).view(np.float32)  # quantize what bf16 stores
            scale = np.maximum(np.abs(wb).max(axis=1, keepdims=True), np.float32(1e-30)) / np.float32(448.0)
            yield encode_fp8_e4m3(wb / scale)
            yield scale.astype(np.float32)
        else:
            yield bits


def _shard_cuts(sizes: list[int], num_shards: int) -> list[int]:
    """Index of each shard's first tensor: cuts at even byte counts."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = sum(sizes)
    cuts = [0]
    for k in range(1, num_shards):
        i = int(np.searchsorted(starts, k * total / num_shards))
        cuts.append(min(max(i, cuts[-1] + 1), len(sizes) - (num_shards - k)))
    return cuts


def write_checkpoint(out_dir, config: dict, *, seed: int = 0, num_shards: int = 2,
                     config_style: str = "published", weight_format: str = "bf16",
                     with_mtp: bool = True) -> Path:
    """Write a checkpoint of `config` with random weights into `out_dir`
    (created; must be empty) and return its path.

    The weights depend only on (config, seed): the bf16 and fp8 checkpoints of
    one seed hold the same weights, and with_mtp=False leaves out the MTP
    layer without changing any other tensor. With with_mtp=False config.json
    still says what `config` says (set num_nextn_predict_layers=0 for a model
    without MTP). config.json is written last.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; write a checkpoint into a new folder")
    if weight_format not in ("bf16", "fp8"):
        raise ValueError(f"weight_format {weight_format!r}: expected 'bf16' or 'fp8'")
    styled = _styled(config, config_style)  # check the options before writing anything
    specs = list(_tensors(config, with_mtp))
    if not 1 <= num_shards <= len(specs):
        raise ValueError(f"num_shards {num_shards}: need 1..{len(specs)} for this model")
    out.mkdir(parents=True, exist_ok=True)

    # Shard cuts come from the shapes alone, so the weights are generated one
    # shard at a time: memory holds one shard, not the model.
    layout = [e for name, shape, _ in specs for e in _stored(name, shape, weight_format)]
    sizes = [np.dtype(DTYPES[dt]).itemsize * int(np.prod(shape)) for _, dt, shape in layout]
    cuts = _shard_cuts(sizes, num_shards) + [len(layout)]
    values = _values(specs, seed, weight_format)
    weight_map = {}
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = layout[cuts[k]: cuts[k + 1]]
        write_safetensors(out / fname, {n: (dt, s, next(values)) for n, dt, s in part}, {"format": "pt"})
        weight_map.update(dict.fromkeys((n for n, *_ in part), fname))
    assert next(values, None) is None
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)

    template = chat_template()
    for fname, content in _tokenizer_files(template).items():
        _write_json(out / fname, content)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        "do_sample": True,
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": config.get("transformers_version", "4.54.0"),
    })
    if weight_format == "fp8":
        kept = [n.removesuffix(".weight") for n, dt, _ in layout if not n.endswith(".weight_scale")
                and dt != "F8_E4M3"]
        styled["quantization_config"] = _quant_config(sorted(kept))
    _write_json(out / "config.json", styled)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
