"""The kernels' self-check on first use, on the CPU: the dispatch is told it is on Metal, and
mx.fast.metal_kernel builds fakes (one fails to build, one is right, the rest give wrong numbers). The
model still answers, with the reference path's logits, one stderr line a failed kernel, and the verdicts
are read from the cache at the next start."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from glm_mlx import experts, kernels, model, selfcheck
from glm_mlx.bench import bench_config, build_ours, random_weights
from glm_mlx.generate import prefill


@pytest.fixture
def fake_metal(monkeypatch, tmp_path):
    """The dispatch on a fake Metal whose kernels are built by the recorder below; returns the names built."""
    built = []

    def metal_kernel(name, input_names, output_names, source, header="", **_):
        built.append(name)
        if name == "glm_qkv":
            raise RuntimeError("Unable to build metal library from source\nprogram_source:1:2: error: ...")

        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **__):
            if name == "glm_router_select":  # right: the reference's numbers
                t = dict(template)
                scale = float(np.int32(t["SCALE"]).view(np.float32))
                inds, w = kernels.router_select_reference(inputs[0], inputs[1], t["TOPK"], bool(t["NORM"]), scale)
                return [inds.reshape(output_shapes[0]), w.reshape(output_shapes[1])]
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]  # wrong numbers
        return launch

    metal = lambda: "metal"  # noqa: E731
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    for mod in (kernels, model, experts):
        monkeypatch.setattr(mod, "backend", metal)
    monkeypatch.setattr(kernels, "_kernels", {})
    monkeypatch.setattr(kernels, "_verdicts", {})
    monkeypatch.setenv("GLM_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GLM_MLX_KERNELS", raising=False)
    return built


def _answer() -> mx.array:
    """A new tiny model's logits (its compiled decode traces are its own) for a 6-token prompt's last
    position, then for three decode steps on the greedy tokens."""
    cfg = bench_config("small", 2)
    m = build_ours(cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
    cache = m.make_cache()
    out = [prefill(m, mx.arange(1, 7)[None] % cfg["vocab_size"], cache).reshape(1, -1)]
    for _ in range(3):
        out.append(m(mx.argmax(out[-1], axis=-1)[None], cache, checked=True).reshape(1, -1))
    return mx.concatenate(out).astype(mx.float32)


def test_failed_kernels_fall_back_with_one_line_each_and_the_verdicts_are_cached(fake_metal, monkeypatch, capsys):
    monkeypatch.setenv("GLM_MLX_KERNELS", "off")
    reference = _answer()
    assert not fake_metal and "GLM_MLX_KERNELS" in kernels.verdict("glm_qkv").reason
    capsys.readouterr()

    monkeypatch.delenv("GLM_MLX_KERNELS")
    kernels._verdicts.clear()
    got = _answer()
    assert mx.array_equal(got, reference).item()
    lines = capsys.readouterr().err.splitlines()
    off = {name for name, v in kernels._verdicts.items() if not v.ok}
    assert kernels._verdicts["glm_router_select"].ok and "glm_router_select" in fake_metal
    assert {"glm_qkv", "glm_expert_down", "glm_router_logits"} <= off
    assert len(lines) == len(off) and all(any(n in line for line in lines) for n in off)
    assert "RuntimeError: Unable to build metal library" in kernels._verdicts["glm_qkv"].reason
    assert "wrong numbers" in kernels._verdicts["glm_expert_down"].reason
    assert all("glm-mlx doctor" in line for line in lines)

    # the next start: every verdict from the cache, no failed kernel built again
    kernels._verdicts.clear()
    kernels._kernels.clear()
    fake_metal.clear()
    again = _answer()
    assert mx.array_equal(again, reference).item()
    assert set(fake_metal) == {"glm_router_select"}  # built to run, not to check
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(off) and all("cached verdict" in line for line in lines)


def test_a_kernel_named_in_glm_mlx_kernels_is_off_and_the_others_are_checked(fake_metal, monkeypatch):
    monkeypatch.setenv("GLM_MLX_KERNELS", "glm_router_select, glm_dequantize")
    assert not kernels.enabled("glm_router_select")
    assert kernels.verdict("glm_router_select").reason == "turned off by GLM_MLX_KERNELS"
    assert not kernels.enabled("glm_router_logits") and fake_metal == ["glm_router_logits"]


def test_an_unreadable_cache_is_checked_anew(fake_metal, tmp_path):
    selfcheck.verdicts_file().parent.mkdir(parents=True)
    selfcheck.verdicts_file().write_text("{not json")
    assert not kernels.enabled("glm_router_logits")
    assert not kernels.verdict("glm_router_logits").cached
    key = next(iter(selfcheck._read()))
    assert selfcheck.lookup(key).reason.startswith("wrong numbers")


def test_the_cpu_takes_no_kernel():
    assert kernels.backend() == "cpu" and not kernels.enabled("glm_qkv")
    assert kernels.verdict("glm_qkv").reason == "the CPU has no custom kernels"
