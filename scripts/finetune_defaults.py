"""What the fine-tuning defaults learn: glm-mlx's against mlx-lm's LoRA at its own defaults.

    PYTHONPATH=. python scripts/finetune_defaults.py [--iters 200] [--dir DIR]

The task is a tool call's argument mapping: "What is the weather in CITY?" answered with
get_weather(city=CITY), for 12 cities, on the tiny generated `air-tiny` model (random weights, so
nothing is known beforehand). Every run trains on the same 12 chats for the same number of steps
(--iters), each through its own command line as a user would run it:

- `glm-mlx finetune` with nothing but --iters (our defaults), on the checkpoint converted with
  `--quant none` (the same bf16 weights, trained in float32 on the CPU);
- the same with the options of the old defaults spelled out (rank 8, alpha 16, batch 1, 1e-4,
  cosine to zero);
- `glm-mlx finetune` with the options that give mlx-lm's behaviour;
- `mlx_lm lora --train` with nothing but --iters and --num-layers -1 (its defaults: rank 8,
  scale 20, batch 4, Adam at 1e-5 constant, loss on the whole chat; its default of the last 16
  layers is refused on a 3-layer model, so all 3), on the checkpoint itself widened to float32
  (MLX's CPU gather_mm, in its MoE layers, takes nothing else).

and mlx-lm once more for its own default length, 1000 steps. Each adapter then answers the 12
questions greedily with its own runtime. The table counts the replies that are the right call
with the right argument, and those with a call but a wrong argument, beside the last reported
training loss (ours on the reply's tokens, mlx-lm's on the whole chat) and the wall time. Runs
one after another on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul", "Dublin",
          "Vienna"]
CALL = re.compile(r"<tool_call>\s*get_weather\s*<arg_key>city</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)

# The runs: (label, runtime, options beyond --iters)
OLD_DEFAULTS = ["--rank", "8", "--alpha", "16", "--batch-size", "1", "--lr", "1e-4", "--lr-schedule", "cosine"]
AS_MLX_LM = ["--alpha", "160", "--batch-size", "4", "--lr", "1e-5", "--lr-schedule", "constant", "--warmup", "0",
             "--targets", "attention,dense_mlp,shared_experts,experts"]
RUNS = [("glm-mlx, defaults", "ours", []),
        ("glm-mlx, old defaults", "ours", OLD_DEFAULTS),
        ("glm-mlx as mlx-lm", "ours", AS_MLX_LM),
        ("mlx-lm lora, defaults", "mlx-lm", ["--num-layers", "-1"]),  # its default, 16 layers, is refused on 3
        ("mlx-lm lora, defaults, its 1000 steps", "mlx-lm", ["--num-layers", "-1", "--iters", "1000"])]


def float32_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with its bf16 tensors widened to float32 (the same values): MLX's CPU gather_mm, which
    mlx-lm's MoE layers use, takes nothing else."""
    import shutil

    import mlx.core as mx

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = mx.load(str(f))
            mx.save_safetensors(str(dst / f.name), {k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v
                                                    for k, v in tensors.items()}, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


def question(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": question(c) + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}]}]}
        for c in CITIES]  # no tool schemas in the prompt: they would make each sample 10x longer
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def score(replies: list[str]) -> tuple[int, int]:
    """(right calls, calls with a wrong argument) over CITIES' replies."""
    got = [CALL.search(r) for r in replies]
    right = sum(1 for m, c in zip(got, CITIES) if m and m[1].strip() == c)
    return right, sum(1 for m in got if m) - right


def ours_replies(model: Path, adapter: Path) -> list[str]:
    import glm_mlx
    from glm_mlx.generate import stream

    m, tok = glm_mlx.load(model, dtype="float32", adapter=adapter)
    out = []
    for c in CITIES:
        ids = tok.encode(tok.apply_chat_template(question(c), enable_thinking=False))
        out.append("".join(stream(m, tok, ids, m.make_cache(), temp=0.0, max_tokens=40)))
    return out


def mlx_lm_replies(checkpoint: Path, adapter: Path) -> list[str]:
    from mlx_lm import generate, load

    m, tok = load(str(checkpoint), adapter_path=str(adapter))
    out = []
    for c in CITIES:
        prompt = tok.apply_chat_template(question(c), add_generation_prompt=True, enable_thinking=False)
        out.append(generate(m, tok, prompt, max_tokens=40, verbose=False))
    return out


def last_loss(text: str, runtime: str) -> float | None:
    # ours: "step N | loss L | ..."; mlx-lm's rows: step, loss, an arrow
    pattern = r"\| loss ([0-9.]+)" if runtime == "ours" else r"^\s*\d+\s+([0-9.]+) [\u25bc\u25b2]"
    found = re.findall(pattern, re.sub(r"\x1b\[[0-9;]*m", "", text), re.M)  # mlx-lm's colours off
    return float(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated run numbers (1-based) to do")
    args = ap.parse_args()
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    work = args.dir or Path(tempfile.mkdtemp(prefix="finetune-defaults-"))
    ckpt, model, data = work / "checkpoint", work / "model", work / "data"
    if not (model / "glm_mlx.json").is_file():
        write_checkpoint(ckpt, make_config("air-tiny"))
        convert(ckpt, model, "none")
    write_data(data)
    ckpt32 = work / "checkpoint-float32"
    if not (ckpt32 / "config.json").is_file():
        float32_copy(ckpt, ckpt32)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    wanted = {int(i) for i in args.only.split(",")} if args.only else set(range(1, len(RUNS) + 1))
    rows = []
    for k, (label, runtime, opts) in enumerate(RUNS, 1):
        if k not in wanted:
            continue
        out = work / f"adapter-{k}"
        if runtime == "ours":
            cmd = [sys.executable, "-m", "glm_mlx", "finetune", "--model", model, "--data", data, "--out", out,
                   "--force", "--iters", args.iters, "--report-every", 10, *opts]
        else:
            cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", ckpt32, "--train", "--data", data,
                   "--adapter-path", out, "--iters", args.iters, *opts]
        t0 = time.perf_counter()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{label}: exit {p.returncode}\n{p.stderr[-2000:]}")
        replies = ours_replies(model, out) if runtime == "ours" else mlx_lm_replies(ckpt32, out)
        right, wrong = score(replies)
        loss = last_loss(p.stdout + p.stderr, runtime)
        rows.append((label, " ".join(map(str, opts)) or "(none)", right, wrong, loss, wall))
        print(f"{label}: {right}/{len(CITIES)} right, {wrong} wrong argument; e.g. {replies[0][:80]!r}",
              file=sys.stderr)
    print(f"| run | options beyond --iters {args.iters} | right calls | call, wrong argument | last loss | wall |")
    print("|---|---|---|---|---|---|")
    for label, opts, right, wrong, loss, wall in rows:
        shown = "-" if loss is None else f"{loss:.3f}"
        print(f"| {label} | `{opts}` | {right}/{len(CITIES)} | {wrong} | {shown} | {wall:.0f} s |")


if __name__ == "__main__":
    main()
