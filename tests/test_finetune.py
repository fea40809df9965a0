"""Fine-tuning end to end: a small task is learnt, resuming is exact, bad input is named."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from test_convert import cli, one_line_error
from test_offload import budget_for, ends_in_error

from glm_mlx.data import load_dataset
from glm_mlx.finetune import TrainConfig, Trainer
from glm_mlx.loading import load_model
from glm_mlx.offload import offloaded_banks, offloaded_stats
from glm_mlx.tokenizer import Tokenizer

QUESTION = "What is the weather in Paris?"
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
LOSS_BOUND = 0.05


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    train = write_jsonl(d / "train.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, CALL]}] * 4)
    valid = write_jsonl(d / "valid.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, CALL]}])
    return d, train, valid


def test_a_tool_call_is_learnt_and_generated_with_the_adapter(converted, task, tmp_path):
    """QLoRA on the 4-bit tiny model: the training loss falls under the bound,
    and greedy `generate --adapter` answers the question with the tool call."""
    folder = converted("air-tiny", "mixed")
    d, _, _ = task
    out = tmp_path / "adapter"
    p = cli("finetune", "--model", folder, "--data", d, "--out", out, "--iters", "60", "--lr", "1e-3",
            "--rank", "8", "--alpha", "16", "--batch-size", "2", "--val-every", "20", "--seed", "0", check_ok=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] > 1.0 and log[-1]["loss"] < LOSS_BOUND, (log[0]["loss"], log[-1]["loss"])
    assert "val_loss" in log[-1] and log[-1]["val_loss"] < LOSS_BOUND
    g = cli("generate", "--model", folder, "--adapter", out, "--prompt", QUESTION, "--temp", "0", "-n", "40",
            check_ok=True)
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>" in g.stdout
    assert p.returncode == 0


def _trainer(folder, data, out, cfg):
    model, manifest = load_model(folder, "float32")
    ds = load_dataset(data, Tokenizer(folder), max_seq_len=cfg.max_seq_len)
    return Trainer(model, ds, cfg, out, base_manifest=manifest, base_dir=folder, log=lambda s: None)


def test_resumed_training_equals_an_uninterrupted_run(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer number {i} " * (1 + i % 3)}]} for i in range(7)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(rank=4, alpha=8, dropout=0.1, iters=8, batch_size=2, grad_accum=2, lr=1e-3, warmup=2, seed=3)
    whole = _trainer(folder, data, tmp_path / "a", cfg).run()

    first = _trainer(folder, data, tmp_path / "b", cfg)

    def stop_at_3(rec, total):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(progress=stop_at_3)
    second = _trainer(folder, data, tmp_path / "b", cfg)
    second.resume(tmp_path / "b" / "checkpoint")
    assert second.step == 3
    resumed = second.run()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]  # every step, bit for bit
    assert [r["lr"] for r in resumed] == [r["lr"] for r in whole]


def test_resume_refuses_other_options(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 5}] * 3)
    t = _trainer(folder, data, tmp_path / "o", TrainConfig(rank=4, iters=2))
    t.run()
    other = _trainer(folder, data, tmp_path / "o", TrainConfig(rank=8, iters=2))
    with pytest.raises(ValueError, match="rank=4"):
        other.resume(tmp_path / "o" / "checkpoint")


def test_adapter_for_another_model_is_refused(converted, task, tmp_path):
    d, train, _ = task
    out = tmp_path / "adapter"
    cli("finetune", "--model", converted("air-tiny", "mixed"), "--data", train, "--out", out, "--iters", "1",
        check_ok=True)
    p = cli("generate", "--model", converted("glm45-tiny", "mixed"), "--adapter", out, "--prompt", "hi", "-n", "2")
    one_line_error(p, "adapter")


def test_malformed_data_is_named_by_file_and_line(converted, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"messages": [{"role": "user"\n')
    p = cli("finetune", "--model", converted("air-tiny", "mixed"), "--data", bad, "--out", tmp_path / "o")
    one_line_error(p, f"{bad}:3:")
    assert not (tmp_path / "o").exists()


def test_fuse_command_writes_a_model_folder_that_loads(converted, tmp_path):
    import glm_mlx

    folder = converted("air-tiny", "none")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, CALL]}] * 2)
    cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "a", "--iters", "3", "--lr", "1e-2",
        "--targets", "attention,experts", check_ok=True)
    p = cli("fuse", "--model", folder, "--adapter", tmp_path / "a", "--out", tmp_path / "fused", check_ok=True)
    assert "wrote" in p.stdout
    fused, _ = glm_mlx.load(tmp_path / "fused", dtype="float32")
    with_adapter, _ = glm_mlx.load(folder, dtype="float32", adapter=tmp_path / "a")
    toks = [[5, 60, 7, 200, 11]]
    a, b = np.array(fused(toks)), np.array(with_adapter(toks))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2  # bf16 storage of the fused weights


def test_gradient_checkpointing_changes_nothing_but_memory(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample {i} " * 6} for i in range(4)])
    runs = []
    for ckpt in (False, True):
        cfg = TrainConfig(rank=4, iters=3, batch_size=2, lr=1e-3, grad_checkpoint=ckpt)
        t = _trainer(folder, data, tmp_path / f"o{ckpt}", cfg)
        assert {type(layer).__name__ == "CheckpointedLayer" for layer in t.model.model.layers} == {ckpt}
        runs.append([r["loss"] for r in t.run()])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_training_with_offloaded_experts_equals_resident_training(converted, tmp_path, grad_checkpoint):
    """A model larger than memory trains: its routed experts, frozen, stay on disk and go through a
    bank of 1 or k + 1 slots a layer. The gradients are the resident model's (the backward pass reads
    the experts again: the slots no longer hold what the forward pass saw), and so is every step's loss."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from glm_mlx.data import batches
    from glm_mlx.finetune import loss_fn

    folder = converted("glm45-tiny", "mixed")  # grouped routing, three dense layers, an MTP layer
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer number {i} " * (1 + i % 3)}]} for i in range(5)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(rank=4, alpha=8, iters=3, batch_size=2, lr=1e-2, seed=1, grad_checkpoint=grad_checkpoint)
    runs = {}
    for slots in (None, 1, 5):
        model, manifest = load_model(folder, "float32", expert_memory=slots and budget_for(folder, slots))
        ds = load_dataset(data, Tokenizer(folder), max_seq_len=cfg.max_seq_len)
        t = Trainer(model, ds, cfg, tmp_path / f"o{slots}", base_manifest=manifest, base_dir=folder,
                    log=lambda s: None)
        for _, layer in tree_flatten(model.trainable_parameters()):  # B is zero at initialisation
            layer[...] = mx.array(np.random.default_rng(layer.size).standard_normal(layer.shape, np.float32) * 0.1)
        batch = [mx.array(a) for a in next(batches(ds, 4, seed=0, epoch=0))]
        _, grads = nn.value_and_grad(model, loss_fn)(model, *batch)
        grads = np.concatenate([np.array(g).ravel() for _, g in tree_flatten(grads)])
        runs[slots] = grads, [r["loss"] for r in t.run()]
        stats = offloaded_stats(model)
        assert (stats is None) == (slots is None)
        if stats is not None:
            assert stats.misses > 0 and "experts_read_gb" in t.history[-1]
    want_grads, want_losses = runs[None]
    assert want_losses[-1] < want_losses[0]  # it learns
    for slots in (1, 5):
        grads, losses = runs[slots]
        assert np.linalg.norm(grads - want_grads) / np.linalg.norm(want_grads) < 1e-5
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


