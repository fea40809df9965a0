"""Load a glm-mlx model folder: check it, build the model, assign the weights.

Checkpoint names become model names here and only here (`model_key`): the
MTP layer `model.layers.{N}` becomes `mtp.0`, and a layer's routed experts,
stored one contiguous byte range per expert, are stacked into [E, ...]
arrays (`read_experts`, which is also where offloading hooks in).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from convert.lock import refuse_if_being_written
from convert.safetensors_io import sha256_file as _sha256

from .config import ModelArgs
from .model import Model, Router

MANIFEST = "glm_mlx.json"
VERIFIED = ".glm_mlx_verified.json"
FORMAT_VERSION = 1
# how a stored dtype code is held in numpy (bf16 as its uint16 bits)
STORED_DTYPES = {"U32": np.uint32, "BF16": np.uint16, "F32": np.float32, "F16": np.float16}
MX_DTYPES = {"U32": mx.uint32, "BF16": mx.bfloat16, "F32": mx.float32, "F16": mx.float16}  # what each holds


def stored_array(arr: np.ndarray, code: str) -> mx.array:
    """A stored tensor read with numpy (bf16 as its uint16 bits) as the MLX array it holds."""
    a = mx.array(arr)
    return a.view(mx.bfloat16) if code == "BF16" else a
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


class ModelFolderError(ValueError):
    """A model folder that must not be loaded; the message says why."""


def model_key(name: str, num_hidden_layers: int) -> str:
    """Checkpoint tensor name -> parameter path in `Model`."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m and int(m[1]) >= num_hidden_layers:
        rest = m[2]
        if rest.split(".")[0] in _LAYER_PARTS:
            rest = "layer." + rest
        return f"mtp.{int(m[1]) - num_hidden_layers}.{rest}"
    return name


def verify_folder(folder: Path) -> dict:
    """The manifest, once every file it lists has the right size and sha256.

    Hashing a 60 GB folder takes a minute, so a file whose (size, mtime)
    matches the stamp left by the last successful check is not re-hashed;
    any write to a file changes its mtime and brings the check back.
    """
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    if not mpath.is_file():
        raise ModelFolderError(
            f"{folder}: no {MANIFEST}: not a glm-mlx model folder, or its conversion did not finish "
            "(run glm-mlx convert again to complete it)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelFolderError(f"{mpath}: corrupt manifest") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{mpath}: format version {manifest.get('format_version')} "
                               f"is not {FORMAT_VERSION}; convert the model again")
    try:
        stamp = json.loads((folder / VERIFIED).read_text())
    except (OSError, json.JSONDecodeError):
        stamp = {}
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            raise ModelFolderError(f"{p}: missing (listed in the manifest)")
        st = p.stat()
        if st.st_size != rec["size"]:
            raise ModelFolderError(f"{p}: size {st.st_size} bytes, the manifest says {rec['size']}")
        if stamp.get(rel) != _stamp_key(p, rec) and _sha256(p) != rec["sha256"]:
            raise ModelFolderError(f"{p}: checksum does not match the manifest (file is corrupt)")
    write_verified_stamp(folder, files, stamp)
    return manifest


def _stamp_key(path: Path, rec: dict) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, rec["sha256"]]


def write_verified_stamp(folder: Path, files: dict, old: dict | None = None) -> None:
    """Record that `files` ({rel: {size, sha256}}) were verified as they are now.
    The converter calls it too: it hashed every byte as it wrote it."""
    stamp = {rel: _stamp_key(folder / rel, rec) for rel, rec in files.items()}
    if stamp != old:
        with contextlib.suppress(OSError):  # a read-only folder is verified again next time, nothing worse
            (folder / VERIFIED).write_text(json.dumps(stamp))


