"""The `glm-mlx` command: one function per subcommand, typed options."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run, chat with and fine-tune GLM-4.5 / GLM-4.5-Air with MLX.")


# MLX's CUDA backend batches at most MLX_MAX_OPS_PER_BUFFER ops (20 by default) into each CUDA graph. A
# decode step is bound by the host, and launching and updating those graphs is its largest cost: at 400
# an 8-layer Air step took ~1450-1500 us against ~2000-2300 at 20, with the same prefill and peak memory
# at full size (BENCHMARKS.md). Metal keeps MLX's own per-device default.
CUDA_OPS_PER_GRAPH = "400"


def show_version(value: bool) -> None:
    if value:
        from glm_mlx import __version__

        typer.echo(f"glm-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def setup(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Run, chat with and fine-tune GLM-4.5 / GLM-4.5-Air with MLX."""
    use_cuda_graph_default()


def use_cuda_graph_default() -> None:
    """MLX_MAX_OPS_PER_BUFFER=CUDA_OPS_PER_GRAPH on a CUDA GPU unless the user set it; before anything
    runs, since MLX reads it once per process."""
    if "MLX_MAX_OPS_PER_BUFFER" in os.environ:
        return
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        os.environ["MLX_MAX_OPS_PER_BUFFER"] = CUDA_OPS_PER_GRAPH


