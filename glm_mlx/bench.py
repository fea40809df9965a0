"""`glm-mlx bench`: our runtime beside mlx-lm's on the same weights, against the bandwidth ceiling.

Builds a GLM-4.5-Air or GLM-4.5 shaped model (or a tiny one for the CPU) with
random weights, deterministic from a seed and quantized by a recipe, once for
mlx-lm's glm4_moe and once for ours, one model at a time (a 4-bit Air is
60 GB), and measures each after warming up at the timed shapes:

- prefill tokens/s per prompt length, through each runtime's own prefill loop;
- decode tokens/s at each context, the KV cache filled with random keys and
  values instead of a prefill (a 32K context costs nothing to set up), greedy
  tokens pipelined as both runtimes' own generate loops do (the next step
  queued before this one's token is read); the median of several rounds on one
  cache after a warm-up round, since one round can be a third slower than the next;
- peak memory, and decode's GB/s: the bytes one decode step must read (the
  non-expert weights, k of E routed experts per MoE layer, one embedding row,
  the KV cache at that context; from the arrays' nbytes) over its time, set
  against an elementwise copy's GB/s measured in the same run;
- the logits of both on one short prompt, compared.
"""

from __future__ import annotations

import gc
import inspect
import os
import statistics
import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from quantize.recipes import precision

from . import loading
from .config import ModelArgs
from .generate import PREFILL_CHUNK, fmt_bytes, prefill
from .model import Model

# The published configs without the MTP layer (mlx-lm drops it; decode does not run it).
AIR = {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
       "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
       "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
       "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
       "norm_topk_prob": True, "use_qk_norm": False, "attention_bias": True, "rms_norm_eps": 1e-5,
       "rope_theta": 1e6, "partial_rotary_factor": 0.5, "max_position_embeddings": 131072,
       "tie_word_embeddings": False, "rope_scaling": None, "num_nextn_predict_layers": 0}
GLM45 = dict(AIR, hidden_size=5120, num_hidden_layers=92, first_k_dense_replace=3, n_routed_experts=160,
             moe_intermediate_size=1536, intermediate_size=12288, use_qk_norm=True, routed_scaling_factor=2.5)
SMALL = dict(AIR, num_hidden_layers=4, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=16,
             num_experts_per_tok=4, vocab_size=1024)
SHAPES = {"air": AIR, "glm45": GLM45, "small": SMALL}
RECIPES = ("uniform4", "mixed")
RUNTIMES = ("mlx-lm", "ours")
LOGITS_PROMPT = 32


def bench_config(shape: str, layers: int | None = None) -> dict:
    """The config.json of a bench shape, cut to its first `layers` layers."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise ValueError(f"--layers must be 1 to {cfg['num_hidden_layers']} for {shape}, got {layers}")
        cfg["num_hidden_layers"] = layers
    return cfg


# ---- weights ---------------------------------------------------------------------------------

def tensor_shapes(a: ModelArgs, layer: int | None) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of one layer's tensors, routed experts stacked [E, out, in]
    (layer None: the embedding, the final norm and lm_head)."""
    d = a.hidden_size
    if layer is None:
        out = {"model.embed_tokens.weight": (a.vocab_size, d), "model.norm.weight": (d,)}
        if not a.tie_word_embeddings:
            out["lm_head.weight"] = (a.vocab_size, d)
        return out
    p, hd = f"model.layers.{layer}", a.head_dim
    q, kv = a.num_attention_heads * hd, a.num_key_value_heads * hd
    out = {f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,)}
    for name, rows, cols in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
        out[f"{p}.self_attn.{name}.weight"] = (rows, cols)
        if a.attention_bias and name != "o_proj":
            out[f"{p}.self_attn.{name}.bias"] = (rows,)
    if a.use_qk_norm:
        out[f"{p}.self_attn.q_norm.weight"] = out[f"{p}.self_attn.k_norm.weight"] = (hd,)

    def mlp(prefix: str, width: int, lead: tuple[int, ...] = ()):
        out[f"{prefix}.gate_proj.weight"] = out[f"{prefix}.up_proj.weight"] = (*lead, width, d)
        out[f"{prefix}.down_proj.weight"] = (*lead, d, width)

    if a.is_moe_layer(layer):
        E = a.n_routed_experts
        out[f"{p}.mlp.gate.weight"], out[f"{p}.mlp.gate.e_score_correction_bias"] = (E, d), (E,)
        mlp(f"{p}.mlp.experts", a.moe_intermediate_size, (E,))
        mlp(f"{p}.mlp.shared_experts", a.moe_intermediate_size * a.n_shared_experts)
    else:
        mlp(f"{p}.mlp", a.intermediate_size)
    return out


