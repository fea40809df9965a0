"""The chat: cache reuse between turns, the tool loop, and the terminal end to end."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

import glm_mlx
import glm_mlx.generate as gen
from glm_mlx.chat import ChatSession, ContextFull, Repl
from test_convert import ENV, ROOT


class Script:
    """A sampler that emits chosen tokens in order (and records the logits it was
    given), so a real model runs, and fills its cache, on a reply we choose."""

    def __init__(self):
        self.replies: list[list[int]] = []
        self.logits: list[np.ndarray] = []

    def install(self, monkeypatch):
        def make_sampler(temp=0.0, top_p=1.0):
            tokens = iter(self.replies.pop(0))

            def sample(logits):  # the loop samples one step ahead of what it yields
                self.logits.append(np.array(logits))
                return mx.array([next(tokens, 0)])

            return sample

        monkeypatch.setattr(gen, "make_sampler", make_sampler)
        return self


@pytest.fixture(scope="module")
def tiny(converted):
    return glm_mlx.load(converted("air-tiny", "none"), dtype="float32")


def reply_tokens(tok, text: str, end: str) -> list[int]:
    return tok.encode(text) + [tok.token_id(end)]


def drain(events) -> list:
    return list(events)


def test_second_turn_prefills_only_its_new_tokens(tiny, monkeypatch):
    model, tok = tiny
    script = Script().install(monkeypatch)
    s = ChatSession(model, tok, system="Be brief.", think=False, temp=0.0)
    s.add_user("Hello!")
    first = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\nHi, how can I help?", "<|user|>"))
    events = drain(s.stream_reply())
    assert "".join(v for k, v in events if k == "content") == "Hi, how can I help?"
    assert s.last.prompt_tokens == len(first)
    assert s.messages[-1] == {"role": "assistant", "content": "Hi, how can I help?"}

    s.add_user("Tell me about MoE.")
    second = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\nExperts.", "<|user|>"))
    n_logits = len(script.logits)
    drain(s.stream_reply())
    # everything up to and including the <|user|> that ended the reply was cached
    already = len(first) + len(reply_tokens(tok, "\nHi, how can I help?", "<|user|>"))
    assert second[:already] == first + reply_tokens(tok, "\nHi, how can I help?", "<|user|>")
    assert s.last.prompt_tokens == len(second) - already
    # and the logits the reused cache gave are those of a fresh forward over the whole prompt
    fresh = np.array(model([second]))[0, -1]
    np.testing.assert_allclose(script.logits[n_logits][0], fresh, rtol=1e-4, atol=1e-4)


def test_dropped_reasoning_is_prefilled_again_not_kept_stale(tiny, monkeypatch):
    """With thinking on, the template drops an earlier turn's reasoning once a
    new user turn comes: the cache is cut back to where the rendering changed."""
    model, tok = tiny
    script = Script().install(monkeypatch)
    s = ChatSession(model, tok, think=True, temp=0.0)
    s.add_user("2+2?")
    script.replies.append(reply_tokens(tok, "\n<think>Add them.</think>\n4", "<|user|>"))
    events = drain(s.stream_reply())
    assert "".join(v for k, v in events if k == "reasoning").strip() == "Add them."
    assert s.messages[-1]["reasoning_content"] == "Add them."
    s.add_user("And 3+3?")
    second = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\n<think>Again.</think>\n6", "<|user|>"))
    n_logits = len(script.logits)
    drain(s.stream_reply())
    assert "Add them." not in tok.decode(s.cached)
    assert 0 < s.last.prompt_tokens < len(second)  # the shared head stayed, the changed tail was redone
    np.testing.assert_allclose(script.logits[n_logits][0], np.array(model([second]))[0, -1], rtol=1e-4, atol=1e-4)


def test_tool_round_trip(tiny, monkeypatch, tmp_path):
    """The tokens of a real GLM tool call, as the tokenizer encodes them; the
    user says yes; the tool runs; the next prompt holds the observation exactly
    as the template renders it, and the loop goes on until a text answer."""
    from glm_mlx.tools import load_tools

    model, tok = tiny
    (tmp_path / "tools.py").write_text(
        'def get_weather(city: str, days: int = 1) -> str:\n'
        '    """The weather forecast.\n\n    Args:\n        city: the city\n        days: how many days\n    """\n'
        '    return f"{city}: sunny for {days} day(s)"\n')
    tools = load_tools(tmp_path / "tools.py")
    script = Script().install(monkeypatch)
    s = ChatSession(model, tok, tools=[t.schema for t in tools.values()], think=False, temp=0.0)
    call = "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n" \
           "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
    script.replies += [reply_tokens(tok, call, "<|observation|>"), reply_tokens(tok, "\nSunny in Paris.", "<|user|>")]
    answers = iter(["y"])
    printed = []

    class Console:
        def print(self, *a, **k):
            printed.append(" ".join(map(str, a)))

    s.add_user("Weather in Paris for two days?")
    Repl(s, Console(), tools, ask=lambda prompt: next(answers)).turn()

    roles = [m["role"] for m in s.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    want = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    assert s.messages[1]["tool_calls"][0]["function"] == want
    assert s.messages[2]["content"] == "Paris: sunny for 2 day(s)"
    assert s.messages[3]["content"] == "Sunny in Paris."
    # the prompt of the second reply, as the template renders the conversation
    rendered = tok.hf.apply_chat_template(s.messages[:3], tools=[t.schema for t in tools.values()], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
    assert "<|observation|>\n<tool_response>\nParis: sunny for 2 day(s)\n</tool_response>" in rendered
    assert s.cached[: len(tok.encode(rendered))] == tok.encode(rendered)
    assert any("get_weather" in p for p in printed)


def test_context_overflow_is_a_clear_error(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, context_limit=16)
    s.add_user("a long message " * 10)
    with pytest.raises(ContextFull, match="context limit is 16"):
        drain(s.stream_reply())


def test_save_and_load_round_trip_openai_format(tiny, tmp_path):
    import json

    model, tok = tiny
    s = ChatSession(model, tok, system="sys")
    s.messages = [{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [1, "é"]}}}]},
                  {"role": "tool", "name": "f", "content": "ok", "tool_call_id": "c1"}]
    s.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved[0] == {"role": "system", "content": "sys"}
    assert json.loads(saved[2]["tool_calls"][0]["function"]["arguments"]) == {"x": [1, "é"]}
    t = ChatSession(model, tok)
    t.load(tmp_path / "c.json")
    assert (t.system, t.messages) == (s.system, s.messages)
    (tmp_path / "bad.json").write_text('{"nope": 1}')
    with pytest.raises(ValueError, match="not a conversation"):
        t.load(tmp_path / "bad.json")


class Terminal:
    """The far side of a pty: read until a needle appears, consuming up to it."""

    def __init__(self, fd):
        self.fd, self.buf = fd, ""

    def expect(self, needle: str, timeout: float = 120.0) -> str:
        end = time.time() + timeout
        while needle not in self.buf:
            if time.time() > end:
                raise AssertionError(f"no {needle!r} in:\n{self.buf}")
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.buf += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        i = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")


def test_chat_in_a_terminal(converted):
    folder = converted("air-tiny", "mixed")
    main, child = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "glm_mlx.cli", "chat", "--model", str(folder), "--temp", "0",
                          "--max-tokens", "12", "--no-think"], stdin=child, stdout=child, stderr=child,
                         env={**ENV, "COLUMNS": "200", "TERM": "dumb"}, cwd=ROOT, close_fds=True)
    os.close(child)
    term = Terminal(main)
    try:
        term.expect("> ")
        term.send("Hello there")
        term.expect("Hello there")  # the echo
        reply = term.expect("prompt: ")  # the streamed reply, then its stats line
        assert reply.strip(), "no reply text before the stats line"
        term.expect("tokens/s")
        assert "context:" in term.expect("> ")
        term.send("/clear")
        term.expect("conversation cleared")
        term.send("/exit")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(main)


def test_ctrl_c_mid_reply_keeps_a_consistent_session(tiny, monkeypatch):
    model, tok = tiny
    script = Script().install(monkeypatch)
    s = ChatSession(model, tok, think=False)
    s.add_user("Count to ten.")
    script.replies.append(tok.encode("\none two three four five six seven eight nine ten") + [tok.token_id("<|user|>")])
    events = s.stream_reply()
    next(events), next(events)
    with pytest.raises(KeyboardInterrupt):
        events.throw(KeyboardInterrupt)
    partial = s.messages[-1]["content"]  # the part streamed before the interruption is kept
    assert s.messages[-1]["role"] == "assistant" and partial and "one two three".startswith(partial)
    assert len({c.offset for c in s.cache}) == 1 and s.cache[0].offset == len(s.cached)
    s.add_user("Go on.")
    second = s.prompt_tokens()
    script.replies.append(reply_tokens(tok, "\neleven", "<|user|>"))
    n = len(script.logits)
    drain(s.stream_reply())
    np.testing.assert_allclose(script.logits[n][0], np.array(model([second]))[0, -1], rtol=1e-4, atol=1e-4)


def _repl(session, answers):
    it = iter(answers)

    class Console:
        def __init__(self):
            self.lines = []

        def print(self, *a, **k):
            self.lines.append(" ".join(map(str, a)))

    return Repl(session, Console(), ask=lambda prompt: next(it))


def test_multi_line_input(tiny):
    model, tok = tiny
    r = _repl(ChatSession(model, tok), ["first \\", "second", '"""', "a", "", "b", '"""'])
    assert r.read_message() == "first \nsecond"
    assert r.read_message() == "a\n\nb"


def test_outgrown_context_offers_to_drop_the_oldest_turns(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, think=False)
    for i in range(4):
        s.messages += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": "ok"}]
    s.add_user("last")
    s.context_limit = len(s.prompt_tokens()) - 5
    r = _repl(s, ["d"])
    assert r.make_room("too long") is True
    assert s.messages[-1]["content"] == "last" and len(s.prompt_tokens()) < s.context_limit
    assert "question 0" not in str(s.messages)
    s.add_user("x " * 400)
    assert _repl(s, ["k"]).make_room("too long") is False and s.messages[-1]["content"] == "last"


def test_a_chat_decoding_speculatively_says_the_same_and_caches_alike(tiny):
    """Two greedy turns with the MTP layer drafting: the same replies as without, and the cache (the
    MTP layer's included) cut back and reused between turns alike."""
    model, tok = tiny
    sessions = [ChatSession(model, tok, think=False, temp=0.0, max_tokens=12, mtp=mtp) for mtp in (False, True)]
    for text in ("Hello!", "And then?"):
        for s in sessions:
            s.add_user(text)
            drain(s.stream_reply())
        plain, spec = sessions
        assert spec.messages == plain.messages
        assert spec.cached == plain.cached and spec.last.prompt_tokens == plain.last.prompt_tokens
        assert [c.offset for c in spec.cache] == [len(spec.cached)] * len(spec.cache)
    assert spec.last.tally[0] > 0  # drafts were checked
    assert "MTP drafts" in spec.last.line()
