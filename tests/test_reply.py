"""GLM-4.5 reply parsing: a table of model outputs, the streamed parse against
the whole-text parse for every chunking, and the round trip through the
official chat template."""

from __future__ import annotations

import json
import random

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from convert.synthetic import chat_template

from glm_mlx.reply import Reply, ReplyStream, ToolCall, parse_reply

TEMPLATE = chat_template()  # GLM-4.5's published template, as the package ships it
CALL_TAGS = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")


def fn(name, props, required=()):
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
        "type": "object", "properties": props, "required": list(required)}}}


TOOLS = [
    fn("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}, ["city"]),
    fn("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"]),
    fn("set", {"code": {"type": "string"}, "n": {"type": "number"}, "flag": {"type": "boolean"},
               "items": {"type": "array"}, "opts": {"type": "object"}, "nothing": {"type": "null"},
               "maybe": {"type": ["integer", "null"]}, "label": {"anyOf": [{"type": "string"}, {"type": "null"}]}}),
]


def call(name, *kv):
    """GLM markup for one call, as the template writes it."""
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in kv)
    return f"<tool_call>{name}\n{body}</tool_call>"


W = call("get_weather", ("city", "Paris"))
WEATHER = ToolCall("get_weather", {"city": "Paris"})

# (id, text, tools, reasoning, content, tool calls, a substring of each error in order)
CASES = [
    ("content-only", "\nHello there.", None, "", "Hello there.", [], []),
    ("thinking", "\n<think>Let me think.\nIt is 4.</think>\nThe answer is 4.", None,
     "Let me think.\nIt is 4.", "The answer is 4.", [], []),
    ("empty-think", "\n<think></think>\nHi!", None, "", "Hi!", [], []),
    ("blank-think", "\n<think>\n\n</think>\n\nHi!\n", None, "", "Hi!", [], []),
    ("unclosed-think", "\n<think>I was weighing whether", None, "I was weighing whether", "", [], []),
    ("unclosed-think-partial-tag", "\n<think>so a <b and </thi", None, "so a <b and </thi", "", [], []),
    ("stray-think-close-first", "</think>\nJust text.", None, "", "Just text.", [], []),
    ("think-tags-mid-content-literal", "\nUse <think> and </think> tags.", None,
     "", "Use <think> and </think> tags.", [], []),
    ("one-call", "\n" + W, None, "", "", [WEATHER], []),
    ("one-call-schema", "\n" + call("get_weather", ("city", "Paris"), ("days", "3")), TOOLS, "", "",
     [ToolCall("get_weather", {"city": "Paris", "days": 3})], []),
    ("several-calls", "\n" + W + "\n" + call("get_weather", ("city", "Tokyo")) + call("list_files"), None, "", "",
     [WEATHER, ToolCall("get_weather", {"city": "Tokyo"}), ToolCall("list_files", {})], []),
    ("calls-with-text-between", "\n" + W + "\nand also\n" + call("get_weather", ("city", "Oslo")), None,
     "", "and also", [WEATHER, ToolCall("get_weather", {"city": "Oslo"})], []),
    ("call-after-reasoning", "\n<think>Need the weather.</think>\n" + W, None,
     "Need the weather.", "", [WEATHER], []),
    ("call-after-content", "\nLet me check.\n" + W, None, "", "Let me check.", [WEATHER], []),
    ("content-after-call", "\n" + W + "\nDone, waiting.", None, "", "Done, waiting.", [WEATHER], []),
    ("reasoning-content-call-content", "\n<think>plan</think>\nChecking.\n" + W + "\nThen more.", None,
     "plan", "Checking.\n\nThen more.", [WEATHER], []),
    ("json-values-no-schema",
     call("set", ("i", "42"), ("f", "-2.5e3"), ("b", "true"), ("z", "null"), ("l", "[1, \"two\", 3.0]"),
          ("o", '{"a": {"b": [1, {"c": null}]}, "d": "é"}'), ("s", "plain words")), None, "", "",
     [ToolCall("set", {"i": 42, "f": -2500.0, "b": True, "z": None, "l": [1, "two", 3.0],
                       "o": {"a": {"b": [1, {"c": None}]}, "d": "é"}, "s": "plain words"})], []),
    ("json-values-schema",
     call("set", ("n", "2.5"), ("flag", "false"), ("items", '["a", 1]'), ("opts", '{"k": {"deep": [true]}}'),
          ("nothing", "null"), ("maybe", "null"), ("label", "null")), TOOLS, "", "",
     [ToolCall("set", {"n": 2.5, "flag": False, "items": ["a", 1], "opts": {"k": {"deep": [True]}},
                       "nothing": None, "maybe": None, "label": None})], []),
    ("union-types", call("set", ("maybe", "7"), ("label", "seven")), TOOLS, "", "",
     [ToolCall("set", {"maybe": 7, "label": "seven"})], []),
    ("integer-from-integral-float", call("get_weather", ("city", "Rome"), ("days", "5.0")), TOOLS, "", "",
     [ToolCall("get_weather", {"city": "Rome", "days": 5})], []),
    ("string-with-newlines",
     call("write_file", ("path", "a.py"), ("content", "def f():\n    return 1\n\n\nprint(f())\n")), TOOLS, "", "",
     [ToolCall("write_file", {"path": "a.py", "content": "def f():\n    return 1\n\n\nprint(f())\n"})], []),
    ("string-verbatim-whitespace", call("write_file", ("path", " x "), ("content", "\n  indented\n")), TOOLS,
     "", "", [ToolCall("write_file", {"path": " x ", "content": "\n  indented\n"})], []),
    ("angle-brackets-and-entities",
     call("write_file", ("path", "i.html"), ("content", '<div class="a">&lt;b&gt; &amp; a < b > c</div>')),
     TOOLS, "", "", [ToolCall("write_file", {"path": "i.html",
                                             "content": '<div class="a">&lt;b&gt; &amp; a < b > c</div>'})], []),
    ("closing-tag-lookalikes",
     call("write_file", ("path", "t"), ("content", "a </arg_valu b </arg_value c </arg_values> d </arg <arg_value")),
     TOOLS, "", "", [ToolCall("write_file", {
         "path": "t", "content": "a </arg_valu b </arg_value c </arg_values> d </arg <arg_value"})], []),
    ("markup-inside-value",
     call("write_file", ("path", "glm.md"), ("content", "write <tool_call>x</tool_call> and <think>")), TOOLS,
     "", "", [ToolCall("write_file", {"path": "glm.md", "content": "write <tool_call>x</tool_call> and <think>"})],
     []),
    ("unicode-emoji", "\n東京の天気？ 🌦️\n" + call("get_weather", ("city", "東京 🌸 café")), None,
     "", "東京の天気？ 🌦️", [ToolCall("get_weather", {"city": "東京 🌸 café"})], []),
    ("name-trailing-newline", "<tool_call>get_weather\n\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
     "</tool_call>", None, "", "", [WEATHER], []),
    ("name-trailing-spaces-no-args", "<tool_call>list_files  \n</tool_call>", None, "", "",
     [ToolCall("list_files", {})], []),
    ("no-args-tight", "<tool_call>list_files</tool_call>", None, "", "", [ToolCall("list_files", {})], []),
    ("tight-no-newlines", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
     None, "", "", [WEATHER], []),
    ("empty-string-value", call("write_file", ("path", "empty"), ("content", "")), TOOLS, "", "",
     [ToolCall("write_file", {"path": "empty", "content": ""})], []),
    ("nan-stays-string", call("f", ("x", "NaN"), ("y", "Infinity")), None, "", "",
     [ToolCall("f", {"x": "NaN", "y": "Infinity"})], []),
    ("json-looking-string-schema", call("set", ("code", "42")), TOOLS, "", "", [ToolCall("set", {"code": "42"})], []),
    ("json-looking-string-no-schema", call("set", ("code", "42")), None, "", "", [ToolCall("set", {"code": 42})], []),
    ("draft-call-inside-think", "\n<think>maybe " + W + " first</think>\nNo call needed.", None,
     "maybe " + W + " first", "No call needed.", [], []),
    ("near-tags-are-text", "\nx <tool <tool_call ><arg_ </think > <<>> y", None,
     "", "x <tool <tool_call ><arg_ </think > <<>> y", [], []),
    # malformed
    ("unclosed-call", "\nChecking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par", None,
     "", "Checking.", [], ["tool call 1 (get_weather): it is not closed: the reply ended inside it"]),
    ("unclosed-call-name-only", "\n<think>hm</think>\n<tool_call>get_wea", None, "hm", "", [], ["not closed"]),
    ("unclosed-before-next-call", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
     + W, None, "", "", [WEATHER], ["tool call 1 (get_weather): it is not closed before the next <tool_call>"]),
    ("missing-name", "<tool_call>\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>\nOk", None,
     "", "Ok", [], ["no tool name"]),
    ("key-without-value", "Hm.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>", None,
     "", "Hm.", [], ["argument 'city' has no <arg_value>"]),
    ("key-without-value-then-key", "<tool_call>f\n<arg_key>a</arg_key>\n<arg_key>b</arg_key>\n"
     "<arg_value>1</arg_value>\n</tool_call>", None, "", "", [], ["argument 'a' has no <arg_value>, found <arg_key>"]),
    ("value-without-key", "<tool_call>f\n<arg_value>1</arg_value>\n</tool_call>", None, "", "", [],
     ["<arg_value> without an <arg_key>"]),
    ("garbage-between-tags", "<tool_call>f\n<arg_key>a</arg_key> oops <arg_value>1</arg_value>\n</tool_call>"
     + call("g", ("b", "2")), None, "", "", [ToolCall("g", {"b": 2})], ["unexpected text 'oops'"]),
    ("garbage-after-value", "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>junk\n</tool_call>", None,
     "", "", [], ["unexpected text 'junk' between tags"]),
    ("name-not-one-word", "<tool_call>get weather now\n</tool_call>", None, "", "", [], ["is not one word"]),
    ("think-inside-call", "<tool_call>f\n<think>x</think></tool_call>", None, "", "", [], ["found <think>"]),
    ("stray-close", "Hi</tool_call> there", None, "", "Hi there", [], ["stray </tool_call>"]),
    ("stray-value-close", "\n<think>r</think>\nA</arg_value>B</arg_key>", None, "r", "AB", [],
     ["stray </arg_value>", "stray </arg_key>"]),
    ("headless-call", "get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\nDone",
     None, "", "get_weather\n\nDone", [], ["outside any <tool_call>"]),
    ("unknown-tool", "\n" + call("get_wether", ("city", "Paris")), TOOLS, "", "", [],
     ["tool call 1 (get_wether): unknown tool; the tools are: get_weather, write_file, set"]),
    ("no-tools-offered", "\n" + W, [], "", "", [], ["no tools are available"]),
    ("wrong-type", call("get_weather", ("city", "Paris"), ("days", "three")) + W, TOOLS, "", "", [WEATHER],
     ["argument 'days' must be integer, got 'three'"]),
    ("bool-for-number", call("set", ("n", "true"), ("flag", "1")), TOOLS, "", "", [],
     ["'n' must be number, got 'true'; argument 'flag' must be boolean, got '1'"]),
    ("bool-for-integer", call("get_weather", ("city", "Nice"), ("days", "false")), TOOLS, "", "", [],
     ["argument 'days' must be integer, got 'false'"]),
    ("missing-required", call("write_file", ("path", "a")), TOOLS, "", "", [],
     ["missing required argument 'content'"]),
    ("duplicate-keys", call("get_weather", ("city", "Paris"), ("city", "Lyon")), None, "", "", [],
     ["duplicate argument 'city'"]),
    ("markup-soup", "<<tool_call>></arg_key><think></tool_call><arg_value></think>x</arg_value>",
     None, "", "<", [], ["the tool name '>' is not one word", "outside any <tool_call>"]),
    ("random-bytes", "\n" + bytes(range(0, 256, 7)).decode("latin-1") + "<\x00\ufffd>" + W, None,
     "", (bytes(range(0, 256, 7)).decode("latin-1") + "<\x00\ufffd>").strip(), [WEATHER], []),
]
assert len(CASES) >= 30


