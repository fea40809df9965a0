"""Every CUDA kernel the project launches compiles under NVRTC, as MLX compiles it on the GPU machine:
no GPU needed (scripts/cuda_compile.py). The Metal twins share the bodies; no Metal compiler runs here."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

from glm_mlx import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import cuda_compile  # noqa: E402

# NVRTC and CUDA's headers come from pip's nvidia-cuda-* wheels, which exist for Linux only (the test extra
# installs them there); a Mac checks its own kernels' sources in test_metal_compile.py.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="NVRTC's pip wheels are Linux-only")


@pytest.fixture(scope="module")
def launches():
    """Each distinct launch of the small shape's prefill and decode (4-bit and mixed recipes), plus
    gather_qmv and dequantize (not on a model's path here) at 4 and 8 bits."""
    out = cuda_compile.model_launches("small", "uniform4") + cuda_compile.model_launches("small", "mixed")
    return list(dict.fromkeys(out + cuda_compile.off_path_launches()))


def test_every_kernel_is_launched_and_checked(launches):
    names = {launch.name for launch in launches}
    assert names == set(kernels.KERNELS) | set(kernels.CUDA_KERNELS)
    assert {dict(launch.template).get("BITS") for launch in launches} >= {4, 8}


def test_every_launch_compiles_under_nvrtc_for_the_h100(launches):
    failed = []
    for launch in launches:
        c = cuda_compile.compile_launch(launch, "sm_90")
        if not c.ok:
            failed.append(f"{launch.kernel}:\n{c.log}")
        else:
            assert c.registers is not None  # ptxas reported on it
    assert not failed, "\n\n".join(failed)


def test_a_broken_body_is_caught():
    launch = cuda_compile.Launch("broken", "y[0] = undefined_name;", "", (("x", "float"),), (("y", "float"),), ())
    c = cuda_compile.compile_launch(launch)
    assert not c.ok and "undefined_name" in c.log


def test_the_probes_variant_bodies_compile():
    import qmv_probe  # scripts/qmv_probe.py keeps the matvec bodies the kernels had before, to compare

    with cuda_compile.recording() as launches:
        for bits in (4, 8):
            w, s, b = mx.quantize(mx.random.normal((64, 256)), 64, bits)
            for name in ("word", "exact", "loads", "pipe"):
                qmv_probe.variant(name, mx.zeros((1, 256), mx.bfloat16), w, s.astype(mx.bfloat16),
                                  b.astype(mx.bfloat16), bits, 64, 8, 2)
    assert len(launches) == 8 and all(cuda_compile.compile_launch(launch).ok for launch in launches)


def test_opcodes_counts_instructions_without_predicates_or_modifiers():
    lines = ["@P0 LDG.E.128 R4, desc[UR6][R2.64]", "FFMA R1, R2, R3, R4", "@!PT BRA 0x10", "FFMA.FTZ R5, R6, R7, R8"]
    assert cuda_compile.opcodes(lines) == {"FFMA": 2, "LDG": 1, "BRA": 1}
