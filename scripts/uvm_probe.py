"""What an offloaded expert's read costs in CUDA's managed memory, and what the driver's hints buy.

    python3 scripts/uvm_probe.py --slots 16 --rounds 3

MLX's CUDA buffers are managed memory: a page lives on the host or on the card
and moves on a fault. A bank slot the card last read sits on the card; a read
from disk into it faults each page back to the host first, and the card's next
kernel faults it back again. This times, per round over `slots` Air-sized
experts (9.2 MB each, read in 512 KB pieces by 32 threads, as offload.py does):
- read: preadv of every slot from a file (in the page cache, or from the disk
  with --cold), into the slots or into plain host memory (the reference);
- use: a kernel reading every slot afterwards (the migration back);
under variants: plain; the slots prefetched to the host before the read and to
the card after it (cuMemPrefetchAsync); "hints", offload.py's: each piece's
pages sent to the card as soon as it is read (glm_mlx.uvm); the slots advised
read-mostly (last: the advice stays with the memory, which MLX's buffer cache
hands on); "expert hints", offload.py's default: each expert's slot sent to the
card once read; "copy" and "copy a piece": reads into page-locked host memory,
then the copy engine into slots that stay on the card (--copy-only: just plain,
the hints and these).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from glm_mlx import uvm

STRIDE = 3 * 1408 * 4096 // 2 + 3 * 1408 * 4096 // 64 * 4  # an Air expert: 4-bit codes, bf16 scales and biases
PIECE = 512 << 10


def read_into(fd: int, views: list[memoryview], pool, cold: bool, hints: bool = False, then=None) -> float:
    def one(i: int, v: memoryview) -> None:
        for o in range(0, v.nbytes, PIECE):
            piece = [v[o: o + PIECE]]
            os.preadv(fd, piece, i * STRIDE + o)
            if hints:  # as offload.ExpertFile.read_piece does
                uvm.after_write(piece)
            if then is not None:
                then(i, o, piece[0].nbytes)
        if cold:
            os.posix_fadvise(fd, i * STRIDE, STRIDE, os.POSIX_FADV_DONTNEED)

    if cold:  # nothing of the file in the page cache (it was just written)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    list(pool.map(lambda iv: one(*iv), enumerate(views)))
    return time.perf_counter() - t


_COPY = """
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, per = STRIDE / 16;
    if (i < (size_t)N * per) {
        size_t e = i / per, c = i - e * per;
        ((uint4*)bank)[(size_t)slots[e] * per + c] = ((const uint4*)staging)[e * per + c];
    }
    if (i == 0) done[0] = 1;
"""


def staged_rows(fd: int, pool, a, S: int, host: np.ndarray) -> None:
    """Reads into a staging buffer kept on the host (advised so, mapped for the card), then one kernel
    copying it into slots that stay on the card: the bank's pages never move."""
    copy = mx.fast.cuda_kernel(name="probe_stage_copy", input_names=["staging", "bank", "slots"],
                               output_names=["done"], source=_COPY)
    for advise in (True, False):
        staging = mx.array(np.zeros(S * STRIDE, np.uint8))
        mx.eval(staging)
        err = uvm.advise_host(staging) if advise else 0
        bank = mx.zeros((S, STRIDE), mx.uint8)
        mx.eval(bank)
        views = [memoryview(staging).cast("B")[i * STRIDE:(i + 1) * STRIDE] for i in range(S)]
        slots = mx.arange(S, dtype=mx.uint32)
        rows = []
        for _ in range(a.rounds):
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1))
            read = read_into(fd, views, pool, a.cold)
            t2 = time.perf_counter()
            n = S * STRIDE // 16
            done = copy(inputs=[staging, bank, slots], template=[("STRIDE", STRIDE), ("N", S)],
                        grid=(-(-n // 256) * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(1,)],
                        output_dtypes=[mx.uint32])[0]
            mx.eval(done)
            t3 = time.perf_counter()
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1))
            t4 = time.perf_counter()
            rows.append((read, t3 - t2, t4 - t3))
        ok = bool(np.array_equal(np.array(bank[S - 1, :4096]), host[(S - 1) * STRIDE: (S - 1) * STRIDE + 4096]))
        best = min(rows, key=lambda r: sum(r))
        name = "staged" + (" (advised)" if advise else "")
        print(f"{name:22s} read {best[0] * 1e3:7.1f} ms  copy {best[1] * 1e3:7.1f} ms  "
              f"use {best[2] * 1e3:7.1f} ms  total {sum(best) * 1e3:7.1f} ms  bytes right: {ok}  driver error: {err}",
              flush=True)


