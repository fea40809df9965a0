"""LoRA and QLoRA: low-rank adapters that wrap the model's own layers.

    y = base(x) + (alpha / rank) * dropout(x) @ A^T @ B^T,   A [rank, in], B [out, rank]

A and B are in PEFT's orientation, so B @ A has the base weight's shape and
glm_mlx.fuse folds it back in. A starts uniform in +-1/sqrt(in) (PEFT's
kaiming_uniform(a=sqrt(5)), mlx-lm's init) and B at zero, so a fresh adapter
changes nothing. The base layer is kept as it is and frozen: bf16 or float32
(LoRA), or 4/8-bit (QLoRA). The factors are float32 whatever the base's
dtype: they are what the optimizer updates.

Routed experts get per-expert factors A [E, rank, in], B [E, out, rank],
applied through the same gathered matmul the base uses, sorted or not.

Targets are the recipe groups of quantize.recipes ("attention",
"shared_experts", "dense_mlp", "experts"), so --targets and the recipes name
modules alike; "mtp" extends the chosen groups into the MTP layer. The router
(`mlp.gate`) is never wrapped.

An adapter on disk is a folder: adapters.safetensors (the factors, by
parameter path) and adapter_config.json (rank, alpha, dropout, targets, the
wrapped modules, the weights' sha256, and the base model's manifest
fingerprint); each is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from convert.safetensors_io import sha256_file as _sha256
from quantize.recipes import group_of

from .experts import QuantizedSwitchLinear, SwitchLinear

TARGETS = ("attention", "shared_experts", "dense_mlp", "experts", "mtp")
DEFAULT_TARGETS = frozenset({"attention", "shared_experts", "dense_mlp"})
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "glm-mlx-adapter"
_LINEAR_GROUPS = ("attention", "shared_experts", "dense_mlp")


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message names the file."""


def _dims(base) -> tuple[int | None, int, int]:
    """(experts or None, in, out) of a Linear, QuantizedLinear or (Quantized)SwitchLinear,
    or of an offloaded bank's projection given as (OffloadedExperts, name)."""
    if isinstance(base, tuple):
        bank, name = base
        _, inp, out = _dims(getattr(bank.bank.glu, name))
        return bank.slot_of.size, inp, out  # every expert, not the bank's slots
    w = base.weight
    inp = w.shape[-1] * 32 // base.bits if "scales" in base else w.shape[-1]
    return (w.shape[0] if w.ndim == 3 else None), inp, w.shape[-2]


class LoRALayer(nn.Module):
    """What LoRALinear and LoRASwitchLinear share: the base, the factors, the settings."""

    def __init__(self, base, rank: int, alpha: float, dropout: float):
        super().__init__()
        experts, inp, out = _dims(base)
        lead = () if experts is None else (experts,)
        if isinstance(base, nn.Module):
            self.base = base
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(inp)
        self.lora_a = mx.random.uniform(-bound, bound, (*lead, rank, inp), dtype=mx.float32)
        self.lora_b = mx.zeros((*lead, out, rank), dtype=mx.float32)


class LoRALinear(LoRALayer):
    """An nn.Linear or nn.QuantizedLinear plus a trainable low-rank update."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (self.dropout(x).astype(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * z).astype(y.dtype)


class LoRASwitchLinear(LoRALayer):
    """A SwitchLinear or QuantizedSwitchLinear plus per-expert low-rank updates.

    Called as the base is: (x, inds, sorted_indices=False). The two factors
    go through gather_mm with the base's expert indices, so each row meets
    only its own experts' factors and no Python loop runs over experts.
    """

    def __call__(self, x: mx.array, inds: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.base(x, inds, sorted_indices)
        z = self.dropout(x).astype(self.lora_a.dtype)  # float32: MLX's CPU gather_mm takes nothing else
        z = mx.gather_mm(z, self.lora_a.swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(y.dtype)


class ExpertLoRA(LoRALayer):
    """The per-expert factors of one projection of an offloaded bank: the bank holds
    a few experts' base weights in slots, these every expert's factors (small), so
    a row meets its own expert's factors whichever slot its base weights are in.

    Called with the rows and their expert ids; returns the low-rank term only."""

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        z = self.dropout(x).astype(self.lora_a.dtype)
        z = mx.gather_mm(z, self.lora_a.swapaxes(-1, -2), rhs_indices=inds)
        return self.scale * mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=inds)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """[(path, layer)] of the model's LoRA layers."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALayer)]