def split_into(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice((1, 1, 2, 3, 5, 8, 13))
        out.append(text[i:i + n])
        i += n
    return out


def chunkings(text: str):
    yield "whole", [text]
    yield "chars", list(text)
    for seed in range(4):
        yield f"seed{seed}", split_into(text, random.Random(seed))


def run_stream(pieces, tools):
    s = ReplyStream(tools)
    events = []
    for p in pieces:
        events += s.feed(p)
    events += s.finish()
    return s, events


@pytest.mark.parametrize("text,tools,reasoning,content,calls,errors",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_table(text, tools, reasoning, content, calls, errors):
    r = parse_reply(text, tools)
    assert (r.reasoning, r.content, r.tool_calls) == (reasoning, content, calls)
    assert len(r.errors) == len(errors), r.errors
    for got, want in zip(r.errors, errors):
        assert want in got
        assert "\n" not in got  # one line each
    for tag in CALL_TAGS:  # markup of a call, good or bad, never reaches the text
        assert tag not in r.content


@pytest.mark.parametrize("text,tools", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_stream_equals_whole_parse(text, tools):
    whole = parse_reply(text, tools)
    for how, pieces in chunkings(text):
        s, events = run_stream(pieces, tools)
        assert s.reply == whole, how
        by = lambda kind: [v for k, v in events if k == kind]  # noqa: E731
        assert "".join(by("reasoning")) == whole.reasoning, how
        assert "".join(by("content")) == whole.content, how
        assert by("tool_call") == whole.tool_calls, how
        assert by("error") == whole.errors, how
        assert all(v for k, v in events if k in ("reasoning", "content")), how  # no empty pieces


def test_errors_are_in_text_order():
    text = "A</tool_call>" + call("get_wether", ("city", "x")) + "B</arg_value>" + W + "<tool_call>"
    s, events = run_stream(list(text), TOOLS)
    kinds = [k for k, _ in events if k in ("tool_call", "error")]
    assert kinds == ["error", "error", "error", "tool_call", "error"]
    assert "tool call 3" in s.reply.errors[-1] and "no tool name" not in s.reply.errors[-1]


def test_stream_emits_text_as_soon_as_it_is_safe():
    s = ReplyStream()
    assert s.feed("\n<thi") == []  # could still be <think>
    assert s.feed("nk>Let") == [("reasoning", "Let")]
    assert s.feed(" me see") == [("reasoning", " me see")]
    assert s.feed("</think>\nThe answer is <") == [("content", "The answer is")]  # "<" may begin a tag
    assert s.feed("b> bold") == [("content", " <b> bold")]
    assert s.feed(" and <tool_") == [("content", " and")]
    assert s.feed("call>f\n<arg_key>a</arg_key>\n<arg_value>1") == []
    assert s.feed("</arg_value>\n</tool_call>") == [("tool_call", ToolCall("f", {"a": 1}))]
    assert s.finish() == []
    assert s.reply == Reply("Let me see", "The answer is <b> bold and", [ToolCall("f", {"a": 1})], [])


def test_stream_never_holds_back_whole_lines():
    text = "\nA long line of prose with words, numbers 1 < 2 and a <b> tag, going on"
    s, seen = ReplyStream(), ""
    for i, ch in enumerate(text):
        seen += "".join(v for _, v in s.feed(ch))
        if not ch.isspace() and ch != "<" and "<" not in text[max(0, i - 3):i + 1]:
            assert seen == text[:i + 1].strip()


def test_reply_midway_is_the_parse_of_the_text_so_far():
    text = "\n<think>r</think>\nok " + W + "\n<tool_call>get_weather\n<arg_key>ci"
    s = ReplyStream()
    for i, ch in enumerate(text):
        s.feed(ch)
        if i % 7 == 0:
            assert s.reply == parse_reply(text[:i + 1])
    assert s.reply.errors and "not closed" in s.reply.errors[0]
    s.finish()
    assert s.reply == parse_reply(text)
    with pytest.raises(RuntimeError):
        s.feed("x")


def test_random_soup_never_raises_and_streams_alike():
    atoms = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
             "</arg_value>", "<", "</", "<tool", "f", "a b", "\n", " ", "42", '{"x": [1', "]}", "é🌸", ">", "null"]
    for seed in range(60):
        rng = random.Random(seed)
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 40)))
        whole = parse_reply(text, TOOLS if seed % 2 else None)
        s, events = run_stream(split_into(text, rng), TOOLS if seed % 2 else None)
        assert s.reply == whole, text
        for tag in CALL_TAGS:
            assert tag not in whole.content, text


