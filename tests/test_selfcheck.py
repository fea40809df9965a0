"""The kernels' self-check on first use, on the CPU: the dispatch is told it is on Metal, and
mx.fast.metal_kernel builds fakes (one fails to build, one is right, the rest give wrong numbers). The
model still answers, with the reference path's logits, one stderr line a failed kernel, and the verdicts
are read from the cache at the next start."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from glm_mlx import doctor, experts, kernels, memory, model, selfcheck


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
    return doctor.tiny_decode(3)[1]


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


def test_doctor_prints_every_kernels_path_and_the_decode_check():
    from typer.testing import CliRunner

    from glm_mlx.cli import app

    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0, r.output
    for name in (*kernels.KERNELS, *kernels.CUDA_KERNELS):
        assert f"{name} " in r.output
    assert "5-token decode of a tiny model: ok" in r.output and "mlx 0.32" in r.output


def test_the_doctor_says_mismatch_when_the_fast_path_disagrees(fake_metal, monkeypatch):
    monkeypatch.setattr(kernels, "_verdicts", {n: selfcheck.Verdict(n != "glm_qkv", "") for n in kernels.PROBES})
    lines = doctor.report()  # every fake kernel taken unchecked: zeros where numbers should be
    assert "MISMATCH" in lines[-2] and "GLM_MLX_KERNELS=off" in lines[-1]


def test_a_mac_wires_the_model_and_warns_when_it_cannot_fit(monkeypatch):
    calls, said = [], []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    m = build_tiny()
    total, experts_ = memory.model_bytes(m)
    assert 0 < experts_ < total
    monkeypatch.setattr(memory, "working_set", lambda: 10 * total)
    with memory.wired(m, 100, say=said.append):
        assert calls == [10 * total]
    assert calls == [10 * total, 7] and not said  # restored; it fits
    monkeypatch.setattr(memory, "working_set", lambda: total)
    with memory.wired(m, 100_000, say=said.append):
        pass
    assert len(said) == 1 and "does not fit even with every routed expert offloaded" in said[0]
    monkeypatch.setattr(memory, "model_bytes", lambda model: (60e9, 50e9))  # as Air's 4-bit experts weigh
    monkeypatch.setattr(memory, "working_set", lambda: 48e9)
    with memory.wired(m, 1000, say=said.append):
        pass
    assert "--expert-memory 33GB" in said[1] and "60.0 GB" in said[1]
    monkeypatch.setattr(memory, "working_set", lambda: None)
    with memory.wired(m, 100):
        pass
    assert len(calls) == 6  # no Metal: the limit is left alone


def build_tiny():
    from glm_mlx.bench import bench_config, build_ours, random_weights

    cfg = bench_config("small", 2)
    return build_ours(cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")


def test_a_misspelt_kernel_name_is_said_once(fake_metal, monkeypatch, capsys):
    """GLM_MLX_KERNELS=glm_qvk turns nothing off: one line says so, naming the kernels there are."""
    monkeypatch.setenv("GLM_MLX_KERNELS", "glm_qvk,glm_router_select")
    assert not kernels.verdict("glm_router_select").ok  # the name that is right still counts
    kernels.verdict("glm_qkv")
    err = capsys.readouterr().err
    assert err.count("GLM_MLX_KERNELS names no kernel glm_qvk") == 1 and "glm_qkv" in err
    assert any("names no kernel: glm_qvk" in line for line in doctor.report())
