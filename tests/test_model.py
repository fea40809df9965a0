"""The model against transformers' Glm4MoeForCausalLM, and against itself."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import glm_mlx
from glm_mlx.experts import SwitchGLU
from reference import reference_logits

PRESETS = ["air-tiny", "glm45-tiny", "quality"]


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tokens(vocab: int, B=2, T=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


@pytest.mark.parametrize("style", ["published", "rope_parameters"])
@pytest.mark.parametrize("preset", PRESETS)
def test_unquantized_logits_match_transformers(preset, style, checkpoint, converted):
    model, _ = glm_mlx.load(converted(preset, "none", style), dtype="float32")
    toks = tokens(model.args.vocab_size)
    ours = np.array(model(toks))
    ref = reference_logits(checkpoint(preset, style), toks)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("preset", ["air-tiny", "glm45-tiny"])
def test_cached_decoding_equals_full_forward(preset, converted):
    model, _ = glm_mlx.load(converted(preset, "mixed"), dtype="float32")
    toks = tokens(model.args.vocab_size, B=1, T=20, seed=1)
    full = np.array(model(toks))
    cache = model.make_cache()
    # a prefill of 7 tokens, then one token at a time
    steps = [np.array(model(toks[:, :7], cache))]
    steps += [np.array(model(toks[:, t : t + 1], cache)) for t in range(7, 20)]
    inc = np.concatenate(steps, axis=1)
    assert rel_err(inc, full) < 1e-5
    assert (inc.argmax(-1) == full.argmax(-1)).all()


def test_chunked_prefill_equals_full_forward(converted):
    from glm_mlx.generate import prefill

    model, _ = glm_mlx.load(converted("air-tiny", "none"), dtype="float32")
    toks = tokens(model.args.vocab_size, B=1, T=23, seed=2)
    last = np.array(prefill(model, mx.array(toks), model.make_cache(), chunk=5))
    assert rel_err(last, np.array(model(toks))[:, -1]) < 1e-5


def _expert_loop(glu: SwitchGLU, x: np.ndarray, inds: np.ndarray) -> np.ndarray:
    """The slow, obvious oracle: every row, every chosen expert, one at a time."""
    g, u, d = (np.array(p.weight) for p in (glu.gate_proj, glu.up_proj, glu.down_proj))
    out = np.zeros((*inds.shape, x.shape[-1]), np.float32)
    for r in np.ndindex(inds.shape):
        e, row = inds[r], x[r[:-1]]
        a, b = g[e] @ row, u[e] @ row
        out[r] = d[e] @ (a / (1 + np.exp(-a)) * b)
    return out


@pytest.mark.parametrize("rows", [3, 80])  # below and above the sort threshold
def test_gathered_experts_equal_a_per_expert_loop(rows):
    rng = np.random.default_rng(0)
    glu = SwitchGLU(16, 32, 6)
    glu.update({k: {"weight": mx.array(rng.standard_normal((6, *p.weight.shape[1:]), dtype=np.float32))}
                for k, p in glu.children().items()})
    x = rng.standard_normal((1, rows, 16), dtype=np.float32)
    inds = np.stack([rng.permutation(6)[:2] for _ in range(rows)])[None]
    ours = np.array(glu(mx.array(x), mx.array(inds)))
    assert rel_err(ours, _expert_loop(glu, x, inds)) < 1e-5


@pytest.mark.parametrize("rows", [3, 80, 300])  # gather_qmm unsorted, sorted; dequantized + gather_mm
def test_quantized_gathered_experts_equal_a_per_expert_loop_on_their_dequantized_weights(rows, monkeypatch):
    import glm_mlx.experts as experts

    monkeypatch.setattr(experts, "DEQUANT_ROWS", 512)  # 300 rows x 2 experts each: dequantized
    rng = np.random.default_rng(1)
    glu = SwitchGLU(64, 64, 6)
    glu.update({k: {"weight": mx.array(rng.standard_normal((6, *p.weight.shape[1:]), dtype=np.float32))}
                for k, p in glu.children().items()})
    nn.quantize(glu, 32, 4)
    plain = SwitchGLU(64, 64, 6)  # the same experts, dequantized: what the quantized ones compute
    plain.update({k: {"weight": mx.dequantize(p.weight, p.scales, p.biases, 32, 4)} for k, p in glu.children().items()})
    x = rng.standard_normal((1, rows, 64), dtype=np.float32)
    inds = np.stack([rng.permutation(6)[:2] for _ in range(rows)])[None]
    ours = np.array(glu(mx.array(x), mx.array(inds)))
    assert rel_err(ours, _expert_loop(plain, x, inds)) < 1e-5


def test_a_gradient_through_whole_dequantized_experts_never_differentiates_the_dequantize(monkeypatch):
    """Training over many rows dequantizes the frozen experts whole; the gradient for the input
    reaches no vjp of that dequantize (on CUDA it is a custom kernel, which has none) and equals the
    gradient through gather_qmm."""
    import glm_mlx.experts as experts

    @mx.custom_function
    def dequantize(w, s, b):
        return mx.dequantize(w, s, b, 32, 4)

    @dequantize.vjp
    def _(primals, cotangent, output):
        raise AssertionError("the experts' dequantize was differentiated")

    monkeypatch.setattr(experts, "dequantize", lambda w, s, b, group, bits: dequantize(w, s, b))
    rng = np.random.default_rng(5)
    glu = SwitchGLU(64, 64, 6)
    glu.update({k: {"weight": mx.array(rng.standard_normal((6, *p.weight.shape[1:]), dtype=np.float32))}
                for k, p in glu.children().items()})
    nn.quantize(glu, 32, 4)
    x = mx.array(rng.standard_normal((1, 100, 64), dtype=np.float32))
    inds = mx.array(np.stack([rng.permutation(6)[:2] for _ in range(100)])[None])

    def grad():
        return mx.grad(lambda x: (glu(x, inds) ** 2).sum())(x)

    monkeypatch.setattr(experts, "DEQUANT_ROWS", 64)  # 200 rows: dequantized whole
    whole = grad()
    monkeypatch.setattr(experts, "DEQUANT_ROWS", 10**6)
    assert rel_err(whole, grad()) < 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_experts_padded_into_a_batch_equal_a_per_expert_loop(quantized, monkeypatch):
    """With the router's choice on the host (a layer-by-layer prefill), each expert's rows go
    through it as one padded batch: the same outputs; routing too uneven for the padding falls
    back to the gathered matmuls, with the same outputs again."""
    import glm_mlx.experts as experts

    monkeypatch.setattr(experts, "DEQUANT_ROWS", 256)
    monkeypatch.setattr(experts, "PAD_WASTE", 2.0)
    rng = np.random.default_rng(2)
    glu = SwitchGLU(64, 32, 6)
    glu.update({k: {"weight": mx.array(rng.standard_normal((6, *p.weight.shape[1:]), dtype=np.float32))}
                for k, p in glu.children().items()})
    plain = glu
    if quantized:
        nn.quantize(glu, 32, 4)
        plain = SwitchGLU(64, 32, 6)
        plain.update({k: {"weight": mx.dequantize(p.weight, p.scales, p.biases, 32, 4)}
                      for k, p in glu.children().items()})
    taken = []
    real = SwitchGLU._padded
    monkeypatch.setattr(SwitchGLU, "_padded", lambda self, *a: (lambda y: taken.append(y is not None) or y)(
        real(self, *a)))
    x = rng.standard_normal((1, 200, 64), dtype=np.float32)
    even = np.stack([rng.permutation(6)[:2] for _ in range(200)])[None]
    skewed = np.stack([[0, 1 + i % 5] for i in range(200)])[None]  # expert 0 in every row: cap 200 of 400 rows
    for inds, padded in ((even, True), (skewed, False)):
        with experts.prefilling():
            ours = np.array(glu(mx.array(x), mx.array(inds)))
        assert taken.pop() is padded
        assert rel_err(ours, _expert_loop(plain, x, inds)) < 1e-5
    glu(mx.array(x), mx.array(even))  # outside prefilling: never padded (no synchronisation)
    assert taken.pop() is False


def test_token_ids_are_validated(converted):
    model, _ = glm_mlx.load(converted("air-tiny", "none"))
    V = model.args.vocab_size
    for bad in ([[1, 2, V]], [[-1, 3]], mx.array([[0, V + 5]])):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(bad)
    with pytest.raises(ValueError, match=r"int array \[B, T\]"):
        model(np.array([1.0, 2.0]))


def test_bf16_compute_is_close_to_float32(converted):
    folder = converted("air-tiny", "mixed")
    f32, _ = glm_mlx.load(folder, dtype="float32")
    bf16, _ = glm_mlx.load(folder)
    toks = tokens(f32.args.vocab_size)
    a, b = np.array(f32(toks)), np.array(bf16(toks).astype(mx.float32))
    assert rel_err(b, a) < 0.1


def test_routers_load_in_float32_and_compute_as_when_cast_per_call(converted, monkeypatch):
    # uniform4 stores the routers in bf16; the model casts them once at load, the numbers unchanged
    from glm_mlx import loading
    from glm_mlx.model import Router

    folder = converted("air-tiny", "uniform4")
    model, _ = glm_mlx.load(folder)
    routers = [m for _, m in model.named_modules() if isinstance(m, Router)]
    assert routers and all(r.weight.dtype == r.e_score_correction_bias.dtype == mx.float32 for r in routers)
    monkeypatch.setattr(loading, "prepare_model", lambda model: None)
    stored, _ = glm_mlx.load(folder)
    assert any(m.weight.dtype == mx.bfloat16 for _, m in stored.named_modules() if isinstance(m, Router))
    toks = tokens(model.args.vocab_size)
    assert mx.array_equal(model(toks), stored(toks)).item()


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_mtp_layer_survives_conversion(fmt, checkpoint, converted):
    from convert.checkpoint import Checkpoint
    from convert.safetensors_io import bf16_bits, to_float32

    model, _ = glm_mlx.load(converted("air-tiny", "none", "published", fmt), dtype="float32")
    src = Checkpoint(checkpoint("air-tiny", "published", fmt))
    N = model.args.num_hidden_layers
    assert len(model.mtp) == 1
    mtp = model.mtp[0]
    for hf, ours in [(f"model.layers.{N}.eh_proj.weight", mtp.eh_proj.weight),
                     (f"model.layers.{N}.shared_head.head.weight", mtp.shared_head.head.weight),
                     (f"model.layers.{N}.self_attn.q_proj.weight", mtp.layer.self_attn.q_proj.weight),
                     (f"model.layers.{N}.mlp.experts.3.up_proj.weight", mtp.layer.mlp.experts.up_proj.weight[3])]:
        # FP8 weights are dequantized on read and stored in bf16 (the source's float type)
        want = to_float32(bf16_bits(src.read(hf)), "BF16")
        np.testing.assert_array_equal(np.array(ours), want, err_msg=hf)
    # and it runs: logits for t+2 from the trunk's hidden state and token t+1
    toks = mx.array(tokens(model.args.vocab_size, B=1, T=6))
    hidden = model.model(toks)
    out = mtp(hidden[:, :-1], toks[:, 1:], model.model.embed_tokens)
    assert out.shape == (1, 5, model.args.vocab_size) and np.isfinite(np.array(out)).all()


VARIANTS = {
    "tied-embeddings": dict(tie_word_embeddings=True),
    "unnormalised-topk": dict(norm_topk_prob=False, routed_scaling_factor=1.7),
    "all-moe-no-bias": dict(first_k_dense_replace=0, attention_bias=False),
    "full-rotary-qknorm": dict(partial_rotary_factor=1.0, use_qk_norm=True),
    "two-shared-no-mtp": dict(n_shared_experts=2, num_nextn_predict_layers=0),
    "groups-8-choose-3": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_match_transformers(variant, tmp_path):
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    cfg = make_config("air-tiny", **VARIANTS[variant])
    src = write_checkpoint(tmp_path / "src", cfg, with_mtp=cfg["num_nextn_predict_layers"] > 0)
    model, _ = glm_mlx.load(convert(src, tmp_path / "m", "none"), dtype="float32")
    toks = tokens(model.args.vocab_size)
    ours, ref = np.array(model(toks)), reference_logits(src, toks)
    assert rel_err(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_a_steps_position_is_one_view_of_a_device_table():
    """kernels.position: n as a scalar int32 array, the same one for every layer of a step, a view of a table
    the device computed (never an array the host writes), grown past its end."""
    from glm_mlx.kernels import _positions, position

    a = position(5)
    assert a is position(5) and a.shape == () and a.dtype == mx.int32 and a.item() == 5
    assert position(6).item() == 6 and position(6) is not a
    big = position(70000)
    assert big.item() == 70000 and _positions[0].size == 1 << 17
