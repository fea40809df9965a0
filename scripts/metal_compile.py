"""Compile every Metal kernel a model launches, on a machine with no Mac: the source MLX itself writes,
checked by clang against a stand-in for Metal's standard library.

    python3 scripts/metal_compile.py --shape air        (every launch of Air's two first layers)
    python3 scripts/metal_compile.py --shape small --print glm_qkv   (and print one kernel's full source)

No Mac is reachable from the machines this project is built on, and a kernel that does not compile
stops a Mac user's first decode step ("Unable to build metal library from source"). So:

1. A model of the shape (2 layers: a dense one, a MoE one) runs a prefill and a decode step with the
   dispatch told it is on Metal and mx.fast.metal_kernel replaced by a recorder (cuda_compile.py's way).
2. Each distinct launch's source is written by MLX's own mx.fast.metal_kernel: traced under
   mx.export_function (which MLX's Linux wheel allows without Metal) with verbose=True, which prints
   the source it would compile: our header, MLX's template line and signature (an input of fewer than
   8 elements is `const constant T*`, a 0-dim one `const constant T&`, others `const device T*`; the
   attributes the body names), the body, and the explicit instantiation.
3. That source is compiled (syntax and semantics, no code generation) by clang as C++ for OpenCL
   (pip's ziglang ships clang), after metal_standin.h in place of MLX's Metal preamble. Three edits,
   each Metal syntax that C++ for OpenCL spells otherwise, and nothing else: `[[kernel]]` becomes
   `__kernel`; the template parameters become constexpr constants at the top of the kernel (OpenCL
   kernels cannot be templates); the explicit instantiation (an attribute list where C++ allows none)
   is left out. What this cannot prove is listed in the README ("On your Mac").

tests/test_metal_compile.py compiles the small, Air and GLM-4.5 shapes' launches in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_compile  # noqa: E402

STANDIN = Path(__file__).resolve().parent / "metal_standin.h"


@dataclass(frozen=True)
class Launch:
    name: str
    source: str
    header: str
    input_names: tuple
    inputs: tuple  # (dtype, ndim, size): all that MLX's signature writer looks at
    output_names: tuple
    output_dtypes: tuple
    template: tuple  # (name, int)

    def metal(self) -> str:
        """The source MLX 0.32's metal_kernel assembles for this launch (without its Metal preamble),
        as MLX writes it."""
        return _mlx_source(self)


@contextlib.contextmanager
def recording():
    """Within: the dispatch takes Metal's kernels, and each launch is recorded (outputs are zeros of their
    shapes) instead of run. Yields the list of launches."""
    launches: list[Launch] = []

    def metal_kernel(name, input_names, output_names, source, header="", **_):
        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **__):
            launches.append(Launch(name, source, header, tuple(input_names),
                                   tuple((a.dtype, a.ndim, a.size) for a in inputs), tuple(output_names),
                                   tuple(output_dtypes), tuple((n, int(v)) for n, v in template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch

    with cuda_compile.dispatching("metal", metal_kernel):
        yield launches


def model_launches(shape: str, recipe: str = "uniform4") -> list[Launch]:
    """The distinct Metal launches of a prefill and a decode step through `shape`'s first two layers."""
    return cuda_compile.model_launches(shape, recipe, prompt=8, record=recording, zeros=True)


@contextlib.contextmanager
def _stdout_to(path: str):
    """Within: the process's standard output (MLX's std::cout included) goes to `path`."""
    sys.stdout.flush()
    saved = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)


