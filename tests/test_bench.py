"""glm-mlx bench: both runtimes get the same bytes, and the bytes-per-step arithmetic is right."""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from glm_mlx.bench import (
    bench_config,
    build_mlx_lm,
    build_ours,
    fill_cache,
    kv_bytes_per_position,
    mean_context,
    random_weights,
    weight_bytes_per_token,
)
from glm_mlx.cli import app
from glm_mlx.config import ModelArgs

SMALL_RUN = ["bench", "--shape", "small", "--json", "--layers", "2", "--prompts", "16", "--contexts", "0,64",
             "--steps", "2", "--rounds", "3"]


def bench_json(*extra):
    r = CliRunner().invoke(app, [*SMALL_RUN, *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_bench_json_has_both_runtimes_and_their_logits_agree():
    r = bench_json()
    assert set(r["runtimes"]) == {"mlx-lm", "ours"}
    assert r["dtype"] == "float32" and r["layers"] == 2 and r["ceiling_gbps"] > 0
    for x in r["runtimes"].values():
        assert x["prefill_tps"]["16"] > 0 and x["peak_bytes"] > 0
        for c in ("0", "64"):
            assert x["decode_tps"][c] > 0 and x["decode_gbps"][c] > 0 and x["ceiling_tps"][c] > 0
            assert len(x["decode_rounds"][c]) == 3 and x["decode_tps"][c] == sorted(x["decode_rounds"][c])[1]
        # 64 context positions cost their KV bytes on top of the weights
        assert x["decode_bytes_per_step"]["64"] - x["decode_bytes_per_step"]["0"] == 64 * x["kv_bytes_per_position"]
    # uniform4 stores every tensor alike in both, router included: the same bytes per step
    assert r["runtimes"]["ours"]["weight_bytes_per_step"] == r["runtimes"]["mlx-lm"]["weight_bytes_per_step"]
    # float32 compute on the same weights: the two models agree to rounding
    assert r["logits"]["rel_diff"] < 1e-5 and r["logits"]["argmax_agreement"] == 1.0
    assert set(r["ratio"]["decode_tps"]) == {"0", "64"}


def test_bench_runs_ours_alone_without_mlx_lm(monkeypatch):
    for name in ("mlx_lm", "mlx_lm.models.glm4_moe", "mlx_lm.generate", "mlx_lm.models.cache"):
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now fails
    r = bench_json("--runtime", "ours", "--contexts", "0")
    assert list(r["runtimes"]) == ["ours"] and "logits" not in r and r["runtimes"]["ours"]["decode_tps"]["0"] > 0
    both = CliRunner().invoke(app, SMALL_RUN)
    assert both.exit_code == 1 and "pass --runtime ours" in both.stderr


def test_both_runtimes_are_given_the_same_bytes():
    cfg = bench_config("small", 2)
    # bf16 as on the GPU; each runtime gets its own regeneration from the seed, as the bench does
    ref = build_mlx_lm(cfg, random_weights(cfg, "mixed", 3, mx.bfloat16), "mixed")
    ours = build_ours(cfg, random_weights(cfg, "mixed", 3, mx.bfloat16), "mixed")
    ref_p = {k.replace(".switch_mlp.", ".experts."): v for k, v in tree_flatten(ref.parameters())}
    ours_p = dict(tree_flatten(ours.parameters()))
    for part in ("weight", "scales", "biases"):  # a routed expert tensor, byte for byte
        k = f"model.layers.1.mlp.experts.down_proj.{part}"
        a, b = ref_p[k], ours_p[k]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array(a.view(mx.uint8)).tobytes() == np.array(b.view(mx.uint8)).tobytes()
    assert ours_p["model.layers.1.mlp.experts.down_proj.weight"].dtype == mx.uint32
    assert ours_p["lm_head.weight"].dtype == mx.uint32
    # the router: the same values, float32 in ours (mixed recipe), the checkpoint's bf16 in mlx-lm's
    k = "model.layers.1.mlp.gate.weight"
    assert ref_p[k].dtype == mx.bfloat16 and ours_p[k].dtype == mx.float32
    assert mx.array_equal(ref_p[k].astype(mx.float32), ours_p[k]).item()
    # every other tensor both hold under one name is equal too
    common = [k for k in ref_p if k in ours_p]
    assert len(common) > 0.9 * len(ref_p)
    for k in common:
        assert mx.array_equal(ref_p[k].astype(mx.float32), ours_p[k].astype(mx.float32)).item(), k


def qbytes(rows: int, cols: int, bits: int, scale_bytes: int) -> int:
    """A quantized [rows, cols] matrix, group 64: packed codes plus a scale and a bias per group."""
    return rows * cols * bits // 8 + 2 * rows * (cols // 64) * scale_bytes


def test_bytes_per_step_is_the_arrays_a_token_reads():
    cfg = bench_config("small", 2)  # layer 0 dense, layer 1 MoE
    a = ModelArgs.from_dict(cfg)
    model = build_ours(cfg, random_weights(cfg, "mixed", 0, mx.float32), "mixed")
    s = 4  # float32 scales, biases, norms
    d, V, hq, hkv = a.hidden_size, a.vocab_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    m, dense, E, k = a.moe_intermediate_size, a.intermediate_size, a.n_routed_experts, a.num_experts_per_tok
    attention = (qbytes(hq, d, 8, s) + 2 * qbytes(hkv, d, 8, s) + qbytes(d, hq, 8, s)  # mixed: 8-bit
                 + (hq + 2 * hkv) * s + 2 * d * s)  # q, k, v biases; the two norms
    layer0 = attention + 2 * qbytes(dense, d, 8, s) + qbytes(d, dense, 8, s)
    expert = 2 * qbytes(m, d, 4, s) + qbytes(d, m, 4, s)  # routed experts 4-bit
    layer1 = (attention + E * d * 4 + E * 4  # the router in float32, its correction bias
              + k * expert + 2 * qbytes(m, d, 8, s) + qbytes(d, m, 8, s))  # k of E experts; the shared one
    top = qbytes(V, d, 8, s) // V + d * s + qbytes(V, d, 8, s)  # one embedding row, the final norm, lm_head
    assert weight_bytes_per_token(model, a) == layer0 + layer1 + top
    cache = fill_cache(model.make_cache(), a, 64, 2, mx.float32, 0)
    assert cache[0].offset == 64 and cache[0].keys.shape[2] == 256  # room for the steps, in the caches' steps
    assert kv_bytes_per_position(cache) == a.num_hidden_layers * 2 * hkv * s


def _script(name: str):
    """A module of scripts/, imported."""
    import importlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_decode_trace_counts_a_steps_ops_for_both_runtimes(capsys, monkeypatch):
    # scripts/decode_trace.py on the small shape, without the device trace (no CUDA here)
    decode_trace = _script("decode_trace")
    monkeypatch.setattr(sys, "argv", ["decode_trace", "--shape", "small", "--layers", "1", "--context", "32",
                                      "--steps", "2", "--no-trace"])
    decode_trace.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]
    assert set(report) == {"ours", "mlx-lm"}
    for r in report.values():
        assert r["ops_per_step"] == sum(r["ops"].values()) > 0
        assert len(r["wall_us_per_step"]) == 3 and min(r["wall_us_per_step"]) > 0 and r["device"] is None


def test_the_cli_batches_400_ops_a_cuda_graph_unless_told_otherwise(monkeypatch):
    """MLX reads MLX_MAX_OPS_PER_BUFFER once: the CLI sets it before anything runs, on CUDA only, and
    never over the user's own value."""
    import mlx.core as mx

    from glm_mlx import cli

    class Cuda:
        available = True

        @staticmethod
        def is_available():
            return Cuda.available

    monkeypatch.setattr(mx, "cuda", Cuda, raising=False)
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER", raising=False)
    cli.use_cuda_graph_default()
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == cli.CUDA_OPS_PER_GRAPH
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "50")
    cli.use_cuda_graph_default()
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "50"
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    Cuda.available = False  # Metal or the CPU: MLX's own default
    cli.use_cuda_graph_default()
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ


