"""Token generation: one loop for `generate` and `chat`.

`generate_tokens` is a generator in mlx-lm's style: the next step is queued
with `mx.async_eval` before the current token is handed to the host, so the
device never waits for Python between tokens. Stop conditions are one set:
the config's eos ids plus the template's role tokens that end a turn.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from .model import Model, validate_tokens
from .tokenizer import StreamDecoder, Tokenizer

# GLM ends an assistant turn by emitting the next role token.
TURN_END_TOKENS = ("<|user|>", "<|observation|>", "<|endoftext|>")
PREFILL_CHUNK = 2048  # as mlx-lm; prefill dequantizes each projection's experts once per chunk


def stop_ids(model: Model, tokenizer: Tokenizer) -> set[int]:
    ids = set(model.args.eos_token_id)
    ids.update(i for t in TURN_END_TOKENS if (i := tokenizer.token_id(t)) is not None)
    return ids


def make_sampler(temp: float = 0.0, top_p: float = 1.0):
    """logits [B, V] -> token ids [B]; greedy at temp 0, nucleus sampling below top_p 1."""

    def sample(logits: mx.array) -> mx.array:
        if temp <= 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits.astype(mx.float32) / temp
        if top_p < 1.0:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
            probs = mx.softmax(sorted_lp, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always)
            keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
            sorted_lp = mx.where(keep, sorted_lp, -mx.inf)
            choice = mx.random.categorical(sorted_lp, axis=-1)
            return mx.take_along_axis(order, choice[..., None], axis=-1)[..., 0]
        return mx.random.categorical(logprobs, axis=-1)

    return sample


def prefill(model: Model, tokens: mx.array, cache, chunk: int = PREFILL_CHUNK) -> mx.array:
    """Run checked prompt tokens [1, T] through the model in chunks, a layer at a time
    (what one layer's prefill makes, such as its experts dequantized whole, is freed
    before the next layer's is); the logits of the last position only."""
    for start in range(0, tokens.shape[1], chunk):
        h = model.model(tokens[:, start : start + chunk], cache, eval_layers=True)
    return model.logits(h[:, -1:, :])[:, -1, :]


def generate_tokens(model: Model, prompt: list[int], cache=None, *, temp: float = 0.0,
                    top_p: float = 1.0, max_tokens: int = 256) -> Iterator[int]:
    """Yield up to max_tokens sampled token ids after the prompt (the cache is extended in place)."""
    cache = model.make_cache() if cache is None else cache
    sample = make_sampler(temp, top_p)
    tokens = validate_tokens([prompt], model.args.vocab_size)
    y = sample(prefill(model, tokens, cache))
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            nxt = sample(model(y[:, None], cache, checked=True)[:, -1, :])
            mx.async_eval(nxt)
        yield y.item()
        if n + 1 < max_tokens:
            y = nxt


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated: int = 0
    gen_seconds: float = 0.0
    finish: str = "length"
    tokens: list[int] = field(default_factory=list)  # generated ids, a stop token included

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prompt_seconds, 1e-9)

    @property
    def gen_tps(self) -> float:
        # the first token comes out of prefill; rate the ones decoded after it
        return max(self.generated - 1, 0) / max(self.gen_seconds, 1e-9)

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
                f"generation: {self.generated} tokens, {self.gen_tps:.1f} tokens/s | "
                f"peak memory: {fmt_bytes(mx.get_peak_memory())} (MLX), {fmt_bytes(peak_rss_bytes())} (process)")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def stream(model: Model, tokenizer: Tokenizer, prompt: list[int], cache=None, *, temp: float = 0.0,
           top_p: float = 1.0, max_tokens: int = 256, stats: Stats | None = None) -> Iterator[str]:
    """Text pieces of the reply as they are decoded; stops at a turn-ending token
    (not in the text). `stats`, if given, is filled in as it goes: its `tokens`
    are every token generated, the stop token included (the cache holds it)."""
    stats = stats if stats is not None else Stats()
    stops = stop_ids(model, tokenizer)
    decoder = StreamDecoder(tokenizer)
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    for tok in generate_tokens(model, prompt, cache, temp=temp, top_p=top_p, max_tokens=max_tokens):
        now = time.perf_counter()
        if stats.generated == 0:
            stats.prompt_seconds, t0 = now - t0, now
        stats.generated += 1
        stats.gen_seconds = now - t0
        stats.tokens.append(tok)
        if tok in stops:
            stats.finish = "stop"
            break
        if piece := decoder.add(tok):
            yield piece
