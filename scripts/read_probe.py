"""What an offloaded read's steps cost at the disk: reads in pieces, as offload.py makes them, with
each of its per-piece steps added in turn, and with O_DIRECT (no page cache).

    python3 scripts/read_probe.py --experts 64

Reads `--experts` experts' worth of bytes (Air-sized: 9.7 MB) from the file, 512 KB pieces on 32
threads, into an MLX array the card has just read (a bank's slots), nothing of the file in the page
cache before each mode. Prints GB/s for each mode, best of `--rounds`.
"""

from __future__ import annotations

import argparse
import mmap
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from glm_mlx import uvm
from uvm_probe import PIECE, STRIDE  # an Air expert (a multiple of 4096), read in offload.py's pieces


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="/tmp/read-probe.bin", help="made (random bytes) when missing")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=32)
    a = ap.parse_args()
    n = a.experts * STRIDE
    if not os.path.exists(a.file):
        block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
        with open(a.file, "wb") as f:
            for o in range(0, n + 4096, len(block)):
                f.write(block)
            os.fsync(f.fileno())
    assert os.path.getsize(a.file) >= n + 4096, "the file is smaller than the experts asked for"
    fds = {"buffered": os.open(a.file, os.O_RDONLY), "direct": os.open(a.file, os.O_RDONLY | os.O_DIRECT)}
    bank = mx.zeros((n,), mx.uint8)
    mx.eval(bank)
    host = mmap.mmap(-1, n)  # page-aligned host memory, as O_DIRECT wants
    # "pinned": host memory page-locked for the card (cuMemHostRegister), as the copy engine wants; "ring":
    # each thread's own 512 KB buffer, read into again and again (session 20's copy-engine reads did both)
    locked = uvm.pinned(n)
    rings = threading.local()
    pool = ThreadPoolExecutor(a.workers)
    pieces = [(o, min(PIECE, n - o)) for o in range(0, n, PIECE)]
    print(f"{mx.default_device()}; {a.experts} experts, {n / 1e9:.2f} GB in {len(pieces)} pieces of "
          f"{PIECE >> 10} KB, {a.workers} in flight; managed bank: {uvm.available(bank)}")

    def run(mode: str) -> float:
        direct = mode.startswith("direct")
        fd = fds["direct" if direct else "buffered"]
        dst = memoryview(locked if "pinned" in mode else host if "host" in mode else memoryview(bank).cast("B"))

        def one(span):
            o, size = span
            v = dst[o: o + size]
            if "ring" in mode:
                if not hasattr(rings, "buf"):
                    rings.buf = memoryview(mmap.mmap(-1, PIECE))
                v = rings.buf[:size]
            got = os.preadv(fd, [v], 4096 + o)
            if "crc" in mode:
                zlib.crc32(v)
            if "drop" in mode:
                os.posix_fadvise(fd, 4096 + o, size, os.POSIX_FADV_DONTNEED)
            if "hints" in mode:
                uvm.after_write([v])
            return got

        best = 0.0
        for _ in range(a.rounds):
            mx.eval(mx.sum(bank[:: 1 << 12]))  # the card touches the bank: its pages move there
            os.posix_fadvise(fds["buffered"], 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            got = sum(pool.map(one, pieces))
            dt = time.perf_counter() - t
            assert got == n, f"{mode}: read {got} of {n} bytes"
            best = max(best, n / dt / 1e9)
        return best

    modes = ["buffered", "buffered crc", "buffered crc drop", "buffered crc drop hints", "buffered host",
             "direct", "direct crc", "direct host", "direct crc hints", "direct host ring"]
    modes += ["direct pinned", "direct crc pinned"] if locked is not None else []
    for mode in modes + modes[:1] + ["direct"]:
        try:
            print(f"{mode:26s} {run(mode):6.2f} GB/s", flush=True)
        except OSError as e:
            print(f"{mode:26s} failed: {e}", flush=True)
    ref = np.frombuffer(host, np.uint8)[: 1 << 20].copy()  # (written by the last "host" mode: not a ring's)
    print("bank equals host read:", bool(np.array_equal(np.array(bank[: 1 << 20]), ref)))


if __name__ == "__main__":
    main()
