"""Checkpoint -> glm-mlx model folder, streaming, resumable.

The folder (format version 1):

    config.json, tokenizer files, chat template     copied from the source
    weights/main.safetensors                         embeddings, final norm, lm_head
    weights/layer.NNN.safetensors                    one layer's non-expert weights
    weights/experts.NNN.safetensors                  one layer's routed experts
    glm_mlx.json                                     the manifest, written last

Layers N .. N+mtp-1 are the MTP layers (an MTP layer's copy of the embedding
that is byte for byte the trunk's is left out: the layer reads the trunk's).
Tensor names are the Hugging Face checkpoint's; a quantized weight W is
stored as W (uint32), W's `scales` and `biases` (bf16), MLX's affine layout.
In an experts file the tensors are ordered expert by expert, so expert e of
a layer is the one byte range [data_start + e*stride, data_start + (e+1)*stride):
one read fetches it.

Memory: one layer's non-expert weights, or one expert, at a time. Every file
is written under a temporary name and renamed when complete; a progress file
records each finished file's size and sha256, so a rerun verifies and skips
them. The manifest, written last, is what makes the folder loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from glm_mlx.loading import write_verified_stamp
from quantize.quantizer import dequantize, quantize
from quantize.recipes import DEFAULT_RECIPE, RECIPES, SOURCE, group_of, precision

from .checkpoint import SMALL_FILES, Checkpoint, CheckpointError, Quantized, read_json
from .lock import LOCK, writing
from .safetensors_io import (
    SafetensorsFile,
    SafetensorsWriter,
    bf16_bits,
    sha256_file,
    write_safetensors,
)

FORMAT_VERSION = 1
MANIFEST = "glm_mlx.json"
PROGRESS = ".glm_mlx_progress.json"
COPIED = ("config.json", *SMALL_FILES)
PROJS = ("gate_proj", "up_proj", "down_proj")
FLOAT_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class ConvertError(ValueError):
    pass


# -- what each tensor becomes ---------------------------------------------------

def _target(ckpt: Checkpoint, recipe: str, name: str, module: str) -> tuple:
    """("q", bits, group_size) or ("f", dtype code) for a weight."""
    shape = ckpt.shape(name)
    src = ckpt.quant_of(name)
    p = precision(recipe, module, shape[-1] if len(shape) == 2 else None)
    if len(shape) != 2 and p.bits:  # norms and biases of a quantized group keep their precision
        p = SOURCE
    if src:  # never re-quantize to more bits than the source has
        return ("q", p.bits, p.group_size) if p.bits and p.bits < src[0] else ("q", *src)
    if p.bits:
        return ("q", p.bits, p.group_size)
    if p.dtype == "source" and group_of(module) == "router":
        # as the source holds it, exactly: a dequantized router (fp8 times a scale) stays float32,
        # where bf16 would round it (a flipped expert choice costs more than any rounding)
        return ("f", ckpt.exact_dtype(name))
    return ("f", ckpt.dtype(name) if p.dtype == "source" else FLOAT_CODES[p.dtype])


def _specs(name: str, shape: tuple[int, ...], target: tuple) -> dict[str, tuple[str, tuple]]:
    if target[0] == "f":
        return {name: (target[1], tuple(shape))}
    _, bits, gs = target
    out, inp = shape
    base = name[: -len(".weight")]
    return {name: ("U32", (out, inp * bits // 32)), f"{base}.scales": ("BF16", (out, inp // gs)),
            f"{base}.biases": ("BF16", (out, inp // gs))}


def _encode(name: str, x: np.ndarray | Quantized, target: tuple) -> dict[str, np.ndarray]:
    if target[0] == "f":
        if isinstance(x, Quantized):
            x = dequantize(x.weight, x.scales, x.biases, x.bits, x.group_size)
        code = target[1]
        return {name: bf16_bits(x) if code == "BF16" else x.astype({"F32": np.float32, "F16": np.float16}[code])}
    _, bits, gs = target
    base = name[: -len(".weight")]
    if isinstance(x, Quantized) and (x.bits, x.group_size) == (bits, gs):
        w, s, b = x.weight, bf16_bits(x.scales), bf16_bits(x.biases)
    else:
        if isinstance(x, Quantized):
            x = dequantize(x.weight, x.scales, x.biases, x.bits, x.group_size)
        w, s, b = quantize(x, bits, gs)
    return {name: w, f"{base}.scales": s, f"{base}.biases": b}


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


# -- the plan: one entry per output file ----------------------------------------

def _dense_file(ckpt, recipe, names) -> Callable[[Path], tuple[int, str]]:
    def write(path: Path):
        tensors = {}
        for n in sorted(names):
            t = _target(ckpt, recipe, n, _module(n))
            enc = _encode(n, ckpt.read(n), t)
            spec = _specs(n, ckpt.shape(n), t)
            tensors.update({k: (spec[k][0], spec[k][1], enc[k]) for k in spec})
        return write_safetensors(path, tensors, {"format": "mlx"})
    return write


def _experts_layout(ckpt, recipe, layer: int):
    E = ckpt.args.n_routed_experts
    specs, targets = {}, {}
    for e in range(E):
        for p in PROJS:
            n = f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
            targets[n] = t = _target(ckpt, recipe, n, f"model.layers.{layer}.mlp.experts")
            specs.update(_specs(n, ckpt.shape(n), t))
    return specs, targets


def _experts_file(ckpt, recipe, layer: int) -> Callable[[Path], tuple[int, str]]:
    def write(path: Path):
        specs, targets = _experts_layout(ckpt, recipe, layer)
        w = SafetensorsWriter(path, specs, {"format": "mlx"})
        try:
            for n, t in targets.items():
                for k, arr in _encode(n, ckpt.read(n), t).items():
                    w.write(k, arr)
        except BaseException:
            w.abort()
            raise
        return w.close()
    return write


def experts_entry(path: Path, rel: str, layer: int, num_experts: int, quant: dict) -> dict:
    """The manifest's description of a written experts file, read off its
    header: expert e is bytes [data_start + e*stride, data_start + (e+1)*stride)."""
    f = SafetensorsFile(path)
    first = f"model.layers.{layer}.mlp.experts.0."
    parts = {k[len(first):]: v for k, v in f.tensors.items() if k.startswith(first)}
    start = min(v.start for v in parts.values())
    stride = sum(v.nbytes for v in parts.values())
    crc = []
    with open(path, "rb") as fh:
        for e in range(num_experts):  # the layout the offloader relies on, checked
            mine = [v for k, v in f.tensors.items() if k.startswith(f"model.layers.{layer}.mlp.experts.{e}.")]
            assert min(v.start for v in mine) == start + e * stride and sum(v.nbytes for v in mine) == stride
            # a crc32 per expert: what an offloaded read is checked against
            crc.append(zlib.crc32(os.pread(fh.fileno(), stride, start + e * stride)))
    return {"file": rel, "num_experts": num_experts, "data_start": start, "stride": stride,
            "parts": {k: {"dtype": v.dtype, "shape": list(v.shape), "offset": v.start - start}
                      for k, v in parts.items()},
            "quantization": quant, "crc32": crc}


def plan(ckpt: Checkpoint, recipe: str):
    """[(relative path, writer)] for every weights file, and the quantized
    non-expert modules {module: {bits, group_size}}."""
    a = ckpt.args
    n_layers = a.num_hidden_layers + ckpt.mtp_layers
    layer_names = {i: [] for i in range(n_layers)}
    main = []
    for n in ckpt.names:
        if n.startswith("model.layers."):
            i = int(n.split(".")[2])
            if i in layer_names and ".mlp.experts." not in n:
                layer_names[i].append(n)
        else:
            main.append(n)
    for i in range(a.num_hidden_layers, n_layers):
        copy = f"model.layers.{i}.embed_tokens.weight"
        if copy in layer_names[i] and ckpt.same_bytes(copy, "model.embed_tokens.weight"):
            # the MTP layer's embedding, byte for byte the trunk's: stored once (the MTP layer
            # then reads the trunk's, as it does where a checkpoint has no copy)
            layer_names[i].remove(copy)
    files = [("weights/main.safetensors", _dense_file(ckpt, recipe, main))]
    for i in range(n_layers):
        files.append((f"weights/layer.{i:03d}.safetensors", _dense_file(ckpt, recipe, layer_names[i])))
        if i >= a.num_hidden_layers or a.is_moe_layer(i):
            files.append((f"weights/experts.{i:03d}.safetensors", _experts_file(ckpt, recipe, i)))
    quant = {}
    for n in sorted(main + sum(layer_names.values(), [])):
        t = _target(ckpt, recipe, n, _module(n))
        if t[0] == "q":
            quant[_module(n)] = {"bits": t[1], "group_size": t[2]}
    return files, quant


# -- driving it ------------------------------------------------------------------

def fingerprint(ckpt: Checkpoint, recipe: str, identity: dict) -> str:
    """What a finished or unfinished folder is a conversion of: the recipe, the source's identity
    (Checkpoint.identity: its files' sizes and sampled hashes) and its tensors."""
    h = hashlib.sha256(f"glm-mlx/{FORMAT_VERSION}/{recipe}\n".encode())
    h.update(json.dumps(identity, sort_keys=True).encode())
    for name in sorted(ckpt.files):
        f = ckpt.files[name]
        for t, info in sorted(f.tensors.items()):
            h.update(f"{t}:{info.dtype}:{info.shape}\n".encode())
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def copy_file_atomic(src: Path, dst: Path) -> tuple[int, str]:
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst.stat().st_size, sha256_file(dst)


def _progress(path: Path) -> dict:
    """An unfinished conversion's progress file, its types checked."""
    state = _read(path)
    files = state.get("files") if isinstance(state, dict) else None
    if not (isinstance(files, dict) and isinstance(state.get("fingerprint"), str) and all(
            isinstance(r, dict) and type(r.get("size")) is int and isinstance(r.get("sha256"), str)
            for r in files.values())):
        raise ConvertError(f"{path}: not a progress file glm-mlx wrote; delete {path.parent} to start over")
    return state


def _read(path: Path):
    try:
        return read_json(path)
    except CheckpointError as e:
        raise ConvertError(f"{e}; delete {path.parent} to start over") from None


def _other(out: Path, what: str, recorded: dict, recipe: str) -> ConvertError:
    """The refusal for a folder holding a conversion of another source or recipe."""
    if recorded.get("recipe") not in (None, recipe):
        why = f"recipe {recorded['recipe']!r}, not {recipe!r}"
    else:  # a folder an earlier glm-mlx wrote has no record of its source to compare
        why = "another source" if recorded.get("source") else "a source it has no record of (an older glm-mlx)"
    return ConvertError(f"{out}: holds {what} of {why}; choose another --out, or delete {out} to start over")


def convert(source_dir: str | Path, out: str | Path, recipe: str = DEFAULT_RECIPE, *,
            source_info: dict | None = None, log: Callable[[str], None] = lambda s: None) -> Path:
    """Convert a local checkpoint folder into a glm-mlx model folder at `out`."""
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    try:
        ckpt = Checkpoint(source_dir)  # every check of the source, before anything is written
        identity = ckpt.identity()
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    out = Path(out)
    fp = fingerprint(ckpt, recipe, identity)
    state_path, manifest_path = out / PROGRESS, out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: is a file; --out names the model folder to write")
    ours = manifest_path.exists() or state_path.exists()
    if out.exists() and not ours and any(p.name != LOCK for p in out.iterdir()):
        raise ConvertError(f"{out}: exists and is not an unfinished conversion; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{out}: cannot create the folder ({e.strerror})") from None
    with writing(out):  # what is in the folder now, no one else changes until we are done
        if manifest_path.exists():
            m = _read(manifest_path)
            if not isinstance(m, dict):
                raise ConvertError(f"{manifest_path}: not a JSON object; delete {out} to start over")
            if m.get("fingerprint") == fp:
                log(f"{out}: already converted")
                log(summary(out))
                return out
            recipe_of, source_of = m.get("recipe"), m.get("source")
            recorded = {"recipe": recipe_of.get("name") if isinstance(recipe_of, dict) else None,
                        "source": source_of.get("files") if isinstance(source_of, dict) else None}
            raise _other(out, "a finished conversion", recorded, recipe)
        state = _progress(state_path) if state_path.exists() else {"fingerprint": fp, "recipe": recipe,
                                                                    "source": identity, "files": {}}
        if state["fingerprint"] != fp:
            raise _other(out, "an unfinished conversion", state, recipe)
        _write(ckpt, out, recipe, fp, identity, state, source_info, log)
    log(summary(out))
    return out


def summary(out: Path) -> str:
    """The folder's size on disk and its bits per weight."""
    from quantize.quality import weight_bits

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    stored, params = weight_bits(out)
    on_disk = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    return (f"{out}: {on_disk} on disk, {stored / params:.2f} bits per weight "
            "(tensor bytes over parameters, the MTP layer left out)")


def _write(ckpt: Checkpoint, out: Path, recipe: str, fp: str, identity: dict, state: dict,
           source_info: dict | None, log: Callable[[str], None]) -> None:
    state_path, manifest_path = out / PROGRESS, out / MANIFEST
    (out / "weights").mkdir(exist_ok=True)
    done: dict = state["files"]
    weight_files, quant_map = plan(ckpt, recipe)

    def finished(rel: str) -> bool:
        rec, p = done.get(rel), out / rel
        return bool(rec) and p.is_file() and p.stat().st_size == rec["size"] and sha256_file(p) == rec["sha256"]

    jobs = [(rel, (lambda r=rel: copy_file_atomic(ckpt.file(r), out / r)))
            for rel in COPIED if (ckpt.folder / rel).is_file()]
    jobs += [(rel, (lambda r=rel, w=write: w(out / r))) for rel, write in weight_files]
    for k, (rel, job) in enumerate(jobs):
        if finished(rel):
            log(f"[{k + 1}/{len(jobs)}] {rel}: done, verified, skipped")
            continue
        size, sha = job()
        done[rel] = {"size": size, "sha256": sha}
        write_json_atomic(state_path, state)
        log(f"[{k + 1}/{len(jobs)}] {rel}: {size / 1e6:.1f} MB")

    experts = {}
    for rel, _ in weight_files:
        if rel.startswith("weights/experts."):
            i = int(rel.split(".")[1])
            quant = {}
            for p in PROJS:  # an mlx-lm mixed_4_6 source has 6-bit down and 4-bit gate/up
                t = _target(ckpt, recipe, f"model.layers.{i}.mlp.experts.0.{p}.weight", f"model.layers.{i}.mlp.experts")
                quant[p] = {"bits": t[1], "group_size": t[2]} if t[0] == "q" else None
            experts[str(i)] = experts_entry(out / rel, rel, i, ckpt.args.n_routed_experts, quant)
    manifest = {
        "format": "glm-mlx", "format_version": FORMAT_VERSION, "fingerprint": fp,
        "source": {"kind": ckpt.kind, **(source_info or {"path": str(ckpt.folder)}), "files": identity},
        "recipe": {"name": recipe, "groups": {g: p.to_json() for g, p in RECIPES[recipe].items()}},
        "mtp_layers": ckpt.mtp_layers,
        "quantization": quant_map,
        "experts": experts,
        "files": {rel: done[rel] for rel, _ in jobs},
    }
    write_json_atomic(manifest_path, manifest)
    write_verified_stamp(out, manifest["files"])  # every byte was hashed as it was written
    state_path.unlink()
