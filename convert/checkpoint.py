"""A source checkpoint, read one tensor at a time, in Hugging Face naming.

Three kinds of source are read through one interface:
- `hf`: the published bf16 (or fp16/fp32) checkpoint;
- `fp8`: the -FP8 repos: float8 e4m3 weights with per-channel, per-tensor or
  per-block scales, as the config's quantization_config says; dequantized here;
- `mlx`: an mlx-lm / mlx-community folder: experts stacked as
  `mlp.switch_mlp.*`, possibly quantized; presented as per-expert tensors.

Everything is checked before any output is written: shards named by the
index lie inside the folder and exist, headers parse, sizes match, every
tensor the model needs is present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm_mlx.config import ModelArgs

from .safetensors_io import DuplicateKey, FormatError, SafetensorsFile, to_float32, unique_keys
from .synthetic import layout

EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# The small files a conversion copies into the model folder as they are.
SMALL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
               "tokenizer.model")


class CheckpointError(ValueError):
    """A source that cannot be converted; the message says why in one line."""


MAX_JSON = 256 << 20  # tokenizer.json is 7 MB; a config or index of more is not one


def read_json(path: Path):
    """A JSON file's value; one line naming the file when it is not JSON (or names a key twice)."""
    if path.stat().st_size > MAX_JSON:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large to be a model's JSON file")
    try:
        return json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except DuplicateKey as e:
        raise CheckpointError(f"{path}: names {e} twice") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a model file") from None


@dataclass(frozen=True)
class Quantized:
    """A tensor stored quantized in MLX's affine format."""

    weight: np.ndarray  # uint32 packed
    scales: np.ndarray  # float32
    biases: np.ndarray  # float32
    bits: int
    group_size: int


# Config fields the converter sizes things by: each a JSON integer, at least this.
COUNTS = {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
          "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "n_routed_experts": 1,
          "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "head_dim": 1, "n_shared_experts": 0,
          "first_k_dense_replace": 0, "num_nextn_predict_layers": 0}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
AUX = (".scales", ".biases", ".weight_scale", ".weight_scale_inv", ".input_scale")  # parts of a quantized weight


