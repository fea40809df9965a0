"""Offloaded experts under a budget: tokens/s, hit rate and GB/s against the disk's bound.

    python3 scripts/offload_bench.py --layers 8 --dir /tmp/offload-bench

Writes a model folder of GLM-4.5-Air's shapes (N MoE layers, random weights,
experts 4-bit group 64, the rest 8-bit) in our format, measures the disk's
read bandwidth with the offloader's own access pattern (parallel preads of
whole experts, page cache dropped), then decodes with the routed experts
limited to 100%, 50%, 25% and 10% of their bytes, on two routing traces:
uniform (every expert equally likely) and skewed (Zipf popularity, and each
token reusing most of the previous token's experts). The router's choice of
experts is replaced by the trace (the offloader is what is measured), made to
depend on the router's own so that reading it waits for the card as a real
choice does; every read goes to the disk (direct reads, or each expert's pages
dropped after it is read). The bound
for a run is the disk bandwidth over the bytes read per token (prefetches included). Each row's last logits
are compared with the resident model's on the same trace: they must be equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.convert import FORMAT_VERSION, MANIFEST, experts_entry, write_json_atomic
from convert.safetensors_io import SafetensorsWriter, bf16_bits, write_safetensors
import glm_mlx.model as model_mod
from glm_mlx.bench import bench_config
from glm_mlx.loading import write_verified_stamp

# The Air's shapes, every layer MoE (the bench's config; the loader wants these few more keys)
AIR = dict(bench_config("air"), first_k_dense_replace=0, architectures=["Glm4MoeForCausalLM"],
           eos_token_id=[151329], hidden_act="silu")


def _q(rng, name, out, inp, bits, scale):
    """A random quantized matrix: packed codes, bf16 scales and biases."""
    g = inp // 64
    return {name: ("U32", (out, inp * bits // 32), rng.integers(0, 2**32, (out, inp * bits // 32), dtype=np.uint32)),
            name[:-6] + "scales": ("BF16", (out, g), bf16_bits(np.full((out, g), scale, np.float32))),
            name[:-6] + "biases": ("BF16", (out, g), bf16_bits(np.full((out, g), -scale * (2**bits - 1) / 2,
                                                                          np.float32)))}


def write_folder(folder: Path, cfg: dict) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").mkdir(exist_ok=True)
    d, E, m = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    files, quant, experts = {}, {}, {}
    (folder / "config.json").write_text(json.dumps(cfg))
    files["config.json"] = None
    main = {**_q(rng, "model.embed_tokens.weight", cfg["vocab_size"], d, 8, 0.02),
            **_q(rng, "lm_head.weight", cfg["vocab_size"], d, 8, 0.002),
            "model.norm.weight": ("BF16", (d,), bf16_bits(np.ones(d, np.float32)))}
    quant.update({"model.embed_tokens": {"bits": 8, "group_size": 64}, "lm_head": {"bits": 8, "group_size": 64}})
    files["weights/main.safetensors"] = write_safetensors(folder / "weights/main.safetensors", main)
    hq, hk = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": ("BF16", (d,), bf16_bits(np.ones(d, np.float32))),
             f"{p}.post_attention_layernorm.weight": ("BF16", (d,), bf16_bits(np.ones(d, np.float32))),
             f"{p}.mlp.gate.weight": ("F32", (E, d), rng.standard_normal((E, d), dtype=np.float32) * 0.02),
             f"{p}.mlp.gate.e_score_correction_bias": ("F32", (E,), np.zeros(E, np.float32))}
        for name, out, inp in (("q_proj", hq, d), ("k_proj", hk, d), ("v_proj", hk, d), ("o_proj", d, hq)):
            t.update(_q(rng, f"{p}.self_attn.{name}.weight", out, inp, 8, 0.002))
            quant[f"{p}.self_attn.{name}"] = {"bits": 8, "group_size": 64}
            if name != "o_proj":
                t[f"{p}.self_attn.{name}.bias"] = ("BF16", (out,), bf16_bits(np.zeros(out, np.float32)))
        for name, out, inp in (("gate_proj", m, d), ("up_proj", m, d), ("down_proj", d, m)):
            t.update(_q(rng, f"{p}.mlp.shared_experts.{name}.weight", out, inp, 8, 0.002))
            quant[f"{p}.mlp.shared_experts.{name}"] = {"bits": 8, "group_size": 64}
        rel = f"weights/layer.{i:03d}.safetensors"
        files[rel] = write_safetensors(folder / rel, t)
        specs = {}
        for e in range(E):
            for name, out, inp in (("gate_proj", m, d), ("up_proj", m, d), ("down_proj", d, m)):
                for k, (dt, shape, _) in _q(np.random.default_rng(0), f"{p}.mlp.experts.{e}.{name}.weight",
                                            1, inp, 4, 0.002).items():
                    specs[k] = (dt, (out, shape[1]))
        rel = f"weights/experts.{i:03d}.safetensors"
        w = SafetensorsWriter(folder / rel, specs)
        block = rng.integers(0, 2**32, 1 << 22, dtype=np.uint32)  # reused random codes: writing is the cost
        for k, (dt, shape) in specs.items():
            n = int(np.prod(shape))
            if dt == "U32":
                w.write(k, np.resize(np.roll(block, hash(k) % 1000), n).reshape(shape))
            else:
                val = 0.002 if k.endswith("scales") else -0.002 * 7.5
                w.write(k, bf16_bits(np.full(shape, val, np.float32)))
        files[rel] = w.close()
        q4 = {"bits": 4, "group_size": 64}
        experts[str(i)] = experts_entry(folder / rel, rel, i, E, {n: q4 for n in ("gate_proj", "up_proj",
                                                                                  "down_proj")})
    from convert.safetensors_io import sha256_file

    files["config.json"] = ((folder / "config.json").stat().st_size, sha256_file(folder / "config.json"))
    manifest = {"format": "glm-mlx", "format_version": FORMAT_VERSION, "fingerprint": "bench",
                "source": {"kind": "synthetic"}, "recipe": {"name": "mixed"}, "mtp_layers": 0,
                "quantization": quant, "experts": experts,
                "files": {k: {"size": s, "sha256": h} for k, (s, h) in files.items()}}
    write_json_atomic(folder / MANIFEST, manifest)
    write_verified_stamp(folder, manifest["files"])


def drop_cache(folder: Path) -> None:
    for f in (folder / "weights").glob("experts.*"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_bandwidth(folder: Path, entry: dict, piece: int | None = None, workers: int = 16,
                   experts: int = 64, direct: bool = False, burst: int | None = None) -> float:
    """GB/s of parallel preads from the disk (page cache dropped): `experts` experts, each whole
    (piece None: the bound's measure) or in pieces of `piece` bytes (the offloader's own pattern),
    `workers` reads in flight; `direct`: past the page cache (O_DIRECT), into aligned memory;
    `burst`: that many experts' reads at a time, each burst waited for before the next (as a layer's
    misses are, known only at its router), rather than all in one queue."""
    from concurrent.futures import ThreadPoolExecutor

    from glm_mlx.offload import ALIGN, _open_direct, aligned_buffer

    drop_cache(folder)
    stride, start = entry["stride"], entry["data_start"]
    fd = _open_direct(folder / entry["file"]) if direct else os.open(folder / entry["file"], os.O_RDONLY)
    if fd is None or (direct and (start % ALIGN or stride % ALIGN)):  # no direct reads here
        return 0.0
    piece = piece or stride
    spans = [(start + e * stride + o, min(piece, stride - o)) for e in range(experts) for o in range(0, stride, piece)]
    bufs = [aligned_buffer(stride) for _ in range(workers)] if direct else None

    def one(i: int) -> int:
        at, n = spans[i]
        if bufs is None:
            return len(os.pread(fd, n, at))
        return os.preadv(fd, [bufs[i % workers][:n]], at)  # (the bytes are dropped: two reads may share one)

    t0 = time.perf_counter()
    per = -(-stride // piece) * (burst or experts)  # spans a burst
    with ThreadPoolExecutor(workers) as pool:
        n = sum(sum(pool.map(one, range(i, min(i + per, len(spans))))) for i in range(0, len(spans), per))
    dt = time.perf_counter() - t0
    os.close(fd)
    return n / dt / 1e9


DRIFT = 40  # tokens between the "drifting" trace's changes of topic


def trace(kind: str, tokens: int, layers: int, E: int, k: int, seed: int) -> np.ndarray:
    """Expert ids [tokens, layers, k]: "uniform", "skewed", or "drifting" (skewed, with each layer's
    popular experts drawn anew every DRIFT tokens: a conversation that changes topic)."""
    if kind not in ("uniform", "skewed", "drifting"):
        raise ValueError(f"routing trace {kind!r}: choose uniform, skewed or drifting")
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return np.stack([[rng.choice(E, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    pop = 1.0 / np.arange(1, E + 1) ** 1.1  # Zipf popularity, a different order per layer
    orders = [rng.permutation(E) for _ in range(layers)]
    out = np.zeros((tokens, layers, k), dtype=np.int64)
    for layer in range(layers):
        prev = rng.choice(E, k, replace=False, p=pop / pop.sum())
        for t in range(tokens):
            if kind == "drifting" and t and t % DRIFT == 0:
                orders[layer] = rng.permutation(E)
            keep = prev[rng.random(k) < 0.6]  # temporal locality: most of the last token's experts stay
            p = pop.copy()
            p[keep] = 0
            new = rng.choice(E, k - len(keep), replace=False, p=p / p.sum())
            prev = np.concatenate([keep, new])
            out[t, layer] = orders[layer][prev]
    return out


def guess(tr: np.ndarray, accuracy: float, E: int, seed: int, near: bool = False) -> np.ndarray:
    """A prediction of the trace: each expert right with probability `accuracy`, else another
    expert (what a router applied one layer early might give): any expert alike, or (`near`)
    one drawn as often as the layer's own choices draw it, a near miss, likelier to be in the bank."""
    rng = np.random.default_rng(seed)
    out = tr.copy()
    wrong = rng.random(tr.shape) >= accuracy
    if not near:
        out[wrong] = rng.integers(0, E, wrong.sum())
        return out
    for layer in range(tr.shape[1]):
        p = np.bincount(tr[:, layer].ravel(), minlength=E).astype(np.float64)
        w = wrong[:, layer]
        out[:, layer][w] = rng.choice(E, w.sum(), p=p / p.sum())
    return out


