"""How much a quantization costs: bits per weight, and KL to the reference.

One checkpoint is converted several ways (our recipes, and mlx-lm's own
4-bit and mixed_4_6 conversions as the anchor); each conversion is run in
float32 on the same tokens and its next-token distributions are compared
with the reference's (transformers in float32 on the bf16 checkpoint) by
KL(reference || quantized), averaged over positions.

Every model is computed in float32 because MLX's CPU quantized matmul
accumulates in its input dtype: bf16 inputs would add ~6% error of their
own and hide the quantization's.

Bits per weight counts both kinds of folder alike: the stored bits of every
weight tensor (a quantized one: packed weights, scales and biases; a float
one: its dtype's width) over the number of logical parameters, the MTP layer
left out of both (mlx-lm drops it, we keep it).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.safetensors_io import SafetensorsFile

MANIFEST = "glm_mlx.json"
OUR_RECIPES = ("none", "uniform4", "mixed")
ANCHOR = "mlx-lm 4-bit"
# mlx-lm's conversions: name -> mlx_lm.convert's keyword arguments.
MLX_LM = {
    "mlx-lm bf16": {},  # unquantized: shows mlx-lm's model itself agrees with the reference
    ANCHOR: dict(quantize=True, q_bits=4, q_group_size=64),
    "mlx-lm mixed_4_6": dict(quantize=True, q_group_size=64, quant_predicate="mixed_4_6"),
}

# Varied text for the fixture: prose, code, a tool call in GLM's chat markup,
# numbers, other scripts. The tiny tokenizer's merges were learnt on a little
# English, so these come out as a mix of merged words and raw bytes.
TEXTS = (
    "The user asks the assistant what the weather is like in Paris today. The assistant "
    "thinks about which tool to call, calls it with the name of the city, reads the answer "
    "and tells the user that it is twenty degrees and sunny, with a light wind from the west.",
    "def quantize(w, bits=4, group_size=64):\n    g = w.reshape(-1, group_size)\n"
    "    lo, hi = g.min(1), g.max(1)\n    scale = (hi - lo) / (2**bits - 1)\n"
    "    return np.rint((g - lo[:, None]) / scale[:, None]), scale, lo\n",
    "<|user|>\nWhat is 17 * 23?<|assistant|>\n<think>17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391"
    "</think>\n391<|user|>\nAnd the weather in Berlin?<|assistant|>\n<tool_call>get_weather\n"
    "<arg_key>city</arg_key>\n<arg_value>Berlin</arg_value>\n</tool_call><|observation|>\n"
    "<tool_response>\n{\"temp_c\": 14, \"sky\": \"cloudy\"}\n</tool_response><|assistant|>\n",
    "| layer | experts | bits |\n|---|---|---|\n| 0 | dense | 8 |\n| 1-45 | 128 | 4 |\n"
    "Total: 106B parameters, 12B active; 60.1 GB at 4 bits; 43-58 tokens/s.\n",
    "Quand le modèle répond, il écrit d'abord sa réflexion. Die Antwort folgt danach. "
    "模型先思考，然后回答。 Ответ следует после размышления. 🚀 ∑x² ≤ 1.",
    "SELECT name, count(*) FROM experts WHERE layer >= 1 GROUP BY name ORDER BY 2 DESC;\n"
    "for (int i = 0; i < n; ++i) { y[i] += a * x[i]; }  // axpy\n",
)


def fixture_tokens(tokenizer_dir, n_text: int = 6, n_random: int = 2, length: int = 64,
                   seed: int = 0) -> np.ndarray:
    """int32 token ids [n_text + n_random, length]: windows of TEXTS encoded
    with the folder's tokenizer, then uniformly random ids of that tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = tok.encode("\n\n".join(TEXTS), add_special_tokens=False)
    if len(stream) < length:
        raise ValueError(f"the texts encode to {len(stream)} tokens, too few for {n_text} x {length}")
    starts = np.linspace(0, len(stream) - length, n_text).astype(int)
    text = [stream[s: s + length] for s in starts]
    rand = np.random.default_rng(seed).integers(0, len(tok), size=(n_random, length))
    return np.concatenate([np.array(text, dtype=np.int64).reshape(-1, length), rand]).astype(np.int32)


# -- bits per weight -----------------------------------------------------------

