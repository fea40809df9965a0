"""The custom kernels' self-check: where each verdict is kept, what the user can force, and what is said.

A GPU backend's kernel is JIT-compiled on the user's machine, from source no compiler saw before (no Mac
builds this project). So the first time a process wants a kernel (kernels.enabled), it runs once on small
inputs against its pure-MLX reference; a build error, an exception or a result out of tolerance turns it
off for the process (the reference path runs instead, as on the CPU), with one line on stderr. The
verdict is cached per (MLX version, device, kernel source) in VERDICTS, so a later start pays nothing.

GLM_MLX_KERNELS forces the reference path: "off" for every kernel, or a comma list of kernel names.
GLM_MLX_CACHE names the cache folder (default ~/.cache/glm-mlx, or $XDG_CACHE_HOME/glm-mlx).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPORT = "please report it with the output of `glm-mlx doctor`"


def cache_dir() -> Path:
    if os.environ.get("GLM_MLX_CACHE"):
        return Path(os.environ["GLM_MLX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm-mlx"


def verdicts_file() -> Path:
    return cache_dir() / "kernel-checks.json"


def forced_off(name: str) -> bool:
    """Whether GLM_MLX_KERNELS turns kernel `name` off."""
    value = os.environ.get("GLM_MLX_KERNELS", "").strip()
    if not value:
        return False
    if value.lower() in ("off", "0", "none", "reference"):
        return True
    return name in {n.strip() for n in value.split(",")}


def unknown_names(known) -> list[str]:
    """Names in a GLM_MLX_KERNELS list that are no kernel's (a misspelling would turn nothing off)."""
    value = os.environ.get("GLM_MLX_KERNELS", "").strip()
    if not value or value.lower() in ("off", "0", "none", "reference"):
        return []
    return sorted({n.strip() for n in value.split(",") if n.strip()} - set(known))


def key(mlx_version: str, device: str, source: str) -> str:
    """A verdict's key: the MLX version, the device's name and the kernel source's sha256."""
    return f"{mlx_version}|{device}|{hashlib.sha256(source.encode()).hexdigest()[:32]}"


@dataclass
class Verdict:
    ok: bool
    reason: str  # why off ("" when on)
    cached: bool = False


def _read() -> dict:
    try:
        data = json.loads(verdicts_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: checked anew (and rewritten)
    return data if isinstance(data, dict) else {}


def lookup(k: str) -> Verdict | None:
    entry = _read().get(k)
    if isinstance(entry, dict) and isinstance(entry.get("ok"), bool) and isinstance(entry.get("reason"), str):
        return Verdict(entry["ok"], entry["reason"], cached=True)
    return None


def store(k: str, verdict: Verdict) -> None:
    """Add a verdict to the cache file, written whole (a temporary file renamed into place). A cache that
    cannot be written costs only the check's time at the next start."""
    path = verdicts_file()
    data = _read()
    data[k] = {"ok": verdict.ok, "reason": verdict.reason}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)
    except OSError:
        pass


def say_off(name: str, kind: str, verdict: Verdict) -> None:
    """The one line a kernel turned off by its self-check gets on stderr."""
    cached = " (cached verdict; delete " + str(verdicts_file()) + " to check again)" if verdict.cached else ""
    print(f"glm-mlx: the {kind} kernel {name} failed its self-check ({verdict.reason}){cached}; it is off for "
          f"this run and the reference path runs instead (slower, same numbers): {REPORT}.", file=sys.stderr)
