"""The quantized KV cache: its attention against mx.fast's, decoding against
prefill, trimming, its logits against the float cache's, and chat reuse."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_chat import Script, reply_tokens
from test_convert import cli, one_line_error

import glm_mlx
from glm_mlx.cache import KVCache, QuantizedKVCache, attend, make_caches
from glm_mlx.chat import ChatSession


@pytest.fixture(scope="module")
def tiny(converted):
    return glm_mlx.load(converted("air-tiny", "none"), dtype="float32")


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def mean_kl(ref, got) -> float:
    """Mean KL(ref || got) in nats of the next-token distributions."""
    lr, lg = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
              for x in (np.asarray(ref, np.float64), np.asarray(got, np.float64)))
    return float((np.exp(lr) * (lr - lg)).sum(-1).mean())


def tokens(vocab: int, T: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=T).tolist()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])  # GQA 2:1, 3:1, and none
@pytest.mark.parametrize("T", [1, 5])
def test_quantized_attention_is_sdpa_over_the_dequantized_cache(bits, heads, T):
    Hq, Hkv = heads
    D, before = 64, 9  # the chunk attends to 9 cached positions and, causally, to itself
    r = np.random.default_rng(T * 10 + Hq)
    q, k, v = (mx.array(r.standard_normal((1, h, n, D)).astype(np.float32))
               for h, n in ((Hq, T), (Hkv, before + T), (Hkv, before + T)))
    cache = QuantizedKVCache(bits, 64)
    cache.update_and_fetch(k[:, :, :before], v[:, :, :before])
    qk, qv = cache.update_and_fetch(k[:, :, before:], v[:, :, before:])
    assert cache.offset == before + T and qk[0].dtype == mx.uint32
    ours = attend(q, qk, qv, cache, D**-0.5, causal=T > 1)
    dk, dv = (mx.dequantize(*x, group_size=64, bits=bits) for x in (qk, qv))
    ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=D**-0.5, mask="causal" if T > 1 else None)
    assert ours.shape == (1, Hq, T, D)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-5, rtol=1e-5)
    # and the dequantized keys are the inputs to within the quantization's step
    assert rel_err(dk, k) < (0.01 if bits == 8 else 0.15)


def test_quantized_cache_bytes_are_the_formula():
    """Per token and layer: keys and values, each D * bits / 8 packed bytes plus a
    scale and a bias per group in the compute dtype (bf16: 2 bytes each)."""
    H, D, n = 8, 128, 256
    x = mx.zeros((1, H, n, D), mx.bfloat16)
    for bits, cache in ((16, KVCache()), (8, QuantizedKVCache(8, 64)), (4, QuantizedKVCache(4, 64))):
        mx.eval(cache.update_and_fetch(x, x))
        per_group = 0 if bits == 16 else 2 * 2 / 64
        assert cache.nbytes == 2 * H * n * D * (bits / 8 + per_group)


@pytest.mark.parametrize("bits", [8, 4])
def test_decoding_token_by_token_equals_prefill(tiny, bits):
    model, _ = tiny
    toks = tokens(model.args.vocab_size, 20, seed=1)
    whole = np.array(model([toks], model.make_cache(bits)))
    cache = model.make_cache(bits)
    for c in cache:
        c.step = 4  # grow many times on the way
    steps = [np.array(model([toks[:7]], cache))]
    steps += [np.array(model([toks[t : t + 1]], cache)) for t in range(7, 20)]
    assert cache[0].offset == 20 and cache[0].keys[0].shape[2] == 20
    inc = np.concatenate(steps, axis=1)
    assert rel_err(inc, whole) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_trim_then_append_is_as_if_never_appended(tiny, bits):
    model, _ = tiny
    toks = tokens(model.args.vocab_size, 16, seed=2)
    junk = tokens(model.args.vocab_size, 7, seed=3)
    clean = model.make_cache(bits)
    model([toks[:10]], clean)
    want = np.array(model([toks[10:]], clean))
    cache = model.make_cache(bits)
    for c in cache:
        c.step = 8  # the junk makes it grow; the trim must not keep any of it
    model([toks[:10]], cache)
    model([junk], cache)
    for c in cache:
        c.trim(len(junk))
    got = np.array(model([toks[10:]], cache))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_quantized_cache_logits_are_close_to_the_float_caches(tiny):
    """Prefill 16 tokens, decode 32 one at a time; each step's logits against the
    float cache's. Measured on air-tiny (head_dim 32, so groups of 32): 8-bit
    rel. error 2.8e-3 and mean KL 2.6e-5 nats; 4-bit 4.8e-2 and 1.1e-2."""
    model, _ = tiny
    toks = tokens(model.args.vocab_size, 48, seed=4)

    def decode(cache):
        model([toks[:16]], cache)
        return np.concatenate([np.array(model([[t]], cache))[0] for t in toks[16:]])

    ref = decode(model.make_cache())
    got = {bits: decode(model.make_cache(bits)) for bits in (8, 4)}
    err = {bits: (rel_err(g, ref), mean_kl(ref, g)) for bits, g in got.items()}
    assert err[8][0] < 1e-2 and err[8][1] < 1e-4, err
    assert err[4][0] < 0.2 and err[4][1] < 5e-2, err
    assert err[8][0] < err[4][0] / 5, err  # 8-bit is the near-lossless one
    assert (got[8].argmax(-1) == ref.argmax(-1)).all()


def test_chat_reuses_a_quantized_cache(tiny, monkeypatch):
    """Two turns on an 8-bit cache: the second prefills only its new tokens, and its
    first logits are those of a fresh 8-bit prefill of the whole prompt."""
    model, tok = tiny
    script = Script().install(monkeypatch)
    s = ChatSession(model, tok, system="Be brief.", think=False, temp=0.0, kv_bits=8)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in s.cache)
    s.add_user("Hello!")
    first = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\nHi, how can I help?", "<|user|>"))
    list(s.stream_reply())
    s.add_user("Tell me about MoE.")
    second = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\nExperts.", "<|user|>"))
    n_logits = len(script.logits)
    list(s.stream_reply())
    already = len(first) + len(reply_tokens(tok, "\nHi, how can I help?", "<|user|>"))
    assert s.last.prompt_tokens == len(second) - already
    fresh = np.array(model([second], model.make_cache(8)))[0, -1]
    np.testing.assert_allclose(script.logits[n_logits][0], fresh, rtol=1e-4, atol=1e-4)


def test_make_cache_choices(tiny):
    model, _ = tiny
    assert all(type(c) is KVCache for c in model.make_cache())
    caches = model.make_cache(4)
    assert len(caches) == model.args.num_hidden_layers
    assert {(c.bits, c.group_size) for c in caches} == {(4, 32)}  # air-tiny's head_dim is 32
    assert {c.group_size for c in make_caches(2, 128, 8)} == {64}
    with pytest.raises(ValueError, match="8 or 4, not 3"):
        model.make_cache(3)
    with pytest.raises(ValueError, match="head_dim a multiple of 32; this model's is 16"):
        make_caches(2, 16, 8)


def test_kv_bits_option(converted):
    folder = converted("air-tiny", "mixed")
    one_line_error(cli("generate", "--model", folder, "--token-ids", "5,6", "--kv-bits", "6"),
                   "--kv-bits must be 8 or 4, not 6")
    one_line_error(cli("chat", "--model", folder, "--kv-bits", "2"), "--kv-bits must be 8 or 4, not 2")
    p = cli("generate", "--model", folder, "--token-ids", "5,6,7", "-n", "4", "--temp", "0", "--kv-bits", "4",
            check_ok=True)
    assert "tokens/s" in p.stderr.strip().splitlines()[-1]


def test_a_launchs_writes_are_waited_for_before_the_caches_own_ops_read_the_buffers():
    """A launch that writes k and v into the buffers itself (kernels.qkv_decode_cached) is not an op MLX
    orders the buffers' later readers after: the cache hands the next launch its output (last_write), and
    evaluates it before growing the buffers or slice-updating a prompt into them (settle)."""
    cache, shape = KVCache(), (1, 2, 1, 4)
    assert np.array_equal(np.asarray(cache.last_write(shape, mx.float32)), np.zeros(shape))  # none yet: a stand-in
    keys, values = cache.room(shape, mx.float32)
    written = mx.ones(shape) * 2  # a launch's output, not yet computed
    cache.advance(keys, values, 1, written)
    assert cache.last_write(shape, mx.float32) is written
    cache.update_and_fetch(mx.ones(shape), mx.ones(shape))  # a prompt's slice update: the launch first
    assert cache.written is None and np.asarray(written).sum() == 16
    cache.advance(cache.keys, cache.values, 0, mx.ones(shape) * 3)
    cache.offset = cache.keys.shape[2]  # full: the next room grows the buffers
    cache.room(shape, mx.float32)
    assert cache.written is None and cache.keys.shape[2] == 2 * KVCache.step
