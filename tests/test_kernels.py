"""The custom kernels' pure-MLX references (what CI runs; the GPU kernels are
checked against these by scripts/kernel_check.py on the GPU machine)."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import glm_mlx.model as model_mod
from glm_mlx.experts import SwitchGLU
from glm_mlx.model import MLP
import glm_mlx.experts as experts_mod
from glm_mlx.kernels import (
    KERNELS,
    decode_attention,
    decode_attention_reference,
    gather_qmv_reference,
    grouped_qmm_reference,
    linear_decode_reference,
    moe_decode,
    moe_decode_reference,
    position,
    qkv_decode_reference,
    router_logits_reference,
    router_select_reference,
    tile_map,
)
from glm_mlx.loading import load_model


def decode_logits(model, toks, prompt: int) -> np.ndarray:
    """The logits of toks [1, T] decoded one token at a time after a prefill of the first `prompt`."""
    cache = model.make_cache()
    mx.eval(model(toks[:, :prompt], cache))
    return np.concatenate([np.array(model(toks[:, t : t + 1], cache)) for t in range(prompt, toks.shape[1])],
                          axis=1)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("bits,rows", [(4, 1), (8, 3)])
def test_gather_qmv_reference_is_mlxs_gathered_quantized_matmul(bits, rows):
    mx.random.seed(0)
    w, s, b = mx.quantize(mx.random.normal((6, 96, 128)), 64, bits)
    x = mx.random.normal((rows, 128))
    inds = mx.array([4, 1, 5], mx.uint32)
    want = mx.gather_qmm(mx.broadcast_to(x, (3, 128))[:, None, :], w, s, b, rhs_indices=inds, transpose=True,
                         group_size=64, bits=bits).squeeze(1)
    assert rel_err(gather_qmv_reference(x, w, s, b, inds, 64, bits), want) < 1e-6


def _quantized(module, bits: int):
    """A SwiGLU (stacked experts or a plain MLP) with random weights, quantized."""
    module.update({p: {"weight": mx.random.normal(getattr(module, p).weight.shape) * 0.1} for p in
                   ("gate_proj", "up_proj", "down_proj")})
    nn.quantize(module, 64, bits)
    return module


def test_moe_decode_reference_is_the_switch_glu_shared_expert_and_residual():
    mx.random.seed(1)
    glu, shared = _quantized(SwitchGLU(128, 64, 8), 4), _quantized(MLP(128, 64), 8)
    x, inds, w = mx.random.normal((128,)), mx.array([6, 0, 3], mx.uint32), mx.array([0.5, 0.3, 0.2])
    res = mx.random.normal((128,))
    routed = (glu(x[None, None], inds[None, None]) * w[None, None, :, None]).sum(-2).reshape(-1)
    assert rel_err(moe_decode(x, glu, inds, w), routed) < 1e-5  # on the CPU: the reference
    assert rel_err(moe_decode_reference(x, glu, inds, w, shared, res), routed + shared(x) + res) < 1e-5
    assert rel_err(moe_decode_reference(x, None, None, None, shared, res), shared(x) + res) < 1e-5


def test_the_dense_references_are_the_layers():
    mx.random.seed(2)
    q, k, v, o = (nn.QuantizedLinear(128, n, bias=b, group_size=64, bits=4) for n, b in
                  ((256, True), (64, True), (64, True), (128, False)))
    for lin in (q, k, v):
        lin.bias = mx.random.normal(lin.bias.shape)
    x, res = mx.random.normal((128,)), mx.random.normal((128,))
    shapes = ((1, 2, 1, 128), (1, 1, 1, 64), (1, 1, 1, 64))
    for got, lin, shape in zip(qkv_decode_reference(x, q, k, v, shapes), (q, k, v), shapes):
        assert got.shape == shape and rel_err(got.reshape(-1), lin(x)) < 1e-5
    assert rel_err(linear_decode_reference(x, o, res), o(x) + res) < 1e-5


def _norm(D: int) -> nn.RMSNorm:
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = 1 + 0.3 * mx.random.normal((D,))
    return norm


def test_the_references_apply_the_norm_they_are_given_first():
    """One token's kernels take the layer's RMSNorm and apply it as they read x: their references
    equal the norm's output through the plain references (float32: rounded to x's dtype, a no-op)."""
    mx.random.seed(5)
    x, res, norm = mx.random.normal((128,)) * 3, mx.random.normal((128,)), _norm(128)
    xn = norm(x)
    glu, shared = _quantized(SwitchGLU(128, 64, 8), 4), _quantized(MLP(128, 64), 8)
    inds, w = mx.array([2, 7], mx.uint32), mx.array([0.6, 0.4])
    assert rel_err(moe_decode_reference(x, glu, inds, w, shared, res, norm),
                   moe_decode_reference(xn, glu, inds, w, shared, res)) < 1e-5
    weight = mx.random.normal((16, 128))
    assert rel_err(router_logits_reference(x[None, None], weight, norm), weight @ xn) < 1e-5
    assert router_logits_reference(x, weight).shape == (16,)


@pytest.mark.parametrize("offset", [0, 7, 70000])
def test_the_qkv_reference_normalises_and_ropes_as_the_attention_does(offset):
    """q|k|v with the input norm and RoPE in the same call (the Air's: rotate-half over the first half of
    each head) equals the norm, the projections and mx.fast.rope one after another; the offset may be
    an array (a compiled step's input)."""
    mx.random.seed(6)
    q, k, v = (nn.QuantizedLinear(128, n, bias=True, group_size=64, bits=4) for n in (256, 64, 64))
    for lin in (q, k, v):
        lin.bias = mx.random.normal(lin.bias.shape)
    x, norm = mx.random.normal((1, 1, 128)), _norm(128)
    shapes = ((1, 4, 1, 64), (1, 1, 1, 64), (1, 1, 1, 64))
    xn = norm(x)
    want = [lin(xn).reshape(shape) for lin, shape in zip((q, k, v), shapes)]
    want[:2] = [mx.fast.rope(t, 32, traditional=False, base=1e4, scale=1.0, offset=offset) for t in want[:2]]
    for off in (offset, mx.array(offset, mx.int32)):
        got = qkv_decode_reference(x, q, k, v, shapes, norm, (32, 1e4, off))
        for g, w_ in zip(got, want):
            assert g.shape == w_.shape and rel_err(g, w_) < 1e-5
    assert rel_err(want[2], qkv_decode_reference(x, q, k, v, shapes, norm)[2]) < 1e-5  # v never rotates


@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
def test_router_select_reference_is_the_router(norm, scale):
    from glm_mlx.config import ModelArgs
    from glm_mlx.model import Router

    args = ModelArgs(vocab_size=8, hidden_size=64, intermediate_size=8, moe_intermediate_size=8,
                     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, n_routed_experts=40,
                     num_experts_per_tok=6, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = Router(args)
    mx.random.seed(3)
    router.weight = mx.random.normal(router.weight.shape)
    router.e_score_correction_bias = mx.random.normal((40,)) * 0.1
    x = mx.random.normal((1, 1, 64))
    inds, w = router(x)
    got_i, got_w = router_select_reference((x.reshape(1, -1) @ router.weight.T).reshape(-1),
                                           router.e_score_correction_bias, 6, norm, scale)
    want = dict(zip(np.array(inds).ravel().tolist(), np.array(w).ravel().tolist()))
    assert sorted(want) == sorted(np.array(got_i).tolist())
    np.testing.assert_allclose([want[i] for i in np.array(got_i).tolist()], np.array(got_w), rtol=1e-6)
    choice = np.array(mx.sigmoid(x.reshape(1, -1) @ router.weight.T) + router.e_score_correction_bias).ravel()
    assert list(np.array(got_i)) == list(np.argsort(-choice)[:6])  # best first


@pytest.mark.parametrize("preset", ["air-tiny", "glm45-tiny"])
def test_the_model_decodes_the_same_through_the_fused_path(converted, monkeypatch, preset):
    """One token on a GPU: q|k|v, o_proj with the residual, the router's choice (not under grouped
    routing: glm45-tiny's), and every MLP block, routed or dense, take the kernels (here their
    references, on the CPU); the logits stay those of the plain path."""
    folder = converted(preset, "mixed")
    model, _ = load_model(folder, "float32")
    toks = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(1, 12))

    def decode():
        return decode_logits(model, toks, 4)

    plain = decode()
    calls = []
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")  # take the fused path (its references, on the CPU)
    monkeypatch.setattr(model_mod, "COMPILED_DECODE", False)  # count every call (a compiled trace replays them)
    for name in ("moe_decode", "qkv_decode", "qkv_decode_cached", "linear_decode", "router_logits",
                 "router_select"):
        real = getattr(model_mod, name)
        monkeypatch.setattr(model_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    fused = decode()
    a = model.args
    # every layer, each of 8 tokens: q|k|v writing k and v into the cache too, except where q and k are
    # normalised per head (glm45-tiny), RoPE then outside the launch
    assert calls.count("qkv_decode_cached" if not a.use_qk_norm else "qkv_decode") == 8 * a.num_hidden_layers
    assert calls.count("moe_decode") == 8 * a.num_hidden_layers
    assert calls.count("linear_decode") == 8 * (a.num_hidden_layers + 1)  # o_proj, and lm_head
    moe_layers = a.num_hidden_layers - a.first_k_dense_replace
    assert calls.count("router_select") == (8 * moe_layers if a.n_group == a.topk_group else 0)
    assert calls.count("router_logits") == calls.count("router_select")  # the norm in the logits' launch
    assert rel_err(fused, plain) < 1e-5


def test_routed_experts_stay_fused_beside_a_lora_wrapped_shared_expert(converted, monkeypatch):
    """An adapter on the shared experts (LoRA layers the kernels do not take) leaves the routed
    experts, the norm and the residual in the kernels' launches and adds the shared expert after:
    the logits stay those of the plain path."""
    from glm_mlx.lora import apply_lora, lora_modules

    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    apply_lora(model, targets=("shared_experts",), rank=2, alpha=4.0)
    for _, m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1  # an adapter that changes the output
    toks = np.random.default_rng(3).integers(0, model.args.vocab_size, size=(1, 9))

    plain = decode_logits(model, toks, 3)
    routed = []
    real = model_mod.moe_decode
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    monkeypatch.setattr(model_mod, "COMPILED_DECODE", False)
    monkeypatch.setattr(model_mod, "moe_decode", lambda *a: routed.append(a[1] is not None and a[4] is None)
                        or real(*a))
    assert rel_err(decode_logits(model, toks, 3), plain) < 1e-5
    a = model.args
    assert routed.count(True) == 6 * (a.num_hidden_layers - a.first_k_dense_replace)  # routed, shared not in it


def test_compiled_decode_equals_the_plain_path_and_follows_new_weights(converted, monkeypatch):
    """One token on a GPU runs each layer's MLP half through mx.compile (here over the kernels'
    references, on the CPU): the logits stay those of the uncompiled path, and a trace is redone
    when the weights under it change (it holds the ones it saw)."""
    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    toks = np.random.default_rng(2).integers(0, model.args.vocab_size, size=(1, 9))

    def decode(compiled: bool):
        monkeypatch.setattr(model_mod, "COMPILED_DECODE", compiled)
        return decode_logits(model, toks, 3)

    plain, compiled = decode(False), decode(True)
    layers = model.model.layers
    assert all("_plan" in layer.__dict__ for layer in layers)  # the compiled path was taken
    assert all(layer.self_attn.writes_cache(c) for layer, c in zip(layers, model.make_cache()))  # k, v in the launch
    assert all(layer.__dict__["_cached"][1] == 256 for layer in layers)  # one trace, for the cache's capacity
    assert rel_err(compiled, plain) < 1e-6
    traces = [layer.__dict__["_plan"][2] for layer in layers]
    norm = layers[-1].post_attention_layernorm
    norm.weight = norm.weight * 3  # another array under the last layer's MLP half
    plain2, compiled2 = decode(False), decode(True)
    assert rel_err(plain2, plain) > 1e-3  # the change matters...
    assert rel_err(compiled2, plain2) < 1e-6  # ...and the compiled path follows it
    assert [layer.__dict__["_plan"][2] is t for layer, t in zip(layers, traces)] == \
        [True] * (len(layers) - 1) + [False]  # only that layer traced again


@pytest.mark.parametrize("pos", [0, 5, 255])
def test_decode_attention_reference_reads_the_buffers_up_to_the_devices_position(pos):
    """One token's attention over the KV cache's whole buffers with its length an int array (as the
    kernel reads them, in place) equals mx.fast's over the slices a cache hands out; positions past it,
    whatever they hold, change nothing."""
    mx.random.seed(pos)
    q = mx.random.normal((1, 8, 1, 64))
    keys, values = mx.random.normal((1, 2, 256, 64)), mx.random.normal((1, 2, 256, 64))
    want = mx.fast.scaled_dot_product_attention(q, keys[:, :, : pos + 1], values[:, :, : pos + 1], scale=0.125)
    got = decode_attention(q, keys, values, position(pos), 0.125)  # on the CPU: the reference
    assert rel_err(got, want) < 1e-6
    junk = mx.where(mx.arange(256)[:, None] > pos, 1e4, 1.0)  # the positions past pos, scaled up
    assert rel_err(decode_attention_reference(q, keys * junk, values * junk, position(pos), 0.125), want) < 1e-6


@pytest.mark.parametrize("whole", [True, False])
def test_the_whole_layer_is_one_trace_where_attention_reads_the_cache_in_place(converted, monkeypatch, whole):
    """Where one token's attention reads the KV cache's buffers in place (kernels.decode_attention; its
    reference here, on the CPU), the token is one compiled trace for the caches' capacity: of every layer
    and the final norm (model.WHOLE_STEP), or each layer's; the logits stay those of the plain path, across
    a growth of the buffers (256 positions)."""
    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    toks = np.random.default_rng(4).integers(0, model.args.vocab_size, size=(1, 260))
    plain = decode_logits(model, toks, 250)
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    monkeypatch.setattr(model_mod, "attention_fits", lambda *a: True)
    monkeypatch.setattr(model_mod, "WHOLE_STEP", whole)
    attended = []
    real = model_mod.decode_attention
    monkeypatch.setattr(model_mod, "decode_attention", lambda *a: attended.append(a[1].shape[2]) or real(*a))
    stepped = decode_logits(model, toks, 250)
    layers = model.model.layers
    if whole:  # traced again when the buffers grew
        assert model.model.__dict__["_whole_traced"][1] == 512
        assert all("_stepped" not in layer.__dict__ for layer in layers)
    else:
        assert all(layer.__dict__["_stepped"][1] == 512 for layer in layers)
    # traced once a capacity (each layer's attention, in the whole trace or in its own): the buffers whole
    assert sorted(attended) == [256] * len(layers) + [512] * len(layers)
    assert rel_err(stepped, plain) < 1e-5


def test_the_whole_step_trace_is_made_again_when_a_weight_is_replaced(converted, monkeypatch):
    """The whole-step trace holds the weights it saw: a norm's weight replaced in a layer and the final
    norm's, after it was traced, give the logits of the plain path on the new weights."""
    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    toks = np.random.default_rng(5).integers(0, model.args.vocab_size, size=(1, 12))
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    monkeypatch.setattr(model_mod, "attention_fits", lambda *a: True)
    decode_logits(model, toks, 8)
    traced = model.model.__dict__["_whole"]
    layer = model.model.layers[-1]
    layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight * 2
    model.model.norm.weight = model.model.norm.weight * 0.5
    got = decode_logits(model, toks, 8)
    assert model.model.__dict__["_whole"] is not traced
    monkeypatch.setattr(model_mod, "FUSED_DECODE", False)
    assert rel_err(got, decode_logits(model, toks, 8)) < 1e-5


def test_a_layer_snapshot_sees_every_replaced_or_added_array_or_module(converted):
    """The compiled decode's check that a layer still holds what its trace saw (model._Tree): an array
    replaced anywhere under it, a module replaced, an array or module added (to an empty list too), and a
    list's entry."""
    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    layer = model.model.layers[-1]
    layer.extra, layer.spare = [nn.Linear(2, 2)], []

    def changes():
        yield lambda: setattr(layer.post_attention_layernorm, "weight", layer.post_attention_layernorm.weight + 0)
        yield lambda: setattr(layer.mlp.experts, "gate_proj", layer.mlp.experts.gate_proj)  # the same: no change
        yield lambda: setattr(layer.self_attn, "o_proj", nn.Linear(4, 4))
        yield lambda: setattr(layer.mlp.gate, "added", mx.zeros(3))
        yield lambda: layer.extra.__setitem__(0, nn.Linear(2, 2))
        yield lambda: layer.extra[0].update({"weight": mx.zeros((2, 2))})
        yield lambda: layer.extra.append(mx.zeros(1))
        yield lambda: layer.spare.append(mx.zeros(1))  # into a container that held nothing
    for i, change in enumerate(changes()):
        snap = model_mod._Tree(layer)
        assert snap.holds()
        change()
        assert snap.holds() == (i == 1), i


def test_every_kernel_body_uses_only_the_shared_names():
    """One body for Metal and CUDA: no backend-specific identifiers in a body."""
    for name, (_, _, body) in KERNELS.items():
        for word in ("threadIdx", "blockIdx", "__shfl", "simd_sum", "thread_position", "threadgroup_position",
                     "__nv_bfloat16", "device "):
            assert word not in body, (name, word)


@pytest.mark.parametrize("preset,in_place", [("glm45-tiny", False), ("air-tiny", True)])
def test_offloaded_experts_take_the_same_fused_path(converted, monkeypatch, preset, in_place):
    """On a GPU one token's experts go through the fused kernels whether resident or
    offloaded (here their references, on the CPU): the logits stay equal. An offloaded layer
    decodes through its compiled halves, split at the router's choice (the host reads the
    experts it names between them): the attention in place where it fits (air-tiny)."""
    folder = converted(preset, "mixed")
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    monkeypatch.setattr(model_mod, "attention_fits", lambda *a: in_place)
    calls = []
    real = model_mod.moe_decode
    monkeypatch.setattr(model_mod, "moe_decode", lambda *a: calls.append(1) or real(*a))
    toks = np.random.default_rng(4).integers(0, 400, size=(1, 10))

    def decode(model):
        return decode_logits(model, toks, 3)

    resident, _ = load_model(folder, "float32")
    want = decode(resident)
    assert calls
    m = resident.args
    stride = sum(e["stride"] for e in json.loads((folder / "glm_mlx.json").read_text())["experts"].values())
    import glm_mlx.offload as offload

    banked = []
    slots_for = offload.OffloadedExperts.slots_for
    monkeypatch.setattr(offload.OffloadedExperts, "slots_for",
                        lambda self, *a: (lambda s: banked.append(s is not None) or s)(slots_for(self, *a)))
    for slots in (m.num_experts_per_tok + 1, m.n_routed_experts - 1):  # a token's experts fit the bank
        for compiled in (True, False):
            monkeypatch.setattr(model_mod, "COMPILED_DECODE", compiled)
            model, _ = load_model(folder, "float32", expert_memory=slots * stride)
            np.testing.assert_array_equal(decode(model), want)
            moe = [layer for layer in model.model.layers if "experts" in layer.mlp]
            assert all(("_plan" in layer.__dict__) == compiled for layer in moe)  # the layer's halves traced
            if compiled and in_place:
                assert all("_stepped" in layer.__dict__ for layer in moe)  # attention to the router one trace
    assert any(banked)  # the bank computed through the fused path
    routes = []
    route = offload.OffloadedExperts._route
    monkeypatch.setattr(offload.OffloadedExperts, "_route", lambda self, *a: routes.append(1) or route(self, *a))
    model, _ = load_model(folder, "float32", expert_memory=2 * stride)  # they do not: summed in groups
    assert rel_err(decode(model), want) < 1e-5
    prompt_routes = m.num_hidden_layers - m.first_k_dense_replace  # the 3-token prompt: once a layer
    assert len(routes) == prompt_routes * (1 + toks.shape[1] - 3)  # each token's choice read once, not twice


def test_compiled_decode_turns_off_from_the_environment():
    import subprocess
    import sys

    code = "import glm_mlx.model as m; print(m.COMPILED_DECODE)"
    for value, want in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "GLM_MLX_COMPILED_DECODE": value})
        assert out.stdout.strip() == want