def random_weights(cfg: dict, recipe: str, seed: int = 0, dtype: mx.Dtype = mx.bfloat16):
    """weights(layer) -> {checkpoint name: array}: one layer's random weights (layer None: the
    embedding, final norm and lm_head), linears quantized as `recipe` says. Each tensor has its
    own key, from (seed, name): every call gives the same bytes, so each runtime can have its
    own copy built while the other's is gone. Matrices have unit gain (std 1/sqrt(in)), norm
    weights are near one, the router's correction bias is float32 as in the checkpoints."""
    args = ModelArgs.from_dict(cfg)

    def weights(layer: int | None) -> dict[str, mx.array]:
        out = {}
        for name, shape in tensor_shapes(args, layer).items():
            key = mx.random.key(zlib.crc32(f"{seed}:{name}".encode()))
            module = name.rsplit(".", 1)[0]
            if name.endswith("e_score_correction_bias"):
                out[name] = mx.random.normal(shape, scale=0.01, key=key)
            elif name.endswith("norm.weight"):
                out[name] = (1 + mx.random.normal(shape, scale=0.02, key=key)).astype(dtype)
            elif name.endswith(".bias"):
                out[name] = mx.random.normal(shape, dtype, scale=0.02, key=key)
            else:
                w = mx.random.normal(shape, dtype, scale=shape[-1] ** -0.5, key=key)
                prec = precision(recipe, module, shape[-1])
                if prec.bits:
                    w, scales, biases = mx.quantize(w, prec.group_size, prec.bits)
                    out[module + ".scales"], out[module + ".biases"] = scales, biases
                out[name] = w
            mx.eval(list(out.values()))  # one tensor's temporaries at a time, never a layer in bf16
        return out

    return weights


def _quant_predicate(recipe: str, rename: Callable[[str], str] = lambda p: p):
    def pred(path: str, m: nn.Module):
        if not hasattr(m, "to_quantized"):
            return False
        p = precision(recipe, rename(path), m.weight.shape[-1])
        return {"group_size": p.group_size, "bits": p.bits} if p.bits else False

    return pred


def _load_parts(model: nn.Module, args: ModelArgs, weights, convert: Callable[[str, mx.array], tuple]):
    """Assign every part's weights (one layer at a time), checking names and shapes as strict loading does."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    loaded = set()
    for part in [None, *range(args.num_hidden_layers)]:
        items = [convert(k, v) for k, v in weights(part).items()]
        for k, v in items:
            if expected.get(k) != v.shape:
                raise ValueError(f"bench weights: {k} {v.shape} does not fit the model ({expected.get(k)})")
        model.load_weights(items, strict=False)
        loaded.update(k for k, _ in items)
    if missing := expected.keys() - loaded:
        raise ValueError(f"bench weights: {len(missing)} parameters not given, e.g. {min(missing)}")


def build_mlx_lm(cfg: dict, weights, recipe: str) -> nn.Module:
    """mlx-lm's glm4_moe with the given weights (checkpoint names, experts stacked), as its
    converter leaves them: experts under switch_mlp, the router in the checkpoint's dtype."""
    from mlx_lm.models import glm4_moe

    model = glm4_moe.Model(glm4_moe.ModelArgs.from_dict(cfg))
    nn.quantize(model, class_predicate=_quant_predicate(recipe, lambda p: p.replace(".switch_mlp.", ".experts.")))
    _load_parts(model, ModelArgs.from_dict(cfg), weights, lambda k, v: (k.replace(".experts.", ".switch_mlp."), v))
    model.eval()
    return model


