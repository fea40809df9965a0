"""Hints to CUDA's managed memory, for an offloaded bank's slots (no-ops elsewhere).

MLX's CUDA buffers are managed memory: each page lives on the host or on the
card, and moves when the other side touches it, a fault at a time. A bank slot
the card has computed on sits on the card; the host's read from disk into it
faults every page back first (moving bytes about to be overwritten), and the
card's next kernel faults them back again. The second move can be a bulk
transfer started as soon as the bytes are in (cuMemPrefetchAsync): the card's
kernel then finds them there. A hint never changes data, only where it lives:
a failed one costs time, not correctness. (Measured in scripts/uvm_probe.py,
beside hints tried and dropped: moving or discarding the pages to the host
before the read, piece by piece, cost more than the faults it saved; advising
read-mostly made the host's writes ten times slower.)

The bank can also keep the host off its slots: a read lands in page-locked host
memory (`pinned`) and the copy engine writes it into the slot, which stays on
the card (`copy_to_card`, offload.HINTS "copy"). No page moves either way.
Unlike a hint, a copy carries the data: a failed one is an error.

MLX does not expose these; this calls the CUDA driver through ctypes. On a Mac
(unified memory, nothing to move) and on the CPU, `available()` is False and
every call returns at once.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading

import mlx.core as mx

_HOST, _DEVICE = 2, 1  # CUmemLocationType
_READ_MOSTLY = 1  # CUmem_advise
_IS_MANAGED = 8  # CUpointer_attribute


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


@functools.cache
def _driver():
    """(libcuda, the card's ordinal), or None off CUDA."""
    cuda = getattr(mx, "cuda", None)  # (not in every build)
    if mx.default_device() != mx.gpu or cuda is None or not cuda.is_available():
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev = ctypes.c_int()
    if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(dev), 0):
        return None
    return lib, dev.value


_local, _lock, _shared = threading.local(), threading.Lock(), []


def _stream(lib, dev: int) -> ctypes.c_void_p:
    """The one stream hints go on (reads' pool threads share it), with the primary context (MLX's)
    current on this thread."""
    if not getattr(_local, "ctx", False):
        ctx = ctypes.c_void_p()
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        lib.cuCtxSetCurrent(ctx)
        _local.ctx = True
    with _lock:
        if not _shared:
            st = ctypes.c_void_p()
            lib.cuStreamCreate(ctypes.byref(st), 1)  # CU_STREAM_NON_BLOCKING
            _shared.append(st)
    return _shared[0]


def _range(a) -> tuple[int, int]:
    """(address, bytes) of an evaluated array or a writable memoryview of one."""
    v = memoryview(a).cast("B") if isinstance(a, mx.array) else a
    return ctypes.addressof(ctypes.c_char.from_buffer(v)), v.nbytes


def available(a: mx.array | None = None) -> bool:
    """Whether hints reach the driver here (for `a`'s memory: it is managed)."""
    d = _driver()
    if d is None or a is None:
        return d is not None
    lib, dev = d
    _stream(lib, dev)
    managed = ctypes.c_uint()
    err = lib.cuPointerGetAttribute(ctypes.byref(managed), _IS_MANAGED, ctypes.c_uint64(_range(a)[0]))
    return err == 0 and bool(managed.value)


# Each returns the driver's result: 0, or a CUresult a caller may report (the data is never at stake).
def _prefetch(a, where: int, wait: bool) -> int:
    d = _driver()
    if d is None:
        return 0
    lib, dev = d
    st = _stream(lib, dev)
    ptr, n = _range(a)
    loc = _Location(where, dev if where == _DEVICE else 0)
    err = lib.cuMemPrefetchAsync_v2(ctypes.c_uint64(ptr), ctypes.c_size_t(n), loc, ctypes.c_uint(0), st)
    return err or (lib.cuStreamSynchronize(st) if wait else 0)


def after_write(views) -> int:
    """Start moving the pages of `views` (memoryviews of managed arrays, or the arrays) to the card in bulk, once the
    host has written them; the card's first kernel on them waits for any still on the way."""
    err = 0
    for v in views:
        err = err or _prefetch(v, _DEVICE, False)
    return err


def pinned(n: int) -> memoryview | None:
    """n bytes of page-locked host memory at a page boundary (which a direct read can fill and the copy
    engine read), or None where there is no driver or it refuses. Kept for the process's life."""
    d = _driver()
    if d is None:
        return None
    lib, dev = d
    _stream(lib, dev)
    buf = memoryview(mmap.mmap(-1, n))
    if lib.cuMemHostRegister_v2(ctypes.c_void_p(_range(buf)[0]), ctypes.c_size_t(n), ctypes.c_uint(1)):  # PORTABLE
        return None
    return buf


def copy_to_card(views: list[memoryview], src: memoryview) -> int:
    """Start copying src (pinned) into views (consecutive pieces of managed arrays, src's length in all) with
    the copy engine, on the stream hints go on: 0, or the CUresult of what failed (`copies_done` waits)."""
    d = _driver()
    if d is None:
        return -1
    lib, dev = d
    st = _stream(lib, dev)
    at, base = 0, _range(src)[0]
    for v in views:
        ptr, n = _range(v)
        err = lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(ptr), ctypes.c_void_p(base + at), ctypes.c_size_t(n), st)
        if err:
            return err
        at += n
    return 0


def copies_done() -> int:
    """Wait for every copy and hint started on the stream they go on (a sleeping wait, not a spinning one): 0, or a
    CUresult."""
    d = _driver()
    if d is None:
        return 0
    lib, dev = d
    st = _stream(lib, dev)
    if not hasattr(_local, "done"):
        ev = ctypes.c_void_p()
        lib.cuEventCreate(ctypes.byref(ev), 3)  # CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING
        _local.done = ev
    return lib.cuEventRecord(_local.done, st) or lib.cuEventSynchronize(_local.done)


# The alternatives scripts/uvm_probe.py measured beside after_write (neither is used: see the docstring).
def to_host(a) -> int:
    """Move a's pages to the host in bulk, and wait (before the host writes them)."""
    return _prefetch(a, _HOST, True)


def _advise(a, advice: int, where: int) -> int:
    """cuMemAdvise over a's pages, for the card (where=_DEVICE) or the host."""
    d = _driver()
    if d is None:
        return 0
    lib, dev = d
    _stream(lib, dev)
    ptr, n = _range(a)
    loc = _Location(where, dev if where == _DEVICE else 0)
    return lib.cuMemAdvise_v2(ctypes.c_uint64(ptr), ctypes.c_size_t(n), advice, loc)


def advise_read_mostly(a) -> int:
    """The card reads a duplicate of a's pages; a host write drops it rather than moving it back."""
    return _advise(a, _READ_MOSTLY, _DEVICE)


_PREFERRED, _ACCESSED_BY = 3, 5  # CUmem_advise


def advise_host(a) -> int:
    """a's pages stay on the host, mapped for the card to read across the bus: neither side's touch
    moves them. (scripts/uvm_probe.py's staged variant: reads into such a buffer, then a kernel copying
    it into slots that stay on the card. It measured no faster than reading into the slots: not used.)"""
    return _advise(a, _PREFERRED, _HOST) or _advise(a, _ACCESSED_BY, _DEVICE)
