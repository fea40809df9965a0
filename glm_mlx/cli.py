"""The `glm-mlx` command: one function per subcommand, typed options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run, chat with and fine-tune GLM-4.5 / GLM-4.5-Air with MLX.")


def fail(message: str) -> None:
    """One line on stderr naming the cause, and a non-zero exit; never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


USER_ERRORS = (ValueError, OSError)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hugging Face repo id (e.g. zai-org/GLM-4.5-Air) or a local folder"),
    out: Path = typer.Option(..., "--out", "-o", help="the glm-mlx model folder to write"),
    quant: str = typer.Option("mixed", "--quant", "-q", help="recipe: mixed (default), uniform4, none"),
    revision: Optional[str] = typer.Option(None, help="hub revision (branch, tag or commit)"),
    token: Optional[str] = typer.Option(None, help="hub token (default: HF_TOKEN / hf auth login)"),
):
    """Convert a GLM-4.5 checkpoint (bf16, FP8 or mlx-lm) into a glm-mlx model folder."""
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
    model: Path = typer.Option(..., "--model", "-m", help="a glm-mlx model folder"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="the user message"),
    token_ids: Optional[str] = typer.Option(None, help="raw prompt token ids, comma-separated, "
                                            "instead of --prompt (no chat template)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temp: float = typer.Option(0.6, "--temp", help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(0.95, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for reproducible sampling"),
    think: bool = typer.Option(True, "--think/--no-think", help="let the model reason first"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
    dtype: Optional[str] = typer.Option(None, help="compute dtype (float32 for exact checks)"),
):
    """Generate one reply to a prompt, streamed, then the speed and peak memory."""
    import mlx.core as mx

    import glm_mlx
    from glm_mlx.generate import Stats, stream

    if (prompt is None) == (token_ids is None):
        fail("give exactly one of --prompt or --token-ids")
    try:
        m, tok = glm_mlx.load(model, dtype=dtype)
        if token_ids is not None:
            ids = [int(t) for t in token_ids.replace(" ", "").split(",") if t]
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.encode(tok.apply_chat_template(msgs, enable_thinking=think))
        if seed is not None:
            mx.random.seed(seed)
        stats = Stats()
        for piece in stream(m, tok, ids, temp=temp, top_p=top_p, max_tokens=max_tokens, stats=stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo("")
    typer.echo(stats.line(), err=True)


def models_home() -> Path:
    import os

    return Path(os.environ.get("GLM_MLX_HOME", Path.home() / ".cache" / "glm-mlx")) / "models"


def resolve_model(model: str, yes: bool) -> Path:
    """A model folder, or a repo id converted (once, after asking) into the models home."""
    from convert.source import is_repo_id

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    if not is_repo_id(model):
        fail(f"{model}: no such model folder, and not a Hugging Face repo id")
    folder = models_home() / model.replace("/", "--")
    if (folder / "glm_mlx.json").is_file():
        return folder
    if not yes and not typer.confirm(f"{model} is not converted yet: download and convert it into {folder}?"):
        fail("not converted (pass --yes to convert without asking)")
    convert(model, folder, "mixed", None, None)
    return folder


@app.command()
def chat(
    model: str = typer.Option(..., "--model", "-m", help="a glm-mlx model folder or a Hugging Face repo id"),
    tools: Optional[Path] = typer.Option(None, "--tools", help="a .py file of typed, documented functions, "
                                         "or a .json file of OpenAI-style schemas with commands"),
    think: bool = typer.Option(True, "--think/--no-think", help="reasoning on or off at the start"),
    show_thinking: bool = typer.Option(True, "--show-thinking/--hide-thinking", help="print the reasoning, dimmed"),
    yes: bool = typer.Option(False, "--yes", "-y", help="convert without asking; run every tool call without asking"),
    temp: float = typer.Option(0.6, "--temp"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", help="the most tokens one reply may have"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for reproducible replies"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
    context: Optional[int] = typer.Option(None, "--context", help="context limit in tokens (default: the model's)"),
    dtype: Optional[str] = typer.Option(None, help="compute dtype (float32 for exact checks)"),
):
    """Chat in the terminal: streamed replies, reasoning on and off, GLM's tool calls."""
    import mlx.core as mx
    from rich.console import Console

    import glm_mlx
    from glm_mlx.chat import ChatSession, Repl
    from glm_mlx.tools import load_tools

    folder = resolve_model(model, yes)
    try:
        tool_map = load_tools(tools) if tools else {}
        m, tok = glm_mlx.load(folder, dtype=dtype)
    except USER_ERRORS as e:
        fail(str(e))
    if seed is not None:
        mx.random.seed(seed)
    session = ChatSession(m, tok, system=system, tools=[t.schema for t in tool_map.values()] or None,
                          think=think, temp=temp, top_p=top_p, max_tokens=max_tokens, context_limit=context)
    Repl(session, Console(highlight=False), tool_map, show_thinking=show_thinking, approve_all=yes).run()


@app.command()
def demo(
    folder: Path = typer.Option(Path("glm-mlx-demo"), "--dir", help="where the tiny checkpoint and model go"),
    preset: str = typer.Option("air-tiny", help="tiny config: air-tiny, glm45-tiny, quality"),
    prompt: str = typer.Option("Hello! What can you do?", "--prompt", "-p"),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n"),
):
    """End to end on a tiny generated GLM: write a checkpoint, convert it, generate."""
    from convert.synthetic import make_config, write_checkpoint

    ckpt, out = folder / "checkpoint", folder / "model"
    if not (ckpt / "model.safetensors.index.json").exists():
        typer.echo(f"writing a tiny {preset} checkpoint to {ckpt}", err=True)
        try:
            write_checkpoint(ckpt, make_config(preset))
        except USER_ERRORS as e:
            fail(str(e))
    convert(str(ckpt), out, "mixed", None, None)
    generate(model=out, prompt=prompt, token_ids=None, max_tokens=max_tokens, temp=0.0, top_p=1.0,
             seed=0, think=False, system=None, dtype=None)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
