"""Fine-tuning end to end: a small task is learnt, resuming is exact, bad input is named."""

from __future__ import annotations

import json

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
