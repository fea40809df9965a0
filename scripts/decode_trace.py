"""A decode step's ops, and, where torch's profiler can see the GPU, its device timeline.

    python3 scripts/decode_trace.py --layers 8 --context 512
    python3 scripts/decode_trace.py --layers 8 --prefill 512   (a prefill's kernels instead)

For N layers of GLM-4.5-Air's shape (random weights, every linear 4-bit; ours
and mlx-lm's on the same weights), per decode step:
- the ops in its lazy graph, by primitive (what the host must build and encode);
- wall time per step, decoding pipelined as both runtimes' generate loops do;
- with torch (CUDA) importable: a CUPTI trace through torch.profiler of the same
  pipelined steps, giving the kernels run per step, the time the device is busy
  (the union of kernel intervals), the largest kernels, and the CUDA API calls
  the host spends its time in. Busy far below wall means the device waits on
  the host; busy near wall means the kernels are the cost.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import tempfile

import mlx.core as mx

from glm_mlx.bench import bench_config, decode_seconds, fill_cache, make_runtime, random_weights
from glm_mlx.config import ModelArgs


def op_counts(out: mx.array) -> collections.Counter:
    """Primitives in out's unevaluated graph, by name."""
    f = io.StringIO()
    mx.export_to_dot(f, out)
    return collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue()))


def pipelined(step, cache, steps: int) -> float:
    """Seconds per greedy step, decoded as the bench does (bench.decode_seconds)."""
    return decode_seconds(step, cache, steps) / steps


def cupti(work) -> list | None:
    """The events of a CUPTI trace of work() through torch.profiler (None without torch on CUDA)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 (no torch, or one that cannot load beside MLX's CUDA libraries)
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return json.load(open(f.name))["traceEvents"]


def kernel_events(events: list) -> list:
    """The kernels among a CUPTI trace's events, by start."""
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def device_kernels(work) -> list | None:
    """The kernels work() ran on the device (CUPTI's events, by start), None where it cannot tell."""
    events = cupti(work)
    return None if events is None else kernel_events(events)


def trace(work, steps: int) -> dict | None:
    """The device's side of work() (`steps` steps of it), from a CUPTI trace (None without torch on CUDA)."""
    events = cupti(work)
    if events is None:
        return None
    kernels = kernel_events(events)
    if not kernels:
        return {"kernels": 0}
    busy, end = 0.0, -1.0
    for e in kernels:  # union of the intervals
        s, t = e["ts"], e["ts"] + e["dur"]
        busy += max(0.0, t - max(s, end))
        end = max(end, t)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    by_kernel = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        name = e["name"].split("(")[0][:70]
        by_kernel[name][0] += 1
        by_kernel[name][1] += e["dur"]
    api = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            api[e["name"]][0] += 1
            api[e["name"]][1] += e["dur"]
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:24]
    return {"kernels_per_step": len(kernels) / (steps + 1), "busy_us_per_step": busy / (steps + 1),
            "span_us_per_step": span / (steps + 1),
            "top_kernels": [(n, c / (steps + 1), t / (steps + 1)) for n, (c, t) in top],
            "api": [(n, c / (steps + 1), t / (steps + 1)) for n, (c, t) in
                    sorted(api.items(), key=lambda kv: -kv[1][1])[:10]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="air", help="air, glm45, or small (for the CPU)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runtimes", default="ours,mlx-lm")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--prefill", type=int, default=0, help="trace a prefill of this many tokens instead")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    print(mx.default_device(), "env:", env or "defaults", flush=True)
    cfg = bench_config(a.shape, a.layers)
    args = ModelArgs.from_dict(cfg)
    report = {}
    for name in a.runtimes.split(","):
        rt = make_runtime(name, cfg, random_weights(cfg, "uniform4", 0, mx.bfloat16), "uniform4")
        if a.prefill:
            prompt = mx.random.randint(0, args.vocab_size, (1, a.prefill)).astype(mx.uint32)

            def work():
                mx.eval(rt.prefill(prompt, rt.make_cache()))
            work()  # warm: JIT
            dev = trace(work, 0)
            if not dev or "busy_us_per_step" not in dev:
                print(f"{name}: no device trace (needs torch with CUDA beside MLX's)")
                continue
            print(f"\n== {name}: {a.layers} layers, prefill {a.prefill}: device busy {dev['busy_us_per_step']:.0f} us "
                  f"of a {dev['span_us_per_step']:.0f} us span, {dev['kernels_per_step']:.0f} kernels")
            for n, c, t in dev["top_kernels"]:
                print(f"  {t:8.1f} us  x{c:5.1f}  {n}")
            continue
        cache = fill_cache(rt.make_cache(), args, a.context, 8 * a.steps + 64, mx.bfloat16, 0)
        pipelined(rt.step, cache, 3)  # warm: JIT and the graph cache
        walls = [pipelined(rt.step, cache, a.steps) for _ in range(3)]
        dev = None if a.no_trace else trace(lambda: pipelined(rt.step, cache, a.steps), a.steps)
        ops = op_counts(rt.step(mx.array([[1]], mx.uint32), cache))  # built, never run
        r = report[name] = {"ops_per_step": sum(ops.values()), "ops": dict(ops.most_common()),
                            "wall_us_per_step": [w * 1e6 for w in walls], "device": dev}
        print(f"\n== {name}: {a.layers} layers, context {a.context}", flush=True)
        print(f"ops per step {r['ops_per_step']} ({r['ops_per_step'] / a.layers:.1f} per layer): "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
        print("wall per step (3 rounds of", a.steps, "steps): " + " / ".join(f"{w:.0f}" for w in r["wall_us_per_step"])
              + f" us ({min(r['wall_us_per_step']) / a.layers:.0f} us per layer)")
        if dev and "busy_us_per_step" in dev:
            print(f"device: {dev['kernels_per_step']:.0f} kernels per step, busy {dev['busy_us_per_step']:.0f} us "
                  f"of a {dev['span_us_per_step']:.0f} us span per step")
            for n, c, t in dev["top_kernels"]:
                print(f"  {t:8.1f} us  x{c:5.1f}  {n}")
            print("host CUDA API per step:")
            for n, c, t in dev["api"]:
                print(f"  {t:8.1f} us  x{c:5.1f}  {n}")
        elif dev is not None:
            print("device trace: no kernels seen (CUPTI did not record MLX's context)")
        rt = cache = None
        mx.clear_cache()
    print(json.dumps({"env": env, "layers": a.layers, "context": a.context, "report": report}))


if __name__ == "__main__":
    main()
