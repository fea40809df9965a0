"""Routed experts offloaded: a bank of slots per layer, filled from the model folder.

Each MoE layer keeps `slots` experts resident in a SwitchGLU of that many
experts (quantized like the folder's); the rest stay on disk, where the
converter wrote each expert as one contiguous byte range, so a miss is one
positional read (checked against the manifest's size and crc32), several
misses read in parallel. The MoE computes on the bank with the router's
indices mapped to slots: no per-expert Python loop. When a step needs more
experts than there are slots (prefill), the experts go through the bank in
groups, each read once and serving all its rows.

Eviction keeps the experts with the highest aged frequency (each step
multiplies every score by DECAY and adds one for each expert used), never
those the current step needs. Prefetch (off by default: measured slower so
far): in decode, a layer applies the next layer's router to its own input
and starts reading the experts it predicts.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import QuantizedSwitchLinear, SwitchGLU
from .loading import STORED_DTYPES, model_key

DECAY = 0.9
PROJS = ("gate_proj", "up_proj", "down_proj")


class ExpertReadError(RuntimeError):
    """An expert that came back short or corrupt: never compute on it."""


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # misses served by a read the prefetch had started
    bytes: int = 0
    seconds: float = 0.0  # time spent waiting for reads

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def add(self, other: "Stats") -> None:
        for k in ("hits", "misses", "prefetched", "bytes", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def line(self) -> str:
        return (f"experts: {self.hit_rate:.1%} hits ({self.hits} hits, {self.misses} misses, "
                f"{self.prefetched} prefetched), {self.bytes / 1e9:.2f} GB read at {self.gbps:.2f} GB/s")


class ExpertFile:
    """One layer's experts file: expert e is one pread of `stride` bytes."""

    def __init__(self, folder: Path, layer: int, entry: dict):
        self.path, self.layer = folder / entry["file"], layer
        self.fd = os.open(self.path, os.O_RDONLY)
        self.start, self.stride = entry["data_start"], entry["stride"]
        self.parts, self.crc = entry["parts"], entry.get("crc32")

    def read(self, e: int) -> bytes:
        blob = os.pread(self.fd, self.stride, self.start + e * self.stride)
        if len(blob) != self.stride:
            raise ExpertReadError(f"{self.path}: expert {e} of layer {self.layer}: read {len(blob)} of "
                                  f"{self.stride} bytes (is the file truncated?)")
        if self.crc is not None and zlib.crc32(blob) != self.crc[e]:
            raise ExpertReadError(f"{self.path}: expert {e} of layer {self.layer} does not match the "
                                  "manifest's checksum (the file is corrupt)")
        return blob

    def arrays(self, blob: bytes) -> dict[str, np.ndarray]:
        out = {}
        for part, spec in self.parts.items():
            dt = np.dtype(STORED_DTYPES[spec["dtype"]])
            n = int(np.prod(spec["shape"]))
            out[part] = np.frombuffer(blob, dtype=dt, count=n, offset=spec["offset"]).reshape(spec["shape"])
        return out


class _Holder:
    """Keeps the bank out of the module tree: its slots are not model parameters."""

    def __init__(self, glu: SwitchGLU):
        self.glu = glu