def build_ours(cfg: dict, weights_by_layer_fn, recipe: str) -> Model:
    """Our Model from checkpoint-named weights (experts stacked), quantized per `recipe`, the
    unquantized tensors at the recipe's dtype as convert writes them (mixed: the router in
    float32), then through loading's load-time preparation."""
    args = ModelArgs.from_dict(cfg)
    model = Model(args)
    nn.quantize(model, class_predicate=_quant_predicate(recipe))

    def convert(k: str, v: mx.array):
        p = precision(recipe, k.rsplit(".", 1)[0])
        return k, v.astype(getattr(mx, p.dtype)) if not p.bits and p.dtype != "source" else v

    _load_parts(model, args, weights_by_layer_fn, convert)
    loading.prepare_model(model)
    model.eval()
    mx.eval(model.parameters())
    return model


# ---- what a decode step reads ----------------------------------------------------------------

def weight_bytes_per_token(model: nn.Module, args: ModelArgs) -> int:
    """Weight bytes one decode step reads: every parameter, except that the embedding gives one
    row (unless tied to lm_head) and the routed experts k of E."""
    total = 0
    for name, a in tree_flatten(model.parameters()):
        if name.startswith("model.embed_tokens.") and not args.tie_word_embeddings:
            total += a.nbytes // a.shape[0]
        elif ".experts." in name or ".switch_mlp." in name:
            total += a.nbytes * args.num_experts_per_tok // args.n_routed_experts
        else:
            total += a.nbytes
    return total


def kv_bytes_per_position(cache: list) -> float:
    """KV cache bytes one context position costs, over all layers (from the cache's arrays)."""
    return sum(c.keys.nbytes / c.keys.shape[2] + c.values.nbytes / c.values.shape[2] for c in cache)


def mean_context(context: int, steps: int, rounds: int = 1) -> float:
    """Positions attention reads per step, averaged over `rounds` rounds of `steps` steps that follow
    a warm-up round of `steps` after `context`, all on one cache."""
    return context + steps + steps * (rounds - 1) / 2 + (steps + 1) / 2


