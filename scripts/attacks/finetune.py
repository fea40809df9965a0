"""finetune and fuse: outputs that hold someone's files, absurd options, damaged checkpoints, another model's
folder, kills mid-save (items 32.2, 33.8, 33.9, 33.12, 33.13)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from attacks import ROOT, Lab, Problem, case


def _data(lab: Lab) -> Path:
    path = lab.tmp() / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"hello world {i} " * 5}) + "\n" for i in range(3)))
    return path


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _trained(lab: Lab, *extra) -> tuple[Path, Path, Path]:
    """(model, data, out) after a short run that left a checkpoint."""
    model, data, out = lab.model(), _data(lab), lab.tmp() / "adapter"
    lab.cli("finetune", "-m", model, "--data", data, "--out", out, "--iters", "2", "--save-every", "1", *extra).ok()
    return model, data, out


@case("32.2", "finetune into an --out holding an adapter", "error naming --resume and --force; nothing changed")
def out_holds_adapter(lab: Lab) -> str:
    model, data, out = _trained(lab)
    before = _files(out)
    line = lab.cli("finetune", "-m", model, "--data", data, "--out", out, "--iters", "2", "--seed", "7").refused(
        "--resume", "--force")
    if _files(out) != before:
        raise Problem("the adapter in --out changed")
    return line


@case("33.12", "finetune --out FILE", "error before any training; the file untouched")
def out_is_a_file(lab: Lab) -> str:
    f = lab.tmp() / "notes.txt"
    f.write_text("mine")
    run = lab.cli("finetune", "-m", lab.model(), "--data", _data(lab), "--out", f, "--iters", "50")
    line = run.refused("not a folder")
    if "train:" in run.err or f.read_text() != "mine":
        raise Problem("training started, or the file changed")
    return line


@case("33.12", "fuse next to a user's OUT.partial", "error naming OUT.partial; the user's files kept")
def fuse_user_partial(lab: Lab) -> str:
    model, _, adapter = _trained(lab)
    out = lab.tmp() / "fused"
    (out.parent / "fused.partial").mkdir()
    (out.parent / "fused.partial" / "thesis.tex").write_text("mine")
    line = lab.cli("fuse", "-m", model, "--adapter", adapter, "--out", out).refused("fused.partial")
    if not (out.parent / "fused.partial" / "thesis.tex").is_file():
        raise Problem("fuse deleted the user's OUT.partial")
    return line


def _absurd(option: str, value: str):
    def run(lab: Lab) -> str:
        out = lab.tmp() / "o"
        line = lab.cli("finetune", "-m", lab.model(), "--data", _data(lab), "--out", out, option, value).refused(
            option)
        if out.exists():
            raise Problem(f"{out} was written")
        return line
    return run


for _option, _value in (("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--batch-size", "0"), ("--rank", "0"),
                        ("--alpha", "nan"), ("--dropout", "1"), ("--grad-accum", "0"), ("--iters", "0"),
                        ("--max-seq-len", "1"), ("--seed", "-1"), ("--lr-schedule", "linear"),
                        ("--report-every", "0")):
    case("33.9", f"finetune {_option} {_value}", f"error naming {_option}; nothing written")(_absurd(_option, _value))


@case("33.9", "finetune whose loss turns NaN (--lr 1e30)", "error naming the step; no adapter that looks complete")
def diverges(lab: Lab) -> str:
    out = lab.tmp() / "o"
    line = lab.cli("finetune", "-m", lab.model(), "--data", _data(lab), "--out", out, "--iters", "5",
                   "--lr", "1e30").refused("step 2", "not")
    if (out / "adapter_config.json").exists() or (out / "adapters.safetensors").exists():
        raise Problem("an adapter was written")
    return line


def _damaged(name: str, damage, says: str):
    def run(lab: Lab) -> str:
        model, data, out = _trained(lab)
        damage(out / "checkpoint" / name)
        return lab.cli("finetune", "-m", model, "--data", data, "--out", out, "--iters", "3", "--save-every", "1",
                       "--resume").refused(says)
    return run


case("33.13", "finetune --resume, checkpoint adapter truncated", "error naming adapters.safetensors")(
    _damaged("adapters.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "adapters.safetensors"))
case("33.13", "finetune --resume, optimizer file missing", "error naming optimizer.safetensors")(
    _damaged("optimizer.safetensors", lambda p: p.unlink(), "optimizer.safetensors"))
case("33.13", "finetune --resume, state.json not JSON", "error naming the checkpoint")(
    _damaged("state.json", lambda p: p.write_text("{"), "corrupt checkpoint"))


@case("33.8", "finetune --resume on another model with the same config", "error: trained on another model")
def resume_other_weights(lab: Lab) -> str:
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    _, data, out = _trained(lab)
    tmp = lab.tmp()
    other = convert(write_checkpoint(tmp / "src", make_config("air-tiny"), seed=5), tmp / "model", "mixed")
    return lab.cli("finetune", "-m", other, "--data", data, "--out", out, "--iters", "3", "--save-every", "1",
                   "--resume").refused("another model")


@case("33.8", "kill -9 during checkpoint saves, 8 times", "every checkpoint whole (one step); --resume goes on")
def kill_mid_save(lab: Lab) -> str:
    model, data, out = lab.model(), _data(lab), lab.tmp() / "o"
    cmd = [sys.executable, "-m", "glm_mlx", "finetune", "-m", str(model), "--data", str(data), "--out", str(out),
           "--iters", "100000", "--save-every", "1"]
    steps = [0]

    def saved_step() -> int:
        try:
            return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
        except (OSError, ValueError):
            return 0

    for k in range(8):
        p = subprocess.Popen(cmd + (["--resume"] if k else []), cwd=ROOT, env=lab.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while saved_step() <= steps[-1] and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)  # until this run has saved once
        time.sleep(0.05 + 0.037 * k)  # then a moment more, so the kills land at different points of a save
        p.send_signal(signal.SIGKILL)
        err = p.communicate()[1].decode()
        ckpt = out / "checkpoint"
        try:
            state = json.loads((ckpt / "state.json").read_text())
            config = json.loads((ckpt / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise Problem(f"kill {k + 1}: no whole checkpoint ({e}); stderr {err[-200:]!r}") from None
        if state["step"] != config["steps"]:
            raise Problem(f"kill {k + 1}: state.json at step {state['step']}, the adapter at {config['steps']}")
        stray = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-") and
                 p.name != os.readlink(ckpt)]
        steps.append(state["step"])
        if len(stray) > 1:
            raise Problem(f"kill {k + 1}: stray checkpoint folders {stray}")
    line = lab.cli("finetune", "-m", model, "--data", data, "--out", out, "--iters", str(steps[-1] + 1),
                   "--resume").ok().err.strip().splitlines()
    return f"(not an error) checkpoints whole at steps {steps[1:]}; resumed: {line[-1]}"


@case("33.14", "finetune on a JSONL line of 50 MB", "error naming the line, read past without holding it")
def huge_jsonl_line(lab: Lab) -> str:
    data = lab.tmp() / "data.jsonl"
    with data.open("w") as f:
        f.write(json.dumps({"text": "hello there"}) + "\n")
        f.write('{"text": "' + "word " * (10 << 20) + '"}\n')
    return lab.cli("finetune", "-m", lab.model(), "--data", data, "--out", lab.tmp() / "o", "--iters", "1",
                   "--max-seq-len", "64").refused("data.jsonl:2")


@case("33.12", "finetune --out MODEL_FOLDER --force", "error: a model folder is never an adapter's --out")
def out_is_the_model(lab: Lab) -> str:
    model = lab.model()
    before = sorted(p.name for p in model.iterdir())
    line = lab.cli("finetune", "-m", model, "--data", _data(lab), "--out", model, "--iters", "1",
                   "--force").refused("model folder")
    if sorted(p.name for p in model.iterdir()) != before:
        raise Problem(f"{model} was written")
    return line


@case("33.9", "generate --adapter whose alpha is nan", "error: corrupt adapter config, no nan logits")
def adapter_alpha_nan(lab: Lab) -> str:
    model, data, out = _trained(lab)
    config = json.loads((out / "adapter_config.json").read_text())
    config["alpha"] = float("nan")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return lab.cli("generate", "-m", model, "-p", "hi", "-n", "2", "--adapter", out).refused("adapter_config.json")