def _blocks(shape: tuple, scales: tuple, block: list | None) -> bool:
    """Whether `scales` is one per (bo, bi) block of a 2-D `shape` (block None: as the scales divide it)."""
    if len(shape) != 2 or len(scales) != 2 or 0 in scales:
        return False
    bo, bi = block or (-(-shape[0] // scales[0]), -(-shape[1] // scales[1]))
    return (-(-shape[0] // bo), -(-shape[1] // bi)) == tuple(scales)


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        cfg_path = self.folder / "config.json"
        if (self.folder / "glm_mlx.json").is_file():
            raise CheckpointError(f"{self.folder}: is already a glm-mlx model folder (convert's output); "
                                  "give it to chat, generate or finetune as it is")
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (not a model folder)")
        self.config = read_json(self.file("config.json"))
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        for k, least in COUNTS.items():
            v = self.config.get(k)
            if v is not None and (type(v) is not int or v < least):
                raise CheckpointError(f"{cfg_path}: {k} is {json.dumps(v)}, not an integer >= {least}")
        try:
            self.args = ModelArgs.from_dict(self.config, source=str(cfg_path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        except (TypeError, AttributeError, ArithmeticError) as e:  # a field of the wrong JSON type
            raise CheckpointError(f"{cfg_path}: not a GLM-4.5 config ({type(e).__name__}: {e})") from None
        self.files, where = self._open_shards()
        self._where = where  # tensor name -> SafetensorsFile
        self.block = None  # fp8 block scales, (rows, columns) a scale, when the config gives them
        qc = self.config.get("quantization_config") or {}
        if not isinstance(qc, dict) or not isinstance(self.config.get("quantization") or {}, dict):
            raise CheckpointError(f"{cfg_path}: quantization_config / quantization is not a JSON object")
        if any(".switch_mlp." in n for n in where) or "quantization" in self.config:
            self.kind = "mlx"
            self.mlx_quant = self.config.get("quantization") or {}
        elif qc.get("quant_method") in ("fp8", "compressed-tensors") or any(
            f.tensors[n].dtype == "F8_E4M3" for n, f in where.items()
        ):
            self.kind = "fp8"
            self.block = qc.get("weight_block_size")
            if self.block is not None and not (isinstance(self.block, list) and len(self.block) == 2
                                               and all(type(b) is int and b > 0 for b in self.block)):
                raise CheckpointError(f"{cfg_path}: weight_block_size is {json.dumps(self.block)}, "
                                      "not two positive integers")
        elif qc:
            raise CheckpointError(f"{cfg_path}: quantization method {qc.get('quant_method')!r} is not supported")
        else:
            self.kind = "hf"
        self._bound_config()
        self.names = self._logical_names()
        self._check_complete()

    # -- opening and checking -------------------------------------------------

    def file(self, rel: str, named_by: Path | None = None) -> Path:
        """The source's file `rel`, refused if it (or a link it is) leads outside the folder: a link
        planted in a download must not copy or read, say, ~/.ssh/id_rsa into the model folder. The
        Hugging Face cache's own links, snapshots/<commit>/x -> ../../blobs/<hash>, stay allowed."""
        path = self.folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{named_by or self.folder}: names a file outside the folder: {rel}")
        real = path.resolve()
        blobs = self.folder.parent.parent / "blobs"
        hub = self.folder.parent.name == "snapshots" and self.folder.parent.parent.name.startswith("models--")
        if real.is_relative_to(self.folder) or (hub and real.is_relative_to(blobs.resolve())):
            return path
        raise CheckpointError(f"{path}: is a link to {real}, outside the source folder; refusing to read it")

    def _open_shards(self):
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(self.file(index.name))
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid safetensors index "
                                      "(wants {\"weight_map\": {tensor: file name}})")
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shard_names:
                raise CheckpointError(f"{self.folder}: no safetensors weights found")
            weight_map = None
        files = {}
        for name in shard_names:
            path = self.file(name, index)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing shard (named by the index)")
            try:
                files[name] = SafetensorsFile(path)
            except FormatError as e:
                raise CheckpointError(str(e)) from None
        where = {}
        for name, f in files.items():
            for t in f.tensors:
                if t in where:  # which copy is meant? the index may say, but two copies are a broken download
                    raise CheckpointError(f"{f.path}: holds {t}, which {where[t].path.name} holds too")
                if weight_map is not None and weight_map.get(t) != name:
                    raise CheckpointError(f"{f.path}: holds {t}, which the index "
                                          + (f"places in {weight_map[t]}" if t in weight_map else "does not list"))
                where[t] = f
        if weight_map is not None:
            for t, shard in weight_map.items():
                if t not in files[shard].tensors:
                    raise CheckpointError(f"{files[shard].path}: lacks {t}, which the index places there")
        return files, where

    def _bound_config(self) -> None:
        """What the config claims, bounded by the tensors really there, before anything is sized by it
        (a claim of 10^9 layers must not build 10^9 of anything)."""
        a, cfg = self.args, self.folder / "config.json"
        layers = {int(m[1]) for n in self._where if (m := LAYER.match(n))}
        self._layers = len(layers)
        if a.num_hidden_layers > len(layers):
            raise CheckpointError(f"{cfg}: num_hidden_layers is {a.num_hidden_layers}, but the checkpoint "
                                  f"holds {len(layers)} layers")
        if self.kind == "mlx":
            stacked = {n: f.tensors[n].shape[0] for n, f in self._where.items()
                       if ".switch_mlp." in n and n.endswith(".weight")}
            counts = set(stacked.values())
        else:
            counts = {int(m[2]) + 1 for n in self._where if (m := EXPERT.match(n))}
        have = max(counts, default=0)
        if any(a.is_moe_layer(i) for i in range(a.num_hidden_layers)) and a.n_routed_experts > have:
            raise CheckpointError(f"{cfg}: n_routed_experts is {a.n_routed_experts}, but the checkpoint "
                                  f"holds {have} experts a layer")

    def _logical_names(self) -> set[str]:
        names = set()
        E = self.args.n_routed_experts
        for n in self._where:
            m = re.match(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.weight$", n)
            if m:
                if self._where[n].tensors[n].shape[0] != E:
                    raise CheckpointError(f"{self._where[n].path}: {n} stacks {self._where[n].tensors[n].shape[0]} "
                                          f"experts, config.json says n_routed_experts {E}")
                names.update(f"{m[1]}.experts.{e}.{m[2]}.weight" for e in range(E))
            elif not n.endswith(AUX):
                names.add(n)
        return names

    def _check_complete(self) -> None:
        """Every tensor the model needs is there with the shape the config implies, and nothing it
        does not know is: checked whole before anything is written."""
        a = self.args
        n = a.num_hidden_layers + self.mtp_layers
        c = {**dataclasses.asdict(a), "num_nextn_predict_layers": self.mtp_layers}
        known = set()
        for name, shape in layout(c):
            known.add(name)
            if name not in self.names:
                if name.endswith(".embed_tokens.weight") and name != "model.embed_tokens.weight":
                    continue  # the MTP layer's own copy of the embedding: GLM-4.6 dropped it
                raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint")
            if tuple(self.shape(name)) != tuple(shape):
                raise CheckpointError(f"{self.where(name)}: {name} has shape {list(self.shape(name))}, "
                                      f"config.json implies {list(shape)}")
        self._check_parts()
        for name in sorted(self.names - known):
            m = LAYER.match(name)
            if not (m and int(m[1]) >= n):  # layers past the config's (an MTP layer it does not count) are left out
                raise CheckpointError(f"{self.where(name)}: holds {name}, which a GLM-4.5 model of this "
                                      "config.json does not have")

    def _check_parts(self) -> None:
        """A quantized weight's scales (and biases) have the shape its weight implies, so reading it
        cannot fail halfway through the conversion."""
        for n, f in self._where.items():
            t, base = f.tensors[n], n[: -len(".weight")]
            if self.kind == "mlx" and n.endswith(".weight") and base + ".scales" in self._where:
                bits, gs = self._mlx_bits(base)
                want = (*t.shape[:-1], t.shape[-1] * 32 // bits // gs)
                for part in (f"{base}.scales", f"{base}.biases"):
                    if t.dtype != "U32" or self._where[part].tensors[part].shape != want:
                        raise CheckpointError(f"{self._where[part].path}: {part} has shape "
                                              f"{list(self._where[part].tensors[part].shape)}, its {t.dtype} "
                                              f"weight at {bits} bits, group {gs} implies {list(want)}")
            elif t.dtype == "F8_E4M3":
                scale = next((base + x for x in (".weight_scale_inv", ".weight_scale") if base + x in self._where),
                             None)
                if scale is None:
                    raise CheckpointError(f"{f.path}: fp8 tensor {n} has no scale")
                have = self._where[scale].tensors[scale].shape
                rows = have in ((t.shape[0], 1), (t.shape[0],))
                if not (math.prod(have) == 1 or rows or _blocks(t.shape, have, self.block)):
                    raise CheckpointError(f"{self._where[scale].path}: {scale} has shape {list(have)}, which "
                                          f"scales {n} {list(t.shape)} neither per tensor, per row nor by blocks")

    def where(self, name: str) -> Path:
        """The shard holding a logical tensor."""
        stored, _ = self._stored(name)
        return self._where[stored].path if stored in self._where else self.folder

    def identity(self) -> dict:
        """What tells this source from another of the same config, cheaply (a checkpoint is hundreds of
        GB): each shard's size and a sha256 of its header and of the first and last MiB of its data (a
        fine-tune of the same model differs there), and the index's and small files' sha256."""
        files = {}
        for name, f in sorted(self.files.items()):
            h = hashlib.sha256()
            size = f.path.stat().st_size
            start = min((t.start for t in f.tensors.values()), default=size)
            with open(f.path, "rb") as fh:
                for offset, length in ((0, start), (start, 1 << 20), (max(start, size - (1 << 20)), 1 << 20)):
                    h.update(os.pread(fh.fileno(), length, offset))
            files[name] = {"size": size, "sample_sha256": h.hexdigest()}
        for rel in ("config.json", "model.safetensors.index.json", *SMALL_FILES):
            if (self.folder / rel).is_file():
                path = self.file(rel)
                files[rel] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return files

    @property
    def mtp_layers(self) -> int:
        """How many MTP layers the checkpoint really holds (mlx-lm drops them)."""
        n = self.args.num_hidden_layers
        extra = self._layers - n  # the config's count bounded by the layers there
        return sum(f"model.layers.{n + j}.eh_proj.weight" in self.names
                   for j in range(min(self.args.num_nextn_predict_layers, extra)))

    # -- reading ----------------------------------------------------------------

    def dtype(self, name: str) -> str:
        """The stored dtype code of a logical tensor (for keeping source precision)."""
        name, _ = self._stored(name)
        t = self._where[name].tensors[name]
        if t.dtype in ("F8_E4M3", "U32"):
            return "BF16"
        return t.dtype

    def same_bytes(self, a: str, b: str, chunk: int = 16 << 20) -> bool:
        """Whether two stored tensors hold the same dtype, shape and bytes (read a chunk at a time)."""
        (fa, ta), (fb, tb) = [(self._where[n], self._where[n].tensors[n]) for n in (a, b)]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape) or ta.dtype not in ("BF16", "F16", "F32"):
            return False  # fp8 or packed values are the same only with their scales: not compared

        with open(fa.path, "rb") as x, open(fb.path, "rb") as y:
            for at in range(0, ta.nbytes, chunk):
                n = min(chunk, ta.nbytes - at)
                if os.pread(x.fileno(), n, ta.start + at) != os.pread(y.fileno(), n, tb.start + at):
                    return False
        return True

    def exact_dtype(self, name: str) -> str:
        """The narrowest dtype code that holds the tensor as `read` gives it without rounding: its stored
        float dtype, float32 where it is dequantized (fp8 times a scale, packed bits)."""
        name, _ = self._stored(name)
        t = self._where[name].tensors[name]
        return t.dtype if t.dtype in ("BF16", "F16", "F32") else "F32"

    def read(self, name: str) -> np.ndarray | Quantized:
        """A tensor as float32, or as `Quantized` where an mlx source stores it so."""
        if self.kind == "mlx":
            m = EXPERT.match(name)
            if m:
                stacked = f"model.layers.{m[1]}.mlp.switch_mlp.{m[3]}"
                return self._read_mlx(stacked, rows=(int(m[2]), int(m[2]) + 1))
            if name.endswith(".weight") and name[:-6] + "scales" in self._where:
                return self._read_mlx(name[:-7])
        f = self._where[name]
        x = f.read_float32(name)
        if self.kind == "fp8" and f.tensors[name].dtype == "F8_E4M3":
            x = x * self._fp8_scale(name, x.shape)
        return x

    def _read_mlx(self, module: str, rows: tuple[int, int] | None = None) -> np.ndarray | Quantized:
        def get(suffix):
            n = f"{module}.{suffix}"
            f = self._where[n]
            x = f.read_rows(n, *rows)[0] if rows else f.read(n)
            return x if suffix == "weight" and f.tensors[n].dtype == "U32" else to_float32(x, f.tensors[n].dtype)

        w = get("weight")
        if f"{module}.scales" not in self._where:
            return w
        return Quantized(w, get("scales"), get("biases"), *self._mlx_bits(module))

    def _mlx_bits(self, module: str) -> tuple[int, int]:
        top = {k: v for k, v in self.mlx_quant.items() if not isinstance(v, dict)}
        own = self.mlx_quant.get(module)
        # per-module entries override the defaults; mlx-lm writes group_size None to mean "the default"
        q = {**top, **{k: v for k, v in own.items() if v is not None}} if isinstance(own, dict) else top
        if q.get("mode", "affine") != "affine" or f"{module}.biases" not in self._where:
            raise CheckpointError(f"{self.folder}: {module} uses a quantization mode other than affine")
        bits, group_size = q.get("bits", 4), q.get("group_size", 64)
        if not (type(bits) is int and bits in (2, 3, 4, 5, 6, 8) and type(group_size) is int
                and group_size in (32, 64, 128)):
            raise CheckpointError(f"{self.folder / 'config.json'}: quantization of {module} is bits {bits!r}, "
                                  f"group_size {group_size!r} (MLX's affine: bits 2-6 or 8, group 32, 64 or 128)")
        return bits, group_size

    def _stored(self, name: str) -> tuple[str, bool]:
        """(stored tensor or module name, whether it is a stacked-expert row)."""
        m = EXPERT.match(name)
        if self.kind == "mlx" and m:
            return f"model.layers.{m[1]}.mlp.switch_mlp.{m[3]}.weight", True
        return name, False

    def quant_of(self, name: str) -> tuple[int, int] | None:
        """(bits, group_size) where the source stores this weight quantized."""
        stored, _ = self._stored(name)
        if self.kind == "mlx" and stored.endswith(".weight") and stored[:-6] + "scales" in self._where:
            return self._mlx_bits(stored[:-7])
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical (unquantized, unstacked) shape of a tensor."""
        stored, row = self._stored(name)
        shape = self._where[stored].tensors[stored].shape[1 if row else 0:]
        q = self.quant_of(name)
        return (*shape[:-1], shape[-1] * 32 // q[0]) if q else shape

    def _fp8_scale(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        base = name[: -len(".weight")]
        for suffix in (".weight_scale_inv", ".weight_scale"):
            if base + suffix in self._where:
                s = self._where[base + suffix].read_float32(base + suffix)
                break
        else:
            raise CheckpointError(f"{self.folder}: fp8 tensor {name} has no scale")
        if s.size == 1 or s.shape == (shape[0], 1) or s.shape == (shape[0],):
            return s.reshape(-1, 1) if s.size > 1 else s.reshape(())
        # Block scales [ceil(out/bo), ceil(in/bi)].
        bo = self.block[0] if self.block else -(-shape[0] // s.shape[0])
        bi = self.block[1] if self.block else -(-shape[1] // s.shape[1])
        full = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)
        return full[: shape[0], : shape[1]]
