"""Safetensors read and write, one tensor at a time.

We parse the format ourselves (an 8-byte header length, a JSON header, raw
bytes) rather than go through `safetensors.safe_open` for three reasons: every
check a user's broken download needs (truncated file, corrupt header, offsets
past the end) gets a one-line message naming the file; FP8 e4m3 tensors, which
numpy cannot hold, are decoded here by table; and the writer controls tensor
order, which is how each routed expert becomes one contiguous byte range.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype code -> (numpy storage dtype, bytes per element)
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """A file that is not a valid safetensors file; the message names it."""


class DuplicateKey(ValueError):
    """A JSON object naming one key twice (json.loads would keep the last silently)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: a dict, refusing a key given twice."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(repr(k))
        out[k] = v
    return out


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """An open safetensors file whose header has been read and checked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FormatError(f"{self.path}: missing") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{self.path}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{self.path}: corrupt header (length {n}, file {size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw, object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{self.path}: corrupt header (not JSON)") from None
        except DuplicateKey as e:
            raise FormatError(f"{self.path}: corrupt header: {e} is listed twice") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: corrupt header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.path}: corrupt header (__metadata__ is not a JSON object)")
        self.metadata: dict = meta
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in header.items():
            try:
                dtype, shape, (a, b) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
                item = np.dtype(DTYPES[dtype]).itemsize
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path}: corrupt header entry for {name!r}") from None
            if not all(_is_count(x) for x in (*shape, a, b)):
                raise FormatError(f"{self.path}: corrupt header: {name!r} has a shape or offset "
                                  "that is not a non-negative integer")
            need = item * math.prod(shape)
            if a > b or b - a != need:
                raise FormatError(f"{self.path}: corrupt header: {name!r} is {dtype} {list(shape)}, "
                                  f"{need} bytes, but its data offsets [{a}, {b}] hold {b - a}")
            self.tensors[name] = TensorInfo(dtype, shape, base + a, base + b)
        # Each tensor its own bytes: two tensors sharing a range would read as one another.
        spans = sorted((t.start, t.end, name) for name, t in self.tensors.items() if t.end > t.start)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise FormatError(f"{self.path}: corrupt header: the data of {first!r} and {second!r} overlap")
        data_end = max((end for _, end, _ in spans), default=base)
        if data_end > size:
            raise FormatError(f"{self.path}: truncated ({size} bytes, header needs {data_end})")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """The tensor's stored values (BF16 as uint16 bits, F8_E4M3 as uint8 bits)."""
        t = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(t.start)
            buf = f.read(t.nbytes)
        if len(buf) != t.nbytes:
            raise FormatError(f"{self.path}: truncated while reading {name!r}")
        return np.frombuffer(buf, dtype=DTYPES[t.dtype]).reshape(t.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis, reading only those bytes."""
        t = self.tensors[name]
        row = t.nbytes // t.shape[0]
        with open(self.path, "rb") as f:
            f.seek(t.start + start * row)
            buf = f.read((stop - start) * row)
        if len(buf) != (stop - start) * row:
            raise FormatError(f"{self.path}: truncated while reading {name!r}")
        return np.frombuffer(buf, dtype=DTYPES[t.dtype]).reshape(stop - start, *t.shape[1:])

    def read_float32(self, name: str) -> np.ndarray:
        """The tensor as float32, whatever float type it is stored in."""
        return to_float32(self.read(name), self.tensors[name].dtype)


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return _E4M3_TABLE[x]
    return x.astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _e4m3_table() -> np.ndarray:
    """All 256 float8 e4m3fn values (bias 7, no infinities, 0x7f/0xff are NaN)."""
    b = np.arange(256, dtype=np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


_E4M3_TABLE = _e4m3_table()


ALIGN = 4096  # where a written file's data section starts (see SafetensorsWriter)


class SafetensorsWriter:
    """Streams a safetensors file whose tensor list is known up front.

    Tensors are written in the declared order, one `write` at a time, so a
    file far larger than memory can be produced piece by piece. The file
    appears under its final name only after `close()`, complete and synced.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.sizes = {}
        for name, (dtype, shape) in specs.items():
            n = np.dtype(DTYPES[dtype]).itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        # The data section starts at a multiple of ALIGN: an offloaded expert's read can then bypass the
        # page cache (O_DIRECT wants offsets aligned to the disk's blocks); the spec asks for 8.
        raw += b" " * (-(8 + len(raw)) % ALIGN)
        self.path = Path(path)
        self.size = 8 + len(raw) + offset
        self._order = iter(specs)
        self._hash = hashlib.sha256()
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._f = open(self._tmp, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, arr: np.ndarray) -> None:
        want = next(self._order)
        assert name == want, f"{self.path}: wrote {name!r} where {want!r} comes next"
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        assert data.nbytes == self.sizes[name], f"{name}: {data.nbytes} bytes, header says {self.sizes[name]}"
        self._put(data)

    def close(self) -> tuple[int, str]:
        """Finish the file; return (size, sha256)."""
        assert next(self._order, None) is None, f"{self.path}: not every tensor was written"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Write tensors in the given order, atomically; return (size, sha256).

    `tensors` maps name -> (dtype code, shape, array holding the raw bytes).
    """
    w = SafetensorsWriter(path, {k: (d, tuple(s)) for k, (d, s, _) in tensors.items()}, metadata)
    try:
        for name, (_, _, arr) in tensors.items():
            w.write(name, arr)
    except BaseException:
        w.abort()
        raise
    return w.close()


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