def fail(message: str) -> None:
    """One line on stderr naming the cause, and a non-zero exit; never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


USER_ERRORS = (ValueError, OSError)


def say_offloaded(model) -> None:
    """One line on stderr when the routed experts are offloaded, and how far."""
    from glm_mlx.offload import offloaded_banks

    if banks := offloaded_banks(model):
        b = banks[0]
        typer.echo(f"experts offloaded: {b.slots} of {b.slot_of.size} per layer resident "
                   f"({b.slots * b.file.stride * len(banks) / 1e9:.2f} GB), the rest read from disk", err=True)


def check_kv_bits(value: Optional[int]) -> Optional[int]:
    if value not in (None, 8, 4):
        fail(f"--kv-bits must be 8 or 4, not {value}")
    return value


# Every spelling of a compute dtype a user may type, and the MLX name it means.
DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16"}


def check_dtype(value: Optional[str]) -> Optional[str]:
    """The MLX name of a --dtype (float32, bfloat16, float16 or a short name such as bf16)."""
    if value is None:
        return None
    if value.lower() not in DTYPES:
        fail(f"--dtype {value!r}: choose float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return DTYPES[value.lower()]


def check_temp(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        fail(f"--temp must be a number >= 0 (0: greedy), not {value}")
    return value


def check_top_p(value: float) -> float:
    if not (0 < value <= 1):  # also refuses nan
        fail(f"--top-p must be in (0, 1] (1: no nucleus cut), not {value}")
    return value


def check_max_tokens(value: int) -> int:
    if value < 0:
        fail(f"--max-tokens must be >= 0, not {value}")
    return value


def check_seed(value: Optional[int]) -> Optional[int]:
    if value is not None and not (0 <= value < 2**32):
        fail(f"--seed must be an integer from 0 to {2**32 - 1}, not {value}")
    return value


def check_context(value: Optional[int]) -> Optional[int]:
    if value is not None and value < 1:
        fail(f"--context must be at least 1 token, not {value}")
    return value


def check_expert_memory(value: Optional[str]) -> Optional[str]:
    """auto, or a size above zero that parses (the model's own bounds are checked when it loads)."""
    from glm_mlx.offload import parse_size

    if value is None or value.strip().lower() == "auto":
        return value
    try:
        size = parse_size(value, total=0)
    except ValueError:
        size = None
    if size is None or size <= 0:
        fail(f"--expert-memory {value!r}: give a size above zero, like 24GB or 512MB, or auto")
    return value


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def say_prefetch(model, prefetch: bool, mtp: bool) -> None:
    """One warning line when --prefetch cannot act: nothing is offloaded, or MTP drafts (each step then
    runs the layers on two tokens, and a layer guesses the next layer's experts only for one)."""
    from glm_mlx.offload import offloaded_banks

    if prefetch and not offloaded_banks(model):
        warn("--prefetch does nothing here: every expert is resident (it acts only with experts offloaded)")
    elif prefetch and mtp:
        warn("--prefetch does nothing with --mtp: each step then checks two tokens, and prefetch guesses "
             "only for one")


def check_context_fits(model, context: Optional[int]) -> None:
    if context is not None and context > model.args.max_position_embeddings:
        fail(f"--context {context} is above this model's maximum of {model.args.max_position_embeddings} tokens")


# The options generate and chat share: the model as loaded, and its cache, and the sampler.
DTYPE = typer.Option(None, "--dtype", callback=check_dtype, help="compute dtype: float32 (exact checks), bfloat16 "
                     "or float16, or fp32/bf16/fp16 (default: the folder's own)")
ADAPTER = typer.Option(None, "--adapter", help="a LoRA adapter folder from glm-mlx finetune")
EXPERT_MEMORY = typer.Option("auto", "--expert-memory", callback=check_expert_memory, help="most memory routed "
                             "experts may take (e.g. 24GB); the rest are read from disk. auto (the default): all "
                             "resident when the model fits in memory, else what is left")
PREFETCH = typer.Option(False, "--prefetch", help="with experts offloaded: each layer also reads the experts the "
                        "next layer's router picks from its input (pays only when those guesses are mostly right; "
                        "the stats show how many were used)")
KV_BITS = typer.Option(None, "--kv-bits", callback=check_kv_bits, help="quantize the KV cache to 8 or 4 bits (long "
                       "contexts: about 1/2 or 1/4 of its bf16 memory)")
MTP = typer.Option(False, "--mtp", help="speculative decoding: the MTP layer drafts a token ahead, the model "
                   "checks it (the tokens are the model's own, greedy or sampled)")
TEMP = typer.Option(0.6, "--temp", callback=check_temp, help="sampling temperature (0: greedy)")
TOP_P = typer.Option(0.95, "--top-p", callback=check_top_p, help="nucleus sampling: keep the likeliest tokens "
                     "whose probabilities sum to this (1: all)")
SEED = typer.Option(None, "--seed", callback=check_seed, help="seed for reproducible sampling")
YES_CONVERT = typer.Option(False, "--yes", "-y", help="convert a repo id not converted yet without asking")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hugging Face repo id (e.g. zai-org/GLM-4.5-Air) or a local folder"),
    out: Path = typer.Option(..., "--out", "-o", help="the glm-mlx model folder to write: new, empty, or one "
                             "an interrupted convert of the same source and recipe left"),
    quant: str = typer.Option("mixed", "--quant", "-q", help="recipe: mixed (default), uniform4, none"),
    revision: Optional[str] = typer.Option(None, help="hub revision (branch, tag or commit)"),
    token: Optional[str] = typer.Option(None, help="hub token (default: HF_TOKEN / hf auth login)"),
):
    """Convert a GLM-4.5 checkpoint (bf16, FP8 or mlx-lm) into a glm-mlx model folder.

    Interrupted? Run the same command again: finished files are checked and kept."""
    from convert.convert import convert as run
    from convert.source import resolve_source
    from quantize.recipes import RECIPES

    if quant not in RECIPES:  # before a download of hundreds of GB, not after
        fail(f"unknown recipe {quant!r} (choose from {', '.join(RECIPES)})")
    try:
        folder, info = resolve_source(source, revision=revision, token=token)
        run(folder, out, quant, source_info=info, log=lambda s: typer.echo(s, err=True))
    except USER_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130)
    typer.echo(f"wrote {out}")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="a glm-mlx model folder or a Hugging Face repo id "
                              "(converted on first use)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="the user message (- reads it from stdin)"),
    token_ids: Optional[str] = typer.Option(None, help="raw prompt token ids, comma-separated, "
                                            "instead of --prompt (no chat template)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", callback=check_max_tokens,
                                   help="the most tokens the reply may have"),
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    think: bool = typer.Option(True, "--think/--no-think", help="let the model reason first"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
    dtype: Optional[str] = DTYPE,
    adapter: Optional[Path] = ADAPTER,
    expert_memory: Optional[str] = EXPERT_MEMORY,
    prefetch: bool = PREFETCH,
    kv_bits: Optional[int] = KV_BITS,
    mtp: bool = MTP,
    yes: bool = YES_CONVERT,
):
    """Generate one reply to a prompt, streamed, then the speed and peak memory."""
    import mlx.core as mx

    import glm_mlx
    from glm_mlx.generate import Stats, stream
    from glm_mlx.memory import wired

    if (prompt is None) == (token_ids is None):
        fail("give exactly one of --prompt or --token-ids")
    if prompt == "-":
        prompt = read_stdin("--prompt -")
    ids = int_list("--token-ids", token_ids) if token_ids is not None else None
    if ids == []:
        fail("--token-ids: no token ids given")
    folder = resolve_model(model, yes)
    try:
        m, tok = glm_mlx.load(folder, dtype=dtype, adapter=adapter, expert_memory=expert_memory,
                              prefetch=prefetch)
        say_offloaded(m)
        say_prefetch(m, prefetch, mtp)
        if ids is None:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.encode(tok.apply_chat_template(msgs, enable_thinking=think))
        if seed is not None:
            mx.random.seed(seed)
        stats, cache = Stats(), m.make_cache(kv_bits, mtp=mtp)
        with wired(m, len(ids) + max_tokens, kv_bits):
            for piece in stream(m, tok, ids, cache, temp=temp, top_p=top_p, max_tokens=max_tokens, stats=stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo("")
    typer.echo(stats.line(), err=True)
    from glm_mlx.offload import offloaded_stats

    if (experts := offloaded_stats(m)) is not None:
        typer.echo(experts.line(), err=True)


def read_stdin(option: str) -> str:
    """All of stdin as text (invalid UTF-8 is refused, not guessed at)."""
    if sys.stdin.isatty():
        typer.echo("reading the prompt from stdin (end with Ctrl-D)", err=True)
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{option}: stdin is not UTF-8 text (byte {e.start})")
    if not text.strip():
        fail(f"{option}: stdin was empty")
    return text


@app.command()
def finetune(
    model: Path = typer.Option(..., "--model", "-m", help="a glm-mlx model folder (4-bit experts: QLoRA)"),
    data: Path = typer.Option(..., "--data", help="JSONL (chat, prompt/completion or text), or a folder "
                              "with train.jsonl and valid.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="the adapter folder to write (new or empty)"),
    valid: Optional[Path] = typer.Option(None, "--valid", help="validation JSONL"),
    rank: int = typer.Option(8, "--rank"),
    alpha: float = typer.Option(16.0, "--alpha", help="the update is scaled by alpha / rank, as in PEFT "
                                "(mlx-lm's --scale 20 at rank 8 is --alpha 160)"),
    dropout: float = typer.Option(0.0, "--dropout"),
    targets: str = typer.Option("attention,dense_mlp,shared_experts", "--targets",
                                help="comma-separated: attention, shared_experts, dense_mlp, experts (routed, "
                                "per-expert factors: much more memory), mtp"),
    iters: Optional[int] = typer.Option(None, "--iters", help="optimizer steps (default: --epochs over the data)"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(4, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(1e-3, "--lr"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, or cosine (decay to zero "
                                    "at the last step), after --warmup"),
    warmup: int = typer.Option(0, "--warmup", help="steps of linear warmup before the schedule"),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="recompute activations: less memory"),
    max_seq_len: int = typer.Option(2048, "--max-seq-len"),
    overlong: str = typer.Option("truncate", "--overlong", help="truncate or skip samples over --max-seq-len"),
    val_every: int = typer.Option(0, "--val-every", help="steps between validation losses (0: at the last step "
                                  "only; validation data: --valid, or valid.jsonl beside train.jsonl)"),
    save_every: int = typer.Option(0, "--save-every", help="steps between checkpoints (0: only on Ctrl-C and at "
                                   "the end)"),
    report_every: int = typer.Option(10, "--report-every", help="steps between progress lines when stderr is not "
                                     "a terminal"),
    resume: bool = typer.Option(False, "--resume", help="go on from OUT/checkpoint (a larger --iters or --epochs "
                                "extends the run)"),
    force: bool = typer.Option(False, "--force", help="start over in an OUT that holds an earlier run"),
    seed: int = typer.Option(0, "--seed", callback=check_seed),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="render chat samples with "
                                         "reasoning on or off (default: the template's)"),
    dtype: Optional[str] = typer.Option(None, callback=check_dtype, help="compute dtype: float32, bfloat16 or "
                                        "float16, or fp32/bf16/fp16 (default: float32 on the CPU, else bfloat16)"),
    expert_memory: Optional[str] = typer.Option("auto", "--expert-memory", callback=check_expert_memory,
                                                help="most memory the routed experts may "
                                                "take (e.g. 24GB): a model larger than memory trains with its "
                                                "experts read from disk, frozen. auto (the default): all resident "
                                                "when the model fits"),
):
    """Train a LoRA adapter (QLoRA on a quantized folder); loss on assistant tokens only."""
    import mlx.core as mx

    from glm_mlx.data import load_dataset, split_path
    from glm_mlx.finetune import TrainConfig, Trainer, check_config, check_out, clear_outputs, progress_printer
    from glm_mlx.loading import load_model
    from glm_mlx.memory import wired
    from glm_mlx.tokenizer import Tokenizer

    try:
        chosen = tuple(t for t in targets.split(",") if t)
        cfg = TrainConfig(rank=rank, alpha=alpha, dropout=dropout, targets=chosen, iters=iters, epochs=epochs,
                          batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule,
                          warmup=warmup, grad_checkpoint=grad_checkpoint, max_seq_len=max_seq_len,
                          val_every=val_every, save_every=save_every, seed=seed)
        check_config(cfg)  # before the model loads and the data is read, not after
        if report_every < 1:
            fail(f"--report-every must be an integer of at least 1, not {report_every}")
        if overlong not in ("truncate", "skip"):
            fail(f"--overlong must be truncate or skip, not {overlong!r}")
        check_out(out, resume=resume, force=force)
        train_path, found_valid = split_path(data)
        valid = valid or found_valid
        for path in (train_path, valid):
            if path is not None and not path.is_file():
                fail(f"{path}: no such file")
        dtype = dtype or ("float32" if mx.default_device() == mx.cpu else None)
        m, manifest = load_model(model, dtype, expert_memory, reserve=step_memory(model, dtype, chosen, rank,
                                                                                 batch_size, max_seq_len))
        say_offloaded(m)
        tok = Tokenizer(model)
        train = load_dataset(train_path, tok, max_seq_len=max_seq_len, overlong=overlong, think=think)
        val = load_dataset(valid, tok, max_seq_len=max_seq_len, overlong=overlong, think=think) if valid else None
        for name, ds in (("train", train), ("valid", val)):
            if ds is not None:
                typer.echo(f"{name}: {len(ds.examples)} samples ({ds.truncated} truncated, {ds.skipped} skipped)",
                           err=True)
        if val_every and val is None:
            typer.echo(f"warning: --val-every {val_every} does nothing without validation data (--valid, or "
                       "valid.jsonl beside train.jsonl)", err=True)
        trainer = Trainer(m, train, cfg, out, valid=val, base_manifest=manifest, base_dir=model,
                          log=lambda s: typer.echo(s, err=True))
        if resume:
            trainer.resume(out / "checkpoint")
            typer.echo(f"resumed at step {trainer.step}", err=True)
        elif force and out.is_dir():
            clear_outputs(out)
        with progress_printer(trainer, report_every, sys.stderr) as show, wired(m, batch_size * max_seq_len):
            trainer.run(progress=show)
    except USER_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    with open(out / "train_log.jsonl", "w") as f:
        for rec in trainer.history:
            f.write(json.dumps(rec) + "\n")
    typer.echo(f"adapter written to {out}")


def step_memory(folder: Path, dtype: Optional[str], targets: tuple, rank: int, rows: int, tokens: int) -> int:
    """What a training step needs beside the weights, by glm_mlx.finetune's arithmetic: `--expert-memory
    auto` leaves it free. 0 when the config cannot be read (loading then says why)."""
    from glm_mlx.config import ModelArgs
    from glm_mlx.finetune import training_reserve

    try:
        args = ModelArgs.from_dict(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return 0
    return training_reserve(args, tokens, 4 if dtype == "float32" else 2, targets, rank, rows)


@app.command()
def fuse(
    model: Path = typer.Option(..., "--model", "-m", help="the base glm-mlx model folder"),
    adapter: Path = typer.Option(..., "--adapter", help="the adapter folder"),
    out: Path = typer.Option(..., "--out", "-o", help="the fused model folder to write (new or empty)"),
):
    """Fold an adapter into its base model (re-quantizing quantized layers): a normal model folder. Says how much
    of the adapter's update the rounding lost, and what to do when that is much."""
    from glm_mlx.fuse import describe, explain, fuse_folder

    try:
        report = fuse_folder(model, adapter, out, log=lambda s: typer.echo(s, err=True))
    except USER_ERRORS as e:
        fail(str(e))
    for line in explain(report):
        typer.echo(line, err=True)
    typer.echo(f"wrote {out}: {describe(report)}")


@app.command()
def verify(model: Path = typer.Option(..., "--model", "-m", help="a glm-mlx model folder")):
    """Hash every byte of a model folder against its manifest, whatever the last check's stamp says: one
    line per problem, exit 1 on any; on success loading trusts the files again until they change."""
    from glm_mlx.loading import full_check

    problems = full_check(model.expanduser())
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{model}: every file matches its manifest")


def int_list(option: str, text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")


@app.command()
def bench(
    shape: Optional[str] = typer.Option(None, "--shape", help="air, glm45 or small (default: small on the CPU, "
                                        "else air)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="keep the first N layers (default: all; 4 for small)"),
    recipe: str = typer.Option("uniform4", "--recipe", help="uniform4 (every linear 4-bit) or mixed (routed "
                               "experts 4-bit, the rest 8-bit)"),
    prompts: str = typer.Option("512,4096", "--prompts", help="prefill lengths, comma-separated"),
    contexts: str = typer.Option("0,4096,32768", "--contexts", help="decode contexts, comma-separated (the KV "
                                 "cache is filled with random keys and values)"),
    steps: int = typer.Option(32, "--steps", help="decode steps a round"),
    rounds: int = typer.Option(5, "--rounds", help="timed decode rounds at each context (the median is reported)"),
    runtime: str = typer.Option("both", "--runtime", help="both, ours or mlx-lm"),
    seed: int = typer.Option(0, "--seed", callback=check_seed, help="seed of the random weights"),
    dtype: Optional[str] = typer.Option(None, callback=check_dtype, help="compute dtype: float32, bfloat16 or "
                                        "float16 (default: float32 on the CPU, else bfloat16)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with every raw number instead"),
):
    """Prefill and decode speed, peak memory and GB/s against the copy bandwidth, ours beside mlx-lm."""
    from glm_mlx.bench import render, run_bench
    from glm_mlx.memory import wired

    try:
        with wired(None):
            result = run_bench(shape, layers, recipe, int_list("--prompts", prompts), int_list("--contexts", contexts),
                               steps, rounds, runtime, seed, dtype, log=lambda s: typer.echo(s, err=True))
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(json.dumps(result) if as_json else render(result))


def models_home() -> Path:
    from glm_mlx.chat import glm_home

    return glm_home() / "models"


def resolve_model(model: str, yes: bool) -> Path:
    """A model folder, or a repo id converted (once, after asking) into the models home: generate and
    chat take either."""
    from convert.source import is_repo_id
    from glm_mlx.loading import MANIFEST

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        fail(f"{model}: not a folder (give a glm-mlx model folder or a Hugging Face repo id)")
    if not is_repo_id(model):
        fail(f"{model}: no such model folder, and not a Hugging Face repo id")
    folder = models_home() / model.replace("/", "--")
    if (folder / MANIFEST).is_file():
        return folder
    what = f"{model}: no such folder here; as a Hugging Face repo id it is not converted yet"
    if not yes and not (sys.stdin.isatty() and typer.confirm(f"{what}: download and convert it into {folder}?")):
        fail(f"{what} (pass --yes to download and convert it into {folder})")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the reply's alone
        convert(model, folder, "mixed", None, None)
    return folder


@app.command()
def chat(
    model: str = typer.Option(..., "--model", "-m", help="a glm-mlx model folder or a Hugging Face repo id "
                              "(converted on first use)"),
    tools: Optional[Path] = typer.Option(None, "--tools", help="a .py file of typed, documented functions, "
                                         "or a .json file of OpenAI-style schemas with commands"),
    think: bool = typer.Option(True, "--think/--no-think", help="reasoning on or off at the start"),
    show_thinking: bool = typer.Option(True, "--show-thinking/--hide-thinking", help="print the reasoning, dimmed"),
    yes: bool = typer.Option(False, "--yes", "-y", help="convert without asking; run every tool call without asking"),
    temp: float = TEMP,
    top_p: float = TOP_P,
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", callback=check_max_tokens,
                                   help="the most tokens one reply may have"),
    seed: Optional[int] = SEED,
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
    context: Optional[int] = typer.Option(None, "--context", callback=check_context,
                                          help="context limit in tokens (default: the model's)"),
    dtype: Optional[str] = DTYPE,
    adapter: Optional[Path] = ADAPTER,
    expert_memory: Optional[str] = EXPERT_MEMORY,
    prefetch: bool = PREFETCH,
    kv_bits: Optional[int] = KV_BITS,
    mtp: bool = MTP,
):
    """Chat in the terminal: streamed replies, reasoning on and off, GLM's tool calls. Inside, /help lists
    the commands; up and down recall earlier messages (kept in $GLM_MLX_HOME/chat_history)."""
    import mlx.core as mx
    from rich.console import Console

    import glm_mlx
    from glm_mlx.chat import ChatSession, Repl, glm_home, terminal_input
    from glm_mlx.memory import wired
    from glm_mlx.tools import load_tools

    folder = resolve_model(model, yes)
    try:
        tool_map = load_tools(tools) if tools else {}
        m, tok = glm_mlx.load(folder, dtype=dtype, adapter=adapter, expert_memory=expert_memory,
                              prefetch=prefetch)
        say_offloaded(m)
        say_prefetch(m, prefetch, mtp)
        check_context_fits(m, context)
        session = ChatSession(m, tok, system=system, tools=[t.schema for t in tool_map.values()] or None,
                              think=think, temp=temp, top_p=top_p, max_tokens=max_tokens, context_limit=context,
                              kv_bits=kv_bits, mtp=mtp)
    except USER_ERRORS as e:
        fail(str(e))
    if seed is not None:
        mx.random.seed(seed)
    try:
        with wired(m, session.context_limit, kv_bits), terminal_input(glm_home() / "chat_history") as remember:
            Repl(session, Console(highlight=False), tool_map, show_thinking=show_thinking, approve_all=yes,
                 remember=remember).run()
    except USER_ERRORS as e:  # the conversation is already in a recovery file, named on screen
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command()
def demo(
    folder: Path = typer.Option(Path("glm-mlx-demo"), "--dir", help="where the tiny checkpoint and model go"),
    preset: str = typer.Option("air-tiny", help="tiny config: air-tiny, glm45-tiny, quality"),
    prompt: str = typer.Option("Hello! What can you do?", "--prompt", "-p"),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", callback=check_max_tokens),
):
    """End to end on a tiny generated GLM with random weights: write a checkpoint in the published layout,
    convert it with the default recipe, generate from it (the reply is noise; the path is the real one)."""
    from convert.synthetic import PRESETS, make_config, write_checkpoint

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    ckpt, out = folder / "checkpoint", folder / "model"
    if not (ckpt / "model.safetensors.index.json").exists():
        typer.echo(f"writing a tiny {preset} checkpoint to {ckpt}", err=True)
        try:
            write_checkpoint(ckpt, make_config(preset))
        except USER_ERRORS as e:
            fail(str(e))
    convert(str(ckpt), out, "mixed", None, None)
    generate(model=str(out), prompt=prompt, token_ids=None, max_tokens=max_tokens, temp=0.0, top_p=1.0,
             seed=0, think=False, system=None, dtype=None, adapter=None, expert_memory=None, prefetch=False,
             kv_bits=None, mtp=False, yes=False)


@app.command()
def doctor():
    """What a bug report needs: platform, MLX, device and memory, each kernel's path and why, the wired
    limit, and a 5-token decode of a built-in tiny model against the reference path."""
    from glm_mlx.doctor import report

    lines = report()
    typer.echo("\n".join(lines))
    if any("MISMATCH" in line for line in lines):
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="glm-mlx")


if __name__ == "__main__":
    main()