def test_lora_on_offloaded_experts_is_refused_clearly(converted, tmp_path):
    folder = converted("glm45-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 5}] * 2)
    p = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "o", "--iters", "1",
            "--targets", "attention,experts", "--expert-memory", str(budget_for(folder, 2)))
    ends_in_error(p, "LoRA on the routed experts needs them resident")
    assert not (tmp_path / "o").exists()
    ok = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "o2", "--iters", "1",
             "--expert-memory", str(budget_for(folder, 2)), check_ok=True)
    assert "experts offloaded: 2 of 16" in ok.stderr and (tmp_path / "o2" / "adapters.safetensors").is_file()
    assert "| experts read " in ok.stderr  # the progress line off a terminal says what the step read


def test_an_offloaded_step_reads_its_experts_twice_not_three_times(converted, monkeypatch):
    """The layer-by-layer backward pass computes each layer again for its vjp; an offloaded bank's
    weighted sum skips that forward (its backward pass computes the experts' outputs itself). The
    gradients are the same with and without the skip, and the reads fall by the recomputation's."""
    import contextlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    import glm_mlx.finetune as finetune
    from glm_mlx.lora import apply_lora

    folder = converted("glm45-tiny", "mixed")
    toks = mx.array(np.random.default_rng(3).integers(0, 400, size=(2, 40)))
    out = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(finetune, "recomputing", contextlib.nullcontext)
        model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, 1))
        model.freeze()
        mx.random.seed(0)
        apply_lora(model, targets={"attention", "shared_experts"}, rank=2, alpha=4.0)
        for _, p in tree_flatten(model.trainable_parameters()):
            p[...] = mx.array(np.random.default_rng(p.size).standard_normal(p.shape, np.float32) * 0.1)
        forward = offloaded_stats(model).misses
        (loss, _), grads = finetune.layerwise_value_and_grad(model, toks[:, :-1], toks[:, 1:], mx.ones((2, 39)))
        out[skip] = (np.concatenate([np.array(g).ravel() for _, g in tree_flatten(grads)]),
                     offloaded_stats(model).misses - forward)
    (g_skip, reads_skip), (g_all, reads_all) = out[True], out[False]
    np.testing.assert_allclose(g_skip, g_all, rtol=1e-5, atol=1e-7)
    assert reads_skip < 0.75 * reads_all, (reads_skip, reads_all)