def _mlx_source(launch: Launch) -> str:
    """What MLX's metal_kernel prints with verbose=True for this launch, traced (not run) under
    mx.export_function. Placeholder inputs keep what the signature depends on: dtype, 0-dim or not, fewer
    than 8 elements or not."""
    kernel = mx.fast.metal_kernel(name=launch.name, input_names=list(launch.input_names),
                                  output_names=list(launch.output_names), source=launch.source,
                                  header=launch.header)
    args = [mx.zeros(() if ndim == 0 else (size if size < 8 else 8,), dtype) for dtype, ndim, size in launch.inputs]

    def f(*xs):
        return kernel(inputs=list(xs), template=list(launch.template), grid=(32, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(1,)] * len(launch.output_names), output_dtypes=list(launch.output_dtypes),
                      verbose=True)

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.txt")
        with _stdout_to(out):
            mx.export_function(os.path.join(d, "k.mlxfn"), f, *args)
        text = Path(out).read_text()
    m = re.search(r"^```\n(.*)\n```$", text, re.S | re.M)
    if m is None:
        raise RuntimeError(f"MLX printed no source for {launch.name}:\n{text}")
    return m.group(1)


def as_opencl(source: str) -> str:
    """MLX's Metal source with the three edits C++ for OpenCL needs (the module docstring's step 3)."""
    m = re.search(r"^template <(.*)>\n\[\[kernel\]\] void (\w+)\(", source, re.M)
    if m is None:  # a kernel with no template arguments
        return re.sub(r"^\[\[kernel\]\] void ", "__kernel void ", source, count=1, flags=re.M)
    params = [p.rsplit(" ", 1) for p in m.group(1).split(", ")]
    inst = re.search(r"^template \[\[host_name\(\"\w+\"\)\]\] \[\[kernel\]\] decltype\(\w+<(.*)>\) .*;$",
                     source, re.M)
    values = inst.group(1).split(", ")
    consts = "".join(f"typedef {value} {name};\n" if kind == "typename" else f"constexpr {kind} {name} = {value};\n"
                     for (kind, name), value in zip(params, values))
    body_at = source.index(") {\n", m.end()) + len(") {\n")
    out = source[:m.start()] + f"__kernel void {m.group(2)}(" + source[m.end():body_at] + consts + source[body_at:]
    return out[:out.index(inst.group(0))] + out[out.index(inst.group(0)) + len(inst.group(0)):]


@functools.cache
def _clang() -> list[str]:
    """clang's front end, from pip's ziglang (the test extra)."""
    try:
        import ziglang  # noqa: F401
    except ImportError as e:
        raise RuntimeError("no clang: pip install ziglang") from e
    return [sys.executable, "-m", "ziglang", "clang", "-cc1"]


@dataclass
class Compiled:
    ok: bool
    log: str


def compile_source(source: str, name: str = "kernel") -> Compiled:
    """clang's verdict on one kernel's Metal source (as MLX writes it) after the stand-in preamble."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.clcpp"
        path.write_text(f'#include "{STANDIN}"\n' + as_opencl(source))
        r = subprocess.run(_clang() + ["-triple", "spir64-unknown-unknown", "-fsyntax-only", "-x", "clcpp",
                                       "-cl-std=clc++2021", "-Wno-unknown-attributes", "-ferror-limit", "20",
                                       str(path)], capture_output=True, text=True)
    return Compiled(r.returncode == 0 and "error:" not in r.stderr, r.stderr)


def compile_launch(launch: Launch) -> Compiled:
    return compile_source(launch.metal(), launch.name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air", help="a bench shape: small, air, glm45")
    ap.add_argument("--recipe", default="uniform4", help="a quantization recipe: uniform4, mixed")
    ap.add_argument("--print", default="", help="print the full source of kernels whose name contains this")
    a = ap.parse_args()
    failed = 0
    launches = model_launches(a.shape, a.recipe)
    for launch in launches:
        c = compile_launch(launch)
        t = ", ".join(f"{n}={v}" for n, v in launch.template)
        print(f"{'ok    ' if c.ok else 'FAILED'} {launch.name:18s} | {t}")
        if not c.ok:
            failed += 1
            print(c.log)
        if a.print and a.print in launch.name:
            print(launch.metal())
    print(f"{len(launches) - failed} of {len(launches)} Metal launches compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
