"""One token's attention over the KV cache at Air's heads, on the device: our kernel's settings side by
side with cuDNN's (mx.fast's) and with plain reads of the same bytes.

    python3 scripts/attention_probe.py [--contexts 4096,32768]

For each context: device time per call (CUPTI, through torch.profiler, as kernel_check --device-time),
split by kernel, and the bytes of keys and values a call reads over it; for each of our settings its
worst error against attention in float32 on the same bf16 numbers. Each call reads another copy of the
cache (256 MB of copies or more, past H100's 50 MB L2), as a step's 46 layers do. The plain reads
(`stream`) load the same keys and values with 16-byte loads and nothing else: what this grid could
read them at.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
from decode_trace import device_kernels
from kernel_check import copies

from glm_mlx import kernels

HQ, HKV, D = 96, 8, 128
STREAM = """
    ulong n = (ulong)HKV * L * (D / 8), i = (ulong)blockIdx.x * blockDim.x + threadIdx.x;
    uint CAP = kc_shape[2], acc = 0u;
    for (; i < n; i += (ulong)gridDim.x * blockDim.x) {
        ulong h = i / ((ulong)L * (D / 8)), r = i % ((ulong)L * (D / 8));
        uint4 a = ((const uint4*)kc)[h * CAP * (D / 8) + r], b = ((const uint4*)vc)[h * CAP * (D / 8) + r];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    }
    if (acc == 0x12345678u) y[0] = acc;  // keeps the loads
"""


def busy(seconds: float = 0.3):
    """Keep the device busy a while: its clocks drop while it idles between short timings."""
    a = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a = a @ a * 0.01
        mx.eval(a)


def chain(fn, q: mx.array, reps: int) -> mx.array:
    """fn(i, q) for i = 0 .. reps - 1, each call's output the next one's q: one after another on the device.
    (Calls that do not depend on each other may run at once in MLX's CUDA graph, and the sum of their
    kernels' times then counts the overlap over and over.)"""
    for i in range(reps):
        q = fn(i, q)
    return q


def timed(fn, q: mx.array, reps: int) -> dict[str, float]:
    """us per call of fn(i, q) chained `reps` times, by kernel name (best of 3), the device kept busy before."""
    mx.eval(chain(fn, q, reps))
    best = None
    for _ in range(3):
        outs = chain(fn, q, reps)
        busy()
        ks = device_kernels(lambda: mx.eval(outs))
        if ks is None:
            raise SystemExit("needs torch with CUDA beside MLX's (CUPTI)")
        by = {}
        for e in ks:
            name = e["name"].split("(")[0].split("<")[0][:40]
            by[name] = by.get(name, 0.0) + e["dur"] / reps
        if best is None or sum(by.values()) < sum(best.values()):
            best = by
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--settings", default="0,2,3,512,256;1,2,2,512,256;1,2,2,512,1024;1,2,2,256,256;1,2,2,256,1024",
                    help="our kernel's settings, ';' apart: swizzle,warps,stages,blocks,merge threads")
    ap.add_argument("--stream-blocks", default="2112,4224")
    a = ap.parse_args()
    if kernels.backend() != "cuda":
        raise SystemExit("this probe times CUDA kernels: run it on the GPU machine")
    scale = D**-0.5
    stream = kernels.build("cuda", "probe_stream", ["kc", "vc", "after"], ["y"], STREAM)  # after: the chain
    settings = [tuple(int(x) for x in s.split(",")) for s in a.settings.split(";")]
    out = {}
    for n in (int(c) for c in a.contexts.split(",")):
        cap = -(-(n + 1) // 256) * 256
        nbytes = 2 * HKV * n * D * 2
        m = copies(2 * HKV * cap * D * 2 / 1e9)
        ks = [mx.random.normal((1, HKV, cap, D)).astype(mx.bfloat16) for _ in range(m)]
        vs = [mx.random.normal((1, HKV, cap, D)).astype(mx.bfloat16) for _ in range(m)]
        q = (mx.random.normal((1, HQ, 1, D)) * 2).astype(mx.bfloat16)
        mx.eval(ks, vs, q)
        pos = kernels.position(n - 1)
        f = mx.float32  # attention in float32 on the same bf16 numbers, as kernel_check's
        want = mx.fast.scaled_dot_product_attention(q.astype(f), ks[0][..., :n, :].astype(f),
                                                    vs[0][..., :n, :].astype(f), scale=scale)
        mx.eval(want)
        rows = {}
        for swz, w, st, blocks, mt in settings:
            kernels.ATTENTION_SWIZZLE, kernels.ATTENTION_WARPS, kernels.ATTENTION_STAGES = swz, w, st
            kernels.ATTENTION_BLOCKS, kernels.ATTENTION_MERGE_THREADS = blocks, mt
            got = kernels.decode_attention(q, ks[0], vs[0], pos, scale)
            err = (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item()
            t = timed(lambda i, q: kernels.decode_attention(q, ks[i % m], vs[i % m], pos, scale), q, a.reps)
            rows[f"ours swz={swz} warps={w} stages={st} blocks={blocks} merge={mt}"] = {"us": t, "err": err}
        got = mx.fast.scaled_dot_product_attention(q, ks[0][..., :n, :], vs[0][..., :n, :], scale=scale)
        err = (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item()
        t = timed(lambda i, q: mx.fast.scaled_dot_product_attention(q, ks[i % m][..., :n, :], vs[i % m][..., :n, :],
                                                                     scale=scale), q, a.reps)
        rows["cuDNN (mx.fast, slices)"] = {"us": t, "err": err}
        for blocks in (int(b) for b in a.stream_blocks.split(",")):
            t = timed(lambda i, y: stream(inputs=[ks[i % m], vs[i % m], y], template=[("HKV", HKV), ("L", n), ("D", D)],
                                          grid=(blocks * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(1,)],
                                          output_dtypes=[mx.uint32])[0], mx.zeros((1,), mx.uint32), a.reps)
            rows[f"stream, {blocks} blocks of 256"] = {"us": t}
        print(f"\n== context {n}: {nbytes / 1e6:.1f} MB of keys and values a call, {m} copies")
        for name, r in rows.items():
            total = sum(r["us"].values())
            parts = " + ".join(f"{v:.1f}" for v in r["us"].values())
            err = f"  err {r['err']:.1e}" if "err" in r else ""
            print(f"  {name:48s} {total:7.1f} us ({parts})  {nbytes / total / 1e6:5.2f} TB/s{err}", flush=True)
        out[n] = rows
        ks = vs = None
        mx.clear_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
