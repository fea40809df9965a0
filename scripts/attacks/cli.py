"""Options of generate and chat that are not numbers, or not sensible ones (items 32.6-32.8, 33.9, 33.13)."""

from __future__ import annotations

from attacks import Lab, case


@case("32.6", "generate --dtype int8", "error naming the dtypes accepted")
def dtype_int8(lab: Lab) -> str:
    return lab.cli("generate", "-m", lab.model(), "-p", "hi", "-n", "2", "--dtype", "int8").refused("--dtype")