def test_auto_expert_memory_leaves_room_for_the_training_step(converted, monkeypatch):
    """`auto` gives the experts what the machine has less the weights, its reserve and, for training,
    the step's own memory (LoRA state and activations, by training_reserve's arithmetic)."""
    import glm_mlx.offload as offload
    from glm_mlx.loading import expert_bytes, verify_folder

    folder = converted("glm45-tiny", "mixed")
    manifest = verify_folder(folder)
    experts = expert_bytes(manifest)
    resident = sum(r["size"] for f, r in manifest["files"].items() if f.startswith("weights/")
                   and not f.startswith("weights/experts."))
    monkeypatch.setattr(offload, "machine_memory", lambda: resident + offload.AUTO_RESERVE + experts)
    model, _ = load_model(folder, "float32", expert_memory="auto")
    assert offloaded_stats(model) is None  # the experts fit exactly
    model, _ = load_model(folder, "float32", expert_memory="auto", reserve=experts // 2)
    banks = offloaded_banks(model)
    assert banks and banks[0].slots * banks[0].file.stride * len(banks) <= experts // 2


def test_the_training_memory_arithmetic_holds_at_small_size(tmp_path):
    """training_reserve (what `auto` keeps free for a step) against MLX's peak over two offloaded
    QLoRA steps on the quality fixture: within 25%."""
    import mlx.core as mx

    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint
    from glm_mlx.data import Dataset, Example
    from glm_mlx.finetune import training_reserve

    folder = convert(write_checkpoint(tmp_path / "src", make_config("quality"), with_mtp=False), tmp_path / "m",
                     "mixed")
    model, manifest = load_model(folder, "float32", expert_memory=budget_for(folder, 8))
    tokens, targets = 256, ("attention", "dense_mlp", "shared_experts")
    ds = Dataset([Example([1 + i % 300 for i in range(tokens + 1)], [True] * (tokens + 1))], 0, 0)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    Trainer(model, ds, TrainConfig(rank=8, targets=targets, iters=2, max_seq_len=tokens + 1), tmp_path / "a",
            base_manifest=manifest, base_dir=folder, log=lambda s: None).run()
    measured = mx.get_peak_memory() - before
    predicted = training_reserve(model.args, tokens, 4, targets, 8)
    print(f"measured {measured / 1e6:.1f} MB, predicted {predicted / 1e6:.1f} MB")
    assert abs(measured - predicted) < 0.25 * predicted, (measured, predicted)


# ---- interrupts, checkpoints and resuming --------------------------------------------------------------------------

class Killed(BaseException):
    """kill -9 as the loop sees it: nothing of ours runs after it (no handler, no clean-up)."""


class Interrupter:
    """A tracer over the training loop's own code: counts the lines run in `files` (and, given
    `functions`, in those only) and, when `at` is given, raises `exc` as the at-th runs, as a Ctrl-C
    (or a kill) landing there would. Armed once step 2 reports."""

    def __init__(self, files, functions=None, at=None, exc=KeyboardInterrupt):
        self.files, self.functions, self.at, self.exc = files, functions, at, exc
        self.seen, self.armed = [], False

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if not code.co_filename.endswith(self.files):
            return None
        if event == "line" and self.armed and (self.functions is None or code.co_name in self.functions):
            self.seen.append((code.co_filename.rsplit("/", 1)[1], code.co_name, frame.f_lineno))
            if len(self.seen) == self.at:
                raise self.exc
        return self

    def progress(self, rec, total):
        self.armed = rec["step"] >= 2  # after step 2's work: a checkpoint exists by then for each test below


def _run_traced(trainer, tracer):
    import sys

    sys.settrace(tracer)
    try:
        return trainer.run(progress=tracer.progress)
    finally:
        sys.settrace(None)


def _interrupt_everywhere(converted, tmp_path, monkeypatch, files, functions, exc, save_every):
    """Train 4 steps uninterrupted; then, for each line of `files` the loop runs after step 2 reports, a run
    stopped there by `exc` and resumed from its checkpoint. Each resumed run must take the same steps
    with the same losses and learning rates, and end with the same adapter. Returns the lines tried."""
    import shutil

    from glm_mlx.lora import lora_parameters

    folder = converted("air-tiny", "mixed")
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer number {i} " * (1 + i % 3)}]} for i in range(5)]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), Tokenizer(folder))
    _, manifest = load_model(folder, "float32")
    # 5 samples in batches of 2, 2 a step: step 4 starts an epoch, 2 and 4 validate
    cfg = TrainConfig(rank=4, alpha=8, dropout=0.1, iters=4, batch_size=2, grad_accum=2, lr=1e-3, warmup=1,
                      val_every=2, save_every=save_every, seed=3)

    def trainer(out):
        return Trainer(load_model(folder, "float32")[0], ds, cfg, out, valid=ds, base_manifest=manifest,
                       base_dir=folder, log=lambda s: None)

    whole, baseline = trainer(tmp_path / "whole"), Interrupter(files, functions)
    want = [(r["step"], r["loss"], r["lr"]) for r in _run_traced(whole, baseline)]
    want_adapter = {k: np.array(v) for k, v in lora_parameters(whole.model).items()}
    first = {}  # each distinct line, at its first run
    for k, where in enumerate(baseline.seen, 1):
        first.setdefault(where, k)
    for where, k in first.items():
        out = tmp_path / f"i{k}"
        with monkeypatch.context() as m:
            if exc is Killed:
                m.setattr(shutil, "rmtree", lambda *a, **kw: None)  # a killed process cleans nothing up
            with pytest.raises(exc):
                _run_traced(trainer(out), Interrupter(files, functions, at=k, exc=exc))
        second = trainer(out)
        second.resume(out / "checkpoint")
        got = [(r["step"], r["loss"], r["lr"]) for r in second.run()]
        assert got == want, f"stopped at {where}"
        adapter = lora_parameters(second.model)
        assert all(np.array_equal(np.array(adapter[n]), want_adapter[n]) for n in want_adapter), where
    return first


def test_a_ctrl_c_anywhere_in_the_loop_resumes_exactly(converted, tmp_path, monkeypatch):
    """Ctrl-C at every line the loop and its data iterator run after step 2: fetching a batch,
    inside the batches generator, mid-step (while MLX traces the compiled step too), at the update,
    validating, saving a checkpoint (then the save on Ctrl-C)."""
    tried = _interrupt_everywhere(converted, tmp_path, monkeypatch, ("glm_mlx/finetune.py", "glm_mlx/data.py"),
                                  None, KeyboardInterrupt, 2)
    functions = {f for _, f, _ in tried}
    assert {"train_step", "_batch", "batches", "evaluate", "save", "run", "loss_fn_hidden"} <= functions, functions


def test_a_kill_during_a_checkpoint_save_leaves_one_whole_checkpoint(converted, tmp_path, monkeypatch):
    """kill -9 at every line of a checkpoint save (the adapter's included): OUT/checkpoint is then
    the previous save or the new one, never a mix of steps, and resuming from it is exact."""
    tried = _interrupt_everywhere(converted, tmp_path, monkeypatch, ("glm_mlx/finetune.py", "glm_mlx/lora.py"),
                                  {"save", "save_adapter"}, Killed, 1)
    assert len(tried) > 20


def _small_run(folder, tmp_path, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"hello world {i} " * 5} for i in range(3)])
    cfg = TrainConfig(**{"rank": 4, "iters": 3, "save_every": 1, "lr": 1e-3, **kw})
    return _trainer(folder, data, tmp_path / "o", cfg), data


