"""Why q|k|v slows down as a model grows: the small per-layer arrays it reads, or not.

    python3 scripts/footprint_probe.py --footprints 0.256,7

Seen on the H100 (BENCHMARKS.md, session 15): in a decode step's timeline the q|k|v launch took
32.7 / 51.7 / 62.5 us a call at 8 / 24 / 46 Air layers, and the experts' up launch 46 / 56 / 59,
while o_proj (22.5) and the experts' down launch (18.5) did not move. kernel_check reproduces it
alone once its calls cycle through 7 GB of weight copies (--footprint 7): q|k|v 33 -> 44 us with
no norm and no RoPE, MLX's own three QuantizedLinear 47 -> 59; o_proj 23.8 -> 23.9. MLX's three
quantized matmuls without biases stay at 42 -> 44. The SM clock held 1980 MHz throughout.

What the slowed launches share: each reads small arrays a layer has of its own (q, k and v's
biases, 24 and 2 KB; the norm's weight, 8 KB; the router's bias), every block before or after its
dot products, each a separate allocation: 46 layers' worth is hundreds of them. The ones that do
not slow read only large arrays. Hypothesis: the address translation for those many small
allocations, on every block's critical path. This times q|k|v (our kernel, and MLX's three
QuantizedLinear) over copies with their own bias arrays, and over the same copies with the biases
sliced from one buffer. If the sliced ones stay fast at 7 GB, the fix is to pack a model's small
per-layer arrays into one buffer at load (loading.prepare_model) and hand the layers slices.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from glm_mlx.kernels import qkv_decode

D, NQ, NK = 4096, 12288, 1024
SHAPES = ((1, 96, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))


def per_call(fn, reps: int = 50, rounds: int = 5) -> float:
    mx.eval([fn(i) for i in range(reps)])
    best = float("inf")
    for _ in range(rounds):
        outs = [fn(i) for i in range(reps)]
        t0 = time.perf_counter()
        mx.eval(outs)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def linear(n: int, bias: mx.array) -> nn.QuantizedLinear:
    layer = nn.QuantizedLinear(D, n, bias=True, group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    layer.bias = bias
    return layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--footprints", default="0.256,7", help="GB of weight copies the calls cycle through")
    a = ap.parse_args()
    x = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
    print(mx.default_device())
    for fp in (float(f) for f in a.footprints.split(",")):
        n = max(2, int(fp * 1e9 / ((NQ + 2 * NK) * D * 0.5625)))
        own = [[linear(m, mx.zeros((m,), mx.bfloat16)) for m in (NQ, NK, NK)] for _ in range(n)]
        buf = mx.zeros((n, NQ + 2 * NK), mx.bfloat16)
        sliced = []
        for i, copy in enumerate(own):  # the same weights; the biases slices of one buffer
            layers = [linear(m, buf[i, o: o + m]) for m, o in ((NQ, 0), (NK, NQ), (NK, NQ + NK))]
            for new, old in zip(layers, copy):
                new.weight, new.scales, new.biases = old.weight, old.scales, old.biases
            sliced.append(layers)
        mx.eval([[layer.parameters() for layer in c] for c in own + sliced])
        for name, copies in (("own bias arrays", own), ("biases sliced from one buffer", sliced)):
            ours = per_call(lambda i: qkv_decode(x, *copies[i % n], SHAPES, None, None))
            theirs = per_call(lambda i: [layer(x) for layer in copies[i % n]])
            print(f"footprint {fp:g} GB ({n} copies), {name}: our q|k|v launch {ours:.1f} us, "
                  f"MLX's three QuantizedLinear {theirs:.1f} us", flush=True)
        del own, sliced, buf
        mx.clear_cache()


if __name__ == "__main__":
    main()