def fill_cache(cache: list, args: ModelArgs, context: int, room: int, dtype: mx.Dtype, seed: int) -> list:
    """Give each layer's KV cache `context` random positions, with space for `room` more, as a
    prefill would leave it; the same keys and values for either runtime (both caches have
    .keys, .values [B, H, N, D] and .offset)."""
    if context == 0:
        return cache
    n = -(-(context + room) // 256) * 256  # both caches grow in steps of 256: never inside the timing
    shape = (1, args.num_key_value_heads, n, args.head_dim)
    for i, c in enumerate(cache):
        kk, kv = mx.random.split(mx.random.key(seed * 100003 + i))
        c.keys, c.values = mx.random.normal(shape, dtype, key=kk), mx.random.normal(shape, dtype, key=kv)
        c.offset = context
        mx.eval(c.keys, c.values)
    return cache


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of `a + 1` over a bf16 array of nbytes (read + write), best of `repeats` after a warm-up."""
    a = mx.ones((nbytes // 2,), mx.bfloat16)
    mx.eval(a)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        b = a + 1
        mx.eval(b)
        if i:
            best = min(best, time.perf_counter() - t0)
        del b
    return 2 * a.nbytes / best


# ---- the runtimes ----------------------------------------------------------------------------

def decode_seconds(step: Callable[[mx.array, list], mx.array], cache: list, steps: int) -> float:
    """Seconds for `steps` greedy decode steps from token 1, as mlx_lm.generate_step and
    glm_mlx.generate run them: step n + 1 is built and queued before step n's token is read, so
    the host works while the device does."""
    t0 = time.perf_counter()
    y = mx.argmax(step(mx.array([[1]]), cache)[:, -1:], axis=-1)
    mx.async_eval(y)
    for _ in range(steps - 1):
        nxt = mx.argmax(step(y, cache)[:, -1:], axis=-1)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    return time.perf_counter() - t0


class Runtime(NamedTuple):
    model: nn.Module
    make_cache: Callable[[], list]
    step: Callable[[mx.array, list], mx.array]  # token [1, 1] -> logits [1, 1, V]
    prefill: Callable[[mx.array, list], mx.array]  # prompt [1, T] -> last logits [1, V]
    prefill_note: str


def make_runtime(name: str, cfg: dict, weights, recipe: str) -> Runtime:
    if name == "ours":
        m = build_ours(cfg, weights, recipe)
        return Runtime(m, m.make_cache, lambda y, c: m(y, c, checked=True), lambda t, c: prefill(m, t, c),
                       f"glm_mlx.generate.prefill, chunks of {PREFILL_CHUNK}")
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    m = build_mlx_lm(cfg, weights, recipe)
    chunk = inspect.signature(generate_step).parameters["prefill_step_size"].default

    def prefill_mlx_lm(tokens: mx.array, cache: list) -> mx.array:
        # mlx_lm.generate_step's prompt loop: chunks over all but the last token, each followed
        # by an eval of the cache and clear_cache, then the last token gives the logits.
        while tokens.shape[1] > 1:
            n = min(chunk, tokens.shape[1] - 1)
            m(tokens[:, :n], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
            tokens = tokens[:, n:]
        return m(tokens, cache=cache)[:, -1, :]

    return Runtime(m, lambda: make_prompt_cache(m), lambda y, c: m(y, cache=c), prefill_mlx_lm,
                   f"mlx_lm.generate_step's loop, chunks of {chunk}")


def measure(name: str, cfg: dict, recipe: str, prompts: list[int], contexts: list[int], steps: int,
            seed: int, dtype: mx.Dtype, log: Callable[[str], None], rounds: int = 5) -> tuple[dict, mx.array]:
    """Build one runtime, measure it, and let it go: (its numbers, its logits on the check prompt)."""
    args = ModelArgs.from_dict(cfg)
    t0 = time.perf_counter()
    rt = make_runtime(name, cfg, random_weights(cfg, recipe, seed, dtype), recipe)
    log(f"{name}: built in {time.perf_counter() - t0:.1f} s")
    kv = kv_bytes_per_position(fill_cache(rt.make_cache(), args, 1, 0, dtype, seed))
    mx.reset_peak_memory()
    check = mx.random.randint(0, args.vocab_size, (1, LOGITS_PROMPT), key=mx.random.key(seed + 1))
    logits = rt.model(check).astype(mx.float32)
    mx.eval(logits)
    rec = {"weight_bytes_per_step": weight_bytes_per_token(rt.model, args), "kv_bytes_per_position": kv,
           "prefill_note": rt.prefill_note, "prefill_tps": {}, "decode_tps": {}, "decode_bytes_per_step": {}}

    for T in prompts:
        tokens = mx.random.randint(0, args.vocab_size, (1, T), key=mx.random.key(seed + 2))
        for timed in (False, True):  # new shapes JIT-compile on the GPU: time the second run
            cache = rt.make_cache()
            t0 = time.perf_counter()
            mx.eval(rt.prefill(tokens, cache))
            dt = time.perf_counter() - t0
            del cache
        rec["prefill_tps"][str(T)] = T / dt
        log(f"{name}: prefill {T}: {T / dt:.1f} tok/s")

    rec["decode_rounds"] = {}
    for ctx in contexts:
        gc.collect()
        mx.clear_cache()  # what prefill left in MLX's buffer cache (MLX's CUDA memory is managed:
        # with the 60 GB model on an 80 GB card, that cache pushes pages out to the host)
        cache = fill_cache(rt.make_cache(), args, ctx, steps * (rounds + 1), dtype, seed)
        decode_seconds(rt.step, cache, steps)  # warm-up: new shapes JIT-compile on the GPU
        tps = [steps / decode_seconds(rt.step, cache, steps) for _ in range(rounds)]
        del cache
        # One round of 32 steps on the H100 varied 85-144 tok/s from round to round (BENCHMARKS.md,
        # session 17): the median of several, with all of them kept.
        rec["decode_tps"][str(ctx)] = statistics.median(tps)
        rec["decode_rounds"][str(ctx)] = tps
        rec["decode_bytes_per_step"][str(ctx)] = rec["weight_bytes_per_step"] + kv * mean_context(ctx, steps, rounds)
        log(f"{name}: decode at {ctx}: {statistics.median(tps):.1f} tok/s (median of "
            + " / ".join(f"{v:.1f}" for v in tps) + ")")
    rec["peak_bytes"] = mx.get_peak_memory()
    return rec, logits


def run_bench(shape: str | None = None, layers: int | None = None, recipe: str = "uniform4",
              prompts: list[int] = (512, 4096), contexts: list[int] = (0, 4096, 32768), steps: int = 32,
              rounds: int = 5, runtime: str = "both", seed: int = 0, dtype: str | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Every number of one bench run, as a JSON-ready dict (see the module's docstring)."""
    on_cpu = mx.default_device() == mx.cpu
    shape = shape or ("small" if on_cpu else "air")
    if layers is None and shape == "small":
        layers = 4
    cfg = bench_config(shape, layers)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    if runtime not in ("both", *RUNTIMES):
        raise ValueError(f"unknown runtime {runtime!r} (choose from both, {', '.join(RUNTIMES)})")
    if not prompts and not contexts:
        raise ValueError("nothing to measure: give --prompts or --contexts")
    if min([*prompts, *contexts, steps - 1, rounds - 1]) < 0 or 0 in prompts:
        raise ValueError("prompt lengths, --steps and --rounds must be positive, contexts not negative")
    longest = max([*prompts, *(c + steps + 1 for c in contexts)])
    if longest > cfg["max_position_embeddings"]:
        raise ValueError(f"a prompt or a context of {longest} tokens (with its steps) is above the "
                         f"{cfg['max_position_embeddings']} the {shape} shape allows")
    # CPU quantized matmuls accumulate in the input dtype: bf16 there would make the check noise.
    dtype = dtype or ("float32" if on_cpu else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    names = list(RUNTIMES) if runtime == "both" else [runtime]
    if "mlx-lm" in names:
        try:
            import mlx_lm.models.glm4_moe  # noqa: F401
        except ImportError as e:
            raise ValueError(f"mlx-lm's glm4_moe cannot be imported ({e}): pass --runtime ours") from None

    args = ModelArgs.from_dict(cfg)
    info = mx.device_info()
    out = {"device": f"{mx.default_device()} ({info.get('device_name', '?')})", "shape": shape,
           "layers": args.num_hidden_layers, "recipe": recipe, "dtype": dtype, "seed": seed, "steps": steps,
           "rounds": rounds, "prompts": list(prompts), "contexts": list(contexts), "config": cfg,
           "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")}}
    copy_bytes = 2**26 if on_cpu else 2**31
    out["ceiling_gbps"] = copy_bandwidth(copy_bytes) / 1e9
    out["ceiling_copy_bytes"] = copy_bytes
    mx.clear_cache()
    log(f"copy bandwidth: {out['ceiling_gbps']:.1f} GB/s")

    out["runtimes"], logits = {}, {}
    for name in names:  # one at a time: each peak is its own
        rec, logits[name] = measure(name, cfg, recipe, list(prompts), list(contexts), steps, seed,
                                    getattr(mx, dtype), log, rounds)
        gc.collect()
        mx.clear_cache()
        per_step = rec["decode_bytes_per_step"]
        rec["decode_gbps"] = {c: rec["decode_tps"][c] * per_step[c] / 1e9 for c in per_step}
        rec["decode_pct_of_ceiling"] = {c: 100 * rec["decode_gbps"][c] / out["ceiling_gbps"] for c in per_step}
        rec["ceiling_tps"] = {c: out["ceiling_gbps"] * 1e9 / per_step[c] for c in per_step}
        out["runtimes"][name] = rec

    if len(names) == 2:
        a, b = logits["mlx-lm"], logits["ours"]
        agree = (mx.argmax(a, -1) == mx.argmax(b, -1)).astype(mx.float32).mean()
        out["logits"] = {"positions": LOGITS_PROMPT, "compute_dtype": dtype,
                         "rel_diff": (mx.linalg.norm(b - a) / mx.linalg.norm(a)).item(),
                         "argmax_agreement": agree.item()}
        ours, ref = out["runtimes"]["ours"], out["runtimes"]["mlx-lm"]
        out["ratio"] = {k: {c: ours[k][c] / ref[k][c] for c in ours[k]}
                        for k in ("prefill_tps", "decode_tps", "decode_gbps")}
        out["ratio"]["peak_bytes"] = ours["peak_bytes"] / ref["peak_bytes"]
    return out


