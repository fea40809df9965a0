"""LoRA / QLoRA training on the shared model core.

The training step is one function over explicit state (model, optimizer,
random state), compiled; gradient accumulation sums micro-batch gradients
before one update. The position in the data is (epoch, batch), the order
of an epoch a function of (seed, epoch), and dropout's randomness is seeded
per step, so a run stopped at step k and resumed computes exactly the
losses the uninterrupted run computes.

A step commits in one call: the compiled optimizer update moves the weights,
AdamW's moments and its step counter together, and the data position is a
function of that counter (step x grad_accum micro-batches). An interrupt
anywhere else in the loop (fetching data, mid-step, validating, saving) leaves
the state of the last committed step, which is what Ctrl-C saves.

Checkpoints (every --save-every steps, on Ctrl-C, at the end) are one unit:
the adapter, the optimizer state and the run's record are written into a new
folder OUT/checkpoint-NNNNNN, and the link OUT/checkpoint is then swung to it
(a rename), so a kill at any moment leaves the previous checkpoint or the new
one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .config import ModelArgs
from .data import Dataset, batches
from .generate import fmt_bytes
from .loading import MANIFEST
from .lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    TARGETS,
    apply_lora,
    base_info,
    check_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from .model import DecoderLayer, Model
from .offload import offloaded_banks, offloaded_stats, recomputing

PAD_MULTIPLE = 32  # batch widths rounded up, so the compiled step sees few shapes


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(sorted(DEFAULT_TARGETS))
    iters: int | None = None  # optimizer steps; default: epochs over the data
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_checkpoint: bool = False
    max_seq_len: int = 2048
    val_every: int = 0
    save_every: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)  # what the caller wants recorded (data paths, base folder)


SCHEDULES = ("cosine", "constant")


class OptionError(ValueError):
    """A training option that cannot work; the message names the option."""


class TrainingDiverged(ValueError):
    """A step's loss or gradient is not a finite number."""


def check_config(cfg: TrainConfig) -> None:
    """Refuse options that cannot train, naming the option, before any work is done."""
    def bad(option: str, value, want: str):
        raise OptionError(f"{option} must be {want}, not {value!r}")

    for option, value, low in (("--rank", cfg.rank, 1), ("--epochs", cfg.epochs, 1),
                               ("--batch-size", cfg.batch_size, 1), ("--grad-accum", cfg.grad_accum, 1),
                               ("--warmup", cfg.warmup, 0), ("--max-seq-len", cfg.max_seq_len, 2),
                               ("--val-every", cfg.val_every, 0),
                               ("--save-every", cfg.save_every, 0), ("--seed", cfg.seed, 0)):
        if value < low:
            bad(option, value, f"an integer of at least {low}")
    if cfg.iters is not None and cfg.iters < 1:
        bad("--iters", cfg.iters, "at least 1")
    for option, value in (("--lr", cfg.lr), ("--alpha", cfg.alpha)):
        if not (math.isfinite(value) and value > 0):
            bad(option, value, "a finite number above 0")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        bad("--weight-decay", cfg.weight_decay, "a finite number of at least 0")
    if not 0 <= cfg.dropout < 1:  # a NaN fails this too
        bad("--dropout", cfg.dropout, "in [0, 1)")
    if cfg.lr_schedule not in SCHEDULES:
        bad("--lr-schedule", cfg.lr_schedule, " or ".join(SCHEDULES))
    if not cfg.targets or not set(cfg.targets) <= set(TARGETS):
        bad("--targets", ",".join(cfg.targets), f"some of {', '.join(TARGETS)}, comma-separated")


def loss_fn_hidden(model: Model, hidden: mx.array, targets: mx.array, mask: mx.array):
    """loss_fn from the trunk's final (normed) hidden states."""
    logits = model.logits(hidden).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    n = mask.sum()
    return (ce * mask).sum() / mx.maximum(n, 1), n


