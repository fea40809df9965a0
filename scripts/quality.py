"""The quality table: bits per weight and KL to the reference, per recipe.

    PYTHONPATH=. python scripts/quality.py                       # preset "quality"
    PYTHONPATH=. python scripts/quality.py --preset quality --preset air-tiny --preset glm45-tiny

Generates each preset's bf16 checkpoint in a fresh temporary folder, converts
it with each of our recipes and with mlx-lm (unquantized, 4-bit, mixed_4_6),
runs every conversion in float32 on the CPU beside transformers' float32
reference, prints a markdown table per preset and writes them all to
scripts/quality_table.md. Needs the test extra (torch, transformers) for the
reference.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.synthetic import PRESETS, count_params, make_config, write_checkpoint  # noqa: E402
from quantize import quality  # noqa: E402
from quantize.recipes import DEFAULT_RECIPE  # noqa: E402
from tests.reference import reference_logits  # noqa: E402

# The published models' shapes (DESIGN.md), for bits per weight at full size.
_AIR = {"hidden_size": 4096, "num_hidden_layers": 46, "first_k_dense_replace": 1, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1, "vocab_size": 151552}
PUBLISHED = {
    "GLM-4.5-Air": make_config("air-tiny", **_AIR),
    "GLM-4.5": make_config("air-tiny", **{**_AIR, "hidden_size": 5120, "num_hidden_layers": 92,
                                          "first_k_dense_replace": 3, "intermediate_size": 12288,
                                          "moe_intermediate_size": 1536, "n_routed_experts": 160,
                                          "routed_scaling_factor": 2.5, "use_qk_norm": True}),
}
SHAPE_ROWS = ("uniform4", DEFAULT_RECIPE, quality.ANCHOR, "mlx-lm mixed_4_6")
N_TEXT, N_RANDOM, LENGTH = 6, 2, 64  # the fixture's sequences: text windows, random ids, tokens each
CAPTION = (
    "bits/weight = (stored bits of every weight tensor: a quantized one's packed weights + scales + "
    "biases, a float one's dtype width) / (logical parameters), the MTP layer left out of both "
    "(mlx-lm drops it); the same count of parameters on every row. On disk = the weight files' bytes "
    "(their headers, and in ours each file's data aligned to 4 KiB for direct reads, added) over the "
    "same parameters, the MTP layer's files left out. Mean KL = KL(reference || "
    "quantized) of next-token distributions in nats, averaged over {positions} positions ({seqs}); "
    "reference = transformers Glm4MoeForCausalLM in float32 on the bf16 checkpoint; every "
    "conversion computed in float32 on the CPU (mlx-lm's with all floating parameters cast to "
    "float32). KL vs mlx-lm 4-bit = mean KL / mlx-lm 4-bit's mean KL. Top-1 agreement = share of "
    "positions whose most likely next token is the reference's. mlx-lm bf16, mlx-lm's unquantized "
    "conversion, shows that mlx-lm's model agrees with the reference, so the anchor's KL is its "
    "quantization's alone."
)


def criterion(rows: list[quality.Row]) -> str:
    """The issue's criterion, stated with its numbers."""
    by = {r.name: r for r in rows}
    d, q4, m46 = by[DEFAULT_RECIPE], by[quality.ANCHOR], by["mlx-lm mixed_4_6"]
    ok_kl, ok_bits = d.kl <= q4.kl / 4, d.bits_per_weight <= m46.bits_per_weight
    verdict = "holds" if ok_kl and ok_bits else "FAILS"
    return (f"Criterion (default KL <= 1/4 of mlx-lm 4-bit's, at no more bits/weight than mlx-lm "
            f"mixed_4_6) {verdict}: KL ratio {d.kl / q4.kl:.3f} ({'ok' if ok_kl else 'over 0.25'}), "
            f"bits/weight {d.bits_per_weight:.3f} vs {m46.bits_per_weight:.3f} "
            f"({'ok' if ok_bits else f'{d.bits_per_weight - m46.bits_per_weight:+.3f} over'}).")


def run_preset(preset: str, work: Path, seed: int) -> str:
    t0 = time.perf_counter()
    config = make_config(preset)
    ckpt = write_checkpoint(work / "checkpoint", config, seed=seed)
    entries = quality.build(ckpt, work)
    tokens = quality.fixture_tokens(ckpt, N_TEXT, N_RANDOM, LENGTH, seed=seed)
    rows = quality.run_table(entries, tokens, reference_logits(ckpt, tokens))
    params = {r.params for r in rows}
    assert params == {count_params(config)[0]}, f"rows count different parameters: {params}"
    for r in rows:  # the shape-only count, used at the published sizes below, agrees with the files
        if r.name in SHAPE_ROWS:
            shape = quality.shape_bits_per_weight(config, r.name)
            assert abs(shape - r.bits_per_weight) < 1e-9, (r.name, shape, r.bits_per_weight)
    total, experts = count_params(config)
    return "\n".join([
        f"## preset `{preset}`: {total / 1e6:.2f}M parameters without MTP, routed experts "
        f"{experts / total:.1%} of them",
        "",
        quality.markdown(rows, DEFAULT_RECIPE),
        "",
        criterion(rows),
        f"({time.perf_counter() - t0:.0f} s, checkpoint seed {seed})",
        "",
    ])


def published_section() -> str:
    lines = ["## bits/weight at the published shapes", "",
             "| model | routed experts | " + " | ".join(f"`{n}`" if n in quality.OUR_RECIPES else n
                                                    for n in SHAPE_ROWS) + " |",
             "|---|---:|" + "---:|" * len(SHAPE_ROWS)]
    for name, config in PUBLISHED.items():
        total, experts = count_params(config)
        bits = [quality.shape_bits_per_weight(config, r) for r in SHAPE_ROWS]
        lines.append(f"| {name} ({total / 1e9:.1f}B without MTP) | {experts / total:.1%} | "
                     + " | ".join(f"{b:.3f}" for b in bits) + " |")
    lines += ["", "Same formula as above, computed from the shapes alone (lazy MLX arrays, nothing converted): "
              "our recipes as the converter decides them, mlx-lm's through its own quantize_model; on every "
              "preset above this count equals the one from the converted files. KL needs the weights, so "
              "only the fixtures above have it.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", choices=list(PRESETS),
                   help="synthetic checkpoint preset; repeat for several (default: quality)")
    p.add_argument("--seed", type=int, default=0, help="checkpoint and random-token seed")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "quality_table.md")
    args = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # its per-load weight bar, on stderr
    presets = args.preset or ["quality"]
    versions = ", ".join(f"{m} {version(m)}" for m in ("mlx", "mlx-lm", "transformers", "torch"))
    command = "PYTHONPATH=. python scripts/quality.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    parts = ["# Quality of each recipe against mlx-lm's conversions", "",
             f"`{command.strip()}` ({versions})", "",
             CAPTION.format(positions=N_TEXT * LENGTH + N_RANDOM * LENGTH,
                            seqs=f"{N_TEXT} windows of varied text and {N_RANDOM} of random ids, "
                                 f"{LENGTH} tokens each"), ""]
    print("\n".join(parts), flush=True)
    for preset in presets:
        with tempfile.TemporaryDirectory(prefix=f"glm-mlx-quality-{preset}-") as tmp:
            section = run_preset(preset, Path(tmp), args.seed)
        print(section, flush=True)
        parts.append(section)
    section = published_section()
    print(section, flush=True)
    parts.append(section)
    args.out.write_text("\n".join(parts))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
