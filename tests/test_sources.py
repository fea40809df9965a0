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
    mlx_convert(src, str(root / "mixed_4_6"), quantize=True, quant_predicate="mixed_4_6")
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
    assert manifest["experts"]["1"]["quantization"]["down_proj"] == {"bits": 4, "group_size": 64}
    assert manifest["quantization"]["model.layers.0.self_attn.q_proj"] == {"bits": 4, "group_size": 64}
    model, _ = glm_mlx.load(out, dtype="float32")
    toks = np.random.default_rng(1).integers(0, model.args.vocab_size, size=(2, 16))
    assert rel_err(np.array(model(toks)), _mlx_lm_logits(mlx_lm_folders / "q4", toks)) < 1e-5


def test_mixed_bits_mlx_lm_folder_keeps_each_projections_bits(mlx_lm_folders, tmp_path):
    """mixed_4_6 gives some layers 6-bit expert down projections beside 4-bit
    gate/up; `none` keeps each as it is and computes what mlx-lm computes."""
    out = convert(mlx_lm_folders / "mixed_4_6", tmp_path / "m", "none")
    q = {i: e["quantization"] for i, e in json.loads((out / MANIFEST).read_text())["experts"].items()}
    assert {e["down_proj"]["bits"] for e in q.values()} == {4, 6}
    assert {e["gate_proj"]["bits"] for e in q.values()} == {4}
    model, _ = glm_mlx.load(out, dtype="float32")
    toks = np.random.default_rng(3).integers(0, model.args.vocab_size, size=(2, 16))
    assert rel_err(np.array(model(toks)), _mlx_lm_logits(mlx_lm_folders / "mixed_4_6", toks)) < 1e-5


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


def test_block_scaled_fp8_source(checkpoint, tmp_path):
    """The DeepSeek-V3 style of FP8 (quant_method "fp8", weight_block_size,
    `weight_scale_inv` per block), here in one unsharded model.safetensors."""
    import shutil

    import torch

    from convert.checkpoint import Checkpoint
    from convert.safetensors_io import bf16_bits, to_float32, write_safetensors
    from convert.synthetic import encode_fp8_e4m3

    src, dst = checkpoint("air-tiny"), tmp_path / "fp8"
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}
    (dst / "config.json").write_text(json.dumps(cfg))
    ck, tensors = Checkpoint(src), {}
    for name in sorted(ck.names):
        w = ck.read(name)
        if w.ndim == 2 and "_proj" in name:
            out, inp = w.shape
            blocks = np.abs(w).reshape(out // 32, 32, inp // 32, 32).max(axis=(1, 3)) / 448.0
            scale = np.repeat(np.repeat(blocks, 32, 0), 32, 1)
            tensors[name] = ("F8_E4M3", w.shape, encode_fp8_e4m3(w / scale))
            tensors[name[:-6] + "weight_scale_inv"] = ("F32", blocks.shape, blocks.astype(np.float32))
        else:
            tensors[name] = ("BF16", w.shape, bf16_bits(w))
    write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})

    model, _ = glm_mlx.load(convert(dst, tmp_path / "m", "none"), dtype="float32")
    name = "model.layers.1.mlp.experts.3.down_proj"
    w8 = torch.from_numpy(tensors[name + ".weight"][2].copy()).view(torch.float8_e4m3fn).float().numpy()
    s = tensors[name + ".weight_scale_inv"][2]
    want = to_float32(bf16_bits(w8 * np.repeat(np.repeat(s, 32, 0), 32, 1)), "BF16")
    np.testing.assert_array_equal(np.array(model.model.layers[1].mlp.experts.down_proj.weight[3]), want)
