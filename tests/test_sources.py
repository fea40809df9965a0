"""Other sources: mlx-lm folders (experts stacked as switch_mlp) and FP8 checkpoints."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import glm_mlx
from convert.convert import MANIFEST, convert
from reference import reference_logits


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mlx_lm_folders(checkpoint, tmp_path_factory):
    """mlx-lm's own conversions of the air-tiny checkpoint: bf16 and 4-bit."""
    from mlx_lm import convert as mlx_convert

    root = tmp_path_factory.mktemp("mlxlm")
    src = str(checkpoint("air-tiny"))
    mlx_convert(src, str(root / "bf16"), dtype="bfloat16")
    mlx_convert(src, str(root / "q4"), quantize=True, q_bits=4, q_group_size=64)
    return root


def _mlx_lm_logits(folder, toks) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return np.array(model(mx.array(toks)))


def test_unquantized_mlx_lm_folder_converts_exactly(mlx_lm_folders, checkpoint, tmp_path):
    out = convert(mlx_lm_folders / "bf16", tmp_path / "m", "none")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["kind"] == "mlx" and manifest["mtp_layers"] == 0  # mlx-lm drops the MTP layer
    model, _ = glm_mlx.load(out, dtype="float32")
    toks = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(2, 16))
    ref = reference_logits(checkpoint("air-tiny"), toks)
    assert rel_err(np.array(model(toks)), ref) < 1e-4


@pytest.mark.parametrize("recipe", ["mixed", "uniform4"])
def test_quantized_mlx_lm_folder_keeps_its_quantized_weights(recipe, mlx_lm_folders, tmp_path):
    """Experts stay the source's 4-bit bytes (never re-quantized to more bits),
    so our model computes what mlx-lm's computes."""
    out = convert(mlx_lm_folders / "q4", tmp_path / "m", recipe)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["experts"]["1"]["quantization"] == {"bits": 4, "group_size": 64}
    assert manifest["quantization"]["model.layers.0.self_attn.q_proj"] == {"bits": 4, "group_size": 64}
    model, _ = glm_mlx.load(out, dtype="float32")
    toks = np.random.default_rng(1).integers(0, model.args.vocab_size, size=(2, 16))
    assert rel_err(np.array(model(toks)), _mlx_lm_logits(mlx_lm_folders / "q4", toks)) < 1e-5


def test_fp8_source_is_dequantized_exactly(checkpoint, converted):
    """Each FP8 weight becomes bf16(e4m3 value x its per-row scale); checked
    with torch's own float8 decoding, independent of ours."""
    import torch
    from safetensors.torch import load_file

    src = checkpoint("air-tiny", "published", "fp8")
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    model, _ = glm_mlx.load(converted("air-tiny", "none", "published", "fp8"), dtype="float32")
    layer = model.model.layers[1]
    for name, ours in [("model.layers.1.self_attn.q_proj", layer.self_attn.q_proj.weight),
                       ("model.layers.1.mlp.shared_experts.down_proj", layer.mlp.shared_experts.down_proj.weight),
                       ("model.layers.1.mlp.experts.5.gate_proj", layer.mlp.experts.gate_proj.weight[5])]:
        w = tensors[name + ".weight"]
        assert w.dtype == torch.float8_e4m3fn
        want = (w.float() * tensors[name + ".weight_scale"].float()).bfloat16().float().numpy()
        np.testing.assert_array_equal(np.array(ours), want, err_msg=name)
    # and the whole model stays close to the bf16 checkpoint it was made from
    toks = np.random.default_rng(2).integers(0, model.args.vocab_size, size=(2, 16))
    ref = reference_logits(checkpoint("air-tiny"), toks)
    ours = np.array(model(toks))
    assert rel_err(ours, ref) < 0.2 and (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.8
