"""Why q|k|v slows down as a model grows: the small per-layer arrays it reads, or not.

    python3 scripts/footprint_probe.py --footprints 0.256,7
    python3 scripts/footprint_probe.py --footprints "" --model-layers 46

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

Measured in session 16 (BENCHMARKS.md): it does not hold. At 7 GB the sliced biases gained 3 us a
call, and the whole Air with its 276 small arrays packed decoded no faster (120.7 / 109.5 / 120.6
against 122.8 / 118.1 / 112.6 tok/s). pack_small stays here and goes nowhere else.

--model-layers N asks the same of a model: N Air layers (glm_mlx.bench's random weights), decode
tokens/s (pipelined, as the bench times it) with its arrays as loaded, then with every array of
at most --small KB packed into one buffer per dtype (`pack_small`, here until it earns a place in
loading); the last logits of both must be equal.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from glm_mlx.bench import bench_config, build_ours, decode_seconds, random_weights
from glm_mlx.kernels import qkv_decode
from kernel_check import per_call

D, NQ, NK = 4096, 12288, 1024
SHAPES = ((1, 96, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))


def linear(n: int, bias: mx.array) -> nn.QuantizedLinear:
    layer = nn.QuantizedLinear(D, n, bias=True, group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    layer.bias = bias
    return layer


def pack_small(model: nn.Module, limit: int) -> int:
    """Every parameter of at most `limit` bytes made a slice of one buffer per dtype (the same values);
    how many arrays that packed."""
    small = [(k, v) for k, v in tree_flatten(model.parameters()) if v.nbytes <= limit]
    by_dtype: dict = {}
    for k, v in small:
        by_dtype.setdefault(v.dtype, []).append((k, v))
    packed = []
    for items in by_dtype.values():
        buf = mx.concatenate([v.reshape(-1) for _, v in items])
        mx.eval(buf)
        o = 0
        for k, v in items:
            packed.append((k, buf[o: o + v.size].reshape(v.shape)))
            o += v.size
    mx.eval([v for _, v in packed])
    model.update(tree_unflatten(packed))
    return len(packed)


def model_ab(layers: int, limit: int, steps: int = 32, rounds: int = 3) -> None:
    cfg = bench_config("air" if mx.default_device() != mx.cpu else "small", layers)
    dtype = mx.bfloat16 if mx.default_device() != mx.cpu else mx.float32
    model = build_ours(cfg, random_weights(cfg, "uniform4", 0, dtype), "uniform4")
    step = lambda y, c: model(y, c, checked=True)  # noqa: E731
    y = mx.array([[7]])
    results, last = {}, {}
    for name in ("as loaded", "small arrays packed"):
        if name != "as loaded":
            print(f"packed {pack_small(model, limit)} arrays of at most {limit} bytes", flush=True)
        tps = []
        for _ in range(rounds + 1):  # the first compiles
            tps.append(steps / decode_seconds(step, model.make_cache(), steps))
        results[name] = tps[1:]
        last[name] = step(y, model.make_cache())
        mx.eval(last[name])
    for name, tps in results.items():
        print(f"{layers} layers, {name}: decode {' / '.join(f'{t:.1f}' for t in tps)} tok/s", flush=True)
    print("last logits equal:", mx.array_equal(*last.values()).item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--footprints", default="0.256,7", help="GB of weight copies the calls cycle through")
    ap.add_argument("--model-layers", type=int, default=0, help="also decode N Air layers, unpacked and packed")
    ap.add_argument("--small", type=float, default=64, help="KB: the arrays pack_small packs")
    a = ap.parse_args()
    x = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
    print(mx.default_device())
    if a.model_layers:
        model_ab(a.model_layers, int(a.small * 1024))
        mx.clear_cache()  # the model's 60 GB gone before the copies come
    for fp in (float(f) for f in a.footprints.split(",") if f):
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