def copy_rows(fd: int, pool, a, S: int, host: np.ndarray) -> None:
    """Reads into page-locked host memory (registered with the driver), then the copy engine
    (cuMemcpyHtoDAsync) writes each expert into its slot, which stays on the card: the bank's pages never
    move and the host never touches them. "copy": an expert's copy once all of it is read; "copy a piece":
    each piece's as soon as it is read, overlapping the reads still under way (glm_mlx.uvm's own calls)."""
    whole = uvm.pinned(S * STRIDE)
    if whole is None:
        print("copy: no CUDA driver here, or it refused page-locked memory")
        return
    views = [whole[i * STRIDE:(i + 1) * STRIDE] for i in range(S)]
    for per_piece in (False, True):
        bank = mx.zeros((S, STRIDE), mx.uint8)
        mx.eval(bank)
        dst = memoryview(bank).cast("B")

        def copy(i: int, o: int, n: int) -> None:
            at = i * STRIDE + o
            errs.add(uvm.copy_to_card([dst[at: at + n]], whole[at: at + n]))

        errs, rows = set(), []
        for _ in range(a.rounds):
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1))  # the card reads every slot: its pages are there
            read = read_into(fd, views, pool, a.cold, then=copy if per_piece else None)
            t2 = time.perf_counter()
            if not per_piece:
                for i in range(S):
                    copy(i, 0, STRIDE)
            errs.add(uvm.copies_done())
            t3 = time.perf_counter()
            s = mx.sum(bank.view(mx.uint32)[:, :8], axis=1)
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1), s)
            t4 = time.perf_counter()
            rows.append((read, t3 - t2, t4 - t3))
        ok = bool(np.array_equal(np.array(bank[S - 1, :4096]), np.frombuffer(views[-1][:4096], np.uint8)))
        best = min(rows, key=lambda r: sum(r))
        name = "copy a piece" if per_piece else "copy"
        print(f"{name:22s} read {best[0] * 1e3:7.1f} ms  copy {best[1] * 1e3:7.1f} ms  "
              f"use {best[2] * 1e3:7.1f} ms  total {sum(best) * 1e3:7.1f} ms  bytes right: {ok}  "
              f"driver errors: {sorted(errs - {0}) or 'none'}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file", default="/tmp/uvm-probe.bin")
    ap.add_argument("--cold", action="store_true", help="drop each expert's pages: read from the disk")
    ap.add_argument("--copy-only", action="store_true", help="plain, hints and the copy engine's rows only")
    a = ap.parse_args()
    S = a.slots
    if not os.path.exists(a.file) or os.path.getsize(a.file) < S * STRIDE:
        with open(a.file, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 255, S * STRIDE, dtype=np.uint8).tobytes())
    fd = os.open(a.file, os.O_RDONLY)
    pool = ThreadPoolExecutor(32)
    host = np.zeros(S * STRIDE, np.uint8)
    probe = mx.zeros((4,), mx.uint8)
    mx.eval(probe)
    print(f"{mx.default_device()}, hints: {uvm.available()}, managed: {uvm.available(probe)}, "
          f"slots {S} x {STRIDE / 1e6:.1f} MB, {'disk' if a.cold else 'page cache'}")
    plain = [memoryview(host)[i * STRIDE:(i + 1) * STRIDE] for i in range(S)]
    print(f"host memory: read {min(read_into(fd, plain, pool, a.cold) for _ in range(a.rounds)) * 1e3:.1f} ms")
    if not a.copy_only:
        staged_rows(fd, pool, a, S, host)
        copy_rows(fd, pool, a, S, host)
    for variant in ("plain", "hints", "expert hints", "copy") if a.copy_only else (
            "plain", "hints", "prefetch", "plain", "hints", "read-mostly"):
        if variant == "copy":
            copy_rows(fd, pool, a, S, host)
            continue
        bank = mx.zeros((S, STRIDE), mx.uint8)
        mx.eval(bank)
        errors = set()
        if "read-mostly" in variant:
            errors.add(uvm.advise_read_mostly(bank))
        views = [memoryview(bank).cast("B")[i * STRIDE:(i + 1) * STRIDE] for i in range(S)]
        rows = []
        for _ in range(a.rounds):
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1))  # the card reads every slot: its pages move there
            t0 = time.perf_counter()
            if "prefetch" in variant:
                errors.add(uvm.to_host(bank))
            t1 = time.perf_counter()
            read = read_into(fd, views, pool, a.cold, variant == "hints")
            t2 = time.perf_counter()
            if "prefetch" in variant:
                errors.add(uvm.after_write([bank]))
            if variant == "hints":
                errors.add(uvm.after_write(views[:1]))  # (the code it returns; the reads drop theirs)
            if variant == "expert hints":  # offload.py's default: each expert's slot once read
                errors.add(uvm.after_write(views))
            s = mx.sum(bank.view(mx.uint32)[:, :8], axis=1)  # the card touches every slot
            mx.eval(mx.sum(bank.view(mx.uint32), axis=1), s)
            t3 = time.perf_counter()
            rows.append((t1 - t0, read, t3 - t2))
        ok = bool(np.array_equal(np.array(bank[S - 1, :4096]), host[(S - 1) * STRIDE: (S - 1) * STRIDE + 4096]))
        best = min(rows, key=lambda r: sum(r))
        print(f"{variant:22s} to host {best[0] * 1e3:7.1f} ms  read {best[1] * 1e3:7.1f} ms  "
              f"use {best[2] * 1e3:7.1f} ms  total {sum(best) * 1e3:7.1f} ms  bytes right: {ok}  "
              f"driver errors: {sorted(errors - {0}) or 'none'}")


if __name__ == "__main__":
    main()
