"""Generation: sampling, stop conditions, and the generate command."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import glm_mlx
from glm_mlx.generate import accept_draft, generate_tokens, make_sampler, stop_ids, stream
from test_convert import cli


def test_greedy_generation_follows_the_full_forward_argmax(converted):
    model, _ = glm_mlx.load(converted("air-tiny", "mixed"), dtype="float32")
    prompt = [5, 17, 200, 33]
    out = list(generate_tokens(model, prompt, max_tokens=8))
    seq = list(prompt)
    for tok in out:  # each token is the argmax of a fresh full forward over everything before it
        assert tok == int(np.array(model([seq]))[0, -1].argmax())
        seq.append(tok)


def test_top_p_keeps_only_the_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    sample = make_sampler(temp=1.0, top_p=0.7)
    mx.random.seed(0)
    seen = {int(sample(logits).item()) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    assert {int(make_sampler(1.0, 0.4)(logits).item()) for _ in range(50)} == {0}


def test_stops_at_the_turn_ending_tokens(converted):
    model, tok = glm_mlx.load(converted("air-tiny", "none"))
    stops = stop_ids(model, tok)
    for t in ("<|user|>", "<|observation|>", "<|endoftext|>"):
        assert tok.token_id(t) in stops
    assert set(model.args.eos_token_id) <= stops


def test_stream_stops_on_a_stop_token_and_excludes_it(converted, monkeypatch):
    import glm_mlx.generate as g

    model, tok = glm_mlx.load(converted("air-tiny", "none"))
    user = tok.token_id("<|user|>")
    hello = tok.encode("Hello")
    monkeypatch.setattr(g, "generate_tokens", lambda *a, **k: iter(hello + [user] + hello))
    stats = g.Stats()
    assert "".join(stream(model, tok, [1, 2], stats=stats)) == "Hello"
    assert stats.finish == "stop" and stats.tokens == hello + [user]


def test_generate_command_streams_and_reports(converted):
    folder = converted("air-tiny", "mixed")
    p = cli("generate", "--model", folder, "--prompt", "Hi there", "-n", "12", "--temp", "0", check_ok=True)
    assert p.stdout.strip()
    last = p.stderr.strip().splitlines()[-1]
    assert "tokens/s" in last and "peak memory" in last and "prompt:" in last
    a = cli("generate", "--model", folder, "--prompt", "Hi", "-n", "12", "--temp", "1.0", "--seed", "7",
            check_ok=True).stdout
    b = cli("generate", "--model", folder, "--prompt", "Hi", "-n", "12", "--temp", "1.0", "--seed", "7",
            check_ok=True).stdout
    assert a == b


def test_prompt_is_the_templates_own_rendering(converted):
    _, tok = glm_mlx.load(converted("air-tiny", "none"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? ünïcode <ok>"}]
    for think in (True, False):
        ours = tok.apply_chat_template(msgs, enable_thinking=think)
        theirs = tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=think)
        assert ours == theirs
    assert tok.apply_chat_template(msgs, enable_thinking=False).endswith("<|assistant|>\n<think></think>")


# --- speculative decoding with the MTP layer --------------------------------------


def _trunk_state(cache, n: int) -> list[np.ndarray]:
    """The first n positions of every trunk layer's keys and values."""
    return [np.array(a[..., :n, :]) for c in cache for a in (c.keys, c.values)]