def _plan(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs `targets` selects, nothing changed yet."""
    targets = set(targets)
    if unknown := targets - set(TARGETS):
        raise ValueError(f"unknown LoRA target(s) {', '.join(sorted(unknown))} (choose from {', '.join(TARGETS)})")
    from .offload import PROJS, OffloadedExperts

    chosen = []
    for path, m in model.named_modules():
        if path.startswith("mtp.") and "mtp" not in targets:
            continue
        group = group_of(path)
        if isinstance(m, OffloadedExperts):  # its projections, as the resident layer's paths name them
            if "experts" in targets:
                chosen += [(f"{path}.{p}", (m, p)) for p in PROJS]
            continue
        if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
            ok = group == "experts" and "experts" in targets
        elif isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            ok = group in _LINEAR_GROUPS and group in targets
        else:
            ok = False
        if ok:
            chosen.append((path, m))
    if not chosen:
        raise ValueError(f"LoRA targets {', '.join(sorted(targets))} select no layer of this model")
    return chosen


def apply_lora(model: nn.Module, *, targets, rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap the layers `targets` selects in LoRA layers; freeze everything else.

    targets: a subset of TARGETS. Returns the wrapped module paths. The
    model's train/eval mode carries over to the new layers (dropout acts
    only in train mode).
    """
    if lora_modules(model):
        raise ValueError("LoRA is already applied to this model")
    if rank < 1 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1 (got rank {rank}, dropout {dropout})")
    wrapped, banked = [], []
    for path, m in _plan(model, targets):
        if isinstance(m, tuple):  # an offloaded bank's projection: its factors go beside the bank
            banked.append((m, ExpertLoRA(m, rank, alpha, dropout)))
            wrapped.append((path, banked[-1][1]))
            continue
        cls = LoRASwitchLinear if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)) else LoRALinear
        wrapped.append((path, cls(m, rank, alpha, dropout)))
    model.update_modules(tree_unflatten([(p, m) for p, m in wrapped if not isinstance(m, ExpertLoRA)]))
    for (bank, name), layer in banked:
        setattr(bank, name, layer)
    model.freeze()
    for _, layer in wrapped:
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    model.train(model.training)
    mx.eval([(layer.lora_a, layer.lora_b) for _, layer in wrapped])
    return sorted((p for p, _ in wrapped), key=_natural)


def _natural(path: str) -> list:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.split(".")]


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA factors by parameter path ({"...q_proj.lora_a": A, ...})."""
    return {f"{p}.{k}": m[k] for p, m in lora_modules(model) for k in ("lora_a", "lora_b")}


def base_info(manifest: dict, model_dir: str | Path) -> dict:
    """What an adapter records of its base model: the manifest fingerprint,
    the folder's name, and a hash over its weight files' sha256 (the
    fingerprint covers config, tensor names, shapes and recipe, not values)."""
    return {"fingerprint": manifest["fingerprint"], "model": Path(model_dir).resolve().name,
            "weights_sha256": _files_hash(manifest)}


def _files_hash(manifest: dict) -> str:
    files = {k: v for k, v in manifest["files"].items() if k.startswith("weights/")}
    return hashlib.sha256("".join(f"{k}:{files[k]['sha256']}\n" for k in sorted(files)).encode()).hexdigest()


def _layer_config(model: nn.Module) -> dict:
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    settings = {(m.rank, m.alpha, m.dropout_p) for _, m in layers}
    assert len(settings) == 1, f"LoRA layers with different settings: {settings}"
    (rank, alpha, p), = settings
    paths = sorted((p for p, _ in layers), key=_natural)
    targets = {group_of(p) for p in paths} | ({"mtp"} if any(p.startswith("mtp.") for p in paths) else set())
    return {"rank": rank, "alpha": alpha, "dropout": p, "targets": sorted(targets), "modules": paths}


def save_adapter(directory: str | Path, model: nn.Module, config: dict) -> Path:
    """Write the model's LoRA factors and their config to `directory`.

    config: at least {"base": base_info(manifest, model_dir)}; anything else
    in it (targets as asked for, training settings) is kept. Rank, alpha,
    dropout and the wrapped modules are read off the model's LoRA layers
    (targets too, when config has none). The weights are
    written first, then the config that names their sha256, each atomically:
    a save cut short leaves a pair that load_adapter refuses, or the old one.
    """
    directory = Path(directory)
    assert config.get("base", {}).get("fingerprint"), "save_adapter: config['base'] must come from base_info()"
    layers = _layer_config(model)
    for k in ("rank", "alpha", "dropout"):
        assert config.get(k, layers[k]) == layers[k], f"save_adapter: {k}={config[k]!r}, LoRA layers: {layers[k]!r}"
    if "targets" in config:  # what was asked for; a target this model lacks (mtp, dense_mlp) selects nothing
        assert set(layers["targets"]) <= set(config["targets"]), (config["targets"], layers["targets"])
        layers["targets"] = list(config["targets"])
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "adapters.partial.safetensors"  # MLX appends .safetensors to any other name
    mx.save_safetensors(str(tmp), lora_parameters(model), metadata={"format": "mlx"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    full = {"format": ADAPTER_FORMAT, "version": 1, **config, **layers,
            "weights": {"file": ADAPTER_WEIGHTS, "sha256": _sha256(directory / ADAPTER_WEIGHTS)}}
    tmp = directory / (ADAPTER_CONFIG + ".partial")
    tmp.write_text(json.dumps(full, indent=1))
    os.replace(tmp, directory / ADAPTER_CONFIG)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """An adapter folder's config, checked for form; a ValueError names the file."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter folder")
    if not path.is_file():
        raise AdapterError(f"{path}: missing (not an adapter folder, or its save did not finish)")
    try:
        config = json.loads(path.read_text())
        ok = (config["format"] == ADAPTER_FORMAT and isinstance(config["base"]["fingerprint"], str)
              and type(config["rank"]) is int and config["rank"] >= 1
              and math.isfinite(float(config["alpha"])) and 0 <= float(config["dropout"]) < 1
              and isinstance(config["targets"], list)
              and isinstance(config["modules"], list) and isinstance(config["weights"]["sha256"], str))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise AdapterError(f"{path}: corrupt or not a glm-mlx adapter config")
    return config


