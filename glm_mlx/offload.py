"""Routed experts offloaded: a bank of slots per layer, filled from the model folder.

Each MoE layer keeps `slots` experts resident in a SwitchGLU of that many
experts (quantized like the folder's); the rest stay on disk, where the
converter wrote each expert as one contiguous byte range, so a miss is one
positional read (checked against the manifest's size and crc32), a layer's
misses read in parallel. When the bank holds the folder's own dtypes (the
default), a read goes straight into the slot's memory (preadv into the MLX
arrays' buffers: no copy, no scatter), past the page cache where it is aligned
(DIRECT); a bank in another dtype (float32 for tests) reads into a buffer and
converts. The MoE computes on the bank with the
router's indices mapped to slots: no per-expert Python loop. When a step needs
more experts than there are slots (prefill), the experts go through the bank
in groups, each read once and serving all its rows.

Three policies, each switchable so the benchmark can measure what it buys:
- eviction: "lfu" keeps the experts with the highest aged frequency (each step
  multiplies every score by DECAY and adds one per expert used); "lru" the
  most recently used. The current step's experts are never evicted (they must
  all be in the bank at once).
- pin: the experts the previous token used are evicted last (routing is
  temporally local). A prefetch never evicts them, pin or not. Off by default: with LFU it cost
  hits on the skewed trace (scripts/policy_sim.py).
- prefetch (decode): a layer applies the next layer's router to its own input
  and starts reading the experts it predicts, behind its own reads, so the
  disk stays busy while this layer computes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import uvm
from .experts import QuantizedSwitchLinear, Switch, SwitchGLU
from .loading import MX_DTYPES, STORED_DTYPES, check_experts_entry, model_key, stored_array

DECAY = 0.9
PROJS = ("gate_proj", "up_proj", "down_proj")
POLICIES = ("lfu", "lru")


class ExpertReadError(OSError):
    """An expert that came back short or corrupt: never compute on it (an OSError: the
    commands report it as a one-line error, as they do a file they cannot read)."""


@dataclass
class Stats:
    hits: int = 0  # needed experts already in the bank (a finished prefetch included)
    misses: int = 0  # needed experts read on demand
    prefetched: int = 0  # reads started ahead by a prediction
    prefetch_used: int = 0  # of those, experts the step then needed
    bytes: int = 0  # everything read, prefetches included
    dropped: int = 0  # bytes of abandoned prefetches never read (not in `bytes`)
    seconds: float = 0.0  # time spent waiting for reads

    @property
    def hit_rate(self) -> float | None:
        """Of the experts needed, the share already resident; None before any was needed."""
        needed = self.hits + self.misses
        return self.hits / needed if needed else None

    @property
    def gbps(self) -> float | None:
        """GB read a second of waiting; None when nothing was read or no wait was measured."""
        from .generate import rate

        r = rate(self.bytes, self.seconds)
        return None if r is None else r / 1e9

    def add(self, other: "Stats") -> None:
        for k in ("hits", "misses", "prefetched", "prefetch_used", "bytes", "dropped", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def line(self) -> str:
        ahead = f", {self.prefetch_used} of {self.prefetched} prefetched used" if self.prefetched else ""
        hits = "-" if self.hit_rate is None else f"{self.hit_rate:.1%}"
        speed = "-" if self.gbps is None else f"{self.gbps:.2f}"
        return (f"experts: {hits} hits ({self.hits} hits, {self.misses} misses{ahead}), "
                f"{self.bytes / 1e9:.2f} GB read at {speed} GB/s")


def preadv_all(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill `views` from the file at `offset` (one preadv, continued if it
    comes back short); the bytes read, fewer only at the end of the file."""
    views, done = list(views), 0
    while views:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, views, offset + done)
        else:  # no preadv on this platform: one pread per view
            blob = os.pread(fd, views[0].nbytes, offset + done)
            views[0][: len(blob)], n = blob, len(blob)
        if n == 0:
            break
        done += n
        while views and n >= views[0].nbytes:
            n -= views.pop(0).nbytes
        if views and n:
            views[0] = views[0][n:]
    return done


