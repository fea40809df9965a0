"""Compile every CUDA kernel a model launches, on a machine with no GPU: NVRTC, as MLX does.

    python3 scripts/cuda_compile.py --shape air --arch sm_90     (about 6 minutes on 2 CPU cores)

The GPU machine is lent for minutes a session; a kernel that does not compile there costs one of
them. NVRTC needs no GPU or driver (pip's nvidia-cuda-nvrtc, with nvidia-cuda-runtime's headers),
so this builds a model of the shape (2 layers, bench.random_weights), runs a decode step and a
prefill with the dispatch told it is on CUDA and mx.fast.cuda_kernel replaced by a recorder,
writes each launch's source the way MLX's custom_kernel.cpp does (the kernel signature from the
inputs' and outputs' dtypes, `constexpr int` template arguments, the body), and compiles each
distinct one for `arch` with ptxas's report: registers per thread, spilled bytes, shared memory.
MLX's own device header (mlx/backend/cuda/device/utils.cuh, compiled into libmlx) is not on
this machine; the kernels use only CUDA's builtins and cuda_bf16.h, which stand in for it.

tests/test_cuda_compile.py compiles the small shape's kernels in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from glm_mlx import experts, kernels, model, selfcheck

CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint32: "uint32_t",
              mx.int32: "int32_t", mx.uint8: "uint8_t", mx.bool_: "bool"}

PRELUDE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned char uint8_t;
struct Shape {  // MLX's (a cuda::std::array of MAX_NDIM int32), as a launch's {name}_shape argument
    int32_t v[10];
    __device__ int32_t operator[](int i) const { return v[i]; }
};
"""


@dataclass(frozen=True)
class Launch:
    name: str
    source: str
    header: str
    inputs: tuple  # (name, cuda type)
    outputs: tuple
    template: tuple  # (name, int)

    @property
    def kernel(self) -> str:
        """MLX's name for it: custom_kernel_<name>_<template values>."""
        return "custom_kernel_" + self.name + "".join(f"_{v}" for _, v in self.template)

    def cuda(self) -> str:
        """The source MLX's custom_kernel.cpp compiles for this launch (PRELUDE for its device header)."""
        args = [a for n, t in self.inputs for a in [f"    const {t}* {n}"]
                + ([f"    const __grid_constant__ Shape {n}_shape"] if f"{n}_shape" in self.source else [])]
        args += [f"    {t}* {n}" for n, t in self.outputs]
        consts = "".join(f"  constexpr int {n} = {v};\n" for n, v in self.template)
        return (PRELUDE + self.header + "namespace mlx::core::cu {\n\n"
                + f"__global__ void {self.kernel}(\n" + ",\n".join(args) + ") {\n" + consts + "\n"
                + self.source + "\n}\n\n} // namespace mlx::core::cu\n")


@contextlib.contextmanager
def dispatching(kind: str, make_kernel):
    """Within: the dispatch takes backend `kind`'s kernels ("cuda" or "metal"), built by `make_kernel` in place of
    mx.fast's (a recorder), and the layers' ops are built as they run, not traced."""
    attr = "cuda_kernel" if kind == "cuda" else "metal_kernel"
    saved = (getattr(mx.fast, attr), kernels.backend, model.backend, experts.backend, dict(kernels._kernels),
             model.COMPILED_DECODE, dict(kernels._verdicts))
    pick = lambda: kind  # noqa: E731
    setattr(mx.fast, attr, make_kernel)
    kernels.backend, model.backend, experts.backend = pick, pick, pick
    kernels._kernels.clear()
    model.COMPILED_DECODE = False
    # every kernel taken, unchecked: a recorder's outputs are placeholders, not numbers to check
    kernels._verdicts.clear()
    kernels._verdicts.update({n: selfcheck.Verdict(True, "") for n in (*kernels.KERNELS, *kernels.CUDA_KERNELS)})
    try:
        yield
    finally:
        setattr(mx.fast, attr, saved[0])
        kernels.backend, model.backend, experts.backend, kernels._kernels, model.COMPILED_DECODE = saved[1:6]
        kernels._verdicts.clear()
        kernels._verdicts.update(saved[6])