def test_to_openai():
    c = ToolCall("get_weather", {"city": "東京", "days": 2, "opts": {"a": [1, None]}})
    d = c.to_openai("call_0")
    assert d == {"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "東京", "days": 2, "opts": {"a": [1, null]}}'}}
    assert json.loads(d["function"]["arguments"]) == c.arguments


def test_tool_schema_without_a_name_is_refused():
    with pytest.raises(ValueError, match="without a function name"):
        ReplyStream([{"type": "function", "function": {"parameters": {}}}])


# -- the round trip through the official template -----------------------------------------

def render_assistant(message: dict, tools=None) -> str:
    """What GLM's template writes for an assistant message after `<|assistant|>`,
    rendered as transformers does (trim/lstrip blocks, tojson keeping unicode)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
    text = env.from_string(TEMPLATE).render(
        messages=[{"role": "user", "content": "go"}, message], tools=tools, add_generation_prompt=False)
    return text.split("<|assistant|>")[-1]


ROUND_TRIPS = [
    ("", "", [("get_weather", {"city": "Paris"})]),
    ("Think first.\nThen act.", "Checking the weather.", [("get_weather", {"city": "São Paulo", "days": 3})]),
    ("", "", [("write_file", {"path": "src/a.py", "content": "import os\n\n\nif a < b and c > d:\n    x = '&lt;'\n"})]),
    ("plan", "", [("set", {"code": "42", "n": 1.5, "flag": True, "items": [1, "two", {"three": 3}],
                           "opts": {"nested": {"deep": [None, False, "é"]}, "s": "a\nb"}, "nothing": None}),
                  ("set", {"code": '{"looks": "like json"}', "label": "null?", "maybe": 0})]),
    ("", "Several at once:", [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "東京 🌸"}),
                              ("write_file", {"path": "p", "content": "</arg_valu </tool_call> <think>"})]),
    ("", "", [("set", {})]),
]


@pytest.mark.parametrize("reasoning,content,calls", ROUND_TRIPS)
def test_template_round_trip(reasoning, content, calls):
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning,
               "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
    text = render_assistant(message, TOOLS)
    assert text.startswith("\n<think>")
    r = parse_reply(text, TOOLS)
    assert r == Reply(reasoning, content, [ToolCall(n, a) for n, a in calls], [])
    s, _ = run_stream(list(text), TOOLS)
    assert s.reply == r


def test_template_round_trip_without_schemas_decodes_json_looking_strings():
    # Strings are written raw, so without a schema "42" and 42 read back the same: the schema is what tells them apart.
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"s": "42", "i": 42, "t": "true", "w": "words", "o": {"a": [1]}}}}]}
    r = parse_reply(render_assistant(message))
    assert r.tool_calls == [ToolCall("f", {"s": 42, "i": 42, "t": True, "w": "words", "o": {"a": [1]}})]