COSINE = {"rank": 4, "lr": 1e-3, "lr_schedule": "cosine"}


def test_resume_extends_a_run_with_the_new_lengths_schedule(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    t, data = _small_run(folder, tmp_path, lr_schedule="cosine")  # a schedule whose length shows
    t.run()
    said = []
    longer = _trainer(folder, data, tmp_path / "o", TrainConfig(iters=5, save_every=1, **COSINE))
    longer.log = said.append
    longer.resume(tmp_path / "o" / "checkpoint")
    assert len(said) == 1 and "the checkpoint's run was 3 steps): not what a 5-step run from scratch gives" in said[0]
    hist = longer.run()
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5]
    fresh = _trainer(folder, data, tmp_path / "f", TrainConfig(iters=5, **COSINE))
    assert [r["lr"] for r in hist[3:]] == [float(fresh.lr_at(mx.array(s)).item()) for s in (3, 4)]
    assert hist[1]["lr"] != float(fresh.lr_at(mx.array(1)).item())  # the first steps had the 3-step schedule
    shorter = _trainer(folder, data, tmp_path / "o", TrainConfig(iters=4, save_every=1, **COSINE))
    with pytest.raises(ValueError, match="at step 5, past this run's 4 steps"):
        shorter.resume(tmp_path / "o" / "checkpoint")