def _mul(a: int, b: int) -> int:
    """a(x) * b(x) modulo CRC-32's polynomial (bit-reflected), as zlib computes it."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_mul(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _shift(len2: int) -> int:
    """x^(8 * len2) modulo the polynomial: the same few lengths (a piece, an expert's last piece) recur."""
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _mul(_X2N[k & 31], p)
        n, k = n >> 1, k + 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b) (zlib's crc32_combine,
    which Python's zlib does not expose): pieces are checked in parallel."""
    return _mul(_shift(len2), crc1) ^ crc2


def split(views: list[memoryview], size: int) -> list[list[memoryview]]:
    """`views` (consecutive bytes) cut into pieces of at most `size` bytes."""
    pieces, cur, room = [], [], size
    for v in views:
        while v.nbytes:
            take = v[:room]
            cur.append(take)
            v, room = v[take.nbytes:], room - take.nbytes
            if room == 0:
                pieces.append(cur)
                cur, room = [], size
    return pieces + ([cur] if cur else [])


# CUDA managed memory's hint after a read into a slot (glm_mlx.uvm): "expert", a whole expert's slot sent to
# the card once its read is checked (by a thread of its own, so the step does not wait on the driver);
# "piece", each piece by its reading thread once read; False, none (the card's first kernel on a slot then
# faults its pages over, ~0.1 ms a MB). With direct reads, "piece" lost or tied in every cell of the
# benchmark, and "expert" made the card's part of a token 2.5-6.5x shorter than none (BENCHMARKS.md, session 19).
# "copy" is no hint: each expert is read into page-locked host memory of its own (_Spans) and the copy engine
# writes it into its slot, which stays on the card. It halves the card's part of a token, but the reads wait
# longer beside its transfers (copying each piece as it arrived was worse): over session 25's runs it won 11 of
# 16 skewed cells and lost 6 of 10 uniform ones (tied 3). An option, not the default; COPY_MISSES below.
HINTS: bool | str = "expert"
_hinting = ThreadPoolExecutor(max_workers=1)
# With HINTS "copy", the copy engine only for a step that reads at most this many experts, the hints beyond:
# a copy is a transfer beside the disk's, and many at once slowed the reads (BENCHMARKS.md, session 25).
COPY_MISSES = 1 << 30


def _hints_settled() -> None:
    """Wait until every hint asked for so far is made and its pages have moved (the hint thread's queue, then the
    stream the hints go on). A read must not write into a slot whose pages a hint is still moving: a direct read
    writes the pages the disk was handed, the move copies them away mid-write, and the read's checksum fails (an
    offload_bench run hit it, session 25)."""
    _hinting.submit(uvm.copies_done).result()


class _Spans:
    """Page-locked host memory for HINTS "copy": an expert in flight is read into a span of its own, then
    copied into its slot by the copy engine; the slot stays on the card and no page moves. At most `n` spans
    (made as needed, kept); an expert that finds none free takes the hinted path."""

    def __init__(self, n: int):
        self.n, self.free, self.made = n, {}, 0

    def take(self, size: int) -> memoryview | None:
        free = self.free.setdefault(size, [])
        if not free and self.made < self.n:
            span = uvm.pinned(size)
            if span is not None:
                self.made += 1
                free.append(span)
        return free.pop() if free else None

    def give(self, span: memoryview) -> None:
        self.free[span.nbytes].append(span)


_spans = _Spans(24)
PIECE = 512 << 10  # an expert is read as pieces of this size in parallel: a disk serves several at once (BENCHMARKS.md)
WORKERS = 32  # reads in flight at once (threads: each mostly waits on the disk)


# Reads skip the page cache where they can (Linux's O_DIRECT, macOS's F_NOCACHE): experts that do not fit in
# memory gain nothing from it, and on the lent machine's disk direct reads were 1.3-1.8x faster than
# buffered ones (scripts/read_probe.py, BENCHMARKS.md). O_DIRECT wants the file offset, and each buffer's
# address and length, aligned to the disk's blocks; the converter aligns the experts' bytes to ALIGN, a read
# that is not aligned (an older folder, a small model) goes through the page cache. Off to compare.
DIRECT = True
ALIGN = 4096


def _open_direct(path: Path) -> int | None:
    """A descriptor whose reads bypass the page cache, or None where the OS or filesystem has none."""
    try:
        if hasattr(os, "O_DIRECT"):
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        if sys.platform == "darwin":
            import fcntl

            fd = os.open(path, os.O_RDONLY)
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
            return fd
    except OSError:  # (tmpfs refuses O_DIRECT)
        pass
    return None


def _aligned(views: list[memoryview], offset: int) -> bool:
    return offset % ALIGN == 0 and all(v.nbytes % ALIGN == 0 and _address(v) % ALIGN == 0 for v in views)


def _address(v: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(v))


def aligned_buffer(n: int) -> memoryview:
    """n writable bytes at a page boundary (anonymous memory), which a direct read can fill."""
    return memoryview(mmap.mmap(-1, n))


class ExpertFile:
    """One layer's experts file: expert e is the `stride` bytes at start + e * stride,
    its parts (gate_proj.weight, gate_proj.scales, ...) back to back in `order`."""

    drop_pages = False  # forget each expert's pages once read (the benchmark's honest disk, when buffered)

    def __init__(self, folder: Path, layer: int, entry: dict):
        self.path, self.layer = folder / entry["file"], layer
        self.fd = os.open(self.path, os.O_RDONLY)
        try:  # the numbers against the file as opened, before any read: none may reach past it
            check_experts_entry(entry, os.fstat(self.fd).st_size, str(self.path))
        except ValueError:
            os.close(self.fd)
            raise
        self.direct = _open_direct(self.path) if DIRECT else None
        self.start, self.stride = entry["data_start"], entry["stride"]
        self.parts, self.crc = entry["parts"], entry.get("crc32")
        self.order = sorted(self.parts, key=lambda p: self.parts[p]["offset"])
        self.pieces = {"direct": 0, "buffered": 0}  # how the pieces were read
        self._count = threading.Lock()

    def nbytes(self, part: str) -> int:
        spec = self.parts[part]
        return int(np.prod(spec["shape"])) * np.dtype(STORED_DTYPES[spec["dtype"]]).itemsize

    def read_piece(self, views: list[memoryview], offset: int, hints: bool = False) -> tuple[int, int]:
        """(bytes read, their crc32) of one piece at `offset` within an expert's range: past the page
        cache when the piece is aligned. `hints`: the views are CUDA managed memory, sent to the card in
        bulk once read, rather than a page fault at a time when a kernel first reads them (glm_mlx.uvm)."""
        direct = self.direct
        if direct is not None and _aligned(views, offset):
            try:
                n = preadv_all(direct, views, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = direct = None  # a filesystem that takes the flag but not its reads
        else:
            direct = None
        if direct is None:
            n = preadv_all(self.fd, views, offset)
            if self.drop_pages:
                os.posix_fadvise(self.fd, offset, sum(v.nbytes for v in views), os.POSIX_FADV_DONTNEED)
        with self._count:
            self.pieces["buffered" if direct is None else "direct"] += 1
        crc = 0
        for v in views:
            crc = zlib.crc32(v, crc)
        if hints:  # after the checksum, whose reads would fault the pages back
            uvm.after_write(views)
        return n, crc

    def start_read(self, pool, e: int, views: list[memoryview], hints: bool = False) -> "ExpertRead":
        """Start reading expert e into `views` (writable bytes, in file order), in pieces."""
        offset, futures = self.start + e * self.stride, []
        for piece in split(views, PIECE):
            futures.append((pool.submit(self.read_piece, piece, offset, hints), sum(v.nbytes for v in piece)))
            offset += futures[-1][1]
        return ExpertRead(self, e, futures)


class ExpertRead:
    """An expert's read under way: its pieces' futures, checked as one."""

    def __init__(self, file: ExpertFile, e: int, futures: list):
        self.file, self.e, self.futures = file, e, futures
        self.dropped = 0  # bytes abandon() dropped before they were read

    def result(self) -> None:
        """Wait for every piece; a short or corrupt expert raises ExpertReadError."""
        f, e = self.file, self.e
        got, crc, error = 0, 0, None
        for fut, size in self.futures:
            try:
                n, c = fut.result()
            except OSError as ex:
                error = error or ex
                continue
            got += n
            crc = crc32_combine(crc, c, size)
        if error is not None:
            raise ExpertReadError(f"{f.path}: expert {e} of layer {f.layer}: {error}")
        if got != f.stride:
            raise ExpertReadError(f"{f.path}: expert {e} of layer {f.layer}: read {got} of "
                                  f"{f.stride} bytes (is the file truncated?)")
        if f.crc is not None and crc != f.crc[e]:
            raise ExpertReadError(f"{f.path}: expert {e} of layer {f.layer} does not match the "
                                  "manifest's checksum (the file is corrupt)")

    def abandon(self) -> bool:
        """Stop a read no longer wanted, without waiting: pieces not started are dropped, those under way go
        on writing into their memory until they finish (`done`). True when it had all been read already."""
        dropped = [size for fut, size in self.futures if fut.cancel()]
        self.dropped = sum(dropped)
        return not dropped and self.done()

    def done(self) -> bool:
        """Whether no piece is under way or waiting (read, failed or dropped)."""
        return all(fut.done() for fut, _ in self.futures)

    def stop(self) -> None:
        """Wait for the pieces under way (after abandon)."""
        for fut, _ in self.futures:
            if not fut.cancelled():
                fut.exception()


def arrays(file: ExpertFile, blob: memoryview) -> dict[str, np.ndarray]:
    out = {}
    for part, spec in file.parts.items():
        dt = np.dtype(STORED_DTYPES[spec["dtype"]])
        n = int(np.prod(spec["shape"]))
        out[part] = np.frombuffer(blob, dtype=dt, count=n, offset=spec["offset"]).reshape(spec["shape"])
    return out


def _detached(a: mx.array) -> mx.array:
    """a's values in a new array with no graph behind it. Under a gradient transform MLX keeps the
    inputs of every array it evaluates (it may differentiate them), so a bank's groups, computed on
    a's graph, would all stay in memory until the backward pass; computed on this, each group's
    temporaries go when the next group comes."""
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: its bits, as they are
        return mx.array(np.array(a.view(mx.uint16))).view(mx.bfloat16)
    return mx.array(np.array(a))


FREE, HELD = -1, -2  # a slot that holds no expert: free, or held until an abandoned read into it stops


class Slots:
    """Which expert each of a bank's slots holds, and the eviction policy's bookkeeping: no I/O, so that
    scripts/policy_sim.py replays routing traces through it alone (hit rates, against the optimum)."""

    def __init__(self, slots: int, experts: int, policy: str = "lfu", pin: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r}: choose from {', '.join(POLICIES)}")
        self.slots, self.policy, self.pin = slots, policy, pin
        self.slot_of = np.full(experts, -1, dtype=np.int64)
        self.expert_in = np.full(slots, FREE, dtype=np.int64)  # an expert's id, FREE or HELD
        self.score = np.zeros(experts)
        self.recent = np.zeros(experts, dtype=bool)  # used by the previous step
        self.clock = 0

    def use(self, needed: np.ndarray) -> None:
        """A step needs these experts: the policy's scores updated (before their misses are admitted)."""
        self.clock += 1
        if self.policy == "lfu":
            self.score *= DECAY
            self.score[needed] += 1.0
        else:
            self.score[needed] = self.clock

    def victim(self, protect: np.ndarray, spare_recent: bool = False) -> int | None:
        """A slot to (re)fill: a free one, else the coldest unprotected one; with pin, one the previous
        step did not use if there is one; with `spare_recent`, only such a one (None when there is none).
        Never a held one."""
        free = np.flatnonzero(self.expert_in == FREE)
        if free.size:
            return int(free[0])
        cand = np.flatnonzero(~protect & (self.expert_in >= 0))
        if (self.pin or spare_recent) and cand.size:
            cold = cand[~self.recent[self.expert_in[cand]]]
            cand = cold if cold.size or spare_recent else cand
        if not cand.size:
            return None
        return int(cand[np.argmin(self.score[self.expert_in[cand]])])

    def take(self, slot: int, e: int) -> None:
        self.free(slot)
        self.expert_in[slot], self.slot_of[e] = e, slot

    def free(self, slot: int, held: bool = False) -> None:
        """The slot holds no expert: free, or `held` (neither free nor any expert's: an abandoned read still
        writes into it) until freed again."""
        if self.expert_in[slot] >= 0:
            self.slot_of[self.expert_in[slot]] = -1
        self.expert_in[slot] = HELD if held else FREE

    @property
    def usable(self) -> int:
        """Slots not held."""
        return int((self.expert_in != HELD).sum())

    def admit(self, needed: np.ndarray, spare_recent: bool = False) -> list[tuple[int, int]]:
        """(expert, slot) for each of `needed`'s experts not resident, its slot taken for it: never one
        holding another of `needed` (len(needed) <= slots). `spare_recent` (a prefetch's guesses): never
        one the previous step used either, and as many as such slots allow."""
        protect = np.zeros(self.slots, dtype=bool)
        protect[self.slot_of[needed][self.slot_of[needed] >= 0]] = True
        out = []
        for e in (int(e) for e in needed if self.slot_of[e] < 0):
            slot = self.victim(protect, spare_recent)
            if slot is None:
                break
            self.take(slot, e)
            protect[slot] = True
            out.append((e, slot))
        return out

    def remember(self, needed: np.ndarray | None) -> None:
        """The step's experts, for pin (None: a step that went through the bank in groups)."""
        self.recent[:] = False
        if needed is not None:
            self.recent[needed] = True


class _Holder:
    """Keeps the bank out of the module tree: its slots are not model parameters."""

    def __init__(self, glu: SwitchGLU):
        self.glu = glu


class OffloadedExperts(nn.Module):
    """Stands in for a MoE layer's SwitchGLU: same call, experts read on demand."""

    def __init__(self, file: ExpertFile, entry: dict, dims: tuple[int, int], slots: int, dtype, pool,
                 policy: str = "lfu", pin: bool = False):
        super().__init__()
        table = Slots(slots, entry["num_experts"], policy, pin)
        dim, hidden = dims
        glu = SwitchGLU(dim, hidden, slots)
        for p in PROJS:
            q = entry["quantization"][p]
            if q:
                E, out, inp = getattr(glu, p).weight.shape
                setattr(glu, p, QuantizedSwitchLinear(E, inp, out, q["group_size"], q["bits"]))
        # The bank in the dtype the model computes in (the stored one when dtype is None),
        # as real, evaluated buffers: reads may write into them.
        direct = True
        for part, spec in entry["parts"].items():
            proj, name = part.split(".")
            stored = MX_DTYPES[spec["dtype"]]
            dt = stored if dtype is None or not mx.issubdtype(stored, mx.floating) else dtype
            direct &= dt == stored
            setattr(getattr(glu, proj), name, mx.zeros((slots, *spec["shape"]), dt))
        mx.eval(glu.parameters())
        object.__setattr__(self, "bank", _Holder(glu))
        object.__setattr__(self, "file", file)
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "pending", {})  # expert -> a prefetch's read, as _start returns it
        object.__setattr__(self, "stopping", [])  # abandoned prefetches' reads (_start's tuples), slots held
        object.__setattr__(self, "next", None)  # (router, OffloadedExperts) of the next MoE layer
        object.__setattr__(self, "views", None)
        object.__setattr__(self, "routed", None)  # (inds, _route's answer) that slots_for could not use
        object.__setattr__(self, "hinted", set())  # slots hinted since the hints last settled (_start)
        if direct:  # slot s of every part, in file order: the iovecs of one preadv
            whole = {p: memoryview(getattr(getattr(glu, p.split(".")[0]), p.split(".")[1])).cast("B")
                     for p in file.order}
            object.__setattr__(self, "views", [[whole[p][s * file.nbytes(p): (s + 1) * file.nbytes(p)]
                                                for p in file.order] for s in range(slots)])
        object.__setattr__(self, "hints", HINTS if direct and uvm.available(glu.gate_proj.weight) else False)
        self.slots, self.table, self.stats = slots, table, Stats()

    @property
    def slot_of(self) -> np.ndarray:
        """Each expert's slot, -1 where it is not in the bank."""
        return self.table.slot_of

    # --- reads ----------------------------------------------------------------

    def _start(self, e: int, slot: int, copy: bool = True) -> tuple:
        """Start reading expert e: straight into its slot, into a span to copy into it (HINTS "copy"),
        or into a buffer to convert. (expert, slot, ExpertRead, span, buffer or None)."""
        if self.views is not None:
            if slot in self.hinted:  # a hint may still be moving the slot's pages
                _hints_settled()
                self.hinted.clear()
            if self.hints == "piece":
                self.hinted.add(slot)  # (the reading threads hint each piece)
            span = _spans.take(self.file.stride) if self.hints == "copy" and copy else None
            if span is not None:  # into page-locked memory, copied into the slot once read (_wait)
                return e, slot, self.file.start_read(self.pool, e, [span]), span
            return e, slot, self.file.start_read(self.pool, e, self.views[slot], self.hints == "piece"), None
        blob = aligned_buffer(self.file.stride)
        return e, slot, self.file.start_read(self.pool, e, [blob]), blob

    def _wait(self, reads: list[tuple]) -> None:
        """Wait for reads from _start; fill converted ones; a failed read empties its
        slot and raises once every read has stopped writing."""
        t0 = time.perf_counter()
        error, blobs, spans, copy_err = None, [], [], 0
        for e, slot, read, blob in reads:
            try:
                read.result()
            except ExpertReadError as ex:
                error = error or ex
                self.table.free(slot)
                if self.views is not None and blob is not None:
                    _spans.give(blob)
                continue
            if self.views is not None and blob is not None:  # a span: copied into the slot on the card
                copy_err = copy_err or uvm.copy_to_card(self.views[slot], blob)
                spans.append((slot, blob))
            elif blob is not None:
                blobs.append((slot, e, blob))
            elif self.hints in ("expert", "copy"):  # ("copy" when no span was free)
                _hinting.submit(uvm.after_write, self.views[slot])
                self.hinted.add(slot)
        if spans:
            copy_err = uvm.copies_done() or copy_err
            for slot, span in spans:
                _spans.give(span)
                if copy_err:  # what the slots hold is not known
                    self.table.free(slot)
            if copy_err and error is None:
                error = ExpertReadError(f"{self.file.path}: copying experts of layer {self.file.layer} to the card "
                                        f"failed (CUDA error {copy_err})")
        self.stats.seconds += time.perf_counter() - t0
        if blobs:
            self._fill(blobs)
        if error is not None:
            raise error

    def _fill(self, blobs: list[tuple[int, int, memoryview]]) -> None:
        """Converted reads into their slots, written in place like a direct read (a new array
        would be a graph node, kept whole under a gradient transform): one conversion per tensor."""
        glu = self.bank.glu
        views = [arrays(self.file, b) for _, _, b in blobs]
        where = [s for s, _, _ in blobs]
        for part in views[0]:
            proj, name = part.split(".")
            bank = getattr(glu, proj)[name]
            a = stored_array(np.stack([v[part] for v in views]), self.file.parts[part]["dtype"]).astype(bank.dtype)
            mx.eval(a)
            dst = np.frombuffer(memoryview(bank).cast("B"), np.uint8).reshape(bank.shape[0], -1)
            dst[where] = np.frombuffer(memoryview(a).cast("B"), np.uint8).reshape(len(blobs), -1)

    # --- a step ----------------------------------------------------------------

    def _settle(self, needed: np.ndarray) -> list[tuple]:
        """Settle the prefetches the previous layer started: a wrong guess is dropped
        (what it had under way finishes first: it writes into its slot) unless it
        was read completely; the right ones are returned, still under way, for the
        step to wait for with its own reads."""
        if not self.pending:
            return []
        want = set(map(int, needed))
        reads, kept = [], []
        for e, r in self.pending.items():
            if e in want:
                reads.append(r)
                self.stats.prefetch_used += 1
            elif r[2].abandon():  # read whole anyway: it stays in the bank, but its slot is not this step's
                kept.append(r)
            else:  # its slot (and span) held, not waited for, until the pieces under way stop (_release)
                self.table.free(r[1], held=True)
                self.stopping.append(r)
                self.stats.bytes -= r[2].dropped
                self.stats.dropped += r[2].dropped
        self.pending.clear()
        if kept:  # finished (checked, hinted) before this step's misses may take their slots: waited for among
            self._wait(kept)  # the step's own reads, one would be hinted after another read began writing in it
        return reads

    def _release(self, wait: bool = False) -> None:
        """Free the slots (and spans) of abandoned reads whose pieces have stopped (`wait`: all, once stopped)."""
        going = []
        for r in self.stopping:
            if wait:
                r[2].stop()
            if not r[2].done():
                going.append(r)
                continue
            self.table.free(r[1])
            if self.views is not None:
                if self.hints:  # a piece's hint (HINTS "piece") may have come after the hints last settled
                    self.hinted.add(r[1])
                if r[3] is not None:
                    _spans.give(r[3])
        self.stopping[:] = going

    def ensure(self, needed: np.ndarray, then=None, under_way: list | None = None) -> None:
        """Make every expert in `needed` resident (len(needed) <= slots); `then` runs
        once this step's reads are queued (the next layer's prefetch goes behind them),
        before waiting for them and for `under_way` (this layer's prefetched reads): so
        the next layer's reads are queued while this layer's are still in flight."""
        if self.stopping:
            self._release(wait=self.table.usable < needed.size)  # a held slot is waited for only if needed
        misses = self.table.admit(needed)
        self.stats.hits += len(needed) - len(misses)
        self.stats.misses += len(misses)
        self.stats.bytes += len(misses) * self.file.stride
        reads = [self._start(e, slot, len(misses) <= COPY_MISSES) for e, slot in misses]
        if then is not None:
            then()
        self._wait((under_way or []) + reads)

    def prefetch(self, experts: np.ndarray) -> None:
        """Start reading predicted experts into cold slots (never the last step's nor held ones)."""
        self._release()
        guesses = self.table.admit(experts, spare_recent=True)
        for e, slot in guesses:
            self.pending[e] = self._start(e, slot, len(guesses) <= COPY_MISSES)
            self.stats.prefetched += 1
            self.stats.bytes += self.file.stride

    @property
    def fused_glu(self) -> SwitchGLU | None:
        """The SwitchGLU a token's fused decode kernels may run on: the bank's, unless a
        LoRA adapter adds per-expert terms (then None: _glu computes)."""
        return None if "gate_proj" in self else self.bank.glu

    def _glu(self, x: mx.array, slots: np.ndarray, experts: np.ndarray) -> mx.array:
        """The bank's SwiGLU on the rows' slots, plus, under a LoRA adapter on the experts,
        each projection's low-rank term by expert id (glm_mlx.lora.ExpertLoRA)."""
        glu, s = self.bank.glu, mx.array(slots)
        if "gate_proj" not in self:
            return glu(x, s)
        e = mx.array(experts)

        def proj(name: str, z: mx.array) -> mx.array:
            y = getattr(glu, name)(z, s)
            return y + self[name](z, e).astype(y.dtype)

        xe = mx.expand_dims(x, (-2, -3))
        return proj("down_proj", nn.silu(proj("gate_proj", xe)) * proj("up_proj", xe)).squeeze(-2)

    def _route(self, x: mx.array, inds: mx.array) -> tuple[np.ndarray, np.ndarray, object]:
        """The router's choice on the host: (ids, needed experts, the next layer's prefetch or None)."""
        then = None
        if self.next is not None and x.size == x.shape[-1]:  # decode: guess the next layer's experts
            router, nxt = self.next
            guess = router(x)[0]
            mx.eval(inds, guess)  # one synchronisation for both
            then = lambda: nxt.prefetch(np.unique(np.array(guess)))  # noqa: E731
        idx = np.array(inds)  # the host must know which experts to read
        return idx, np.unique(idx), then

    def _begin(self, needed: np.ndarray) -> list[tuple]:
        """A step's bookkeeping: the previous layer's prefetches settled (the wanted ones returned,
        under way), the experts' scores updated."""
        under_way = self._settle(needed)
        self.table.use(needed)
        return under_way

    def _resident(self, needed: np.ndarray, then) -> None:
        """A step's experts, all of which fit the bank, made resident (the misses read)."""
        self.ensure(needed, then, self._begin(needed))
        self.table.remember(needed)

    def slots_for(self, x: mx.array, inds: mx.array) -> mx.array | None:
        """For one token's fused kernels: its experts made resident and their slots (shaped
        like inds); None when they outnumber the slots (then call the bank with the same inds:
        it groups them, on the choice read here)."""
        route = idx, needed, then = self._route(x, inds)
        if needed.size > self.slots:
            object.__setattr__(self, "routed", (inds, route))
            return None
        self._resident(needed, then)
        return mx.array(self.slot_of[idx].astype(np.uint32))

    mixes = True  # MoE hands it the router's weights: the weighted sum is computed (and differentiated) here

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array | None = None) -> mx.array:
        """[..., k, D] like SwitchGLU; given the router's `weights` [..., k], the weighted sum
        [..., D] as MoE computes it. Differentiable in x and weights (training, experts frozen)."""
        routed = self.routed
        object.__setattr__(self, "routed", None)
        idx, needed, then = routed[1] if routed is not None and routed[0] is inds else self._route(x, inds)
        if "gate_proj" in self:  # a LoRA adapter on the experts: inference only (training refuses it)
            return _mixed(self._forward(x, idx, needed, then), weights)

        # The slots are overwritten as a step's experts go through them, so the backward pass cannot
        # read what the forward pass saw: it brings the experts back in and differentiates them itself.
        @mx.custom_function
        def experts(x, inds, w):
            if weights is not None and RECOMPUTING:  # the value is not used: read nothing
                return mx.zeros(x.shape, x.dtype)
            return _mixed(self._forward(x, idx, needed, then), weights)

        @experts.vjp
        def experts_vjp(primals, cotangent, output):
            x, inds, w = primals
            dx, dw = self._backward(x, w if weights is not None else None, idx, needed, cotangent)
            return dx, mx.zeros_like(inds), mx.zeros_like(w) if dw is None else dw

        return experts(x, inds, mx.array(0.0) if weights is None else weights)

    def _resident_first(self, needed: np.ndarray) -> np.ndarray:
        """A grouped step's experts, those already in the bank first: the first group reads nothing
        when the last grouped call left it there (a training step's recomputation and backward pass
        follow its forward pass over the same experts; a prefill's chunks over much the same)."""
        return needed[np.argsort(self.slot_of[needed] < 0, kind="stable")]

    def _pairs(self, idx: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (row, choice) pairs routed to `group`'s experts: their flat positions in idx, their
        rows, and their experts [n, 1]."""
        where = np.flatnonzero(np.isin(idx, group))
        return where, where // idx.shape[-1], idx.reshape(-1)[where][:, None]

    def _forward(self, x: mx.array, idx: np.ndarray, needed: np.ndarray, then) -> mx.array:
        x = _detached(x)  # under a gradient transform nothing computed here is kept for the backward pass
        if needed.size <= self.slots:
            self._resident(needed, then)
            return self._glu(x, self.slot_of[idx], idx)
        self._wait(self._begin(needed))  # more experts than slots (prefill): in groups, each read once for all its rows
        needed = self._resident_first(needed)
        D = x.shape[-1]
        rows, y = x.reshape(-1, D), mx.zeros((idx.size, D), x.dtype)
        for g in range(0, needed.size, self.slots):
            self.ensure(needed[g : g + self.slots])  # no prefetch: a bank that groups has no room to read ahead
            where, row, experts = self._pairs(idx, needed[g : g + self.slots])
            y[mx.array(where)] = self._glu(rows[mx.array(row)], self.slot_of[experts], experts)[:, 0]
            mx.eval(y)  # the next group overwrites these slots
        self.table.remember(None)
        return y.reshape(*idx.shape, D)

    def _backward(self, x: mx.array, w: mx.array | None, idx: np.ndarray, needed: np.ndarray,
                  cotangent: mx.array) -> tuple[mx.array, mx.array | None]:
        """d(loss)/dx, and d(loss)/dw when the weighted sum was asked for (else None), through the
        experts: the step's experts brought back group by group, each group's outputs computed
        again for the weights' gradient in the same pass."""
        D, needed = x.shape[-1], self._resident_first(needed)
        rows, cot = _detached(x).reshape(-1, D), _detached(cotangent).reshape(-1, D)
        wf = None if w is None else _detached(w).reshape(-1)
        dx, dw = mx.zeros_like(rows), None if w is None else mx.zeros(idx.size, w.dtype)
        for g in range(0, needed.size, self.slots):
            self.ensure(needed[g : g + self.slots])
            where, row, experts = self._pairs(idx, needed[g : g + self.slots])
            at, r, slots = mx.array(where), mx.array(row), mx.array(self.slot_of[experts])
            c = cot[at] if w is None else cot[r] * wf[at][:, None].astype(cot.dtype)  # each pair's dy
            (y,), (d,) = mx.vjp(lambda z: self.bank.glu(z, slots)[:, 0], [rows[r]], [c])
            dx = dx.at[r].add(_detached(d))  # mx.vjp's results keep their graph: the group's temporaries
            if w is not None:
                dw[at] = _detached((cot[r] * y).sum(axis=-1).astype(w.dtype))
            mx.eval(dx if dw is None else (dx, dw))  # before the next group overwrites these slots
        return dx.reshape(x.shape), None if w is None else dw.reshape(w.shape)


def _mixed(y: mx.array, weights: mx.array | None) -> mx.array:
    """y [..., k, D] weighted by the router's weights [..., k] and summed, as MoE does; y without weights."""
    return y if weights is None else (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


# Within recomputing(): layers run again only for their vjp (finetune's layer-by-layer backward pass),
# so an offloaded bank's weighted sum, whose value then feeds nothing its vjp needs (the MoE is the
# layer's last op, added to the residual), skips its forward reads: its backward pass computes the
# experts' outputs itself. Each step then reads a layer's experts twice, not three times.
RECOMPUTING = Switch()
recomputing = RECOMPUTING.on


AUTO_RESERVE = 2 * 10**9  # what `auto` leaves for the KV cache, activations and the rest of the process


def machine_memory() -> int | None:
    """Bytes MLX may use here: Metal's recommended working set on a Mac, else
    three quarters of physical memory; None when unknown."""
    try:
        info = mx.device_info()
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"])
    except (AttributeError, RuntimeError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75)
    except (ValueError, OSError):
        return None


def parse_size(size: str | int | None, total: int, resident: int = 0, smallest: int = 0) -> int | None:
    """Bytes for --expert-memory: '24GB', '512MB', a number of bytes, or 'auto'
    (what the machine has for MLX, less the `resident` non-expert weights and
    AUTO_RESERVE); None when every expert (`total` bytes) fits resident.
    `smallest` is the least budget that works (one expert per layer)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    if s == "AUTO":
        mem = machine_memory()
        if mem is None:
            return None
        budget = mem - resident - AUTO_RESERVE
        if budget >= total:
            return None
        if budget < smallest:
            raise ValueError(f"--expert-memory auto: MLX may use {mem / 1e9:.1f} GB here; the non-expert weights "
                             f"({resident / 1e9:.1f} GB) and a {AUTO_RESERVE / 1e9:.0f} GB reserve leave less than "
                             f"one expert per layer ({smallest / 1e9:.2f} GB)")
        return budget
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?I?B?)", s)
    if not m:
        raise ValueError(f"--expert-memory {size!r}: give a size like 24GB, 512MB, or auto")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m[2]]
    return int(float(m[1]) * unit)


# The defaults, each measured against its alternative (BENCHMARKS.md): eviction and pin by their hit rates
# (scripts/policy_sim.py: LFU 0.6-2.1 points above LRU on the skewed trace; pin 1.2 below at a 10% budget),
# prefetch by its speed in scripts/offload_bench.py (it pays only as far as its guesses are right).
POLICY, PIN, PREFETCH = "lfu", False, False


def offload_experts(model, folder: Path, manifest: dict, budget: int, dtype, prefetch: bool | None = None,
                    policy: str | None = None, pin: bool | None = None) -> list[OffloadedExperts]:
    """Swap every MoE layer's experts for an offloaded bank sharing `budget` bytes.
    dtype None keeps the folder's dtypes (reads go straight into the bank)."""
    prefetch = PREFETCH if prefetch is None else prefetch
    policy, pin = policy or POLICY, PIN if pin is None else pin
    entries = manifest["experts"]
    stride = max(e["stride"] for e in entries.values())
    slots = max(1, min(min(e["num_experts"] for e in entries.values()), budget // (stride * len(entries))))
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    n = model.args.num_hidden_layers
    layers = []
    for i, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        path = model_key(f"model.layers.{i}.mlp", n)
        moe = model
        for key in path.split("."):
            moe = moe[int(key)] if isinstance(moe, list) else getattr(moe, key)
        off = OffloadedExperts(ExpertFile(folder, int(i), entry), entry,
                               (model.args.hidden_size, model.args.moe_intermediate_size), slots, dtype, pool,
                               policy, pin)
        moe.experts = off
        layers.append((int(i), moe, off))
    trunk = [(i, moe, off) for i, moe, off in layers if i < n]
    for (_, _, off), (_, nxt_moe, nxt_off) in zip(trunk, trunk[1:]) if prefetch else ():
        object.__setattr__(off, "next", (nxt_moe.gate, nxt_off))
    return [off for _, _, off in layers]


def offloaded_banks(model) -> list[OffloadedExperts]:
    """The offloaded layers in layer order (named_modules lists a list's items last first)."""
    banks = [m for _, m in model.named_modules() if isinstance(m, OffloadedExperts)]
    return sorted(banks, key=lambda b: b.file.layer)


def offloaded_stats(model) -> Stats | None:
    """All offloaded layers' statistics summed; None when the experts are resident."""
    banks = offloaded_banks(model)
    if not banks:
        return None
    total = Stats()
    for m in banks:
        total.add(m.stats)
    return total
