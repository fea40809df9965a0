"""Load a glm-mlx model folder: check it, build the model, assign the weights.

Checkpoint names become model names here and only here (`model_key`): the
MTP layer `model.layers.{N}` becomes `mtp.0`, and a layer's routed experts,
stored one contiguous byte range per expert, are stacked into [E, ...]
arrays (`read_experts`, which is also where offloading hooks in).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

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


MAX_JSON = 64 << 20  # a manifest, config or tokenizer config larger than this is not one (Air's manifest: 0.1 MB)
QUANT_BITS, QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)
PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PART = re.compile(r"(gate|up|down)_proj\.(weight|scales|biases)")


def read_json(path: Path, what: str = "JSON"):
    """A JSON file's value; a file too large, not UTF-8 or not JSON is a ModelFolderError naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON:
            raise ModelFolderError(f"{path}: {size} bytes, too large for {what}")
        return json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({str(e)[:200]})") from None


def _int(v, where: str, low: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ModelFolderError(f"{where} must be an integer of at least {low}, not {v!r}"[:300])
    return v


def _obj(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise ModelFolderError(f"{where} must be an object, not {v!r}"[:300])
    return v


def _quant(q, where: str) -> None:
    _obj(q, where)
    if q.get("bits") not in QUANT_BITS or isinstance(q.get("bits"), bool) or q.get("group_size") not in QUANT_GROUPS:
        raise ModelFolderError(f"{where}: bits {q.get('bits')!r} and group_size {q.get('group_size')!r} are not "
                               f"a quantization MLX has (bits {QUANT_BITS}, group_size {QUANT_GROUPS})"[:300])


def confined(folder: Path, rel, where: str) -> Path:
    """folder / rel, where rel is a relative path that stays inside the folder, links followed."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise ModelFolderError(f"{where}: {rel!r} is not a relative path")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise ModelFolderError(f"{where}: {rel!r} is outside the model folder")
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ModelFolderError(f"{where}: {rel!r} is a link to {path.resolve()}, outside the model folder")
    return path


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, its every field of the type and range loading relies on and every path it
    names inside the folder and listed in `files` (ModelFolderError naming the manifest otherwise)."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    if not mpath.is_file():
        raise ModelFolderError(
            f"{folder}: no {MANIFEST}: not a glm-mlx model folder, or its conversion did not finish "
            "(run glm-mlx convert again to complete it)")
    m = _obj(read_json(mpath, "a manifest"), str(mpath))
    if m.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{mpath}: format version {m.get('format_version')!r} "
                               f"is not {FORMAT_VERSION}; convert the model again"[:300])
    if not isinstance(m.get("fingerprint"), str):
        raise ModelFolderError(f"{mpath}: fingerprint must be a string")
    files = _obj(m.get("files"), f"{mpath}: files")
    for rel, rec in files.items():
        confined(folder, rel, f"{mpath}: files")
        _int(_obj(rec, f"{mpath}: files[{rel!r}]").get("size"), f"{mpath}: files[{rel!r}].size")
        if not re.fullmatch(r"[0-9a-f]{64}", str(rec.get("sha256"))):
            raise ModelFolderError(f"{mpath}: files[{rel!r}].sha256 is not a sha256")
    if "config.json" not in files:
        raise ModelFolderError(f"{mpath}: config.json is not listed in files")
    _int(m.setdefault("mtp_layers", 0), f"{mpath}: mtp_layers")
    for mod, q in _obj(m.get("quantization"), f"{mpath}: quantization").items():
        _quant(q, f"{mpath}: quantization[{mod!r}]")
    used = set()
    for i, entry in _obj(m.get("experts"), f"{mpath}: experts").items():
        where = f"{mpath}: experts[{i!r}]"
        if not re.fullmatch(r"0|[1-9]\d{0,5}", i):
            raise ModelFolderError(f"{where}: not a layer number")
        _obj(entry, where)
        rel = entry.get("file")
        confined(folder, rel, f"{where}.file")
        if rel not in files:
            raise ModelFolderError(f"{where}.file: {rel} is not listed in files (it would never be checked)")
        if rel in used:
            raise ModelFolderError(f"{where}.file: {rel} is another layer's experts file")
        used.add(rel)
        check_experts_entry(entry, files[rel]["size"], where)
        quant = _obj(entry.get("quantization"), f"{where}.quantization")
        if set(quant) != set(PROJS):
            raise ModelFolderError(f"{where}.quantization must name {', '.join(PROJS)}, not {sorted(quant)}"[:300])
        for p, q in quant.items():
            if q is not None:
                _quant(q, f"{where}.quantization[{p!r}]")
    return m


def check_experts_entry(entry: dict, size: int, where: str) -> None:
    """An experts entry's numbers as read_experts and the offloader use them: integers, every expert's bytes
    and every part within them inside the file's `size` bytes, parts not overlapping. Before any memmap,
    as_strided or pread, so that no number in a manifest reads past a file or from its end."""
    E = _int(entry.get("num_experts"), f"{where}.num_experts", 1)
    stride = _int(entry.get("stride"), f"{where}.stride", 1)
    start = _int(entry.get("data_start"), f"{where}.data_start")
    if start + E * stride > size:
        raise ModelFolderError(f"{where}: {E} experts of {stride} bytes from byte {start} end past the "
                               f"file's {size} bytes")
    end = 0
    parts = _obj(entry.get("parts"), f"{where}.parts")
    if not parts:
        raise ModelFolderError(f"{where}.parts is empty")
    for part, spec in sorted(parts.items(), key=lambda kv: kv[1].get("offset", 0) if isinstance(kv[1], dict) else 0):
        pw = f"{where}.parts[{part!r}]"
        if not EXPERT_PART.fullmatch(part):
            raise ModelFolderError(f"{pw}: not an expert's weight, scales or biases")
        _obj(spec, pw)
        if spec.get("dtype") not in STORED_DTYPES:
            raise ModelFolderError(f"{pw}.dtype {spec.get('dtype')!r} is not one of {', '.join(STORED_DTYPES)}"[:300])
        shape = spec.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2:
            raise ModelFolderError(f"{pw}.shape must be a list of one or two sizes, not {shape!r}"[:300])
        n = np.dtype(STORED_DTYPES[spec["dtype"]]).itemsize
        for d in shape:
            n *= _int(d, f"{pw}.shape", 1)
        offset = _int(spec.get("offset"), f"{pw}.offset")
        if offset < end or offset + n > stride:
            raise ModelFolderError(f"{pw}: bytes {offset}..{offset + n} overlap another part or leave the "
                                   f"expert's {stride}")
        end = offset + n
    crc = entry.get("crc32")
    if crc is not None and (not isinstance(crc, list) or len(crc) != E or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 32 for c in crc)):
        raise ModelFolderError(f"{where}.crc32 must be one 32-bit checksum per expert ({E})")


def _stamp_key(path: Path, rec: dict) -> list:
    """What the fast path compares: a write changes the mtime, a replacement the inode, and `touch -d`,
    which sets the mtime back, still moves the ctime (which nothing but the clock sets back)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns, rec["sha256"]]


def _read_stamp(folder: Path) -> dict:
    try:
        stamp = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):  # none yet, or not ours: every file is hashed again
        return {}
    return stamp if isinstance(stamp, dict) else {}


