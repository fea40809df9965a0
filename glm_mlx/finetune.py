"""LoRA / QLoRA training on the shared model core.

The training step is one function over explicit state (model, optimizer,
random state), compiled; gradient accumulation sums micro-batch gradients
before one update. The position in the data is (epoch, batch), the order
of an epoch a function of (seed, epoch), and dropout's randomness is seeded
per step, so a run stopped at step k and resumed computes exactly the
losses the uninterrupted run computes.

Checkpoints (every --save-every steps, on Ctrl-C, at the end) go to
OUT/checkpoint: the adapter, the optimizer state, and where the data stood.
"""

from __future__ import annotations

import json
import math
import os
import time
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
from .lora import DEFAULT_TARGETS, apply_lora, base_info, save_adapter
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
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    grad_checkpoint: bool = False
    max_seq_len: int = 2048
    val_every: int = 0
    save_every: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)  # what the caller wants recorded (data paths, base folder)


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


def activation_bytes(a: ModelArgs, tokens: int, float_bytes: int, checkpointed: bool) -> float:
    """Checkpointed, each layer keeps its input and one layer's internals live at a
    time, forward and backward (x2): norms, q/k/v/o, the attention scores (the
    backward of MLX's fused attention materialises them: 3 x heads x T^2), and the
    MoE's gathered rows (k x (2 hidden + 3 expert widths)) and shared expert."""
    d, m, k = a.hidden_size, a.moe_intermediate_size, a.num_experts_per_tok
    attn = 2 * a.num_attention_heads * a.head_dim + 2 * a.num_key_value_heads * a.head_dim
    per_token = 4 * d + attn + k * (2 * d + 3 * m) + 3 * m * a.n_shared_experts + a.n_routed_experts * 2
    inner = 2 * (tokens * float_bytes * per_token + 3 * a.num_attention_heads * tokens * tokens * float_bytes)
    kept = tokens * d * float_bytes * a.num_hidden_layers if checkpointed else 0
    return kept + inner * (1 if checkpointed else a.num_hidden_layers) + tokens * a.vocab_size * 4 * 3


def training_reserve(a: ModelArgs, tokens: int, float_bytes: int, targets, rank: int) -> int:
    """Bytes a QLoRA step needs beside the weights (LoRA factors, their gradients and AdamW's two
    moments at 16 bytes a parameter, activations checkpointed): what `--expert-memory auto` leaves
    free when it sizes the experts' bank for training (scripts/finetune_memory.py checks it)."""
    return int(16 * lora_params(a, set(targets), rank) + activation_bytes(a, tokens, float_bytes, True))


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
    decay = optim.cosine_decay(cfg.lr, max(total - cfg.warmup, 1))
    if cfg.warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(cfg.lr / cfg.warmup, cfg.lr, cfg.warmup), decay],
                                [cfg.warmup])


