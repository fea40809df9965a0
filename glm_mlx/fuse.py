"""Fold LoRA adapters back into the layers they wrap; write the result as a
normal model folder.

A float base gets W + (alpha/rank) * B @ A, rounded to its own dtype. A
quantized base is dequantized, the update added, and the sum quantized again
at the same bits and group size with quantize/quantizer.py, the quantizer
convert used: its scales are rounded to bf16 inside its fit, so the error it
minimises is the error the folder stores (mx.quantize fits float32 scales
that the bf16 folder would round afterwards). For each group the base's own
grid, re-rounded, is kept where it fits the sum better: a zero update then
fuses losslessly, and no group ends worse than with either grid alone.

Re-quantization rounds away any part of the update smaller than half a
quantization step. The report says how much: per module, the relative error
of the stored weight against the exact float sum, and the relative error of
the update actually applied (stored - old) against the LoRA update.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from convert.convert import (
    FORMAT_VERSION,
    MANIFEST,
    copy_file_atomic,
    experts_entry,
    write_json_atomic,
)
from convert.safetensors_io import (
    SafetensorsFile,
    SafetensorsWriter,
    bf16_bits,
    to_float32,
)
from quantize.quantizer import dequantize, pack, quantize

from .loading import load_model, model_key, write_verified_stamp
from .lora import LoRALayer, check_adapter_weights, load_adapter, lora_modules, read_adapter_config

_CODES = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16"}
PARTIAL_MARK = ".glm-mlx-fuse-partial"  # in OUT.partial while fuse builds it: only such a folder is ours to remove
LARGE_UPDATE_ERROR = 0.1  # a tenth of the update lost to rounding: the fused model no longer is base + adapter


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _requantize(exact: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int, gs: int):
    """`exact` [out, in] quantized again: per group, the better of a fresh fit
    and the old grid (scales s, biases b, float32) with its codes re-rounded.
    Returns (packed, scales, biases), scales and biases float32 (bf16 values)."""
    qmax = 2**bits - 1
    g = exact.reshape(*s.shape, gs)
    old_codes = np.clip(np.rint((g - b[..., None]) / s[..., None]), 0, qmax)
    old_err = ((old_codes * s[..., None] + b[..., None] - g) ** 2).sum(-1)
    nq, ns, nb = quantize(exact, bits, gs)
    ns, nb = to_float32(ns, "BF16"), to_float32(nb, "BF16")
    new_codes = dequantize(nq, np.ones_like(ns), np.zeros_like(nb), bits, gs).reshape(g.shape)
    new_err = ((new_codes * ns[..., None] + nb[..., None] - g) ** 2).sum(-1)
    keep = old_err <= new_err
    codes = np.where(keep[..., None], old_codes, new_codes).reshape(exact.shape)
    return pack(codes.astype(np.uint32), bits), np.where(keep, s, ns), np.where(keep, b, nb)


def _fold(layer: LoRALayer) -> dict:
    """Add the layer's update into its base module, in place; the errors."""
    base = layer.base
    a, bm = _f32(layer.lora_a), _f32(layer.lora_b)
    stacked = a.ndim == 3
    quant = "scales" in base
    if quant:
        assert base.mode == "affine", f"cannot re-quantize mode {base.mode!r}"
        w, s, z = np.array(base.weight), _f32(base.scales), _f32(base.biases)
    else:
        w = _f32(base.weight)
    if not stacked:
        a, bm, w = a[None], bm[None], w[None]
        if quant:
            s, z = s[None], z[None]
    parts, sq = [], np.zeros(4)  # |new-exact|^2, |exact|^2, |new-old-delta|^2, |delta|^2
    for e in range(len(a)):  # one expert at a time: temporaries stay one matrix big
        delta = layer.scale * (bm[e] @ a[e])
        if quant:
            old = dequantize(w[e], s[e], z[e], base.bits, base.group_size)
            exact = old + delta
            part = _requantize(exact, s[e], z[e], base.bits, base.group_size)
            new = dequantize(*part, base.bits, base.group_size)
        else:
            old = w[e]
            exact = old + delta
            new = _f32(mx.array(exact).astype(base.weight.dtype))
            part = (new,)
        parts.append(part)
        sq += [np.sum((new - exact) ** 2), np.sum(exact**2), np.sum((new - old - delta) ** 2), np.sum(delta**2)]
    stack = [np.stack(p) if stacked else p[0] for p in zip(*parts)]
    if quant:
        base.weight = mx.array(stack[0])
        base.scales = mx.array(stack[1]).astype(base.scales.dtype)
        base.biases = mx.array(stack[2]).astype(base.biases.dtype)
        kind = f"{base.bits}-bit"
    else:
        base.weight = mx.array(stack[0]).astype(base.weight.dtype)
        kind = str(base.weight.dtype).removeprefix("mlx.core.")
    mx.eval(base.parameters())
    return {"kind": kind, "rel_err": float(np.sqrt(sq[0] / sq[1])),
            "update_err": float(np.sqrt(sq[2] / sq[3])) if sq[3] > 0 else 0.0}