def file_problem(folder: Path, rel: str, rec: dict, stamp: dict | None = None) -> str | None:
    """Why the file `rel` is not as the manifest says (missing, size, sha256), or None. With `stamp`
    (the last check's), a file unchanged since (size, mtime, inode, ctime) is not hashed again."""
    p = folder / rel
    if not p.is_file():
        return f"{p}: missing (listed in the manifest)"
    size = p.stat().st_size
    if size != rec["size"]:
        return f"{p}: size {size} bytes, the manifest says {rec['size']}"
    if stamp is not None and stamp.get(rel) == _stamp_key(p, rec):
        return None
    if _sha256(p) != rec["sha256"]:
        return f"{p}: checksum does not match the manifest (file is corrupt)"
    return None


def unlisted(folder: Path, files: dict) -> list[str]:
    """Files loading reads that the manifest does not list (put there after conversion, never checked)."""
    from convert.convert import COPIED  # (convert imports this module)

    return [f"{folder / rel}: not listed in the manifest (added after conversion?)"
            for rel in COPIED if rel not in files and (folder / rel).exists()]


def verify_folder(folder: Path) -> dict:
    """The manifest, once it is well-formed and every file it lists has the right size and sha256.

    Hashing a 60 GB folder takes a minute, so a file whose (size, mtime, inode, ctime) matches the stamp
    left by the last successful check is not re-hashed: any write to a file or replacement of it changes
    one of those. `glm-mlx verify` hashes every byte whatever the stamp says (full_check).
    """
    manifest = read_manifest(folder)
    files, stamp = manifest["files"], _read_stamp(folder)
    for problem in unlisted(folder, files):
        raise ModelFolderError(problem)
    for rel, rec in files.items():
        if problem := file_problem(folder, rel, rec, stamp):
            raise ModelFolderError(problem)
    write_verified_stamp(folder, files, stamp)
    return manifest