def test_resume_refuses_a_model_of_the_same_shapes_with_other_weights(converted, tmp_path):
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    folder = converted("air-tiny", "mixed")
    other = convert(write_checkpoint(tmp_path / "src", make_config("air-tiny"), seed=1), tmp_path / "other", "mixed")
    t, data = _small_run(folder, tmp_path, iters=1)
    t.run()
    elsewhere = _trainer(other, data, tmp_path / "o", t.cfg)
    # The fingerprint records the source converted, so it tells these two apart already; a folder converted
    # before it did (same config, names, shapes, recipe) has the same fingerprint: the weights' sha256 decide.
    assert elsewhere.base["fingerprint"] != t.base["fingerprint"]
    elsewhere.base["fingerprint"] = t.base["fingerprint"]
    with pytest.raises(ValueError, match="same architecture and recipe but other weights"):
        elsewhere.resume(tmp_path / "o" / "checkpoint")


@pytest.mark.parametrize("damage, says", [
    (lambda c: c.joinpath("adapters.safetensors").write_bytes(c.joinpath("adapters.safetensors").read_bytes()[:99]),
     "adapters.safetensors: checksum does not match"),
    (lambda c: c.joinpath("optimizer.safetensors").unlink(), "optimizer.safetensors: missing"),
    (lambda c: c.joinpath("state.json").write_text('{"step": 3'), "corrupt checkpoint"),
    (lambda c: c.joinpath("adapter_config.json").write_text("[]"), "corrupt or not a glm-mlx adapter config"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(converted, tmp_path, damage, says):
    folder = converted("air-tiny", "mixed")
    t, data = _small_run(folder, tmp_path, iters=2)
    t.run()
    damage((tmp_path / "o" / "checkpoint").resolve())
    again = _trainer(folder, data, tmp_path / "o", t.cfg)
    with pytest.raises(ValueError, match=says) as e:
        again.resume(tmp_path / "o" / "checkpoint")
    assert "\n" not in str(e.value)


def test_training_stops_at_the_first_non_finite_loss_and_writes_no_adapter(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"hello world {i} " * 5} for i in range(3)])
    p = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "o", "--iters", "6", "--lr", "1e30",
            "--save-every", "1")
    ends_in_error(p, "step 2: the loss is nan", "no adapter written", "(step 1) kept")
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    state = json.loads((tmp_path / "o" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and np.isfinite(state["history"][0]["loss"])


def test_an_out_holding_a_run_is_refused_unless_resume_or_force(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"hello world {i} " * 5} for i in range(3)])
    out = tmp_path / "o"
    cli("finetune", "--model", folder, "--data", data, "--out", out, "--iters", "2", check_ok=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    p = cli("finetune", "--model", folder, "--data", data, "--out", out, "--iters", "2", "--seed", "1")
    one_line_error(p, f"{out}: holds an adapter already", "--resume", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    p = cli("finetune", "--model", folder, "--data", data, "--out", out, "--iters", "2", "--seed", "1", "--force",
            check_ok=True)
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the run's own files only
    assert (out / "adapters.safetensors").read_bytes() != before["adapters.safetensors"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint",
                                                                                         "checkpoint-000002"]
    f = tmp_path / "file"
    f.write_text("not a folder")
    one_line_error(cli("finetune", "--model", folder, "--data", data, "--out", f), f"{f}: exists and is not a folder")
    one_line_error(cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "new", "--resume"),
                   "no checkpoint to resume from")
    # A model folder is never an adapter's --out, --force or not: its files stay as they were.
    model_files = sorted(p.name for p in folder.iterdir())
    one_line_error(cli("finetune", "--model", folder, "--data", data, "--out", folder, "--force"),
                   "is a glm-mlx model folder")
    assert sorted(p.name for p in folder.iterdir()) == model_files


@pytest.mark.parametrize("option, field, value", [
    ("--lr", "lr", float("nan")), ("--lr", "lr", float("inf")), ("--lr", "lr", -1.0), ("--batch-size", "batch_size", 0),
    ("--rank", "rank", 0), ("--alpha", "alpha", float("nan")), ("--dropout", "dropout", 1.0),
    ("--grad-accum", "grad_accum", 0), ("--iters", "iters", 0), ("--epochs", "epochs", 0),
    ("--max-seq-len", "max_seq_len", 1), ("--warmup", "warmup", -1), ("--seed", "seed", -1),
    ("--lr-schedule", "lr_schedule", "linear"), ("--save-every", "save_every", -2)])
def test_absurd_options_are_refused_before_any_work(option, field, value):
    from glm_mlx.finetune import check_config

    with pytest.raises(ValueError, match=f"^{option} must be"):
        check_config(TrainConfig(**{field: value}))


def test_absurd_options_get_one_line_from_the_command(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 5}])
    for option, value in (("--lr", "nan"), ("--batch-size", "0"), ("--report-every", "0")):
        p = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "o", option, value)
        one_line_error(p, f"{option} must be")
        assert not (tmp_path / "o").exists()


def test_progress_is_a_plain_line_every_report_every_steps_off_a_terminal(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"hello world {i} " * 5} for i in range(3)])
    p = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "o", "--iters", "5",
            "--report-every", "2", "--val-every", "2", check_ok=True)
    assert "warning: --val-every 2 does nothing without validation data" in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2", "step 4", "step 5"], p.stderr
    assert all(k in lines[0] for k in ("loss ", "lr ", "tokens/s", "peak ")) and lines[-1].endswith("5/5")


def test_the_command_line_defaults_are_the_train_configs():
    import inspect

    from glm_mlx.cli import finetune

    defaults = TrainConfig()
    for name, p in inspect.signature(finetune).parameters.items():
        if hasattr(defaults, name) and name != "iters":
            want = getattr(defaults, name)
            got = p.default.default
            assert (tuple(got.split(",")) if name == "targets" else got) == want, name