def fuse_model(model: nn.Module) -> dict:
    """Fold every LoRA layer of `model` back into its base layer, in place.

    Returns the report: {"modules": {path: {kind, rel_err, update_err}},
    "worst": the module of largest rel_err, "worst_update": of largest
    update_err}. rel_err: |stored - exact| / |exact|, exact = W + scale*B@A
    in float32; update_err: |(stored - W) - scale*B@A| / |scale*B@A|.
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to fuse")
    modules = {p: _fold(layer) for p, layer in layers}
    model.update_modules(tree_unflatten([(p, layer.base) for p, layer in layers]))
    worst = max(modules, key=lambda p: modules[p]["rel_err"])
    worst_update = max(modules, key=lambda p: modules[p]["update_err"])
    return {"modules": modules, "worst": {"module": worst, **modules[worst]},
            "worst_update": {"module": worst_update, **modules[worst_update]}}


def describe(report: dict) -> str:
    """One line for the terminal."""
    w, u = report["worst"], report["worst_update"]
    return (f"fused {len(report['modules'])} modules; worst stored-weight error {w['rel_err']:.2e} "
            f"({w['module']}, {w['kind']}); worst update error {u['update_err']:.2e} ({u['module']}, {u['kind']})")


def explain(report: dict) -> list[str]:
    """What the worst update error means, and what to do when it is large."""
    u = report["worst_update"]
    lines = [f"update error = |fused - base - update| / |update|: the share of the adapter's change a layer's "
             f"stored weights lost to rounding (0: all kept; 1: as large as the change itself). Worst: "
             f"{u['update_err']:.2e} in {u['module']} ({u['kind']})."]
    if u["update_err"] > LARGE_UPDATE_ERROR:
        lines.append(f"Above {LARGE_UPDATE_ERROR}, the fused model is measurably not the base with the adapter: the "
                     f"{u['kind']} grid cannot hold an update that small. Use the adapter unfused (--adapter when "
                     "you chat or generate), or fuse into a model converted with --quant none, whose float "
                     "weights take the update.")
    else:
        lines.append("That is small: the fused model behaves as the base with the adapter.")
    return lines


def _encode(arr: mx.array, code: str) -> np.ndarray:
    if code == "BF16":
        return np.array(arr.view(mx.uint16)) if arr.dtype == mx.bfloat16 else bf16_bits(_f32(arr))
    if code == "U32":
        return np.array(arr)
    return np.array(arr.astype({"F32": mx.float32, "F16": mx.float16}[code]))


def _write_weights(src: Path, dst: Path, params: dict[str, mx.array], n_layers: int, keep: bool) -> dict:
    """dst: src's tensors, in src's order and layout (so an experts file keeps
    one contiguous range per expert), their values taken from `params`.
    Quantized parts keep their stored dtype; float tensors too with `keep` (the
    model computes the router in float32 whatever it is stored in), else they
    take the model's."""
    f = SafetensorsFile(src)

    def value(name: str) -> mx.array:
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(.+)", name)
        if m:
            return params[model_key(f"{m[1]}.{m[3]}", n_layers)][int(m[2])]
        return params[model_key(name, n_layers)]

    specs = {}
    for name, info in f.tensors.items():
        quantized_part = info.dtype == "U32" or name.endswith((".scales", ".biases"))
        specs[name] = (info.dtype if quantized_part or keep else _CODES[value(name).dtype], info.shape)
    w = SafetensorsWriter(dst, specs, f.metadata)
    try:
        for name, (code, _) in specs.items():
            w.write(name, _encode(value(name), code))
    except BaseException:
        w.abort()
        raise
    size, sha = w.close()
    return {"size": size, "sha256": sha}