def full_check(folder: Path) -> list[str]:
    """Every problem of a model folder, one line each, hashing every byte whatever the stamp says: the
    manifest, each file's size and sha256, each expert's crc32, the config. The stamp is written anew for
    the files that passed (none of those that did not will pass the fast path)."""
    try:
        manifest = read_manifest(folder)
    except ModelFolderError as e:
        return [str(e)]
    files, passed = manifest["files"], {}
    problems = unlisted(folder, files)
    for rel, rec in files.items():
        if problem := file_problem(folder, rel, rec):
            problems.append(problem)
        else:
            passed[rel] = rec
    for i, entry in manifest["experts"].items():
        if entry["file"] in passed and entry.get("crc32") is not None:
            with open(folder / entry["file"], "rb") as f:
                for e, crc in enumerate(entry["crc32"]):
                    if zlib.crc32(os.pread(f.fileno(), entry["stride"], entry["data_start"] + e * entry["stride"])) != crc:
                        problems.append(f"{folder / entry['file']}: expert {e} does not match the manifest's crc32")
    if "config.json" in passed:
        try:
            read_config(folder, manifest)
        except ValueError as e:
            problems.append(str(e))
    write_verified_stamp(folder, passed, _read_stamp(folder))
    return problems


def write_verified_stamp(folder: Path, files: dict, old: dict | None = None) -> None:
    """Record that `files` ({rel: {size, sha256}}) were verified as they are now, and only they. The
    converter calls it too: it hashed every byte as it wrote it."""
    stamp = {rel: _stamp_key(folder / rel, rec) for rel, rec in files.items()}
    if stamp != old:
        with contextlib.suppress(OSError):  # a read-only folder is verified again next time, nothing worse
            (folder / VERIFIED).write_text(json.dumps(stamp))


def read_experts(folder: Path, entry: dict) -> dict[str, mx.array]:
    """A layer's experts file as stacked arrays {"gate_proj.weight": [E, ...], ...}."""
    path = folder / entry["file"]
    check_experts_entry(entry, path.stat().st_size, str(path))  # the file as it is, whatever the manifest said
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    E, stride, start = entry["num_experts"], entry["stride"], entry["data_start"]
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


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16,
          "fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


def compute_dtype(dtype: str | None) -> mx.Dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose float32, bfloat16 or float16 (fp32, bf16, fp16)")
    return DTYPES[dtype]


def read_config(folder: Path, manifest: dict) -> ModelArgs:
    path = folder / "config.json"
    config = _obj(read_json(path, "a config"), f"{path}: the config")
    config["num_nextn_predict_layers"] = manifest["mtp_layers"]
    return ModelArgs.from_dict(config, source=str(path))


def read_weights(folder: Path, manifest: dict, n: int) -> list[tuple[str, mx.array]]:
    """The non-expert tensors of every weights file (lazily: nothing is read until evaluated), by model name."""
    experts = {e["file"] for e in manifest["experts"].values()}
    weights, seen = [], {}
    for rel in manifest["files"]:
        if rel.startswith("weights/") and rel not in experts:
            try:
                tensors = mx.load(str(folder / rel))
            except (RuntimeError, ValueError) as e:
                raise ModelFolderError(f"{folder / rel}: not a readable safetensors file ({e})") from None
            for k, v in tensors.items():
                if k in seen:
                    raise ModelFolderError(f"{folder / rel}: {k} is also in {seen[k]}")
                seen[k] = rel
                weights.append((model_key(k, n), v))
    return weights


def check_layers(folder: Path, args: ModelArgs, manifest: dict, weights: list) -> None:
    """The config's layers are the folder's: before a module is built for each (num_hidden_layers 1e9
    would build them until memory ran out)."""
    n, mtp = args.num_hidden_layers, manifest["mtp_layers"]
    held = set()
    for k, _ in weights:
        if m := re.match(r"model\.layers\.(\d+)\.", k):
            held.add(int(m[1]))
        elif m := re.match(r"mtp\.(\d+)\.", k):
            held.add(n + int(m[1]))
    if len(held) != n + mtp or min(held, default=0) != 0 or max(held, default=-1) != n + mtp - 1:
        raise ModelFolderError(f"{folder / 'config.json'}: num_hidden_layers {n} (and {mtp} MTP layers in {MANIFEST}), "
                               f"but the folder's weights hold {len(held)} layers "
                               f"(numbered {min(held, default=0)}..{max(held, default=0)})")
    moe = {i for i in range(n + mtp) if i >= n or args.is_moe_layer(i)}
    if {int(i) for i in manifest["experts"]} != moe:
        raise ModelFolderError(f"{folder / MANIFEST}: experts for layers {sorted(map(int, manifest['experts']))}, "
                               f"the config's MoE layers are {sorted(moe)}")


