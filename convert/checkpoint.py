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

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm_mlx.config import ModelArgs

from .safetensors_io import FormatError, SafetensorsFile, to_float32

EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A source that cannot be converted; the message says why in one line."""


@dataclass(frozen=True)
class Quantized:
    """A tensor stored quantized in MLX's affine format."""

    weight: np.ndarray  # uint32 packed
    scales: np.ndarray  # float32
    biases: np.ndarray  # float32
    bits: int
    group_size: int


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (not a model folder)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        try:
            self.args = ModelArgs.from_dict(self.config)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        self.files, where = self._open_shards()
        self._where = where  # tensor name -> SafetensorsFile
        qc = self.config.get("quantization_config") or {}
        if any(".switch_mlp." in n for n in where) or "quantization" in self.config:
            self.kind = "mlx"
            self.mlx_quant = self.config.get("quantization") or {}
        elif qc.get("quant_method") in ("fp8", "compressed-tensors") or any(
            f.tensors[n].dtype == "F8_E4M3" for n, f in where.items()
        ):
            self.kind = "fp8"
            self.block = qc.get("weight_block_size")
        elif qc:
            raise CheckpointError(f"{cfg_path}: quantization method {qc.get('quant_method')!r} is not supported")
        else:
            self.kind = "hf"
        self.names = self._logical_names()
        self._check_complete()

    # -- opening and checking -------------------------------------------------

    def _open_shards(self):
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index}: not a valid safetensors index") from None
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shard_names:
                raise CheckpointError(f"{self.folder}: no safetensors weights found")
            weight_map = None
        files = {}
        for name in shard_names:
            # Judge the name, not where it leads: the hub cache's files are symlinks into blobs/.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{index}: names a file outside the folder: {name}")
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing shard (named by the index)")
            try:
                files[name] = SafetensorsFile(path)
            except FormatError as e:
                raise CheckpointError(str(e)) from None
        where = {}
        for name, f in files.items():
            for t in f.tensors:
                where[t] = f
        if weight_map is not None:
            for t, shard in weight_map.items():
                if t not in files[shard].tensors:
                    raise CheckpointError(f"{files[shard].path}: lacks {t}, which the index places there")
        return files, where

    def _logical_names(self) -> set[str]:
        names = set()
        E = self.args.n_routed_experts
        for n in self._where:
            m = re.match(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.weight$", n)
            if m:
                names.update(f"{m[1]}.experts.{e}.{m[2]}.weight" for e in range(E))
            elif not n.endswith((".scales", ".biases", ".weight_scale", ".weight_scale_inv", ".input_scale")):
                names.add(n)
        return names

    def _check_complete(self) -> None:
        a = self.args
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        if not a.tie_word_embeddings:
            need.append("lm_head.weight")
        for i in range(a.num_hidden_layers):
            p = f"model.layers.{i}"
            need += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                     f"{p}.self_attn.q_proj.weight", f"{p}.self_attn.o_proj.weight"]
            if a.is_moe_layer(i):
                need += [f"{p}.mlp.gate.weight", f"{p}.mlp.experts.{a.n_routed_experts - 1}.down_proj.weight"]
            else:
                need.append(f"{p}.mlp.down_proj.weight")
        for n in need:
            if n not in self.names:
                raise CheckpointError(f"{self.folder}: tensor {n} is missing from the checkpoint")

    @property
    def mtp_layers(self) -> int:
        """How many MTP layers the checkpoint really holds (mlx-lm drops them)."""
        n = self.args.num_hidden_layers
        return sum(f"model.layers.{n + j}.eh_proj.weight" in self.names
                   for j in range(self.args.num_nextn_predict_layers))

    # -- reading ----------------------------------------------------------------

    def dtype(self, name: str) -> str:
        """The stored dtype code of a logical tensor (for keeping source precision)."""
        name, _ = self._stored(name)
        t = self._where[name].tensors[name]
        if t.dtype in ("F8_E4M3", "U32"):
            return "BF16"
        return t.dtype

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
        return int(q.get("bits", 4)), int(q.get("group_size", 64))

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