class OffloadedExperts(nn.Module):
    """Stands in for a MoE layer's SwitchGLU: same call, experts read on demand."""

    def __init__(self, file: ExpertFile, entry: dict, dims: tuple[int, int], slots: int, dtype, pool):
        super().__init__()
        dim, hidden = dims
        glu = SwitchGLU(dim, hidden, slots)
        for p in PROJS:
            q = entry["quantization"][p]
            lin = getattr(glu, p)
            if q:
                E, out, inp = lin.weight.shape
                setattr(glu, p, QuantizedSwitchLinear(E, inp, out, q["group_size"], q["bits"]))
        glu.update({p: {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                        for k, v in getattr(glu, p).items() if isinstance(v, mx.array)} for p in PROJS})
        object.__setattr__(self, "bank", _Holder(glu))
        object.__setattr__(self, "file", file)
        object.__setattr__(self, "pool", pool)
        self.slots, self.dtype = slots, dtype
        E = entry["num_experts"]
        self.slot_of = np.full(E, -1, dtype=np.int64)
        self.expert_in = np.full(slots, -1, dtype=np.int64)
        self.score = np.zeros(E)
        self.stats = Stats()
        object.__setattr__(self, "pending", {})  # expert -> Future of its read
        object.__setattr__(self, "next", None)  # (router, OffloadedExperts) of the next MoE layer

    def _fill(self, slots: list[int], experts: list[int], blobs: list[bytes]) -> None:
        """Write the read experts into their slots: one scatter per tensor, not per expert."""
        glu = self.bank.glu
        views = [self.file.arrays(b) for b in blobs]
        where = mx.array(slots)
        for part in views[0]:
            proj, name = part.split(".")
            stacked = np.stack([v[part] for v in views])
            a = mx.array(stacked)
            if stacked.dtype == np.uint16:  # bf16 bits
                a = a.view(mx.bfloat16)
            if mx.issubdtype(a.dtype, mx.floating):
                a = a.astype(self.dtype)
            lin = getattr(glu, proj)
            lin[name][where] = a
        for slot, e in zip(slots, experts):
            self.expert_in[slot], self.slot_of[e] = e, slot

    def ensure(self, needed: np.ndarray) -> None:
        """Make every expert in `needed` resident (len(needed) <= slots)."""
        misses = [int(e) for e in needed if self.slot_of[e] < 0]
        for e in [e for e in self.pending if e not in misses]:  # a wrong guess: let it go
            self.pending.pop(e).cancel()
        self.stats.hits += len(needed) - len(misses)
        self.stats.misses += len(misses)
        if not misses:
            return
        t0 = time.perf_counter()
        futures = []
        for e in misses:
            f = self.pending.pop(e, None)
            if f is not None:
                self.stats.prefetched += 1
            futures.append(f or self.pool.submit(self.file.read, e))
        blobs = [f.result() for f in futures]
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes += len(misses) * self.file.stride
        pinned = np.zeros(self.slots, dtype=bool)
        pinned[self.slot_of[needed][self.slot_of[needed] >= 0]] = True
        slots = []
        for e in misses:
            free = np.flatnonzero(self.expert_in < 0)
            if free.size:
                slot = int(free[0])
            else:
                cand = np.flatnonzero(~pinned)
                slot = int(cand[np.argmin(self.score[self.expert_in[cand]])])
                self.slot_of[self.expert_in[slot]] = -1
            self.expert_in[slot] = e  # taken, so the next miss picks another slot
            pinned[slot] = True
            slots.append(slot)
        self._fill(slots, misses, blobs)
        mx.eval(self.bank.glu.parameters())

    def prefetch(self, experts: np.ndarray) -> None:
        for e in map(int, experts):
            if self.slot_of[e] < 0 and e not in self.pending:
                self.pending[e] = self.pool.submit(self.file.read, e)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        idx = np.array(inds)  # the host must know which experts to read
        needed = np.unique(idx)
        self.score *= DECAY
        self.score[needed] += 1.0
        glu = self.bank.glu
        if needed.size <= self.slots:
            self.ensure(needed)
            if self.next is not None and x.shape[-2] == 1:
                # decode: this layer's reads are in; read ahead for the next layer while this one computes
                router, nxt = self.next
                nxt.prefetch(np.unique(np.array(router(x)[0])))
            return glu(x, mx.array(self.slot_of[idx]))
        y = None
        for g in range(0, needed.size, self.slots):
            group = needed[g : g + self.slots]
            self.ensure(group)
            member = np.isin(idx, group)
            out = glu(x, mx.array(np.where(member, self.slot_of[idx], 0)))
            part = mx.where(mx.array(member)[..., None], out, mx.zeros_like(out))
            y = part if y is None else y + part
            mx.eval(y)  # the next group overwrites these slots
        return y


def parse_size(size: str | int | None, total: int) -> int | None:
    """Bytes for --expert-memory: '24GB', '512MB', a number of bytes, or 'auto'
    (what the machine can spare); None when everything fits resident."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    if s == "AUTO":
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        budget = int(mem * 0.6)  # leave room for the rest of the model, the cache, the system
        return None if budget >= total else budget
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?I?B?)", s)
    if not m:
        raise ValueError(f"--expert-memory {size!r}: give a size like 24GB, 512MB, or auto")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m[2]]
    return int(float(m[1]) * unit)


PREFETCH = False  # measured slower, even with a perfect prediction (BENCHMARKS.md): off until it pays


def offload_experts(model, folder: Path, manifest: dict, budget: int, dtype,
                    prefetch: bool | None = None) -> list[OffloadedExperts]:
    """Swap every MoE layer's experts for an offloaded bank sharing `budget` bytes."""
    prefetch = PREFETCH if prefetch is None else prefetch
    entries = manifest["experts"]
    stride = max(e["stride"] for e in entries.values())
    slots = max(1, min(min(e["num_experts"] for e in entries.values()), budget // (stride * len(entries))))
    pool = ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 4)))
    n = model.args.num_hidden_layers
    layers = []
    for i, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        path = model_key(f"model.layers.{i}.mlp", n)
        moe = model
        for key in path.split("."):
            moe = moe[int(key)] if isinstance(moe, list) else getattr(moe, key)
        off = OffloadedExperts(ExpertFile(folder, int(i), entry), entry,
                               (model.args.hidden_size, model.args.moe_intermediate_size), slots, dtype, pool)
        moe.experts = off
        layers.append((int(i), moe, off))
    trunk = [(i, moe, off) for i, moe, off in layers if i < n]
    for (_, _, off), (_, nxt_moe, nxt_off) in zip(trunk, trunk[1:]) if prefetch else ():
        object.__setattr__(off, "next", (nxt_moe.gate, nxt_off))
    return [off for _, _, off in layers]


def offloaded_stats(model) -> Stats | None:
    """All offloaded layers' statistics summed; None when the experts are resident."""
    banks = [m for _, m in model.named_modules() if isinstance(m, OffloadedExperts)]
    if not banks:
        return None
    total = Stats()
    for m in banks:
        total.add(m.stats)
    return total
