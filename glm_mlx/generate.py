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
            order, sorted_lp = _nucleus(logprobs, top_p)
            choice = mx.random.categorical(sorted_lp, axis=-1)
            return mx.take_along_axis(order, choice[..., None], axis=-1)[..., 0]
        return mx.random.categorical(logprobs, axis=-1)

    return sample


def _nucleus(logprobs: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """(order, sorted): the vocabulary by falling logprob, and the logprobs in that order with all but the
    smallest prefix whose mass reaches top_p (the first token always) set to -inf."""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.softmax(sorted_lp, axis=-1)
    keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
    return order, mx.where(keep, sorted_lp, -mx.inf)


def make_dist(temp: float, top_p: float = 1.0):
    """logits [B, V] -> the probabilities [B, V] (float32) make_sampler(temp, top_p) draws from (temp > 0)."""

    def dist(logits: mx.array) -> mx.array:
        lp = logits.astype(mx.float32) / temp
        if top_p >= 1.0:
            return mx.softmax(lp, axis=-1)
        order, sorted_lp = _nucleus(lp, top_p)
        return mx.put_along_axis(mx.zeros_like(lp), order, mx.softmax(sorted_lp, axis=-1), axis=-1)

    return dist


def accept_draft(p: mx.array, q: mx.array, d: mx.array, u: mx.array) -> tuple[mx.array, mx.array]:
    """Speculative sampling's test of a drafted token: p, q [B, V] the target's and the draft's
    probabilities, d [B] drawn from q, u [B] uniform in [0, 1). d is accepted when u < p[d] / q[d];
    otherwise the token is drawn from max(p - q, 0), normalised. Either way it is distributed as p.
    Returns (accepted [B], token [B])."""
    pd = mx.take_along_axis(p, d[:, None], axis=-1)[:, 0]
    qd = mx.take_along_axis(q, d[:, None], axis=-1)[:, 0]
    ok = u * qd < pd
    rest = mx.maximum(p - q, 0.0)
    total = rest.sum(axis=-1, keepdims=True)
    rest = mx.where(total > 0, rest / mx.maximum(total, 1e-30), p)  # p == q: never rejected
    return ok, mx.where(ok, d, mx.random.categorical(mx.log(rest), axis=-1).astype(d.dtype))


def prefill_chunks(model: Model, tokens: mx.array, cache, chunk: int = PREFILL_CHUNK) -> Iterator[tuple]:
    """Run checked prompt tokens [1, T] through the model in chunks, a layer at a time (what one
    layer's prefill makes, such as its experts dequantized whole, is freed before the next layer's
    is): (start, end, the chunk's final hidden states) for each chunk."""
    for start in range(0, tokens.shape[1], chunk):
        end = min(tokens.shape[1], start + chunk)
        yield start, end, model.model(tokens[:, start:end], cache, eval_layers=True)


def prefill(model: Model, tokens: mx.array, cache, chunk: int = PREFILL_CHUNK) -> mx.array:
    """prefill_chunks over the prompt: the logits of the last position only."""
    for _, _, h in prefill_chunks(model, tokens, cache, chunk):
        pass
    return model.logits(h[:, -1:, :])[:, -1, :]


def generate_tokens(model: Model, prompt: list[int], cache=None, *, temp: float = 0.0,
                    top_p: float = 1.0, max_tokens: int = 256, mtp: bool = False,
                    tally: list[int] | None = None) -> Iterator[int]:
    """Yield up to max_tokens sampled token ids after the prompt (the cache is extended in place).
    `mtp`, or a cache with one more entry than the trunk has layers (model.make_cache(mtp=True)):
    speculative decoding with the MTP layer as the draft (see speculative_tokens; `tally` counts)."""
    layers = len(model.model.layers)
    cache = model.make_cache(mtp=mtp) if cache is None else cache
    if mtp and len(cache) != layers + 1:
        raise ValueError("speculative decoding needs the MTP layer's cache: model.make_cache(mtp=True)")
    if len(cache) == layers + 1:
        yield from speculative_tokens(model, prompt, cache, temp=temp, top_p=top_p, max_tokens=max_tokens,
                                      tally=tally)
        return
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


def speculative_tokens(model: Model, prompt: list[int], cache: list, *, temp: float = 0.0, top_p: float = 1.0,
                       max_tokens: int = 256, tally: list[int] | None = None) -> Iterator[int]:
    """generate_tokens's tokens, drafted by GLM's MTP layer a token ahead and checked by the trunk.

    The MTP layer predicts token t+2 from the trunk's hidden state at t and token t+1. Each pass
    runs the trunk on [y, d] (y: the last token, d: its draft) and keeps d only if the trunk agrees:
    greedy, if d is the trunk's argmax; sampling, by speculative sampling's test (accept_draft), so
    every token is distributed as the trunk alone would draw it. A kept draft gives two tokens for
    one pass of the trunk; a rejected one gives one, and its position is trimmed from the cache.
    Once a pass is decided, the next draft and the next pass are queued before its tokens are handed
    on: one synchronisation a pass. cache: the trunk's caches, then the MTP layer's
    (model.make_cache(mtp=True)), the same length whenever the tokens run out. tally, if given,
    counts [drafted, accepted]."""
    trunk, mcache, head = cache[:-1], cache[-1], model.mtp[0]
    embed = model.model.embed_tokens
    greedy = temp <= 0
    pick = make_sampler(temp, top_p)
    dist = None if greedy else make_dist(temp, top_p)
    tally = tally if tally is not None else [0, 0]

    def draft(h: mx.array, nxt: mx.array) -> tuple[mx.array, mx.array | None]:
        """The MTP layer fed the trunk's hidden states h with the tokens after them: the draft (and its
        distribution when sampling) for the token after the last of them."""
        logits = head.logits(head.hidden(h, nxt.astype(mx.int32), embed, mcache)[:, -1:, :])[:, -1, :]
        if greedy:
            return mx.argmax(logits, axis=-1), None
        q = dist(logits)
        return mx.random.categorical(mx.log(q), axis=-1), q

    def verify(last: mx.array, d: mx.array, q: mx.array | None) -> tuple:
        """The trunk's pass over [last, d]: (h, kept, the token in d's place, the token after d)."""
        h = model.model(mx.concatenate([last, d[:, None]], axis=1).astype(mx.int32), trunk)
        logits = model.logits(h)[0]  # [2, V]
        if greedy:
            t1 = mx.argmax(logits[0:1], axis=-1)
            ok = t1 == d
        else:
            ok, t1 = accept_draft(dist(logits[0:1]), q, d, mx.random.uniform(shape=d.shape))
        return h, ok, t1, pick(logits[1:2])

    tokens = validate_tokens([prompt], model.args.vocab_size)
    for start, end, h in prefill_chunks(model, tokens, trunk):  # the MTP layer fed each chunk's pairs
        if end < tokens.shape[1]:
            mx.eval(head.hidden(h, tokens[:, start + 1 : end + 1], embed, mcache))
    y = pick(model.logits(h[:, -1:, :])[:, -1, :])[:, None]
    d, q = draft(h, mx.concatenate([tokens[:, start + 1 : end], y.astype(tokens.dtype)], axis=1))
    out, queued = y, None
    if max_tokens > 1:
        queued = verify(y, d, q)
        mx.async_eval(y, d, *queued[1:])
    try:
        while True:
            for t in out[0].tolist():
                if max_tokens <= 0:
                    return
                max_tokens -= 1
                yield t
            if queued is None:
                return
            h, ok, t1, t2 = queued
            queued = None
            tally[0] += 1
            if ok.item():  # the one wait of a pass
                tally[1] += 1
                out = mx.stack([d, t2], axis=1)
            else:
                for c in trunk:
                    c.trim(1)  # the draft's position
                h, out = h[:, :1], t1[:, None]
            d, q = draft(h, out)
            if max_tokens > out.shape[1]:  # tokens are wanted past these: the next pass, queued now
                queued = verify(out[:, -1:], d, q)
                mx.async_eval(out, d, *queued[1:])
    finally:
        if queued is not None:  # handed on no further: forget the queued pass's draft position
            for c in trunk:
                c.trim(1)


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
    tally: list[int] = field(default_factory=lambda: [0, 0])  # MTP drafts: [checked, accepted]

    @property
    def prompt_tps(self) -> float | None:
        """Prompt tokens a second; None when no prompt was timed (`-n 0`, or interrupted in prefill)."""
        return rate(self.prompt_tokens, self.prompt_seconds)

    @property
    def gen_tps(self) -> float | None:
        """Decoded tokens a second; None when fewer than two tokens came. The first token comes out of
        prefill: the ones decoded after it are rated."""
        return rate(self.generated - 1, self.gen_seconds)

    @property
    def drafts(self) -> str:
        """' (MTP drafts: a of n accepted)' when speculative decoding ran, else ''."""
        n, a = self.tally
        return f" (MTP drafts: {a} of {n} accepted)" if n else ""

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {fmt_rate(self.prompt_tps)} tokens/s | "
                f"generation: {self.generated} tokens, {fmt_rate(self.gen_tps)} tokens/s{self.drafts} | "
                f"peak memory: {fmt_bytes(mx.get_peak_memory())} (MLX), {fmt_bytes(peak_rss_bytes())} (process)")


def rate(n: float, seconds: float) -> float | None:
    """n a second; None over no work or no measured time (a rate there would be noise or infinite)."""
    return n / seconds if n > 0 and seconds > 0 else None


def fmt_rate(r: float | None) -> str:
    """A rate as printed: one decimal, or `-` where there is none."""
    return "-" if r is None else f"{r:.1f}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def stream(model: Model, tokenizer: Tokenizer, prompt: list[int], cache=None, *, temp: float = 0.0,
           top_p: float = 1.0, max_tokens: int = 256, stats: Stats | None = None) -> Iterator[str]:
    """Text pieces of the reply as they are decoded; stops at a turn-ending token
    (not in the text). `stats`, if given, is filled in as it goes: its `tokens`
    are every token generated, the stop token included (the cache holds it). A cache made with
    model.make_cache(mtp=True) decodes speculatively (generate_tokens)."""
    stats = stats if stats is not None else Stats()
    stops = stop_ids(model, tokenizer)
    decoder = StreamDecoder(tokenizer)
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    for tok in generate_tokens(model, prompt, cache, temp=temp, top_p=top_p, max_tokens=max_tokens,
                               tally=stats.tally):
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
