"""Every Metal kernel the project launches compiles: the source MLX itself writes for each launch (its
signature's address spaces included), checked by clang against a stand-in for Metal's library
(scripts/metal_compile.py). No Mac runs here; this is what can be proven without one."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

from glm_mlx import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import metal_compile  # noqa: E402


@pytest.fixture(scope="module")
def launches():
    """Each distinct Metal launch of a prefill and a decode step at the small shape (4-bit and mixed recipes),
    Air's (4-bit) and GLM-4.5's (mixed: 4-bit experts, 8-bit elsewhere), plus gather_qmv and dequantize (not
    on a model's path on Metal) at 4 and 8 bits."""
    out = (metal_compile.model_launches("small", "uniform4") + metal_compile.model_launches("small", "mixed")
           + metal_compile.model_launches("air", "uniform4") + metal_compile.model_launches("glm45", "mixed"))
    return list(dict.fromkeys(out + metal_compile.cuda_compile.off_path_launches(metal_compile.recording)))


def test_every_metal_kernel_is_launched_with_both_widths_and_the_real_shapes(launches):
    assert {launch.name for launch in launches} == set(kernels.KERNELS)
    templates = [dict(launch.template) for launch in launches]
    assert {t.get("BITS") for t in templates} >= {4, 8}
    assert {t["K"] for t in templates if "K" in t} >= {4096, 5120}  # Air's and GLM-4.5's hidden size
    # what broke the first Metal sources: a 0-dim input (the position) and inputs of fewer than 8 elements
    sources = {launch.metal() for launch in launches if launch.name in ("glm_qkv", "glm_expert_down")}
    assert any("const constant int32_t& pos" in s for s in sources)
    assert any("const constant uint32_t* w " in s for s in sources)


def test_every_metal_launch_compiles(launches):
    failed = [f"{launch.name} {launch.template}:\n{c.log}" for launch in launches
              if not (c := metal_compile.compile_launch(launch)).ok]
    assert not failed, "\n\n".join(failed)


def _launch(source: str, inputs: tuple, header: str = "") -> metal_compile.Launch:
    return metal_compile.Launch("probe", source, header, tuple(f"a{i}" for i in range(len(inputs))),
                                inputs, ("y",), (mx.float32,), (("N", 4),))


BIG, ONE, SCALAR = (mx.float32, 1, 64), (mx.float32, 1, 1), (mx.float32, 0, 1)


@pytest.mark.parametrize("body, inputs, error", [
    ("y[0] = undefined_name;", (BIG,), "undefined_name"),
    # CUDA's names are not Metal's
    ("y[0] = fmaxf(a0[0], 1.0f);", (BIG,), "fmaxf"),
    ("__syncthreads(); y[0] = a0[0];", (BIG,), "__syncthreads"),
    # the address-space faults MLX's signature makes of a body written for device pointers
    ("y[0] = a0[0];", (SCALAR,), "subscripted value"),
    ("y[0] = *(const device float*)a0;", (ONE,), "address space"),
    ("y[0] = first_device(a0);", (ONE,), "address space"),
])
def test_a_broken_body_fails(body, inputs, error):
    header = "inline float first_device(const device float* p) { return p[0]; }\n"
    c = metal_compile.compile_launch(_launch(body, inputs, header))
    assert not c.ok and error in c.log


def test_a_body_that_minds_address_spaces_compiles():
    header = "template <typename P> inline float first_any(P p) { return p[0]; }\n"
    body = ("uint i = thread_position_in_grid.x; y[i] = first_any(a0) + a1 + a2[N - 1];"
            "threadgroup_barrier(mem_flags::mem_threadgroup);")
    c = metal_compile.compile_launch(_launch(body, (ONE, SCALAR, BIG), header))
    assert c.ok, c.log