def check_shapes(folder: Path, model: Model, manifest: dict, weights: list) -> None:
    """Every tensor has the shape the config gives it and is integer where the model's is (load_weights
    checks no dtype), and so does every experts entry's parts: offloaded experts bypass load_weights."""
    params = dict(tree_flatten(model.parameters()))
    for k, v in weights:  # (routed experts below, by their manifest entries)
        if k in params and ".mlp.experts." not in k and (
                v.shape != params[k].shape or (v.dtype == mx.uint32) != (params[k].dtype == mx.uint32)):
            raise ModelFolderError(f"{folder}: the weights do not match config.json: {k} is {v.shape} {v.dtype}, "
                                   f"config.json makes it {params[k].shape} {params[k].dtype}")
    n = model.args.num_hidden_layers
    for i, entry in manifest["experts"].items():
        prefix = model_key(f"model.layers.{i}.mlp.experts.", n)
        want = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        if set(want) != set(entry["parts"]):
            raise ModelFolderError(f"{folder / MANIFEST}: experts[{i!r}] has parts {sorted(entry['parts'])}, "
                                   f"the model's are {sorted(want)}")
        for part, spec in entry["parts"].items():
            if want[part].shape != (entry["num_experts"], *spec["shape"]) or (
                    spec["dtype"] == "U32") != (want[part].dtype == mx.uint32):
                raise ModelFolderError(f"{folder / MANIFEST}: experts[{i!r}].parts[{part!r}]: {entry['num_experts']} x "
                                       f"{spec['shape']} {spec['dtype']}, config.json makes it {want[part].shape} "
                                       f"{want[part].dtype}")


def load_model(path: str | Path, dtype: str | None = None, expert_memory: str | int | None = None,
               reserve: int = 0, prefetch: bool | None = None) -> tuple[Model, dict]:
    """(model, manifest). `expert_memory` (bytes, "24GB", "auto"): routed experts
    never occupy more than that; the rest are read from the folder on demand.
    `reserve`: bytes "auto" leaves free beyond its own reserve (a training step's).
    `prefetch`: offloaded banks read the next layer's guessed experts ahead (None: offload.PREFETCH).
    A folder that is not as its manifest says, or whose manifest or config does not describe a model
    its files can hold, is a ModelFolderError naming the file and why."""
    from .offload import offload_experts, parse_size

    folder = Path(path).expanduser()
    refuse_if_being_written(folder)
    dt = compute_dtype(dtype)
    manifest = verify_folder(folder)
    args = read_config(folder, manifest)
    n = args.num_hidden_layers
    expert_files = {e["file"] for e in manifest["experts"].values()}
    resident = sum(r["size"] for f, r in manifest["files"].items() if f.startswith("weights/")
                   and f not in expert_files)
    smallest = sum(e["stride"] for e in manifest["experts"].values())  # one expert per layer
    total = expert_bytes(manifest)
    budget = parse_size(expert_memory, total, resident + reserve, smallest)
    offloaded = budget is not None and budget < total and manifest["experts"]
    weights = read_weights(folder, manifest, n)
    check_layers(folder, args, manifest, weights)
    for i, entry in manifest["experts"].items() if not offloaded else ():
        weights += [(model_key(f"model.layers.{i}.mlp.experts.{k}", n), v)
                    for k, v in read_experts(folder, entry).items()]
    model = Model(args, mtp_own_embed=any(k.startswith("mtp.0.embed_tokens.") for k, _ in weights))

    qmap = {model_key(m, n): q for m, q in manifest["quantization"].items()}
    for i, entry in manifest["experts"].items():
        for p, q in entry["quantization"].items():
            if q:
                qmap[model_key(f"model.layers.{i}.mlp.experts.{p}", n)] = q
    try:
        nn.quantize(model, class_predicate=lambda p, m: qmap.get(p, False))
    except ValueError as e:
        raise ModelFolderError(f"{folder / MANIFEST}: its quantization does not fit the model ({e})") from None
    check_shapes(folder, model, manifest, weights)
    if dt is not None:
        weights = [(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights]
    if offloaded:
        offload_experts(model, folder, manifest, budget, dt, prefetch)
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise ModelFolderError(f"{folder}: the weights do not match config.json ({e})") from None
    prepare_model(model)
    model.eval()
    mx.eval(model.parameters())
    return model, manifest