def loss_fn(model: Model, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Mean cross-entropy over the target tokens, and how many there were."""
    return loss_fn_hidden(model, model.model(inputs), targets, mask)


def layerwise_value_and_grad(model: Model, inputs: mx.array, targets: mx.array, mask: mx.array):
    """loss_fn's value and the trainable parameters' gradients, computed a layer at a time: the
    forward pass keeps each layer's input, the backward pass recomputes one layer inside its own
    vjp and hands the gradient of its input to the layer below.

    This is how a model whose routed experts are offloaded trains: a bank evaluates mid-step (it
    reads the router's choice, then the experts), and under one gradient transform over the whole
    model MLX would keep everything evaluated before it for the backward pass. Here each
    evaluation holds one layer's graph at most. Memory is that of gradient checkpointing (it is
    checkpointing, always). Dropout draws from a seed per layer, so the recomputation replays it."""
    layers = model.model.layers
    base = mx.random.randint(0, 2**31 - 1, ()).item()  # the step's seeding decides this
    h, kept = model.model.embed_tokens(inputs), []
    for i, layer in enumerate(layers):
        kept.append(h)
        mx.random.seed(base + i)
        h = layer(h)
        mx.eval(h)

    def head(h):
        return loss_fn_hidden(model, model.model.norm(h), targets, mask)

    (loss, n), dh = mx.value_and_grad(head)(h)
    mx.eval(loss, n, dh)
    grads = tree_map(mx.zeros_like, model.trainable_parameters())
    for i in reversed(range(len(layers))):
        layer = layers[i]
        params = layer.trainable_parameters()

        def pulled(params, x, layer=layer, i=i):
            layer.update(params)
            mx.random.seed(base + i)
            return (layer(x) * dh).sum()  # its gradient in x and params is the vjp of dh

        with recomputing():  # an offloaded bank reads its experts in its backward pass only
            g, dx = mx.grad(pulled, argnums=(0, 1))(params, kept[i])
        layer.update(params)
        mx.eval(g, dx)
        grads["model"]["layers"][i], dh, kept[i] = g, dx, None
    return (loss, n), grads


# ---- memory arithmetic (scripts/finetune_memory.py checks it against measurements)


def linears(a: ModelArgs) -> list[tuple[str, int, int, int]]:
    """(group, in, out, copies) of every weight matrix of the trunk."""
    d, hd = a.hidden_size, a.head_dim
    attn = [(d, a.num_attention_heads * hd), (d, a.num_key_value_heads * hd), (d, a.num_key_value_heads * hd),
            (a.num_attention_heads * hd, d)]
    dense = [(d, a.intermediate_size), (d, a.intermediate_size), (a.intermediate_size, d)]
    m = a.moe_intermediate_size
    moe = [(d, m), (d, m), (m, d)]
    n_moe = a.num_hidden_layers - a.first_k_dense_replace
    out = [("attention", i, o, a.num_hidden_layers) for i, o in attn]
    out += [("dense_mlp", i, o, a.first_k_dense_replace) for i, o in dense]
    out += [("shared_experts", i, o * a.n_shared_experts if o == m else o, n_moe) for i, o in moe]
    out += [("experts", i, o, n_moe * a.n_routed_experts) for i, o in moe]
    out += [("embed", d, a.vocab_size, 1), ("lm_head", d, a.vocab_size, 1), ("router", d, a.n_routed_experts, n_moe)]
    return out


def weight_bytes(a: ModelArgs, float_bytes: int) -> float:
    """The mixed recipe: experts 4-bit, the rest 8-bit (group 64, scale and bias in
    float_bytes each), the router float32; norms and biases ignored (under 0.01%)."""
    total = 0.0
    for group, i, o, n in linears(a):
        bits = {"experts": 4, "router": None}.get(group, 8)
        total += n * i * o * (4 if bits is None else bits / 8 + 2 * float_bytes / 64)
    return total


def lora_params(a: ModelArgs, targets: set[str], rank: int) -> int:
    return sum(n * rank * (i + o) for g, i, o, n in linears(a) if g in targets)


def activation_bytes(a: ModelArgs, tokens: int, float_bytes: int, checkpointed: bool, rows: int = 1) -> float:
    """For `rows` sequences of `tokens` each. Checkpointed, each layer keeps its input and one
    layer's internals live at a time, forward and backward (x2): norms, q/k/v/o, the attention
    scores (the backward of MLX's fused attention materialises them: 3 x heads x T^2 a row), and
    the MoE's gathered rows (k x (2 hidden + 3 expert widths)) and shared expert."""
    if rows > 1:
        one = activation_bytes(a, tokens, float_bytes, checkpointed)
        return rows * one
    d, m, k = a.hidden_size, a.moe_intermediate_size, a.num_experts_per_tok
    attn = 2 * a.num_attention_heads * a.head_dim + 2 * a.num_key_value_heads * a.head_dim
    per_token = 4 * d + attn + k * (2 * d + 3 * m) + 3 * m * a.n_shared_experts + a.n_routed_experts * 2
    inner = 2 * (tokens * float_bytes * per_token + 3 * a.num_attention_heads * tokens * tokens * float_bytes)
    kept = tokens * d * float_bytes * a.num_hidden_layers if checkpointed else 0
    return kept + inner * (1 if checkpointed else a.num_hidden_layers) + tokens * a.vocab_size * 4 * 3


def training_reserve(a: ModelArgs, tokens: int, float_bytes: int, targets, rank: int, rows: int = 1) -> int:
    """Bytes a QLoRA step needs beside the weights (LoRA factors, their gradients and AdamW's two
    moments at 16 bytes a parameter, activations checkpointed): what `--expert-memory auto` leaves
    free when it sizes the experts' bank for training (scripts/finetune_memory.py checks it)."""
    return int(16 * lora_params(a, set(targets), rank) + activation_bytes(a, tokens, float_bytes, True, rows))


class CheckpointedLayer(DecoderLayer):
    """A decoder layer that recomputes its activations in the backward pass."""

    def __call__(self, x, cache=None):
        def inner(params, x):
            self.update(params)
            return DecoderLayer.__call__(self, x, cache)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)


def checkpoint_layers(model: Model) -> None:
    # Only this model's layers change class; the model's parameter names stay.
    for layer in model.model.layers:
        layer.__class__ = CheckpointedLayer


def schedule(cfg: TrainConfig, total: int):
    """The learning rate by step: linear warmup over --warmup steps, then cosine decay to zero at
    `total` steps, or constant."""
    if cfg.lr_schedule == "constant":
        after = lambda step: mx.array(cfg.lr, mx.float32)  # noqa: E731  (MLX schedules are callables)
    else:
        after = optim.cosine_decay(cfg.lr, max(total - cfg.warmup, 1))
    if cfg.warmup <= 0:
        return after
    return optim.join_schedules([optim.linear_schedule(cfg.lr / cfg.warmup, cfg.lr, cfg.warmup), after],
                                [cfg.warmup])


def set_leaves(tree, leaves) -> None:
    """Put (dotted path, array) pairs into a nested tree of dicts and lists, in place."""
    for path, value in leaves:
        node, *keys, last = [tree, *path.split(".")]
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value


def restoring(fn, state: list):
    """fn, compiled over `state`, such that an exception inside it (a Ctrl-C while MLX traces it, on
    its first call or a new shape) leaves `state` as it was: MLX would leave the trace's placeholders
    in the model and the optimizer, and the checkpoint saved on Ctrl-C would hold them."""
    def call(*args):
        before = [tree_flatten(s) for s in state]
        try:
            return fn(*args)
        except BaseException:
            for tree, leaves in zip(state, before):
                set_leaves(tree, leaves)
            raise

    return call


CHECKPOINT = "checkpoint"
_CHECKPOINT_RE = re.compile(rf"{CHECKPOINT}-\d{{6}}")  # the folders a checkpoint link points to
OUTPUTS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "train_log.jsonl")  # what a run writes into OUT beside checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file."""