def read_experts(folder: Path, entry: dict) -> dict[str, mx.array]:
    """A layer's experts file as stacked arrays {"gate_proj.weight": [E, ...], ...}."""
    E, stride, start = entry["num_experts"], entry["stride"], entry["data_start"]
    raw = np.memmap(folder / entry["file"], dtype=np.uint8, mode="r")
    out = {}
    for part, spec in entry["parts"].items():
        dt, shape = np.dtype(STORED_DTYPES[spec["dtype"]]), tuple(spec["shape"])
        nbytes = int(np.prod(shape)) * dt.itemsize
        first = start + spec["offset"]
        rows = np.lib.stride_tricks.as_strided(raw[first:], shape=(E, nbytes), strides=(stride, 1))
        out[part] = stored_array(np.ascontiguousarray(rows).view(dt).reshape(E, *shape), spec["dtype"])
    return out


def expert_bytes(manifest: dict) -> int:
    return sum(e["stride"] * e["num_experts"] for e in manifest["experts"].values())


def prepare_model(model: Model) -> None:
    """Load-time preparation: each router's weight and correction bias in float32, the dtype it
    computes in (as transformers' does, casting on every call): cast once here rather than on every
    token (an op per layer per token; 4 bytes instead of 2 a weight, 1 MB a layer for the Air)."""
    for _, m in model.named_modules():
        if isinstance(m, Router):
            m.weight = m.weight.astype(mx.float32)
            m.e_score_correction_bias = m.e_score_correction_bias.astype(mx.float32)


def load_model(path: str | Path, dtype: str | None = None, expert_memory: str | int | None = None,
               reserve: int = 0, prefetch: bool | None = None) -> tuple[Model, dict]:
    """(model, manifest). `expert_memory` (bytes, "24GB", "auto"): routed experts
    never occupy more than that; the rest are read from the folder on demand.
    `reserve`: bytes "auto" leaves free beyond its own reserve (a training step's).
    `prefetch`: offloaded banks read the next layer's guessed experts ahead (None: offload.PREFETCH)."""
    from .offload import offload_experts, parse_size

    folder = Path(path)
    refuse_if_being_written(folder)
    manifest = verify_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = manifest.get("mtp_layers", 0)
    args = ModelArgs.from_dict(config)
    n = args.num_hidden_layers
    resident = sum(r["size"] for f, r in manifest["files"].items() if f.startswith("weights/")
                   and not f.startswith("weights/experts."))
    smallest = sum(e["stride"] for e in manifest["experts"].values())  # one expert per layer
    total = expert_bytes(manifest)
    budget = parse_size(expert_memory, total, resident + reserve, smallest)
    offloaded = budget is not None and budget < total and manifest["experts"]
    weights = []
    for rel in manifest["files"]:
        if rel.startswith("weights/") and not rel.startswith("weights/experts."):
            weights += [(model_key(k, n), v) for k, v in mx.load(str(folder / rel)).items()]
    for i, entry in manifest["experts"].items() if not offloaded else ():
        weights += [(model_key(f"model.layers.{i}.mlp.experts.{k}", n), v)
                    for k, v in read_experts(folder, entry).items()]
    model = Model(args, mtp_own_embed=any(k.startswith("mtp.0.embed_tokens.") for k, _ in weights))

    qmap = {model_key(m, n): q for m, q in manifest["quantization"].items()}
    for i, entry in manifest["experts"].items():
        for p, q in entry["quantization"].items():
            if q:
                qmap[model_key(f"model.layers.{i}.mlp.experts.{p}", n)] = q
    nn.quantize(model, class_predicate=lambda p, m: qmap.get(p, False))
    if dtype is not None:
        dt = getattr(mx, dtype)
        weights = [(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights]
    if offloaded:
        offload_experts(model, folder, manifest, budget, getattr(mx, dtype) if dtype else None, prefetch)
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise ModelFolderError(f"{folder}: weights do not match the config ({e})") from None
    prepare_model(model)
    model.eval()
    mx.eval(model.parameters())
    return model, manifest