def test_the_tile_map_gives_each_expert_its_rows_and_whole_tiles():
    """Rows sorted by expert, some experts with none: each expert's rows and its tiles of bm rows,
    within the launch's bound (rows / bm plus one part-filled tile per expert)."""
    rng = np.random.default_rng(0)
    E, bm, M = 9, 4, 37
    ids = np.sort(rng.choice([0, 2, 3, 7, 8], size=M, p=[0.5, 0.1, 0.2, 0.15, 0.05]))
    tiles, starts = (np.array(t) for t in tile_map(mx.array(ids.astype(np.uint32)), E, bm))
    counts = np.bincount(ids, minlength=E)
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(np.diff(tiles), -(-counts // bm))
    assert tiles[0] == 0 and tiles[-1] <= -(-M // bm) + min(E, M)


def _routed(rng, T: int, E: int, k: int) -> np.ndarray:
    return np.stack([rng.permutation(E)[:k] for _ in range(T)])


@pytest.mark.parametrize("bits", [4, 8])
def test_the_grouped_reference_is_the_switch_glu(bits):
    """grouped_qmm_reference on rows sorted by expert (gate and up with SwiGLU gathering the tokens'
    rows, then down scattering back) is the SwitchGLU."""
    mx.random.seed(1)
    glu = _quantized(SwitchGLU(128, 64, 6), bits)
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((20, 128), dtype=np.float32))
    inds = mx.array(_routed(rng, 20, 6, 2))
    flat = inds.flatten()
    order = mx.argsort(flat)
    idx = flat[order]
    h = grouped_qmm_reference(x, glu.gate_proj, idx, src=order // 2, up=glu.up_proj)
    y = grouped_qmm_reference(h, glu.down_proj, idx, dst=order)
    assert rel_err(y.reshape(20, 2, 128), glu(x, inds)) < 1e-5


def test_a_prefill_takes_the_grouped_experts_and_keeps_its_logits(converted, monkeypatch):
    """Prefilling on CUDA, routed experts go through grouped_qmm (here its reference, on the CPU) in
    two calls a layer: the logits stay those of the plain path; outside a prefill it is never taken
    (it has no gradient)."""
    model, _ = load_model(converted("air-tiny", "mixed"), "float32")
    toks = mx.array(np.random.default_rng(4).integers(0, model.args.vocab_size, size=(1, 40)))

    def run():
        return np.array(model.logits(model.model(toks, model.make_cache(), eval_layers=True)))  # as prefill runs it

    plain = run()
    calls = []
    monkeypatch.setattr(experts_mod, "grouped_fits", lambda *a: True)
    monkeypatch.setattr(experts_mod, "grouped_qmm", lambda x, layer, idx, maps, src=None, dst=None, up=None:
                        calls.append(maps) or grouped_qmm_reference(x, layer, idx, src, dst, up))
    grouped = run()
    a = model.args
    assert len(calls) == 2 * (a.num_hidden_layers - a.first_k_dense_replace)
    assert rel_err(grouped, plain) < 1e-5
    calls.clear()
    model(toks)  # not a prefill: not taken
    assert not calls
