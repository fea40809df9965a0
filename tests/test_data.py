"""Training data: rendered by GLM's template, loss on exactly what the model generates, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm_mlx.data import DataError, Dataset, Example, batches, load_dataset, split_path
from glm_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(converted) -> Tokenizer:
    return Tokenizer(converted("air-tiny", "none"))


def write(tmp_path, *lines, name="data.jsonl"):
    """A JSONL file of the lines: objects are dumped, strings and bytes written as they are."""
    path = tmp_path / name
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode() + b"\n")
    return path


def load_one(tmp_path, tok, sample, **kw):
    ds = load_dataset(write(tmp_path, sample), tok, **kw)
    assert len(ds.examples) == 1 and ds.truncated == 0 and ds.skipped == 0
    return ds.examples[0]


def target_runs(tok, ex: Example) -> list[str]:
    """The masked tokens, decoded run by run."""
    runs, current = [], []
    for t, m in zip(ex.tokens, ex.mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def untargeted(tok, ex: Example) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.mask) if not m])


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def call(arguments, name="get_weather"):
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


AGENT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "Need the weather.",
     "tool_calls": [call({"city": "Zürich", "days": 2})]},
    {"role": "tool", "tool_call_id": "call_0", "content": "{\"sky\": \"sunny\", \"c\": 21}"},
    {"role": "assistant", "content": "Sunny, 21 °C.", "reasoning_content": "It is sunny."},
]


def test_chat_loss_only_on_replies_and_their_stop_tokens(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"messages": AGENT, "tools": TOOLS})
    rendered = tok.apply_chat_template(AGENT, tools=TOOLS, add_generation_prompt=False)
    assert ex.tokens == tok.encode(rendered) + [tok.token_id("<|user|>")]
    assert len(ex.mask) == len(ex.tokens)
    assert target_runs(tok, ex) == [
        "\n<think>Need the weather.</think>\nLet me look.\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Zürich</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>",
        "\n<think>It is sunny.</think>\nSunny, 21 °C.<|user|>",
    ]
    rest = untargeted(tok, ex)
    for part in ("You are terse.", "Weather in Zürich?", '{"sky": "sunny", "c": 21}', "# Tools", "get_weather"):
        assert part in rest
    assert rest.count("<|assistant|>") == 2  # the generation prompt is given, not learnt


def test_chat_ending_with_a_tool_call_stops_with_observation(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"messages": AGENT[1:3], "tools": TOOLS})
    assert ex.tokens[-1] == tok.token_id("<|observation|>") and ex.mask[-1]
    assert target_runs(tok, ex)[-1].endswith("</tool_call><|observation|>")


def test_chat_ending_with_a_tool_response_appends_nothing(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"messages": AGENT[:4], "tools": TOOLS})
    assert ex.tokens == tok.encode(tok.apply_chat_template(AGENT[:4], tools=TOOLS, add_generation_prompt=False))
    assert target_runs(tok, ex)[-1].endswith("<|observation|>")
    assert not ex.mask[-1]


def test_reasoning_of_earlier_turns_is_dropped_as_at_inference(tmp_path, tok):
    messages = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1", "reasoning_content": "OLD-THOUGHT"},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "2", "reasoning_content": "NEW-THOUGHT"},
    ]
    ex = load_one(tmp_path, tok, {"messages": messages})
    assert "OLD-THOUGHT" not in tok.decode(ex.tokens)
    assert target_runs(tok, ex) == ["\n<think></think>\n1<|user|>", "\n<think>NEW-THOUGHT</think>\n2<|user|>"]


def test_reasoning_inline_in_content_is_split_by_the_template(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "<think>hmm</think>\nHello"}]})
    assert target_runs(tok, ex) == ["\n<think>hmm</think>\nHello<|user|>"]


def test_arguments_as_a_json_string_render_like_the_dict(tmp_path, tok):
    as_dict = load_one(tmp_path, tok, {"messages": AGENT, "tools": TOOLS})
    as_string = [dict(m) for m in AGENT]
    as_string[2]["tool_calls"] = [call(json.dumps({"city": "Zürich", "days": 2}))]
    assert load_one(tmp_path, tok, {"messages": as_string, "tools": TOOLS}) == as_dict
    # A call without "function" wrapping, and null content beside tool calls, as the template allows.
    bare = [dict(m) for m in AGENT]
    bare[2] = {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": "{}"}]}
    ex = load_one(tmp_path, tok, {"messages": bare[:3], "tools": TOOLS})
    assert target_runs(tok, ex) == ["\n<think></think>\n<tool_call>get_weather\n</tool_call><|observation|>"]


def test_completions_form(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"prompt": "2+2?", "completion": "4"})
    rendered = tok.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                       add_generation_prompt=False)
    assert ex.tokens == tok.encode(rendered) + [tok.token_id("<|user|>")]
    assert target_runs(tok, ex) == ["\n<think></think>\n4<|user|>"]
    assert untargeted(tok, ex) == "[gMASK]<sop><|user|>\n2+2?<|assistant|>"


def test_text_form_learns_every_token_and_the_end(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"text": "plain words, Zürich 東京"})
    assert ex.tokens == tok.encode("plain words, Zürich 東京") + [tok.hf.eos_token_id]
    assert all(ex.mask)


def test_think_option_is_the_templates_enable_thinking(tmp_path, tok):
    sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    default = load_one(tmp_path, tok, sample)
    on = load_one(tmp_path, tok, sample, think=True)
    off = load_one(tmp_path, tok, sample, think=False)
    assert on == default  # the template's default is thinking on
    assert off.tokens == tok.encode(tok.apply_chat_template(sample["messages"], add_generation_prompt=False,
                                                            enable_thinking=False)) + [tok.token_id("<|user|>")]
    assert untargeted(tok, off) == "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>"
    assert target_runs(tok, off) == target_runs(tok, default)


GOOD = {"text": "fine"}
MALFORMED = [
    ("not_json", "{not json", "not JSON"),
    ("not_an_object", "[1, 2]", "must be a JSON object, not a list"),
    ("no_form", {"input": "x"}, "none of the three forms"),
    ("mixed_forms", {"text": "a", "messages": []}, "mixes forms"),
    ("prompt_without_completion", {"prompt": "a"}, 'has "prompt" but no "completion"'),
    ("completion_not_string", {"prompt": "a", "completion": 3}, '"completion" must be a string, not a number'),
    ("text_not_string", {"text": ["a"]}, '"text" must be a non-empty string, not a list'),
    ("text_empty", {"text": ""}, '"text" must be a non-empty string'),
    ("messages_not_list", {"messages": "hi"}, '"messages" must be a non-empty list, not a string'),
    ("messages_empty", {"messages": []}, '"messages" must be a non-empty list'),
    ("message_not_object", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("no_role", {"messages": [{"content": "hi"}]}, 'messages[0] has no "role"'),
    ("unknown_role", {"messages": [{"role": "narrator", "content": "hi"}]}, "messages[0] has role 'narrator'"),
    ("no_assistant", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ("user_without_content", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     'messages[0] (user) has no "content"'),
    ("content_a_number", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     '"content" must be a string or a list of parts, not a number'),
    ("image_part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                                 {"role": "assistant", "content": "a"}]}, "the model reads text only"),
    ("reasoning_not_string", {"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a", "reasoning_content": 1}]},
     '"reasoning_content" must be a string'),
    ("tool_calls_not_list", {"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "tool_calls": {"name": "f"}}]},
     '"tool_calls" must be a list, not an object'),
    ("tool_call_without_name", {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "messages[1].tool_calls[0] has no function name"),
    ("arguments_bad_json", {"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "tool_calls": [call("{city: 1")]}]},
     "messages[1].tool_calls[0] (get_weather): arguments are not valid JSON"),
    ("arguments_a_list", {"messages": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "tool_calls": [call([1])]}]},
     "arguments must be a JSON object, not a list"),
    ("user_calls_tools", {"messages": [{"role": "user", "content": "q", "tool_calls": [call({})]},
                                       {"role": "assistant", "content": "a"}]},
     "only assistant messages call tools"),
    ("tools_not_list", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "tools": {"name": "f"}}, '"tools" must be a list of objects'),
    ("role_token_in_content", {"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a<|user|>b"}]},
     "messages[1] holds the text <|user|>, a role token"),
    ("role_token_in_prompt", {"prompt": "q<|assistant|>", "completion": "a"}, "prompt holds the text <|assistant|>"),
    ("not_utf8", b'{"text": "\xff"}', "not UTF-8"),
]


@pytest.mark.parametrize("line,message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_line_names_file_and_line(tmp_path, tok, line, message):
    path = write(tmp_path, GOOD, "", line, GOOD)  # the empty line is skipped but counted
    with pytest.raises(DataError) as e:
        load_dataset(path, tok)
    text = str(e.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text, text
    assert "\n" not in text


def test_missing_file_and_directory(tmp_path, tok):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_dataset(tmp_path / "nope.jsonl", tok)
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(tmp_path, tok)
    with pytest.raises(ValueError, match="overlong"):
        load_dataset(write(tmp_path, GOOD), tok, overlong="cut")


def test_split_path(tmp_path):
    assert split_path(tmp_path / "a.jsonl") == (tmp_path / "a.jsonl", None)
    assert split_path(tmp_path) == (tmp_path / "train.jsonl", None)
    write(tmp_path, GOOD, name="valid.jsonl")
    assert split_path(tmp_path) == (tmp_path / "train.jsonl", tmp_path / "valid.jsonl")


def test_overlong_samples_truncated_or_skipped_and_counted(tmp_path, tok):
    short = {"text": "short"}
    long = {"text": "a long text " * 20}
    late_reply = {"prompt": "a long question " * 20, "completion": "yes"}  # its only target lies past the cut
    limit = len(tok.encode(short["text"])) + 5
    full_long = tok.encode(long["text"]) + [tok.hf.eos_token_id]
    assert len(full_long) > limit

    path = write(tmp_path, short, long, late_reply)
    ds = load_dataset(path, tok, max_seq_len=limit)
    assert (len(ds.examples), ds.truncated, ds.skipped) == (2, 1, 1)
    assert ds.examples[1].tokens == full_long[:limit] and len(ds.examples[1].mask) == limit

    ds = load_dataset(path, tok, max_seq_len=limit, overlong="skip")
    assert (len(ds.examples), ds.truncated, ds.skipped) == (1, 0, 2)
    assert ds.examples[0].tokens == tok.encode("short") + [tok.hf.eos_token_id]

    # A truncated chat keeps the targets before the cut, and only those.
    chat = {"prompt": "q", "completion": "a fairly long answer " * 10}
    whole = load_one(tmp_path, tok, chat)
    cut = load_dataset(write(tmp_path, chat), tok, max_seq_len=len(whole.tokens) - 3)
    assert cut.truncated == 1 and cut.examples[0].mask == whole.mask[:-3]


def fake_dataset(lengths) -> Dataset:
    # Distinct token values per example, so a row tells which example it is; mask every other token.
    return Dataset([Example([100 * i + j + 1 for j in range(n)], [j % 2 == 1 for j in range(n)])
                    for i, n in enumerate(lengths)], 0, 0)


def test_batches_shift_pad_and_mask(tmp_path):
    ds = fake_dataset([5, 9, 3, 7, 4])
    out = list(batches(ds, 2, seed=0, epoch=0))
    assert [b[0].shape[0] for b in out] == [2, 2, 1]
    seen = []
    for inputs, targets, mask in out:
        assert inputs.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
        assert inputs.shape == targets.shape == mask.shape
        lengths = [len(ds.examples[row[0] // 100].tokens) for row in inputs]
        assert inputs.shape[1] == max(lengths) - 1
        for row, n in enumerate(lengths):
            ex = ds.examples[inputs[row, 0] // 100]
            seen.append(inputs[row, 0] // 100)
            assert inputs[row, :n - 1].tolist() == ex.tokens[:-1]
            assert targets[row, :n - 1].tolist() == ex.tokens[1:]
            assert mask[row, :n - 1].tolist() == [float(m) for m in ex.mask[1:]]
            assert not inputs[row, n - 1:].any() and not targets[row, n - 1:].any() and not mask[row, n - 1:].any()
    assert sorted(seen) == list(range(5))

    padded = next(batches(ds, 5, seed=0, epoch=0, pad_multiple=4))
    assert padded[0].shape == (5, 8)


def test_batch_order_is_fixed_by_seed_and_epoch():
    ds = fake_dataset(range(2, 22))

    def order(seed, epoch):
        return [int(x) for b in batches(ds, 3, seed=seed, epoch=epoch) for x in b[0][:, 0] // 100]

    assert order(7, 0) == order(7, 0)
    assert sorted(order(7, 0)) == list(range(20))
    assert order(7, 0) != order(7, 1)
    assert order(7, 0) != order(8, 0)
    first, again = list(batches(ds, 3, seed=7, epoch=1)), list(batches(ds, 3, seed=7, epoch=1))
    assert all((a == b).all() for x, y in zip(first, again) for a, b in zip(x, y))


def test_a_line_longer_than_max_seq_len_tokens_can_be_is_never_held(tmp_path, tok):
    """A 20 MB line at --max-seq-len 8: over the cap (the vocabulary's longest token x 6 bytes a text byte x
    8 tokens, plus slack), so it is refused in truncate mode and skipped in skip mode, read past in 1 MB
    pieces: the peak stays near the cap, not the line's size (tokenizing it whole took gigabytes)."""
    import tracemalloc

    from glm_mlx.data import line_cap

    cap = line_cap(tok, 8)
    assert cap < 4 << 20
    path = tmp_path / "data.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"text": "hello"}) + "\n")
        f.write('{"text": "' + "ab " * ((20 << 20) // 3) + '"}\n')
        f.write(json.dumps({"text": "there"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: longer than .* --overlong skip"):
        load_dataset(path, tok, max_seq_len=8)
    tracemalloc.start()
    ds = load_dataset(path, tok, max_seq_len=8, overlong="skip")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ds.examples) == 2 and ds.skipped == 1
    assert peak < 4 * cap < 20 << 20, peak  # the line itself is 20 MB