def weight_bits(folder) -> tuple[int, int]:
    """(stored bits, logical parameters) of a glm-mlx folder or an mlx-lm one,
    the MTP layer left out of both."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    n_layers = config["num_hidden_layers"]
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        files = sorted(folder.glob("weights/*.safetensors"))

        def bits_of(module: str) -> int:
            m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.(\w+)$", module)
            q = manifest["experts"][m[1]]["quantization"][m[2]] if m else manifest["quantization"][module]
            return q["bits"]
    else:
        q = config.get("quantization", {})
        files = sorted(folder.glob("model*.safetensors"))

        def bits_of(module: str) -> int:
            p = q.get(module)
            return p["bits"] if isinstance(p, dict) else q["bits"]
    if not files:
        raise ValueError(f"{folder}: no safetensors weights (neither weights/*.safetensors nor model*.safetensors)")
    tensors = {}
    for f in files:
        tensors.update(SafetensorsFile(f).tensors)
    stored = params = 0
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m[1]) >= n_layers:
            continue  # the MTP layer
        stored += 8 * t.nbytes
        base, _, leaf = name.rpartition(".")
        packed = tensors.get(f"{base}.weight")
        if leaf in ("scales", "biases") and packed is not None and packed.dtype == "U32":
            continue  # a quantized weight's own overhead: stored, no parameters of its own
        if t.dtype == "U32":
            params += 8 * t.nbytes // bits_of(base)
        else:
            params += int(np.prod(t.shape))
    return stored, params


def weight_files(folder) -> list[Path]:
    """The weight files of a glm-mlx or mlx-lm folder, the MTP layer's own files left out (ours keeps
    that layer in weights/{layer,experts}.NNN with NNN >= num_hidden_layers; mlx-lm drops it)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return sorted(folder.glob("model*.safetensors"))
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return [f for f in sorted(folder.glob("weights/*.safetensors"))
            if not ((m := re.match(r"(layer|experts)\.(\d+)\.safetensors$", f.name)) and int(m[2]) >= n_layers)]


def disk_bits_per_weight(folder) -> float:
    """Bytes of the weight files on disk (headers and, in ours, each file's data aligned to 4 KiB for
    direct reads) over the logical parameters, the MTP layer left out: what the folder costs."""
    _, params = weight_bits(folder)
    return 8 * sum(f.stat().st_size for f in weight_files(folder)) / params


def bits_per_weight(folder) -> float:
    """Stored bits of every weight tensor over the logical parameters, MTP excluded."""
    stored, params = weight_bits(folder)
    return stored / params


def shape_bits_per_weight(config: dict, conversion: str) -> float:
    """bits_per_weight of a conversion from the config's shapes alone, for
    models too big to convert here (the published ones): the model is built
    with lazy MLX arrays, nothing is materialised. `conversion` is one of our
    recipes, decided as the converter decides (a quantized group's 1-D
    tensors and every unquantized one keep the bf16 source dtype, or the
    recipe's), or one of MLX_LM's quantized conversions, decided by mlx-lm's
    own quantize_model. Counted by mlx-lm's compute_bits_per_weight, which
    counts what weight_bits counts (tests/test_quality.py checks both)."""
    import copy

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import compute_bits_per_weight

    bf16 = lambda k, v: v if "e_score_correction_bias" in k else v.astype(mx.bfloat16)  # as the source
    if conversion in MLX_LM:
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.models import glm4_moe
        from mlx_lm.utils import quantize_model

        kw = MLX_LM[conversion]
        if not kw.get("quantize"):
            raise ValueError(f"{conversion!r} is not one of mlx-lm's quantized conversions")
        model = glm4_moe.Model(glm4_moe.ModelArgs.from_dict(config))
        model.update(tree_map_with_path(bf16, model.parameters()))
        pred = kw.get("quant_predicate")
        if isinstance(pred, str):
            pred = mixed_quant_predicate_builder(pred, model, kw["q_group_size"])
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = quantize_model(model, copy.deepcopy(config), kw["q_group_size"], kw.get("q_bits"),
                                      quant_predicate=pred)
        return compute_bits_per_weight(model)

    from glm_mlx.config import ModelArgs
    from glm_mlx.model import Model
    from quantize.recipes import precision

    model = Model(ModelArgs.from_dict({**config, "num_nextn_predict_layers": 0}))

    def quantized(path, module):
        if not hasattr(module, "to_quantized"):  # norms: 1-D, kept as the source
            return False
        p = precision(conversion, path, module.weight.shape[-1])
        return {"bits": p.bits, "group_size": p.group_size} if p.bits else False

    def dtype(path, v):
        if not mx.issubdtype(v.dtype, mx.floating) or "e_score_correction_bias" in path:
            return v
        p = precision(conversion, path.rsplit(".", 1)[0])
        return v.astype(mx.float32 if v.ndim == 2 and p.dtype == "float32" else mx.bfloat16)

    nn.quantize(model, class_predicate=quantized)
    model.update(tree_map_with_path(dtype, model.parameters()))
    return compute_bits_per_weight(model)