def fuse_folder(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                dtype: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Fuse the adapter into the model folder's weights; write a glm-mlx model
    folder at `out_dir` with convert's layout and a manifest of its own.

    dtype: None keeps every tensor's stored dtype (a bf16 folder stays bf16,
    which rounds the update to bf16); "float32" stores float tensors in
    float32, exact. Quantized modules keep their bits and group size.
    The folder is built under `<out_dir>.partial`, manifest last, and renamed
    into place when complete. Returns fuse_model's report plus "out" and
    "fingerprint". Needs memory for the whole model, as loading does.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    # Everything that can be checked before the model loads (minutes at full size) is checked first.
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose another --out")
    if tmp.exists() and not (tmp / PARTIAL_MARK).is_file():
        raise ValueError(f"{tmp}: exists and is not a fuse's unfinished output (fuse builds OUT there); "
                         "move it away or choose another --out")
    check_adapter_weights(adapter_dir, read_adapter_config(adapter_dir))
    if tmp.exists():
        shutil.rmtree(tmp)  # a fuse cut short earlier (its mark says so): never renamed, never loadable
    try:
        (tmp / "weights").mkdir(parents=True)  # before the model loads: OUT's place takes writes
    except OSError as e:
        raise ValueError(f"{out}: cannot write there ({e.strerror}: {e.filename})") from None
    (tmp / PARTIAL_MARK).touch()
    try:
        model, manifest = load_model(model_dir, dtype)
        adapter = load_adapter(model, adapter_dir, manifest)
        report = fuse_model(model)
        log(describe(report))

        params = dict(tree_flatten(model.parameters()))
        files = {}
        for k, rel in enumerate(manifest["files"]):
            if rel.startswith("weights/"):
                files[rel] = _write_weights(model_dir / rel, tmp / rel, params, model.args.num_hidden_layers,
                                             keep=dtype is None)
            else:
                size, sha = copy_file_atomic(model_dir / rel, tmp / rel)
                files[rel] = {"size": size, "sha256": sha}
            log(f"[{k + 1}/{len(manifest['files'])}] {rel}: {files[rel]['size'] / 1e6:.1f} MB")
        experts = {i: experts_entry(tmp / e["file"], e["file"], int(i), e["num_experts"], e["quantization"])
                   for i, e in manifest["experts"].items()}
        fp = hashlib.sha256(f"glm-mlx-fuse/{FORMAT_VERSION}\n{manifest['fingerprint']}\n"
                            f"{adapter['weights']['sha256']}\n{dtype}\n".encode()).hexdigest()
        base = {"fingerprint": manifest["fingerprint"], "model": model_dir.resolve().name}
        if "fused_from" in manifest:
            base["fused_from"] = manifest["fused_from"]
        fused_from = {
            "base": base,
            "adapter": {"path": str(Path(adapter_dir).resolve()), "sha256": adapter["weights"]["sha256"],
                        **{k: adapter[k] for k in ("rank", "alpha", "targets", "modules")}},
            "dtype": dtype,
        }
        new = {**manifest, "fingerprint": fp, "experts": experts, "files": files, "fused_from": fused_from}
        write_json_atomic(tmp / MANIFEST, new)
        write_verified_stamp(tmp, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made above, by this call
        raise
    (tmp / PARTIAL_MARK).unlink()
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {**report, "out": str(out), "fingerprint": fp}
