"""Our sandboxed rendering of GLM-4.5's chat template equals transformers' apply_chat_template, byte for byte."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import jinja2
import pytest
from glm_mlx.tokenizer import ChatTemplateError, Tokenizer

# sha256 of chat_template.jinja as published with GLM-4.5's weights; the package ships a copy
PUBLISHED_SHA256 = "46786fd637de2728b41928ac3b6983e2d8a04706e51778de031fa933eb6f566f"


@pytest.fixture(scope="module")
def tok(converted) -> Tokenizer:
    return Tokenizer(converted("air-tiny", "none"))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville ☀️🌧️ — returns °C.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Stadt, e.g. \"Zürich\" or 東京"},
            "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "book_trip",
        "description": "Book a trip <with> \"quotes\" & ampersands.",
        "parameters": {"type": "object", "properties": {
            "travellers": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}, "required": ["name"]}},
            "legs": {"type": "array", "items": {"type": "object", "properties": {
                "from": {"type": "string"}, "to": {"type": "string"},
                "when": {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
                                                          "flexible": {"type": "boolean"}}}}}},
            "budget": {"type": ["number", "null"], "description": "In €, null for no limit"},
        }, "required": ["travellers", "legs"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {
        "type": "object", "properties": {}}}},
]

CALL_ARGS = {
    "city": "São Paulo",
    "note": "line one\nline two <b>bold</b> </arg_value> & 'quotes' \"dq\"",
    "count": 3,
    "ratio": 0.25,
    "flag": True,
    "nothing": None,
    "cities": ["Zürich", "東京", "🏙️"],
    "options": {"depth": 2, "tags": ["a", "b"], "nested": {"ok": False}},
}


def call(name, arguments, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a helpful assistant. Réponds brièvement. 🤖"}

# (id, messages, tools, options): options holds add_generation_prompt and, where the case sets it, enable_thinking.
CASES = [
    ("system_prompt", [SYSTEM, {"role": "user", "content": "Hello!"}], None, {}),
    ("system_only", [SYSTEM], None, {}),
    ("system_only_no_generation_prompt", [SYSTEM], None, {"add_generation_prompt": False}),
    ("tools", [SYSTEM, {"role": "user", "content": "Weather in Zürich?"}], TOOLS, {}),
    ("tools_without_system", [{"role": "user", "content": "Book it."}], TOOLS, {"enable_thinking": True}),
    ("several_turns", [
        SYSTEM,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "And one more?"},
    ], None, {}),
    ("reasoning_kept_only_after_last_user", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "OLD-THOUGHT: two and two"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "12", "reasoning_content": "\nNEW-THOUGHT: four times three\n"},
    ], None, {"add_generation_prompt": False}),
    ("inline_think_split", [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "<think>\nOLD-INLINE scattering\n</think>\n\nRayleigh scattering."},
        {"role": "user", "content": "Short version?"},
        {"role": "assistant", "content": "<think>NEW-INLINE short</think>Light scatters."},
    ], None, {"add_generation_prompt": False}),
    ("empty_reasoning_string_keeps_inline_think", [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>inline</think>answer", "reasoning_content": ""},
    ], None, {"add_generation_prompt": False}),
    ("reasoning_under_other_names", [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "ALIAS-OLD"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning": "ALIAS-REASONING"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3", "thinking": "ALIAS-THINKING"},
    ], None, {"add_generation_prompt": False}),
    ("tool_call_and_one_response", [
        SYSTEM,
        {"role": "user", "content": "Weather in São Paulo?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [call("get_weather", CALL_ARGS)]},
        {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "{\"temp\": 24, \"sky\": \"☀️\"}"},
    ], TOOLS, {}),
    ("several_calls_several_responses", [
        {"role": "user", "content": "Weather in Oslo and Rome, then book."},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            call("get_weather", {"city": "Oslo"}, 0), call("get_weather", {"city": "Rome", "units": "celsius"}, 1)]},
        {"role": "tool", "tool_call_id": "call_0", "content": "Oslo: 3°C\nsnow"},
        {"role": "tool", "tool_call_id": "call_1", "content": "Rome: 19°C <sunny>"},
        {"role": "assistant", "content": "Oslo 3°C, Rome 19°C.", "tool_calls": [
            call("book_trip", {"travellers": [{"name": "Zoë", "age": 31}],
                               "legs": [{"from": "OSL", "to": "FCO", "when": {"date": "2025-06-01"}}],
                               "budget": None}, 2)]},
        {"role": "tool", "tool_call_id": "call_2", "content": "booked ✅"},
        {"role": "assistant", "content": "Done: booked."},
        {"role": "user", "content": "Thanks!"},
    ], TOOLS, {"enable_thinking": True}),
    ("tool_calls_without_function_wrapper_or_arguments", [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "now", "arguments": {}},
                                                            {"function": {"name": "now"}}]},
        {"role": "tool", "content": "12:00"},
        {"role": "tool", "content": "12:01"},
    ], TOOLS, {}),
    ("tool_content_as_list", [
        {"role": "user", "content": "Both cities?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "A"}),
                                                            call("get_weather", {"city": "B"}, 1)]},
        {"role": "tool", "content": [{"output": "A: 10°C"}, {"output": "B: <b>20</b>°C"}, "plain C"]},
    ], TOOLS, {}),
    ("user_content_parts", [
        {"role": "system", "content": [{"type": "text", "text": "Sys part 1. "}, {"type": "text", "text": "Part 2."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "url": "x.png"},
                                     {"type": "text", "text": "what is it? 🧐"}]},
    ], None, {}),
    ("thinking_off", [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Quick answer please /nothink"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": [{"type": "text", "text": "parts too"}]},
    ], None, {"enable_thinking": False}),
    ("thinking_off_no_generation_prompt", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ], None, {"enable_thinking": False, "add_generation_prompt": False}),
    ("thinking_on", [SYSTEM, {"role": "user", "content": "Think hard: 17*23?"}], None, {"enable_thinking": True}),
    ("thinking_off_with_tools", [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "Paris: 15°C"},
    ], TOOLS, {"enable_thinking": False}),
    ("no_generation_prompt", [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ], None, {"add_generation_prompt": False}),
    ("unicode_everywhere", [
        {"role": "system", "content": "Ты — помощник. 你是助手。 🦄\n\n  indented line\t tab"},
        {"role": "user", "content": "¿Qué tal? 👋🏽 — \"quotes\" <tags> & \\backslash\\ {{ not jinja }} {% raw %}"},
        {"role": "assistant", "content": "Bien 😀", "reasoning_content": "思考中… 🤔"},
        {"role": "user", "content": "مرحبا 🌍 \u200b zero-width \U0001F9EA"},
        {"role": "assistant", "content": "<think>考え</think>\n\n答え 🎌",
         "tool_calls": [call("get_weather", {"city": "Ελλάδα", "units": "celsius", "note": "naïve café\n🚀"})]},
        {"role": "tool", "content": "☁️ 12°C — “smart quotes”"},
    ], TOOLS, {"enable_thinking": True}),
    ("openai_nulls", [
        {"role": "system", "content": "s", "name": None},
        {"role": "user", "content": "q", "name": None},
        {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [call("now", {})]},
        {"role": "tool", "content": "noon", "tool_call_id": "call_0", "name": None},
        {"role": "assistant", "content": "Noon.", "tool_calls": None},
    ], TOOLS, {"add_generation_prompt": False}),
]


def render_both(tok, messages, tools, options):
    options = dict(options)
    generation = options.pop("add_generation_prompt", True)
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, **options)
    theirs = tok.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation,
                                        **options)
    return ours, theirs


def test_the_tokenizer_holds_glms_template(tok):
    assert hashlib.sha256(tok.template_source.encode("utf-8")).hexdigest() == PUBLISHED_SHA256
    assert tok.hf.chat_template == tok.template_source  # transformers renders the same source


@pytest.mark.parametrize("name, messages, tools, options", CASES, ids=[c[0] for c in CASES])
def test_rendering_equals_transformers(tok, name, messages, tools, options):
    before = copy.deepcopy(messages)
    ours, theirs = render_both(tok, messages, tools, options)
    assert isinstance(theirs, str)
    assert ours == theirs
    assert messages == before  # neither rendering touches the caller's messages
    assert ours.startswith("[gMASK]<sop>")


def test_there_are_enough_conversations():
    assert len(CASES) >= 15


def rendered(tok, name):
    _, messages, tools, options = next(c for c in CASES if c[0] == name)
    return render_both(tok, messages, tools, options)[0]


def test_what_the_cases_exercise(tok):
    # The equality above could hold with both sides wrong; these pin what GLM's template does.
    text = rendered(tok, "reasoning_kept_only_after_last_user")
    assert "OLD-THOUGHT" not in text and "<|assistant|>\n<think></think>\n4" in text
    assert text.endswith("<|assistant|>\n<think>NEW-THOUGHT: four times three</think>\n12")
    text = rendered(tok, "inline_think_split")
    assert "OLD-INLINE" not in text and "<think></think>\nRayleigh scattering." in text
    assert text.endswith("<think>NEW-INLINE short</think>\nLight scatters.")
    assert rendered(tok, "empty_reasoning_string_keeps_inline_think").endswith(
        "<|assistant|>\n<think></think>\n<think>inline</think>answer")
    text = rendered(tok, "reasoning_under_other_names")
    assert "ALIAS-OLD" not in text and "ALIAS-REASONING" not in text and "<think>ALIAS-THINKING</think>" in text

    text = rendered(tok, "tool_call_and_one_response")
    assert "None" not in text  # OpenAI's content=None is dropped, not printed
    assert ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo</arg_value>\n"
            "<arg_key>note</arg_key>\n<arg_value>line one\nline two <b>bold</b> </arg_value> & 'quotes' \"dq\""
            "</arg_value>\n<arg_key>count</arg_key>\n<arg_value>3</arg_value>\n") in text
    assert ('<arg_value>["Zürich", "東京", "🏙️"]</arg_value>' in text
            and '<arg_value>{"depth": 2, "tags": ["a", "b"], "nested": {"ok": false}}</arg_value>' in text
            and "<arg_value>true</arg_value>" in text and "<arg_value>null</arg_value>" in text)
    assert text.endswith("</tool_call><|observation|>\n<tool_response>\n{\"temp\": 24, \"sky\": \"☀️\"}\n"
                         "</tool_response><|assistant|>")
    assert '"description": "Météo actuelle d\'une ville ☀️🌧️ — returns °C."' in text  # tojson keeps unicode

    text = rendered(tok, "several_calls_several_responses")
    assert text.count("<|observation|>") == 2 and text.count("<tool_response>") == 3
    assert "<tool_response>\nOslo: 3°C\nsnow\n</tool_response>\n<tool_response>\nRome: 19°C <sunny>\n" in text
    # the list form renders as consecutive string responses do (trim_blocks eats the newline after the for tag)
    assert rendered(tok, "tool_content_as_list").endswith(
        "</tool_call><|observation|>\n<tool_response>\nA: 10°C\n</tool_response>\n<tool_response>\nB: <b>20</b>°C\n"
        "</tool_response>\n<tool_response>\nplain C\n</tool_response><|assistant|>")
    assert "<|user|>\nLook: what is it? 🧐<|assistant|>" in rendered(tok, "user_content_parts")

    text = rendered(tok, "thinking_off")
    assert text.count("/nothink") == 3  # one per user turn; the one already asking is not doubled
    assert text.endswith("<|user|>\nparts too/nothink<|assistant|>\n<think></think>")
    assert rendered(tok, "thinking_on").endswith("<|user|>\nThink hard: 17*23?<|assistant|>")
    assert rendered(tok, "system_only") == "[gMASK]<sop><|system|>\nYou are a helpful assistant. " \
                                           "Réponds brièvement. 🤖<|assistant|>"
    assert rendered(tok, "no_generation_prompt").endswith("<|assistant|>\n<think></think>\nHi!")


def test_json_string_arguments_fail_alike(tok):
    # GLM's template iterates the arguments: a JSON string (OpenAI's wire form) is an error in both renderings.
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [call("now", '{"a": 1}')]}]
    with pytest.raises(ChatTemplateError) as ours:
        tok.apply_chat_template(messages)
    with pytest.raises(jinja2.exceptions.UndefinedError) as theirs:
        tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert str(ours.value) == f"{tok.folder / 'chat_template.jinja'}: {theirs.value}"


# -- the sandbox ---------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hostile_folder(tmp_path, converted, template: str) -> Path:
    folder = tmp_path / "hostile"
    folder.mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(converted("air-tiny", "none") / f, folder / f)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('PWNED', 'w') }}",
    "{{ lipsum.__globals__['os'].popen('touch PWNED').read() }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'changed'}) }}",
    "{{ messages[0].__setitem__('content', 'changed') }}",
    "{% for m in messages %}{{ m.pop('content') }}{% endfor %}",
])
def test_hostile_templates_raise_security_errors(tmp_path, converted, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer(hostile_folder(tmp_path, converted, template))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="is unsafe") as e:
        tok.apply_chat_template(messages)
    assert str(e.value).startswith(f"{tok.folder / 'chat_template.jinja'}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, output", [
    # a single unsafe attribute is undefined, not an error: it renders nothing
    ("<{{ raise_exception.__globals__ }}>", "<>"),
    ("<{{ strftime_now.__code__ }}>", "<>"),
    ("<{{ messages.__class__ }}>", "<>"),
    ("<{{ ''.__class__ }}>", "<>"),
    # str.format goes through the sandbox too
    ("<{{ 'x{0.__class__}'.format(1) }}>", "<x>"),
    ("<{{ '{0.__globals__}'.format(raise_exception) }}>", "<>"),
])
def test_hostile_templates_render_nothing_dangerous(tmp_path, converted, template, output):
    tok = Tokenizer(hostile_folder(tmp_path, converted, template))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == output


# -- what a template may make, and how it fails ----------------------------------------------------------

@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 3000000000 }}", "a repeat would make more than"),
    ("{{ ['x'] * 3000000000 }}", "a repeat would make more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "'~' would make more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "'\\+' would make more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}"
     "{% set ns.s = b %}{% endfor %}{{ ns.s }}", "a block would make more than"),
    ("{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
     "an output would make more than"),
    ("{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l|tojson }}", "the tojson filter: an argument over the limit"),
    ("{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}", "its output would be more than"),
    ("{% macro m(s) %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{{ m('x' * 10000000) }}",
     "a block would make more than"),
    ("{% set s = 'x' * 10000000 %}{{ ''.join([s, s, s, s]) }}", "join: an argument over the limit"),
    ("{% set s = 'x' * 10000000 %}{{ [s, s, s, s]|join }}", "the join filter: an argument over the limit"),
    ("{{ 'x'|indent(3000000000) }}", "the indent filter: an argument over the limit"),
    ("{{ ('\\n' * 1000000)|indent(1000000) }}", "the indent filter would make more than"),
    ("{{ ('x' * 1000000).replace('', 'x' * 1000000) }}", "replace would make more than"),
    ("{{ ('x' * 1000000)|replace('', 'x' * 1000000) }}", "the replace filter would make more than"),
    ("{{ 'x'.center(3000000000) }}", "center: an argument over the limit"),
    ("{{ '%3000000000s' % 'x' }}", "% would make more than"),
    ("{{ '{:>3000000000}'.format('x') }}", "format would make more than"),
    ("{{ ('x\\t' * 100000).expandtabs(1000000) }}", "expandtabs would make more than"),
    ("{{ 2 ** 3000000000 }}", "a power of more than"),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
     "a product of more than"),
])
def test_what_a_template_may_make_is_bounded_before_the_memory_is_taken(tmp_path, converted, template, message):
    import time
    import tracemalloc

    tok = Tokenizer(hostile_folder(tmp_path, converted, template))
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=message) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(e.value).startswith(f"{tok.folder / 'chat_template.jinja'}: ")
    assert peak < 200e6 and time.perf_counter() - t < 20


def test_the_limit_grows_with_the_conversation(tok):
    big = "y" * 40_000_000  # more than the limit on its own: a template that renders it once is fine
    assert big in tok.apply_chat_template([{"role": "user", "content": big}])


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "line 1: unexpected '}'"),
    ("{% include 'secrets.jinja' %}", "names another template \\('secrets.jinja'\\)"),
    ("{% import 'x.jinja' as x %}", "names another template"),
    ("{% extends 'base.jinja' %}", "names another template"),
    ("{{ raise_exception('no system messages') }}", "no system messages$"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_a_template_that_fails_is_one_line_naming_it(tmp_path, converted, template, message):
    folder = hostile_folder(tmp_path, converted, template)
    with pytest.raises(ChatTemplateError, match=message) as e:  # a syntax error: when the folder is loaded
        Tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(e.value).startswith(f"{folder / 'chat_template.jinja'}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("name, text, message", [
    ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON \\(Expecting"),
    ("special_tokens_map.json", "\xff", "special_tokens_map.json: not valid JSON"),
    ("tokenizer.json", "{}", "its tokenizer cannot be loaded"),
])
def test_tokenizer_files_that_are_not_are_named(tmp_path, converted, name, text, message):
    folder = hostile_folder(tmp_path, converted, "{{ 1 }}")
    (folder / name).write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=message):
        Tokenizer(folder)