# -- distributions -------------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(reference || model) of the next-token distributions, in nats,
    averaged over every position of [..., vocab] logits."""
    assert ref_logits.shape == logits.shape, (ref_logits.shape, logits.shape)
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Share of positions where both put the same token first."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())


# -- running each kind of folder, in float32 -----------------------------------

def glm_logits(folder, tokens: np.ndarray) -> np.ndarray:
    """Logits of a glm-mlx folder, computed in float32."""
    import mlx.core as mx

    import glm_mlx

    model, _ = glm_mlx.load(folder, dtype="float32")
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def mlx_lm_logits(path, tokens: np.ndarray) -> np.ndarray:
    """Logits of an mlx-lm folder with every floating parameter (float weights,
    scales, biases) cast to float32, so its quantized matmuls run in float32."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_map

    model, _ = mlx_lm.load(str(path))
    vocab = model.args.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:  # past the vocabulary MLX's CPU embedding crashes
        raise ValueError(f"token ids must be in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]")
    f32 = lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x
    model.update(tree_map(f32, model.parameters()))
    return np.array(model(mx.array(tokens)).astype(mx.float32))


# -- the table -----------------------------------------------------------------

@dataclass
class Entry:
    name: str
    kind: str  # "glm" (our folder) or "mlx_lm"
    path: Path


@dataclass
class Row:
    name: str
    bits_per_weight: float
    disk_bits_per_weight: float
    params: int
    kl: float
    kl_vs_anchor: float
    top1: float


def build(ckpt_dir, out_dir, recipes=OUR_RECIPES, mlx_lm_conversions=MLX_LM) -> list[Entry]:
    """Convert one checkpoint with each of our recipes and with each of
    mlx-lm's conversions into new folders under out_dir."""
    import mlx_lm

    from convert.convert import convert

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    entries = [Entry(r, "glm", convert(ckpt_dir, out_dir / r, r)) for r in recipes]
    for name, kwargs in mlx_lm_conversions.items():
        path = out_dir / name.replace(" ", "_")
        with contextlib.redirect_stdout(io.StringIO()):  # its [INFO] lines
            mlx_lm.convert(str(ckpt_dir), str(path), **kwargs)
        entries.append(Entry(name, "mlx_lm", path))
    return entries


def run_table(entries: list[Entry], tokens: np.ndarray, ref_logits: np.ndarray) -> list[Row]:
    """One row per entry; kl_vs_anchor is KL over the mlx-lm 4-bit row's KL."""
    rows = []
    for e in entries:
        logits = (glm_logits if e.kind == "glm" else mlx_lm_logits)(e.path, tokens)
        stored, params = weight_bits(e.path)
        rows.append(Row(e.name, stored / params, disk_bits_per_weight(e.path), params, kl(ref_logits, logits),
                        float("nan"), top1_agreement(ref_logits, logits)))
    anchor = next((r.kl for r in rows if r.name == ANCHOR), float("nan"))
    for r in rows:
        r.kl_vs_anchor = r.kl / anchor
    return rows


def markdown(rows: list[Row], default: str = "mixed") -> str:
    lines = ["| recipe | bits/weight | on disk | mean KL (nats) | KL vs mlx-lm 4-bit | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"`{r.name}` (default)" if r.name == default else (f"`{r.name}`" if r.name in OUR_RECIPES else r.name)
        lines.append(f"| {name} | {r.bits_per_weight:.3f} | {r.disk_bits_per_weight:.3f} | {r.kl:.2e} "
                     f"| {r.kl_vs_anchor:.3f} | {r.top1:.1%} |")
    return "\n".join(lines)