class Trainer:
    def __init__(self, model: Model, train: Dataset, cfg: TrainConfig, out: str | Path, *,
                 valid: Dataset | None = None, base_manifest: dict | None = None, base_dir: str | Path = "",
                 log=print):
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
        self.opt = optim.AdamW(learning_rate=schedule(cfg, self.total), weight_decay=cfg.weight_decay)
        self.step = 0
        self.position = 0  # micro-batches consumed since the start
        self._epoch = None  # (epoch, next batch index, its generator)
        self.history: list[dict] = []

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

        self._micro, self._update = micro, update

    # -- data position ---------------------------------------------------------

    def _batch(self, position: int):
        """The batch at a position: the epoch's batches are drawn in order, and
        only a jump (a resume) starts an epoch over and skips ahead."""
        epoch, index = divmod(position, self.batches_per_epoch)
        if self._epoch is None or self._epoch[:2] != (epoch, index):
            it = batches(self.train, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch, pad_multiple=PAD_MULTIPLE)
            for _ in range(index):
                next(it)
            self._epoch = (epoch, index, it)
        b = next(self._epoch[2])
        self._epoch = (epoch, index + 1, self._epoch[2])
        return b

    # -- one optimizer step ---------------------------------------------------------

    def train_step(self) -> dict:
        cfg = self.cfg
        mx.random.seed(cfg.seed * 1_000_003 + self.step)  # dropout's randomness: a function of the step
        total_loss, total_n, acc = 0.0, 0, None
        t0, read = time.perf_counter(), self._read_bytes()
        for _ in range(cfg.grad_accum):
            inputs, targets, mask = (mx.array(a) for a in self._batch(self.position))
            self.position += 1
            loss, n, g = self._micro(inputs, targets, mask)
            # sum of per-token losses, so micro-batches weigh by their target tokens
            g = tree_map(lambda x: x * n, g)
            acc = g if acc is None else tree_map(mx.add, acc, g)
            mx.eval(loss, n, acc)
            total_loss += loss.item() * n.item()
            total_n += int(n.item())
        grads = tree_map(lambda x: x / max(total_n, 1), acc)
        self._update(grads)
        mx.eval(self.model.trainable_parameters(), self.opt.state)
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": total_loss / max(total_n, 1), "tokens": total_n,
               "lr": float(self.opt.learning_rate.item()), "tokens_per_s": total_n / dt,
               "peak_memory": mx.get_peak_memory()}
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

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(folder, self.model, self.adapter_config())
        opt = dict(tree_flatten(self.opt.state))
        tmp = folder / "optimizer.partial.safetensors"
        mx.save_safetensors(str(tmp), opt)
        os.replace(tmp, folder / "optimizer.safetensors")
        state = {"step": self.step, "position": self.position, "history": self.history}
        (folder / "state.partial.json").write_text(json.dumps(state))
        os.replace(folder / "state.partial.json", folder / "state.json")

    def resume(self, folder: Path) -> None:
        state_path = folder / "state.json"
        if not state_path.is_file():
            raise ValueError(f"{folder}: no checkpoint to resume from")
        saved = json.loads((folder / "adapter_config.json").read_text())
        mine = self.adapter_config()
        if saved["base"]["fingerprint"] != mine["base"]["fingerprint"]:
            raise ValueError(f"{folder}: the checkpoint was trained on another model ({saved['base'].get('model')})")
        for k in ("rank", "alpha", "dropout", "targets", "iters", "epochs", "batch_size", "grad_accum", "lr",
                  "warmup", "weight_decay", "seed", "max_seq_len"):
            if saved.get(k) != mine.get(k):
                raise ValueError(f"{folder}: the checkpoint was made with {k}={saved.get(k)!r}, "
                                 f"not {mine.get(k)!r}; resume with the same options")
        self.model.load_weights(str(folder / "adapters.safetensors"), strict=False)
        # In place, leaf by leaf: the compiled step holds this very dict as its state.
        self.opt.init(self.model.trainable_parameters())
        for path, value in mx.load(str(folder / "optimizer.safetensors")).items():
            node, *keys, last = [self.opt.state, *path.split(".")]
            for k in keys:
                node = node[int(k)] if isinstance(node, list) else node[k]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        state = json.loads(state_path.read_text())
        self.step, self.position, self.history = state["step"], state["position"], state["history"]
        mx.eval(self.model.parameters(), self.opt.state)

    # -- the loop ------------------------------------------------------------------------

    def run(self, progress=None) -> list[dict]:
        """Train to the end (or Ctrl-C); the adapter lands in OUT, checkpoints in OUT/checkpoint."""
        cfg = self.cfg
        ckpt = self.out / "checkpoint"
        try:
            while self.step < self.total:
                rec = self.train_step()
                if self.valid and cfg.val_every and (self.step % cfg.val_every == 0 or self.step == self.total):
                    rec["val_loss"] = self.evaluate()
                self.history.append(rec)
                if progress:
                    progress(rec, self.total)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save(ckpt)
        except KeyboardInterrupt:
            self.save(ckpt)
            self.log(f"interrupted at step {self.step}: checkpoint in {ckpt}; --resume goes on from there")
            raise
        self.save(ckpt)
        save_adapter(self.out, self.model, self.adapter_config())
        return self.history


def describe(rec: dict) -> str:
    val = f" | val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
    read = f" | experts read {rec['experts_read_gb']:.2f} GB" if "experts_read_gb" in rec else ""
    return (f"step {rec['step']} | loss {rec['loss']:.4f}{val} | lr {rec['lr']:.2e} | "
            f"{rec['tokens_per_s']:.0f} tokens/s | peak {fmt_bytes(rec['peak_memory'])}{read}")