@pytest.mark.parametrize("preset", ["air-tiny", "glm45-tiny"])
@pytest.mark.parametrize("drafts", ["mtp", "right", "wrong"])
def test_greedy_speculative_decoding_gives_the_models_own_tokens(converted, monkeypatch, preset, drafts):
    """Greedy, with the MTP layer drafting (random here: mostly rejected), with drafts always right
    (every one accepted: two tokens a pass) and always wrong (none): the tokens are plain greedy
    decoding's, and the trunk's cache holds the same keys and values, the MTP layer's as many."""
    model, _ = glm_mlx.load(converted(preset, "mixed"), dtype="float32")
    rng = np.random.default_rng(0)
    for prompt in ([5, 17, 200, 33], rng.integers(0, model.args.vocab_size, 19).tolist(), [7]):
        plain_cache = model.make_cache()
        plain = list(generate_tokens(model, prompt, plain_cache, max_tokens=17))
        seq = prompt + plain
        cache = model.make_cache(mtp=True)
        head, V = model.mtp[0], model.args.vocab_size
        if drafts != "mtp":  # the draft for position p + 1, once the MTP cache holds p pairs
            shift = 0 if drafts == "right" else 1

            def oracle(h, cache=cache, seq=seq + [0, 0], shift=shift):
                return mx.eye(V)[None, (seq[cache[-1].offset + 1] + shift) % V][None]

            monkeypatch.setattr(head, "logits", oracle)
        tally = [0, 0]
        assert list(generate_tokens(model, prompt, cache, max_tokens=17, tally=tally)) == plain
        n = plain_cache[0].offset
        assert [c.offset for c in cache] == [n] * len(cache)
        for a, b in zip(_trunk_state(cache[:-1], n), _trunk_state(plain_cache, n)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        if drafts == "right":
            assert tally[0] == tally[1] == 8  # 16 tokens after the first, two a pass
        elif drafts == "wrong":
            assert tally == [16, 0]
        monkeypatch.undo()


def test_a_sampled_token_after_a_draft_is_distributed_as_the_target():
    """accept_draft: a token drawn from the draft q, kept when u < p / q, else drawn from the rest:
    distributed as p (200000 draws, within 0.005); a draft distributed as p is always kept."""
    mx.random.seed(0)
    p = mx.array([[0.4, 0.25, 0.2, 0.1, 0.05, 0.0]])
    q = mx.array([[0.1, 0.1, 0.3, 0.3, 0.1, 0.1]])
    B = 200_000
    P, Q = mx.broadcast_to(p, (B, 6)), mx.broadcast_to(q, (B, 6))
    d = mx.random.categorical(mx.log(Q), axis=-1)
    ok, tok = accept_draft(P, Q, d, mx.random.uniform(shape=(B,)))
    freq = np.bincount(np.array(tok), minlength=6) / B
    assert np.abs(freq - np.array(p)[0]).max() < 0.005
    assert 0.3 < float(np.array(ok).mean()) < 0.9  # both branches taken
    ok, tok = accept_draft(P, P, mx.random.categorical(mx.log(P), axis=-1), mx.random.uniform(shape=(B,)))
    assert bool(np.array(ok).all())


def test_sampled_speculative_decoding_runs_and_keeps_the_caches_in_step(converted):
    model, _ = glm_mlx.load(converted("air-tiny", "mixed"), dtype="float32")
    mx.random.seed(3)
    cache = model.make_cache(mtp=True)
    tally = [0, 0]
    out = list(generate_tokens(model, [5, 17, 200, 33], cache, temp=0.8, top_p=0.9, max_tokens=20, tally=tally))
    assert len(out) == 20 and all(0 <= t < model.args.vocab_size for t in out)
    n = cache[0].offset
    assert tally[0] >= 10 and [c.offset for c in cache] == [n] * len(cache)
    assert n in (4 + 19, 4 + 20)  # the prompt and the tokens fed back (the last, or the last two, not yet)
    fresh = model.make_cache()
    model(mx.array([([5, 17, 200, 33] + out)[:n]]), fresh)  # what the trunk's cache must hold: those tokens'
    for a, b in zip(_trunk_state(cache[:-1], n), _trunk_state(fresh, n)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mtp_needs_an_mtp_layer(tmp_path):
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    folder = convert(write_checkpoint(tmp_path / "src", make_config("air-tiny"), with_mtp=False), tmp_path / "m",
                     "none")
    model, _ = glm_mlx.load(folder)
    with pytest.raises(ValueError, match="no MTP layer"):
        model.make_cache(mtp=True)


def test_a_speculative_generator_closed_early_leaves_a_cache_chat_can_reuse(converted):
    """Closed after a few tokens (a stop token, Ctrl-C): the queued pass's draft position is forgotten,
    and every cache's first min(offsets) positions are those of the prompt and the tokens handed on."""
    model, _ = glm_mlx.load(converted("air-tiny", "mixed"), dtype="float32")
    prompt = [5, 17, 200, 33]
    for stop_after in (1, 2, 5):
        cache = model.make_cache(mtp=True)
        gen = generate_tokens(model, prompt, cache, max_tokens=30)
        got = [next(gen) for _ in range(stop_after)]
        gen.close()
        n = min(c.offset for c in cache)
        assert n <= len(prompt) + len(got) and max(c.offset for c in cache) - n <= 1
        fresh = model.make_cache()
        model(mx.array([(prompt + got)[:n]]), fresh)
        for a, b in zip(_trunk_state(cache[:-1], n), _trunk_state(fresh, n)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_generate_command_decodes_speculatively_on_request(converted):
    folder = converted("air-tiny", "mixed")
    args = ("generate", "--model", folder, "--prompt", "Hi there", "-n", "12", "--temp", "0")
    plain, spec = cli(*args, check_ok=True), cli(*args, "--mtp", check_ok=True)
    assert spec.stdout == plain.stdout
    assert "MTP drafts:" in spec.stderr.strip().splitlines()[-1] and "MTP" not in plain.stderr


def test_the_demo_runs_end_to_end_with_plain_decoding(tmp_path):
    """The quick start's command: a tiny checkpoint written, converted and run; every option it does not
    set is the generate command's default (a typer default left unset is a truthy object, not False)."""
    p = cli("demo", "--dir", str(tmp_path / "demo"), "-n", "8", check_ok=True)
    last = p.stderr.strip().splitlines()[-1]
    assert p.stdout.strip() and "tokens/s" in last and "MTP" not in last