# ---- output ----------------------------------------------------------------------------------

def render(r: dict) -> str:
    """The markdown report of a run_bench result."""
    P, C = [str(p) for p in r["prompts"]], [str(c) for c in r["contexts"]]
    who = "ours" if "ours" in r["runtimes"] else "mlx-lm"
    first = r["runtimes"][who]
    env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()) or "MLX's defaults"
    header = (f"{r['device']} ({env}, both runtimes) | shape {r['shape']}, {r['layers']} layers, recipe {r['recipe']}, "
              f"{r['dtype']} | "
              f"ceiling {r['ceiling_gbps']:.1f} GB/s (copy of {r['ceiling_copy_bytes'] / 1e9:.2f} GB) | "
              f"bytes per decode step: {fmt_bytes(first['weight_bytes_per_step'])} of weights + "
              f"{first['kv_bytes_per_position'] / 1e3:.1f} KB per context position ({who})")
    lines = [header, ""]
    head = ([f"prefill {p} tok/s" for p in P] + [f"decode @{c} tok/s" for c in C] + ["peak memory"]
            + [f"GB/s @{c} (% ceiling)" for c in C])
    lines += ["| runtime | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name, x in r["runtimes"].items():
        cells = ([f"{x['prefill_tps'][p]:.1f}" for p in P] + [f"{x['decode_tps'][c]:.1f}" for c in C]
                 + [fmt_bytes(x["peak_bytes"])]
                 + [f"{x['decode_gbps'][c]:.1f} ({x['decode_pct_of_ceiling'][c]:.1f}%)" for c in C])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if q := r.get("ratio"):
        cells = ([f"{q['prefill_tps'][p]:.2f}x" for p in P] + [f"{q['decode_tps'][c]:.2f}x" for c in C]
                 + [f"{q['peak_bytes']:.2f}x"] + [f"{q['decode_gbps'][c]:.2f}x" for c in C])
        lines.append("| ours / mlx-lm | " + " | ".join(cells) + " |")
    cells = [""] * len(P) + [f"{first['ceiling_tps'][c]:.1f}" for c in C] + [""] + [""] * len(C)
    lines.append("| bandwidth ceiling | " + " | ".join(cells) + " |")
    lines.append("")
    for name, x in r["runtimes"].items():
        lines.append(f"prefill ({name}): {x['prefill_note']}, fresh cache, one run after a warm-up")
    lines.append(f"decode: the median of {r['rounds']} rounds of {r['steps']} greedy steps, pipelined (the next "
                 "queued before this one is read), on one KV cache after a warm-up round; the cache filled with "
                 "random keys and values to the context")
    if lg := r.get("logits"):
        lines.append(f"logits, ours vs mlx-lm on the same weights ({lg['positions']} positions, {lg['compute_dtype']}):"
                     f" relative difference {lg['rel_diff']:.2e}, argmax agreement {lg['argmax_agreement']:.3f}")
    return "\n".join(lines)