def test_mtp_bench_times_both_kinds_of_pass(capsys, monkeypatch):
    # scripts/mtp_bench.py on the small shape: a pass keeping its draft, one rejecting it, plain decode
    mtp_bench = _script("mtp_bench")
    monkeypatch.setattr(sys, "argv", ["mtp_bench", "--shape", "small", "--layers", "1", "--contexts", "0,32",
                                      "--tokens", "6"])
    mtp_bench.main()
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["context"] for r in rows] == [0, 32]
    for r in rows:
        assert r["plain_tps"] > 0 and r["pass_kept_s"] > 0 and r["pass_rejected_s"] > 0
        assert r["spec_tps"]["1.0"] == pytest.approx(2 / r["pass_kept_s"])


def test_footprint_probe_packs_small_arrays_without_changing_the_logits(capsys, monkeypatch):
    # scripts/footprint_probe.py's model A/B on the small shape: pack_small keeps every value
    probe = _script("footprint_probe")
    monkeypatch.setattr(sys, "argv", ["footprint_probe", "--footprints", "", "--model-layers", "1"])
    probe.main()
    out = capsys.readouterr().out
    assert "packed" in out and out.strip().endswith("last logits equal: True")


def test_mean_context_counts_the_warm_up_round_and_every_timed_round():
    for ctx, steps, rounds in ((0, 32, 5), (4096, 8, 1), (7, 3, 4)):
        # step k of the run (warm-up first) reads the context, the k tokens before it and its own
        timed = [ctx + k + 1 for k in range(steps, steps * (rounds + 1))]
        assert mean_context(ctx, steps, rounds) == sum(timed) / len(timed)