def check_adapter_weights(directory: str | Path, config: dict) -> Path:
    """The adapter's weights file, present and the one its config names by sha256 (a truncated or
    swapped file is refused in one line)."""
    wpath = Path(directory) / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise AdapterError(f"{wpath}: missing")
    if _sha256(wpath) != config["weights"]["sha256"]:
        raise AdapterError(f"{wpath}: checksum does not match {ADAPTER_CONFIG} (corrupt, or from another save)")
    return wpath


def load_adapter(model: nn.Module, directory: str | Path, manifest: dict) -> dict:
    """Apply the adapter in `directory` to `model` (loaded from the folder
    whose manifest is `manifest`); returns the adapter's config.

    Refused with a one-line ValueError, the model left untouched: an adapter
    trained for another model (other fingerprint, or same architecture and
    recipe with other weights), a missing or corrupt file, factors that do
    not fit this model's layers.
    """
    directory = Path(directory)
    if lora_modules(model):
        raise ValueError(f"{directory}: the model already carries an adapter")
    config = read_adapter_config(directory)
    base = config["base"]
    name = base.get("model") or base.get("name") or "another model"
    trained_for = f"{name} (fingerprint {base['fingerprint'][:12]})"
    if base["fingerprint"] != manifest["fingerprint"]:
        raise ValueError(f"{directory}: this adapter was trained for {trained_for}, "
                         f"not for this model (fingerprint {manifest['fingerprint'][:12]})")
    if base.get("weights_sha256", _files_hash(manifest)) != _files_hash(manifest):
        raise ValueError(f"{directory}: this adapter was trained for {trained_for}, a model of the same "
                         "architecture and recipe but other weights")
    wpath = check_adapter_weights(directory, config)
    try:
        weights = mx.load(str(wpath))
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"{wpath}: corrupt ({e})") from None

    plan = _plan(model, config["targets"])
    if {p for p, _ in plan} != set(config["modules"]):
        raise ValueError(f"{directory}: the adapter's modules do not match this model's layers")
    rank = int(config["rank"])
    want = {}
    for p, m in plan:
        experts, inp, out = _dims(m)
        lead = () if experts is None else (experts,)
        want[f"{p}.lora_a"], want[f"{p}.lora_b"] = (*lead, rank, inp), (*lead, out, rank)
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
        raise ValueError(f"{wpath}: tensors do not fit this model's layers (first: {bad[0]})")
    if bad := sorted(k for k, v in weights.items() if not mx.all(mx.isfinite(v)).item()):
        raise ValueError(f"{wpath}: {bad[0]} holds values that are not finite numbers (nan or inf)")

    apply_lora(model, targets=config["targets"], rank=rank, alpha=float(config["alpha"]),
               dropout=float(config["dropout"]))
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=False)
    mx.eval(lora_parameters(model))
    return config