DEFAULT_PIECE = DEFAULT_WORKERS = None  # set from glm_mlx.offload in main
# name: (eviction, pin, prefetch accuracy or None (or (accuracy, True): wrong guesses near misses, see guess),
#        CUDA managed memory's hints, direct reads, compiled halves)
VARIANTS = {
    "lru": ("lru", False, None, "expert", True, True),
    "lfu": ("lfu", False, None, "expert", True, True),
    "lfu+pin": ("lfu", True, None, "expert", True, True),
    "lfu (hints a piece)": ("lfu", False, None, "piece", True, True),
    "lfu (no hints)": ("lfu", False, None, False, True, True),
    "lfu (buffered)": ("lfu", False, None, "expert", False, True),
    "lfu (copies)": ("lfu", False, None, "copy", True, True),
    "lfu (copies <= 2)": ("lfu", False, None, "copy <= 2", True, True),
    "lfu (uncompiled)": ("lfu", False, None, "expert", True, False),
    "lfu+prefetch 100%": ("lfu", False, 1.0, "expert", True, True),
    "lfu+prefetch 75%": ("lfu", False, 0.75, "expert", True, True),
    "lfu+prefetch 50%": ("lfu", False, 0.5, "expert", True, True),
    "lfu+prefetch 75% (near)": ("lfu", False, (0.75, True), "expert", True, True),
    "lfu+prefetch 50% (near)": ("lfu", False, (0.5, True), "expert", True, True),
}


