"""What a custom kernel's launch costs the host to encode, by what it is made of.

    MLX_MAX_OPS_PER_BUFFER=400 python3 scripts/encode_probe.py

At full size a decode step is bound by the host again (BENCHMARKS.md, session 22): about 420 ops a step
encode at 14-20 us each, where a chain of elementwise adds encodes at 4-5. 275 of the ops are our
launches. This times chains of 200 launches of one trivial kernel (y = x + 1 over 8 floats), built as
our kernels are (kernels.build), varied one thing at a time:
- the header: the backend's macros alone; with every decode helper (kernels._DOT) and the prefill's
  tensor-core code, as each of our launches carried it until session 22; or as kernels.build hands it
  over now (no tensor-core code where unused, no comments or indentation);
- the inputs: 2, or 20 (as q|k|v's launch takes, 19 of them unread here);
- template arguments: none, or 12;
and beside them a chain of 200 of our own o_proj launches (kernels.linear_decode, 8 layers' weights),
and 200 of the decode step's attention (mx.fast's, cuDNN's on CUDA, Air's 96 query heads over 8 kv heads)
over a cache of 4096 or 32768 positions, given whole or as the slices a step takes of a larger buffer.
Each row is graph / encode / wait, us for the chain, best of 10 (launch_probe.split).
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
from launch_probe import split

from glm_mlx import kernels

BODY = """
    uint i = threadIdx.x + blockIdx.x * blockDim.x;
    if (i < 8) y[i] = x[i] + 1.0f;
"""


def chain(kernel, x: mx.array, extra: list, template: list, n: int = 200):
    def build():
        y = x
        for _ in range(n):
            y = kernel(inputs=[y, *extra], template=template, grid=(32, 1, 1), threadgroup=(32, 1, 1),
                       output_shapes=[(8,)], output_dtypes=[mx.float32])[0]
        return y
    return build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    if kernels.backend() != "cuda":
        raise SystemExit("this probe times CUDA launches: run it on the GPU machine")
    x = mx.zeros((8,), mx.float32)
    pads = [mx.zeros((16,), mx.float32) + i for i in range(19)]
    mx.eval(x, *pads)
    small = kernels._CUDA_HEADER
    # as every launch carried it before
    large = kernels._CUDA_HEADER + kernels._DOT + kernels._CUDA_MMA + kernels._CUDA_GROUPED
    rows = {}
    for name, header, n_in, n_t in (("small header, 2 inputs", small, 2, 0),
                                    ("our header, 2 inputs", large, 2, 0),
                                    ("our header compacted (kernels.build), 2 inputs",
                                     kernels._compact(kernels._CUDA_HEADER + kernels._DOT), 2, 0),
                                    ("small header, 20 inputs", small, 20, 0),
                                    ("small header, 2 inputs, 12 template arguments", small, 2, 12),
                                    ("our header, 20 inputs, 12 template arguments", large, 20, 12)):
        names = ["x"] + [f"p{i}" for i in range(n_in - 1)]
        k = mx.fast.cuda_kernel(name=f"probe_{len(rows)}", input_names=names, output_names=["y"], source=BODY,
                                header=header)
        template = [(f"T{i}", i + 1) for i in range(n_t)]
        rows[name] = split(chain(k, x, pads[: n_in - 1], template, a.n))
    layers = []
    for _ in range(8):
        lin = nn.QuantizedLinear(12288, 4096, bias=False, group_size=64, bits=4)
        lin.scales = lin.scales.astype(mx.bfloat16)
        lin.biases = lin.biases.astype(mx.bfloat16)
        layers.append(lin)
    mx.eval([layer.parameters() for layer in layers])
    xo = mx.zeros((1, 1, 12288), mx.bfloat16)

    def ours():  # independent launches (their inputs all made already): the encode alone
        return [kernels.linear_decode(xo, layers[i % 8]) for i in range(a.n)]
    rows["our o_proj launch (linear_decode)"] = split(ours)
    q = mx.zeros((1, 96, 1, 128), mx.bfloat16)
    for n in (4096, 32768):
        kc = mx.zeros((1, 8, n + 256, 128), mx.bfloat16) + 0.01
        vc = mx.zeros((1, 8, n + 256, 128), mx.bfloat16) + 0.02
        k, v = kc[:, :, :n], vc[:, :, :n]
        kw, vw = mx.contiguous(k), mx.contiguous(v)
        mx.eval(kc, vc, kw, vw)

        def whole(kw=kw, vw=vw):
            return [mx.fast.scaled_dot_product_attention(q, kw, vw, scale=0.088) for _ in range(a.n)]

        def sliced(kc=kc, vc=vc, n=n):  # the slices made per call, as a step makes them
            return [mx.fast.scaled_dot_product_attention(q, kc[:, :, :n], vc[:, :, :n], scale=0.088)
                    for _ in range(a.n)]
        rows[f"attention over {n} positions, whole arrays"] = split(whole)
        rows[f"attention over {n} positions, slices of the cache"] = split(sliced)
    for name, r in rows.items():
        print(f"{name:50s} graph {r['graph_us']:7.0f} us | encode {r['encode_us']:7.0f} us "
              f"({r['encode_us'] / a.n:5.1f} a launch) | wait {r['wait_us']:7.0f} us", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