class Trainer:
    def __init__(self, model: Model, train: Dataset, cfg: TrainConfig, out: str | Path, *,
                 valid: Dataset | None = None, base_manifest: dict | None = None, base_dir: str | Path = "",
                 log=print):
        check_config(cfg)
        if not train.examples:
            raise ValueError("the training data holds no usable samples")
        for name, ds in (("training", train), ("validation", valid)):
            top = max((max(e.tokens) for e in ds.examples), default=0) if ds else 0
            if top >= model.args.vocab_size:  # an id past the vocabulary crashes MLX's CPU embedding
                raise ValueError(f"the {name} data has token id {top}, outside the vocabulary "
                                 f"[0, {model.args.vocab_size}): a tokenizer for another model?")
        banks = offloaded_banks(model)
        if banks and "experts" in cfg.targets:
            raise ValueError(f"LoRA on the routed experts needs them resident, and this model keeps "
                             f"{banks[0].slots} of {banks[0].slot_of.size} experts a layer in memory "
                             "(--expert-memory): train the other targets, or give the experts all their memory")
        self.model, self.train, self.valid, self.cfg, self.banks = model, train, valid, cfg, banks
        self.out, self.log = Path(out), log
        self.base = base_info(base_manifest or {}, Path(base_dir))
        model.freeze()
        mx.random.seed(cfg.seed)  # the adapter's initial A factors follow from the seed
        self.paths = apply_lora(model, targets=set(cfg.targets), rank=cfg.rank, alpha=cfg.alpha,
                                dropout=cfg.dropout)
        if cfg.grad_checkpoint and not banks:  # offloaded, the step goes layer by layer: checkpointed anyway
            checkpoint_layers(model)
        per_epoch = math.ceil(len(train.examples) / cfg.batch_size)
        self.batches_per_epoch = per_epoch
        self.total = cfg.iters or max(1, cfg.epochs * per_epoch // cfg.grad_accum)
        if cfg.warmup >= self.total:
            raise OptionError(f"--warmup {cfg.warmup} is not shorter than the run ({self.total} steps): the learning "
                              "rate would never reach --lr")
        self.lr_at = schedule(cfg, self.total)
        self.opt = optim.AdamW(learning_rate=self.lr_at, weight_decay=cfg.weight_decay)
        self.opt.init(model.trainable_parameters())
        self._epoch = None  # (epoch, next batch index, its generator)
        self.history: list[dict] = []
        self.saved_step: int | None = None  # the step of the checkpoint on disk, once there is one

        state = [model.state, self.opt.state, mx.random.state]
        grad = layerwise_value_and_grad if banks else nn.value_and_grad(model, loss_fn)

        def micro(inputs, targets, mask):
            (loss, n), g = grad(model, inputs, targets, mask)
            return loss, n, g

        if not banks:  # an offloaded bank reads the router's choice on the host mid-step: no trace holds it
            micro = partial(mx.compile, inputs=state, outputs=state)(micro)

        @partial(mx.compile, inputs=state, outputs=state)
        def update(grads):
            self.opt.update(model, grads)

        # The random state is left out: every step seeds it afresh.
        self._micro, self._update = restoring(micro, state[:2]), restoring(update, state[:2])

    @property
    def step(self) -> int:
        """Optimizer steps taken: AdamW's own counter, which moves in the same call as the weights."""
        return int(self.opt.state["step"].item())

    # -- data position ---------------------------------------------------------

    def _batch(self, position: int):
        """The batch at a position (micro-batches since the start): the epoch's batches are drawn in
        order, and only a jump (a resume) starts an epoch over and skips ahead."""
        epoch, index = divmod(position, self.batches_per_epoch)
        cached, self._epoch = self._epoch, None  # an interrupt inside the generator ends it: start afresh then
        if cached is None or cached[:2] != (epoch, index):
            it = batches(self.train, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch, pad_multiple=PAD_MULTIPLE)
            for _ in range(index):
                next(it)
            cached = (epoch, index, it)
        b = next(cached[2])
        self._epoch = (epoch, index + 1, cached[2])
        return b

    # -- one optimizer step ---------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step; its record, also appended to the history. Raises TrainingDiverged,
        nothing updated, when the loss or the gradient is not finite."""
        cfg, step = self.cfg, self.step
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout's randomness: a function of the step
        total_loss, total_n, acc = 0.0, 0, None
        t0, read = time.perf_counter(), self._read_bytes()
        for i in range(cfg.grad_accum):
            inputs, targets, mask = (mx.array(a) for a in self._batch(step * cfg.grad_accum + i))
            loss, n, g = self._micro(inputs, targets, mask)
            # sum of per-token losses, so micro-batches weigh by their target tokens
            g = tree_map(lambda x: x * n, g)
            acc = g if acc is None else tree_map(mx.add, acc, g)
            mx.eval(loss, n, acc)
            total_loss += loss.item() * n.item()
            total_n += int(n.item())
        grads = tree_map(lambda x: x / max(total_n, 1), acc)
        loss = total_loss / max(total_n, 1)
        norm = math.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)).item())
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient's norm is {norm}"
            raise TrainingDiverged(f"step {step + 1}: {what}; training stopped before that step's update "
                                   "(a lower --lr, or data that is not what it seems?)")
        rec = {"step": step + 1, "loss": loss, "tokens": total_n, "lr": float(self.lr_at(mx.array(step)).item())}
        self.history.append(rec)  # before the commit: save() drops a record whose step never committed
        self._update(grads)  # the commit: weights, moments and the step counter change in this one call
        mx.eval(self.model.trainable_parameters(), self.opt.state)
        dt = time.perf_counter() - t0
        rec.update(tokens_per_s=total_n / dt, peak_memory=mx.get_peak_memory())
        if self.banks:  # what the step read from disk (a backward pass brings its experts back in)
            rec["experts_read_gb"] = (self._read_bytes() - read) / 1e9
        return rec

    def _read_bytes(self) -> int:
        """Bytes the offloaded banks have read since loading (0 when the experts are resident)."""
        return offloaded_stats(self.model).bytes if self.banks else 0

    def evaluate(self) -> float:
        total, count = 0.0, 0
        for b in batches(self.valid, self.cfg.batch_size, seed=0, epoch=0, pad_multiple=PAD_MULTIPLE):
            loss, n = loss_fn(self.model, *(mx.array(a) for a in b))
            mx.eval(loss, n)
            total += loss.item() * n.item()
            count += int(n.item())
        return total / max(count, 1)

    # -- checkpoints -------------------------------------------------------------------

    def adapter_config(self) -> dict:
        cfg = asdict(self.cfg)
        cfg["targets"] = list(cfg["targets"])
        return {**cfg, "base": self.base, "steps": self.step}

    def save(self, link: Path) -> None:
        """The checkpoint of the last committed step as one unit: a folder written beside `link`
        under a temporary name, renamed to LINK-NNNNNN, then `link` (a symbolic link) replaced by
        one to it, and the folder it pointed to before removed."""
        step = self.step
        link, name = Path(link), f"{Path(link).name}-{step:06d}"
        folder = link.parent / name
        if link.is_symlink() and os.readlink(link) == name:
            return  # this step is on disk already (a save at the step a resume began from)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=link.parent))
        try:
            save_adapter(tmp, self.model, self.adapter_config())
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.opt.state)))
            history = [r for r in self.history if r["step"] <= step]
            state = {"step": step, "position": step * self.cfg.grad_accum, "history": history}
            (tmp / "state.json").write_text(json.dumps(state))
            if folder.exists():  # a save of this step that a kill cut off before its link moved
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        before = os.readlink(link) if link.is_symlink() else None
        new_link = link.parent / f".{link.name}.link.partial"
        new_link.unlink(missing_ok=True)
        new_link.symlink_to(name)
        if link.is_dir() and not link.is_symlink():  # a checkpoint of an older layout: a plain folder
            before = f".{link.name}.previous"
            os.rename(link, link.parent / before)
        os.replace(new_link, link)
        self.saved_step = step
        for p in link.parent.iterdir():  # what the link pointed to before, and any a kill left unlinked
            if p.name != name and (_CHECKPOINT_RE.fullmatch(p.name) or p.name == before):
                shutil.rmtree(p, ignore_errors=True)

    def resume(self, folder: Path) -> None:
        """Go on from the checkpoint in `folder`: the same model (its weights' sha256), the same
        options (--iters and --epochs may grow: the schedule is then the new length's)."""
        folder = Path(folder)
        state_path, opt_path = folder / "state.json", folder / "optimizer.safetensors"
        if not state_path.is_file():
            raise CheckpointError(f"{folder}: no checkpoint to resume from")
        saved = read_adapter_config(folder)
        mine = self.adapter_config()
        if saved["base"]["fingerprint"] != mine["base"]["fingerprint"]:
            raise CheckpointError(f"{folder}: the checkpoint was trained on another model "
                                  f"({saved['base'].get('model')})")
        if saved["base"].get("weights_sha256") != mine["base"]["weights_sha256"]:
            raise CheckpointError(f"{folder}: the checkpoint was trained on {saved['base'].get('model')}, a model "
                                  "of the same architecture and recipe but other weights")
        for k in ("rank", "alpha", "dropout", "targets", "batch_size", "grad_accum", "lr", "lr_schedule",
                  "warmup", "weight_decay", "seed", "max_seq_len"):
            if saved.get(k, {"lr_schedule": "cosine"}.get(k)) != mine.get(k):  # checkpoints older than the option
                raise CheckpointError(f"{folder}: the checkpoint was made with {k}={saved.get(k)!r}, "
                                      f"not {mine.get(k)!r}; resume with the same options")
        wpath = check_adapter_weights(folder, saved)
        try:
            state = json.loads(state_path.read_text())
            step, history = int(state["step"]), list(state["history"])
            optimizer = mx.load(str(opt_path)) if opt_path.is_file() else None
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, RuntimeError) as e:
            raise CheckpointError(f"{folder}: corrupt checkpoint ({e})") from None
        if optimizer is None:
            raise CheckpointError(f"{opt_path}: missing; the checkpoint cannot be resumed without it")
        mine_opt = dict(tree_flatten(self.opt.state))
        if {k: v.shape for k, v in optimizer.items()} != {k: v.shape for k, v in mine_opt.items()} \
                or int(optimizer["step"].item()) != step or saved.get("steps") != step:
            raise CheckpointError(f"{folder}: its optimizer state, state.json and adapter do not agree "
                                  "(corrupt, or files from different saves)")
        if step > self.total:
            raise CheckpointError(f"{folder}: the checkpoint is at step {step}, past this run's {self.total} "
                                  "steps; give --iters of at least that")
        if (saved.get("iters"), saved.get("epochs")) != (mine["iters"], mine["epochs"]) and step < self.total:
            was = f"{saved['iters']} steps" if saved.get("iters") else f"{saved.get('epochs')} epochs"
            self.log(f"continuing from step {step} to {self.total} with the schedule for {self.total} steps (the "
                     f"checkpoint's run was {was}): not what a {self.total}-step run from scratch gives")
        self.model.load_weights(str(wpath), strict=False)
        set_leaves(self.opt.state, optimizer.items())  # in place: the compiled step holds this very dict
        self.history = history
        self.saved_step = step
        mx.eval(self.model.parameters(), self.opt.state)

    # -- the loop ------------------------------------------------------------------------

    def run(self, progress=None) -> list[dict]:
        """Train to the end (or Ctrl-C); the adapter lands in OUT, checkpoints in OUT/checkpoint."""
        cfg = self.cfg
        ckpt = self.out / CHECKPOINT
        try:
            while self.step < self.total:
                rec = self.train_step()
                step = rec["step"]
                if self.valid and (step == self.total or cfg.val_every and step % cfg.val_every == 0):
                    rec["val_loss"] = self.evaluate()
                if progress:
                    progress(rec, self.total)
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save(ckpt)
        except KeyboardInterrupt:
            self.save(ckpt)
            self.log(f"interrupted at step {self.step}: checkpoint in {ckpt}; --resume goes on from there")
            raise
        except TrainingDiverged as e:
            kept = f"the checkpoint in {ckpt} (step {self.saved_step})" if self.saved_step else "nothing"
            raise TrainingDiverged(f"{e}; no adapter written, {kept} kept") from None
        self.save(ckpt)
        save_adapter(self.out, self.model, self.adapter_config())
        return self.history


def clear_outputs(out: Path) -> None:
    """What an earlier run wrote into OUT (its adapter, log and checkpoints, by their names), removed
    for --force; anything else in OUT stays."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    link = out / CHECKPOINT
    if link.is_symlink():
        link.unlink()
    elif (link / "state.json").is_file():
        shutil.rmtree(link)
    for p in out.iterdir():
        if _CHECKPOINT_RE.fullmatch(p.name) and (p / "state.json").is_file():
            shutil.rmtree(p)


def check_out(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse an --out that would lose or mix work, before any is done: a file, a folder holding
    something (unless --resume or --force), --resume without a checkpoint, a place we cannot write."""
    if resume and force:
        raise OptionError("--resume and --force contradict each other: go on from OUT's checkpoint, or start over")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a folder; --out names the adapter folder to write")
    if (out / MANIFEST).exists():  # even with --force: an adapter never goes into a model folder
        raise OptionError(f"{out}: is a glm-mlx model folder; --out names the adapter folder to write")
    if resume:
        if not (out / CHECKPOINT / "state.json").is_file():
            raise OptionError(f"{out}: no checkpoint to resume from ({out / CHECKPOINT} is missing)")
    elif out.is_dir() and any(out.iterdir()) and not force:
        what = "an adapter" if (out / ADAPTER_CONFIG).exists() or (out / CHECKPOINT).exists() else "files"
        raise OptionError(f"{out}: holds {what} already; --resume goes on from its checkpoint, --force starts "
                          "over (replacing its adapter and checkpoints), or choose another --out")
    parent = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{out}: cannot write there ({parent} is not a writable folder)")


@contextmanager
def progress_printer(trainer: Trainer, every: int, stream):
    """The progress callback for Trainer.run: a rich bar on a terminal; elsewhere (a log file, a
    pipe) one plain line every `every` steps and at the last, flushed as written."""
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=Console(file=stream), transient=False) as bar:
            task = bar.add_task("training", total=trainer.total, completed=trainer.step)
            yield lambda rec, total: bar.update(task, completed=rec["step"], description=describe(rec))
        return

    def show(rec, total):
        if rec["step"] % every == 0 or rec["step"] == total:
            stream.write(f"{describe(rec)} | {rec['step']}/{total}\n")
            stream.flush()

    yield show


def describe(rec: dict) -> str:
    val = f" | val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
    read = f" | experts read {rec['experts_read_gb']:.2f} GB" if "experts_read_gb" in rec else ""
    return (f"step {rec['step']} | loss {rec['loss']:.4f}{val} | lr {rec['lr']:.2e} | "
            f"{rec['tokens_per_s']:.0f} tokens/s | peak {fmt_bytes(rec['peak_memory'])}{read}")

