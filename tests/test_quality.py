"""The issue's quality criterion, measured: on a checkpoint where routed
experts are most of the weights, the default recipe's KL to the reference is
at most a quarter of mlx-lm 4-bit's, at no more bits per weight than mlx-lm's
mixed_4_6; and the unquantized conversions, ours and mlx-lm's, are the
reference. scripts/quality.py prints the full table."""

from __future__ import annotations

import numpy as np
import pytest

from convert.synthetic import count_params, make_config, write_checkpoint
from quantize import quality
from quantize.recipes import DEFAULT_RECIPE
from tests.reference import reference_logits

PRESET = "quality"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The checkpoint, its conversions (converted once for the module), the
    fixture's tokens and the reference's logits on them."""
    work = tmp_path_factory.mktemp("quality")
    ckpt = write_checkpoint(work / "checkpoint", make_config(PRESET))
    entries = quality.build(ckpt, work, recipes=("none", DEFAULT_RECIPE))
    tokens = quality.fixture_tokens(ckpt)
    return {"ckpt": ckpt, "path": {e.name: e.path for e in entries}, "tokens": tokens,
            "ref": reference_logits(ckpt, tokens)}


def test_kl_and_top1_by_hand():
    p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25])
    want = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    # logits are log-probabilities up to a constant per position
    ref = np.log(np.stack([p, q]))[None] + np.array([[[3.0], [-1.0]]])
    got = np.log(np.stack([q, q]))[None]
    assert quality.kl(ref, got) == pytest.approx(want / 2, rel=1e-12)  # second position: KL 0
    assert quality.kl(ref, ref) == 0.0
    assert quality.top1_agreement(ref, got) == 0.5


def test_bits_per_weight_counts_the_same_parameters_on_both_sides(fx):
    c = make_config(PRESET)
    params, _ = count_params(c)  # without MTP, which mlx-lm drops
    for name, path in fx["path"].items():
        assert quality.weight_bits(path)[1] == params, name
    # Unquantized: 16 bits a weight, the router's float32 correction biases 16 more.
    n_bias = (c["num_hidden_layers"] - c["first_k_dense_replace"]) * c["n_routed_experts"]
    for name in ("none", "mlx-lm bf16"):
        assert quality.bits_per_weight(fx["path"][name]) == (16 * params + 16 * n_bias) / params, name


def test_bits_per_weight_from_files_is_mlx_lm_own_count_in_memory(fx, monkeypatch):
    import mlx_lm
    from mlx_lm.utils import compute_bits_per_weight

    from glm_mlx import loading
    from glm_mlx.loading import load_model

    # what the files hold, as loaded: without the load-time preparation (routers cast to float32)
    monkeypatch.setattr(loading, "prepare_model", lambda model: None)

    for name, path in fx["path"].items():
        if name in quality.MLX_LM:
            model, _ = mlx_lm.load(str(path))
        else:
            model, _ = load_model(path)
            model.mtp = []  # counted by neither side
        assert quality.bits_per_weight(path) == pytest.approx(compute_bits_per_weight(model), rel=1e-12), name


def test_bits_per_weight_from_shapes_alone_is_the_files(fx):
    # What scripts/quality.py reports at the published sizes, checked where both exist.
    for name in ("none", DEFAULT_RECIPE, quality.ANCHOR, "mlx-lm mixed_4_6"):
        shapes = quality.shape_bits_per_weight(make_config(PRESET), name)
        assert shapes == pytest.approx(quality.bits_per_weight(fx["path"][name]), rel=1e-12), name


def test_unquantized_conversions_are_the_reference(fx):
    # Two sequences, one of text, one of random ids, are enough for exactness.
    tokens, ref = fx["tokens"][-3:-1], fx["ref"][-3:-1]
    assert quality.kl(ref, quality.glm_logits(fx["path"]["none"], tokens)) < 1e-6
    # The anchor's KL below is its quantization's, not a difference of model code.
    assert quality.kl(ref, quality.mlx_lm_logits(fx["path"]["mlx-lm bf16"], tokens)) < 1e-6


def test_default_recipe_beats_mlx_lm_4bit_at_mixed_4_6_size(fx):
    ours = quality.kl(fx["ref"], quality.glm_logits(fx["path"][DEFAULT_RECIPE], fx["tokens"]))
    anchor = quality.kl(fx["ref"], quality.mlx_lm_logits(fx["path"][quality.ANCHOR], fx["tokens"]))
    assert anchor > 0.05, "the anchor is no worse than rounding: the fixture measures nothing"
    assert ours <= anchor / 4, f"default KL {ours:.4f} vs mlx-lm 4-bit {anchor:.4f}"
    bits = quality.bits_per_weight(fx["path"][DEFAULT_RECIPE])
    limit = quality.bits_per_weight(fx["path"]["mlx-lm mixed_4_6"])
    assert bits <= limit, f"default {bits:.3f} bits/weight, mlx-lm mixed_4_6 {limit:.3f}"


def test_on_disk_bits_add_only_headers_and_alignment_to_tensor_bits(fx):
    """The two counts differ by the weight files' headers and padding (file size minus the tensors'
    bytes, read off each header), the MTP layer's files left out of both."""
    from convert.safetensors_io import SafetensorsFile

    for name, path in fx["path"].items():
        stored, params = quality.weight_bits(path)
        files = quality.weight_files(path)
        assert not any(f.name.endswith(f".{make_config(PRESET)['num_hidden_layers']:03d}.safetensors") for f in files)
        overhead = sum(f.stat().st_size - sum(t.nbytes for t in SafetensorsFile(f).tensors.values()) for f in files)
        assert quality.disk_bits_per_weight(path) == pytest.approx((stored + 8 * overhead) / params, rel=1e-12), name