def run(folder: Path, budget_frac: float, kind: str, tokens: int, warm: int, variant: str,
        piece: int | None = None, workers: int | None = None, sync: bool = True, profile: Path | None = None) -> dict:
    import glm_mlx.offload as offload
    from glm_mlx.loading import expert_bytes, load_model

    policy, pin, accuracy, hints, direct, compiled = VARIANTS[variant]
    hints, _, most = hints.partition(" <= ") if isinstance(hints, str) else (hints, "", "")
    offload.COPY_MISSES = int(most) if most else 1 << 30  # "copy <= N": the copy engine for up to N reads a step
    offload.POLICY, offload.PIN, offload.PREFETCH, offload.HINTS, offload.DIRECT = policy, pin, False, hints, direct
    gc.collect()  # the previous row's model gone before this one's peak is measured
    offload.PIECE = piece or DEFAULT_PIECE
    offload.WORKERS = workers or DEFAULT_WORKERS
    manifest = json.loads((folder / MANIFEST).read_text())
    total = expert_bytes(manifest)
    offloaded = budget_frac < 1
    model, _ = load_model(folder, expert_memory=int(total * budget_frac) if offloaded else None)
    a = model.args
    tr = trace(kind, warm + tokens, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok, seed=1)
    step = [0]

    def chosen(i: int, inds: mx.array) -> mx.array:
        """Layer i's experts for this token: the trace's, in place of the router's choice `inds`. They depend
        on it, so that the host reading them waits for the card up to the router as a real run does (with
        `sync` False they do not: the card then works only once the token's graph is built)."""
        ids = mx.array(tr[step[0], i].reshape(inds.shape))
        return mx.depends(ids, inds) if sync else ids

    # The trace stands in for the router's choice of experts (its weights stay the router's). An offloaded
    # layer hands the choice to its bank on the host (below). A resident one keeps it on the card, in a trace
    # a compiled decode would freeze at its first token: the resident model runs its layers uncompiled.
    model_mod.COMPILED_DECODE = offloaded and compiled
    if not offloaded:
        for i, layer in enumerate(model.model.layers):
            def gate(x, norm=None, i=i, router=layer.mlp.gate):
                inds, weights = router(x, norm)
                return chosen(i, inds), weights
            layer.mlp.gate = gate
    banks = offload.offloaded_banks(model)  # in layer order
    if accuracy is not None:
        # The prediction is the trace's next layer, right with probability `accuracy`:
        # at 100% an oracle, the most prefetch can buy.
        right, near = accuracy if isinstance(accuracy, tuple) else (accuracy, False)
        pred = guess(tr, right, a.n_routed_experts, seed=2, near=near)
        for i, (b, nxt) in enumerate(zip(banks, banks[1:])):
            object.__setattr__(b, "next", (lambda x, i=i: (mx.array(pred[step[0], i + 1][None, None]), None), nxt))
    routing = [0.0]  # seconds the host spent on the routers' choices, its waits for reads left out: the card's work
    for i, b in enumerate(banks):
        b.file.drop_pages = True  # every read from the disk

        def route(x, inds, b=b, i=i, inner=b._route):
            t, w = time.perf_counter(), sum(c.stats.seconds for c in banks)
            out = inner(x, chosen(i, inds))
            routing[0] += time.perf_counter() - t - (sum(c.stats.seconds for c in banks) - w)
            return out
        object.__setattr__(b, "_route", route)
    mx.reset_peak_memory()
    drop_cache(folder)
    cache = model.make_cache()
    y = mx.array([[1]])
    for t in range(warm):
        step[0] = t
        mx.eval(model(y, cache, checked=True))
    before = offload.offloaded_stats(model) or offload.Stats()
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0, built, routing[0] = time.perf_counter(), 0.0, 0.0
    for t in range(warm, warm + tokens):
        step[0] = t
        tb = time.perf_counter()
        logits = model(y, cache, checked=True)  # the graph built, and every read made
        built += time.perf_counter() - tb
        mx.eval(logits)
    dt = time.perf_counter() - t0
    for b in banks:
        del b.__dict__["_route"]  # (the wrapper holds its bank: a cycle that would keep the model alive)
    if profiler is not None:
        import pstats

        profiler.disable()
        profile.mkdir(parents=True, exist_ok=True)
        with open(profile / f"{kind}-{budget_frac:g}-{variant.replace(' ', '_')}.txt", "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
    st = offload.offloaded_stats(model) or offload.Stats()
    misses, nbytes, hits = st.misses - before.misses, st.bytes - before.bytes, st.hits - before.hits
    used, ahead = st.prefetch_used - before.prefetch_used, st.prefetched - before.prefetched
    waited = st.seconds - before.seconds
    pieces = {k: sum(b.file.pieces[k] for b in banks) for k in ("direct", "buffered")}
    return {"budget": budget_frac, "trace": kind, "variant": variant, "tokens_per_s": tokens / dt,
            "hit_rate": hits / max(hits + misses, 1), "read_gbps": nbytes / dt / 1e9,
            "bytes_read_per_token": nbytes / tokens, "wait_ms_per_token": waited / tokens * 1e3,
            "other_ms_per_token": (dt - waited) / tokens * 1e3,
            # the card's work and the host's wait for it: at each router's choice, and after the graph is built
            "eval_ms_per_token": (dt - built + routing[0]) / tokens * 1e3,
            "prefetch_used": used / max(ahead, 1) if ahead else None,
            "direct_share": pieces["direct"] / max(sum(pieces.values()), 1),
            "peak_gb": mx.get_peak_memory() / 1e9, "logits": np.array(logits.astype(mx.float32)).ravel()}


def train(folder: Path, budget_frac: float, tokens: int, steps: int) -> dict:
    """QLoRA steps (LoRA on attention and the shared expert, rank 8) over `tokens` tokens of random
    ids with the experts offloaded to `budget_frac` of their bytes (1: resident), every read from
    the disk: seconds a step, GB read a step (forward and backward passes), the reads' wait."""
    import tempfile

    import glm_mlx.offload as offload
    from glm_mlx.data import Dataset, Example
    from glm_mlx.finetune import TrainConfig, Trainer
    from glm_mlx.loading import expert_bytes, load_model

    manifest = json.loads((folder / MANIFEST).read_text())
    total = expert_bytes(manifest)
    model, _ = load_model(folder, expert_memory=int(total * budget_frac) if budget_frac < 1 else None)
    for b in offload.offloaded_banks(model):
        b.file.drop_pages = True
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, tokens + 1).tolist()
    cfg = TrainConfig(rank=8, targets=("attention", "shared_experts"), iters=steps + 1, max_seq_len=tokens + 1,
                      grad_checkpoint=True)
    data = Dataset([Example(ids, [True] * (tokens + 1))], 0, 0)
    t = Trainer(model, data, cfg, tempfile.mkdtemp(), base_manifest=manifest, base_dir=folder, log=lambda s: None)
    mx.reset_peak_memory()
    drop_cache(folder)
    t.train_step()  # warm-up: the first step compiles (resident) and fills the banks
    before = offload.offloaded_stats(model) or offload.Stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step()
    dt = (time.perf_counter() - t0) / steps
    st = offload.offloaded_stats(model) or offload.Stats()
    return {"budget": budget_frac, "s_per_step": dt, "gb_read_per_step": (st.bytes - before.bytes) / steps / 1e9,
            "wait_s_per_step": (st.seconds - before.seconds) / steps, "peak_gb": mx.get_peak_memory() / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offload-bench"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--budgets", default="0.5,0.25,0.1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--traces", default="uniform,skewed")
    ap.add_argument("--pieces", default="", help="MB per parallel piece of an expert's read, e.g. 1,2,4,16 "
                    "(instead of the policies: lfu at each piece size)")
    ap.add_argument("--workers", default="", help="reads in flight, e.g. 32,64 (with --pieces: each pair; "
                    "the disk's bandwidth is also measured with that access pattern)")
    ap.add_argument("--small", action="store_true", help="shrink the widths (a quick run on the CPU)")
    ap.add_argument("--no-sync", action="store_true", help="the trace's choice independent of the layer's input: "
                    "nothing is evaluated until a token's graph is built (the benchmark before session 20)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="write each row's cProfile of its timed tokens (top 40 by own time) under DIR")
    ap.add_argument("--train", type=int, default=0, metavar="TOKENS", help="instead of decoding, QLoRA steps of "
                    "TOKENS tokens (attention and shared expert, experts frozen) at each budget")
    a = ap.parse_args()
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    global DEFAULT_PIECE, DEFAULT_WORKERS
    import glm_mlx.offload as offload
    DEFAULT_PIECE, DEFAULT_WORKERS = offload.PIECE, offload.WORKERS
    cfg = dict(AIR, num_hidden_layers=a.layers)
    if a.small:
        cfg.update(hidden_size=256, moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=1024, n_routed_experts=32)
    if not (a.dir / MANIFEST).exists():
        t0 = time.perf_counter()
        write_folder(a.dir, cfg)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f} s")
    manifest = json.loads((a.dir / MANIFEST).read_text())
    # The bound takes the fastest of several access patterns, each on another layer's file (a disk that
    # keeps what it just served cannot flatter a later one): whole experts or the offloader's pieces,
    # through the page cache (dropped first) or direct, at two depths.
    patterns = {"whole, buffered, 16": dict(), "whole, direct, 16": dict(direct=True),
                "whole, direct, 32": dict(direct=True, workers=32),
                f"{DEFAULT_PIECE >> 10} KB, direct, {DEFAULT_WORKERS}": dict(direct=True, piece=DEFAULT_PIECE,
                                                                              workers=DEFAULT_WORKERS),
                f"{DEFAULT_PIECE >> 10} KB, direct, {2 * DEFAULT_WORKERS}": dict(direct=True, piece=DEFAULT_PIECE,
                                                                                  workers=2 * DEFAULT_WORKERS)}
    layers = sorted(manifest["experts"], key=int)

    def measure() -> dict:
        return {name: disk_bandwidth(a.dir, manifest["experts"][layers[i % len(layers)]], **kw)
                for i, (name, kw) in enumerate(patterns.items())}

    disk = measure()
    bw = max(disk.values())
    print(f"{mx.default_device()}; disk: {bw:.2f} GB/s, the fastest of ("
          + "; ".join(f"{k}: {v:.2f}" for k, v in disk.items()) + "; parallel preads, page cache dropped); "
          f"expert {manifest['experts']['0']['stride'] / 1e6:.2f} MB; {a.layers} MoE layers of GLM-4.5-Air's shapes",
          flush=True)
    if a.train:
        print(f"QLoRA steps of {a.train} tokens; bound = the disk's GB/s over the GB a step reads")
        print("| budget | s/step | GB read/step | read wait s/step | bound s/step | of bound | peak GB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        rows = []
        for frac in [1.0] + [float(f) for f in a.budgets.split(",")]:
            r = train(a.dir, frac, a.train, a.tokens)
            bound = r["gb_read_per_step"] / bw
            r.update(bound_s_per_step=bound)
            rows.append(r)
            print(f"| {frac:.0%} | {r['s_per_step']:.2f} | {r['gb_read_per_step']:.2f} | {r['wait_s_per_step']:.2f} | "
                  f"{bound:.2f} | {(bound / r['s_per_step'] if bound else float('nan')):.0%} | {r['peak_gb']:.2f} |",
                  flush=True)
        print(json.dumps({"disk_gbps": bw, "train_rows": rows}))
        return
    # Not the bound's: the same disk when a layer's misses come as a burst of a few experts, each waited
    # for before the next (the offloader's pattern, 32 experts in all). The bound's bandwidth has no term
    # for a burst's latency; this says what it costs on this disk.
    stride = manifest["experts"]["0"]["stride"]

    def burst(n: int, direct: bool = True) -> float:  # (through the page cache where direct reads cannot go)
        entry = manifest["experts"][layers[(5 + n) % len(layers)]]
        return disk_bandwidth(a.dir, entry, DEFAULT_PIECE, DEFAULT_WORKERS, experts=32, direct=direct, burst=n)

    bursts = {n: burst(n) or burst(n, False) for n in (1, 2, 4)}
    print("disk in bursts (one layer's misses at a time): " + "; ".join(
        f"{n} expert{'s' * (n > 1)}: {g:.2f} GB/s, {n * stride / g / 1e6 if g else float('nan'):.1f} ms a burst"
        for n, g in bursts.items()), flush=True)

    pieces = [int(float(p) * 2**20) for p in a.pieces.split(",") if p]
    workers = [int(w) for w in a.workers.split(",") if w]
    if workers:
        pieces = pieces or [DEFAULT_PIECE]
        for p in pieces:
            for w in workers:
                gbps = disk_bandwidth(a.dir, manifest["experts"]["0"], p, w)
                print(f"disk with {p / 2**20:g} MB pieces, {w} in flight (the offloader's pattern, 64 experts): "
                      f"{gbps:.2f} GB/s", flush=True)
    rows = []
    grid = [(p, w) for p in pieces for w in (workers or [None])]
    for kind in a.traces.split(","):
        opts = dict(sync=not a.no_sync, profile=a.profile)
        resident = run(a.dir, 1.0, kind, a.tokens, a.warm, "lfu", **opts)
        runs = ([(float(f), "lfu", p, w) for f in a.budgets.split(",") for p, w in grid] if pieces else
                [(float(f), v, None, None) for f in a.budgets.split(",") for v in a.variants.split(",")])
        for frac, variant, piece, nw in [(1.0, "lfu", None, None)] + runs:
            r = resident if frac == 1.0 else run(a.dir, frac, kind, a.tokens, a.warm, variant, piece, nw, **opts)
            if piece:
                variant = f"{variant}, {piece / 2**20:g} MB pieces" + (f", {nw} in flight" if nw else "")
            r.update(trace=kind, policy="(resident)" if frac == 1 else variant,
                     max_logit_diff=float(np.abs(r["logits"] - resident["logits"]).max()))
            rows.append({k: v for k, v in r.items() if k != "logits"})
            print(f"{kind} {frac:.0%} {r['policy']}: {r['tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)
    # The bound's disk: the fastest it was measured before the rows and after them, and never below what a
    # row itself read at (bytes over the whole time): this disk serves long runs faster than short probes,
    # and a bound that a row beats is no bound.
    after = measure()
    bw = max(bw, *after.values(), *(r["read_gbps"] for r in rows))
    print("disk after the rows: " + "; ".join(f"{k}: {v:.2f}" for k, v in after.items())
          + f"; the fastest row read at {max(r['read_gbps'] for r in rows):.2f}. The bound takes {bw:.2f} GB/s")
    print("| routing | budget | policy | tokens/s | hit rate | prefetch used | read GB/s | MB read/token | "
          "bound tokens/s | of bound | read wait ms/token | other ms/token | of it, evaluating ms/token | "
          "read direct | peak GB | logits vs resident |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bound = bw * 1e9 / r["bytes_read_per_token"] if r["bytes_read_per_token"] else float("inf")
        r["bound"] = bound
        used = f"{r['prefetch_used']:.0%}" if r["prefetch_used"] is not None else "-"
        diff = r["max_logit_diff"]
        print(f"| {r['trace']} | {r['budget']:.0%} | {r['policy']} | {r['tokens_per_s']:.2f} | "
              f"{r['hit_rate']:.1%} | {used} | {r['read_gbps']:.2f} | {r['bytes_read_per_token'] / 1e6:.0f} | "
              f"{bound:.2f} | {(r['tokens_per_s'] / bound if bound != float('inf') else float('nan')):.0%} | "
              f"{r['wait_ms_per_token']:.1f} | {r['other_ms_per_token']:.1f} | {r['eval_ms_per_token']:.1f} | "
              f"{r['direct_share']:.0%} | {r['peak_gb']:.2f} | {'equal' if diff == 0 else f'{diff:.1e}'} |")
    print(json.dumps({"disk_gbps": bw, "disk_before": disk, "disk_after": after, "disk_bursts": bursts,
                      "rows": rows}))


if __name__ == "__main__":
    main()
