"""Generation: sampling, stop conditions, and the generate command."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import glm_mlx
from glm_mlx.generate import generate_tokens, make_sampler, stop_ids, stream
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
