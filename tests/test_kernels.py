"""The custom kernels' pure-MLX references (what CI runs; the GPU kernels are
checked against these by scripts/kernel_check.py on the GPU machine)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import glm_mlx.model as model_mod
from glm_mlx.experts import SwitchGLU
from glm_mlx.kernels import KERNELS, gather_qmv_reference, moe_decode, moe_decode_reference
from glm_mlx.loading import load_model


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


def test_moe_decode_reference_is_the_switch_glu_and_weighted_sum():
    mx.random.seed(1)
    glu = SwitchGLU(128, 64, 8)
    glu.update({p: {"weight": mx.random.normal(getattr(glu, p).weight.shape) * 0.1} for p in
                ("gate_proj", "up_proj", "down_proj")})
    nn.quantize(glu, 64, 4)
    x, inds, w = mx.random.normal((128,)), mx.array([6, 0, 3], mx.uint32), mx.array([0.5, 0.3, 0.2])
    want = (glu(x[None, None], inds[None, None]) * w[None, None, :, None]).sum(-2).reshape(-1)
    got = moe_decode(x, glu.gate_proj, glu.up_proj, glu.down_proj, inds, w)  # on the CPU: the reference
    assert rel_err(got, want) < 1e-5
    assert rel_err(moe_decode_reference(x, glu.gate_proj, glu.up_proj, glu.down_proj, inds, w), want) < 1e-5


def test_the_model_decodes_the_same_through_the_fused_path(converted, monkeypatch):
    folder = converted("glm45-tiny", "mixed")
    model, _ = load_model(folder, "float32")
    toks = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(1, 12))

    def decode():
        cache = model.make_cache()
        mx.eval(model(toks[:, :4], cache))
        return np.concatenate([np.array(model(toks[:, t : t + 1], cache)) for t in range(4, 12)], axis=1)

    plain = decode()
    calls = []
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")  # take the fused path (its reference, on the CPU)
    monkeypatch.setattr(model_mod, "moe_decode", lambda *a: calls.append(1) or moe_decode(*a))
    fused = decode()
    assert calls and rel_err(fused, plain) < 1e-5


def test_every_kernel_body_uses_only_the_shared_names():
    """One body for Metal and CUDA: no backend-specific identifiers in a body."""
    for name, (_, body) in KERNELS.items():
        for word in ("threadIdx", "blockIdx", "__shfl", "simd_sum", "thread_position", "threadgroup_position",
                     "__nv_bfloat16", "device "):
            assert word not in body, (name, word)


def test_offloaded_experts_take_the_same_fused_path(converted, monkeypatch):
    """On a GPU one token's experts go through the fused kernels whether resident or
    offloaded (here their references, on the CPU): the logits stay equal."""
    folder = converted("glm45-tiny", "mixed")
    monkeypatch.setattr(model_mod, "backend", lambda: "cuda")
    calls = []
    real = model_mod.moe_decode
    monkeypatch.setattr(model_mod, "moe_decode", lambda *a: calls.append(1) or real(*a))
    toks = np.random.default_rng(4).integers(0, 400, size=(1, 10))

    def decode(model):
        cache = model.make_cache()
        mx.eval(model(toks[:, :3], cache))
        return np.concatenate([np.array(model(toks[:, t : t + 1], cache)) for t in range(3, 10)], axis=1)

    resident, _ = load_model(folder, "float32")
    want = decode(resident)
    assert calls
    m = resident.args
    stride = sum(e["stride"] for e in json.loads((folder / "glm_mlx.json").read_text())["experts"].values())
    import glm_mlx.offload as offload

    banked = []
    monkeypatch.setattr(offload, "moe_decode", lambda *a: banked.append(1) or real(*a))
    for slots in (m.num_experts_per_tok + 1, m.n_routed_experts - 1):  # a token's experts fit the bank
        model, _ = load_model(folder, "float32", expert_memory=slots * stride)
        np.testing.assert_array_equal(decode(model), want)
    assert banked  # the bank computed through the fused path
    model, _ = load_model(folder, "float32", expert_memory=2 * stride)  # they do not: summed in groups
    assert rel_err(decode(model), want) < 1e-5