@contextlib.contextmanager
def recording():
    """Within: the dispatch takes CUDA's kernels, and each launch is recorded (outputs are zeros of
    their shapes) instead of run. Yields the list of launches."""
    launches: list[Launch] = []

    def cuda_kernel(name, input_names, output_names, source, header="", **_):
        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **__):
            launches.append(Launch(name, source, header, tuple(zip(input_names, (CUDA_TYPES[a.dtype] for a in inputs))),
                                   tuple(zip(output_names, (CUDA_TYPES[d] for d in output_dtypes))),
                                   tuple((n, int(v)) for n, v in template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch

    with dispatching("cuda", cuda_kernel):
        yield launches


def model_launches(shape: str, recipe: str = "uniform4", prompt: int = 64, record=None, zeros: bool = False) -> list:
    """The distinct kernel launches of a prefill of `prompt` tokens and a decode step, through the first
    two layers of `shape` (bench's random weights under `recipe`, bf16): a dense one and a MoE one.
    `record`: the recorder (default: this module's `recording`, CUDA's); `zeros`: weights of zeros in the
    recipe's shapes and dtypes, for a recorder that needs no numbers (seconds where random ones take minutes)."""
    from glm_mlx.bench import bench_config, build_ours, random_weights
    from glm_mlx.generate import prefill

    cfg = dict(bench_config(shape, 2), first_k_dense_replace=1)  # a dense layer, then a MoE one (GLM-4.5 has 3)
    m = build_ours(cfg, (zero_weights if zeros else random_weights)(cfg, recipe, 0, mx.bfloat16), recipe)
    with (record or recording)() as launches:
        cache = m.make_cache()
        prefill(m, mx.arange(prompt)[None] % cfg["vocab_size"], cache)
        m(mx.array([[3]]), cache, checked=True)
    return list(dict.fromkeys(launches))


def off_path_launches(record=None) -> list:
    """The launches of gather_qmv and dequantize (not on a model's decode path everywhere) at 4 and 8 bits.
    `record`: the recorder (default: CUDA's)."""
    with (record or recording)() as launches:
        for bits in (4, 8):
            w, s, b = mx.quantize(mx.random.normal((3, 64, 256)), 64, bits)
            s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
            kernels.gather_qmv(mx.zeros((1, 256), mx.bfloat16), w, s, b, mx.array([2], mx.uint32), 64, bits)
            kernels.dequantize(w, s, b, 64, bits)
    return launches


def zero_weights(cfg: dict, recipe: str, seed: int = 0, dtype: mx.Dtype = mx.bfloat16):
    """bench.random_weights' tensors (names, shapes, dtypes), all zeros."""
    from glm_mlx.bench import ModelArgs, precision, tensor_shapes

    args = ModelArgs.from_dict(cfg)

    def weights(layer: int | None) -> dict[str, mx.array]:
        out = {}
        for name, shape in tensor_shapes(args, layer).items():
            module = name.rsplit(".", 1)[0]
            prec = precision(recipe, module, shape[-1])
            if name.endswith("e_score_correction_bias"):
                out[name] = mx.zeros(shape)
            elif prec.bits and not name.endswith(("norm.weight", ".bias")):
                out[name] = mx.zeros((*shape[:-1], shape[-1] * prec.bits // 32), mx.uint32)
                out[module + ".scales"] = out[module + ".biases"] = mx.zeros((*shape[:-1], shape[-1] // prec.group_size),
                                                                             dtype)
            else:
                out[name] = mx.zeros(shape, dtype)
        return out

    return weights


@functools.cache
def _nvrtc():
    """libnvrtc and the CUDA include folder, from pip's nvidia-cuda-nvrtc / nvidia-cuda-runtime."""
    import nvidia

    for root in (Path(p) for p in nvidia.__path__):
        for lib in sorted(root.glob("*/lib/libnvrtc.so*")):
            include = lib.parent.parent / "include"
            if (include / "cuda_bf16.h").is_file():
                return ctypes.CDLL(str(lib)), include
    raise RuntimeError("no libnvrtc with cuda_bf16.h beside it: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime")


@dataclass
class Compiled:
    ok: bool
    log: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None


def compile_launch(launch: Launch, arch: str = "sm_90", cubin: Path | None = None) -> Compiled:
    """NVRTC's verdict on the launch's source, with ptxas's resource report (and the machine code
    written to `cubin` if given)."""
    lib, include = _nvrtc()
    prog = ctypes.c_void_p()
    src = launch.cuda().encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{launch.kernel}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture={arch}", f"--include-path={include}", "--ptxas-options=-v"]
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        if cubin is not None and status == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            code = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetCUBIN(prog, code)
            cubin.write_bytes(code.raw)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    log = buf.value.decode(errors="replace")
    out = Compiled(status == 0, log)
    if m := re.search(r"Used (\d+) registers", log):
        out.registers = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out.spill_stores, out.spill_loads = int(m.group(1)), int(m.group(2))
    if m := re.search(r"(\d+) bytes smem", log):
        out.smem = int(m.group(1))
    return out


def sass(launch: Launch, arch: str = "sm_90") -> list[str]:
    """The launch's machine code (SASS), one instruction a line, from nvdisasm (pip's
    nvidia-cuda-nvdisasm: an analysis tool, not a dependency)."""
    import subprocess
    import tempfile

    import nvidia

    tool = next((t for p in nvidia.__path__ for t in Path(p).glob("*/bin/nvdisasm")), None)
    if tool is None:
        raise RuntimeError("no nvdisasm: pip install nvidia-cuda-nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        if not compile_launch(launch, arch, f).ok:
            raise RuntimeError(f"{launch.kernel} does not compile")
        text = subprocess.run([str(tool), "-c", str(f)], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]+);", text)]


def opcodes(lines: list[str]) -> dict[str, int]:
    """Instructions by opcode (predicates and modifiers dropped), most frequent first."""
    counts: dict[str, int] = {}
    for line in lines:
        op = re.sub(r"^@!?U?P\w+\s+", "", line.strip()).split()[0].split(".")[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air", help="a bench shape: small, air, glm45")
    ap.add_argument("--recipe", default="uniform4", help="a quantization recipe: uniform4, mixed")
    ap.add_argument("--arch", default="sm_90", help="NVRTC's --gpu-architecture (H100: sm_90)")
    ap.add_argument("--sass", default="", help="also count the machine instructions of kernels whose name "
                    "contains this (needs nvidia-cuda-nvdisasm)")
    a = ap.parse_args()
    failed = 0
    for launch in model_launches(a.shape, a.recipe):
        c = compile_launch(launch, a.arch)
        t = ", ".join(f"{n}={v}" for n, v in launch.template)
        if not c.ok:
            failed += 1
            print(f"FAILED {launch.name} ({t}):\n{c.log}")
        else:
            types = ",".join(ty.replace("__nv_bfloat16", "bf16") for _, ty in launch.inputs + launch.outputs)
            print(f"{launch.name:18s} {c.registers:4d} registers, spills {c.spill_stores}/{c.spill_loads} bytes, "
                  f"{c.smem} B shared | {t} | {types}")
            if a.sass and a.sass in launch.name:
                ops = opcodes(sass(launch, a.arch))
                print(f"    {sum(ops.values())} instructions: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
