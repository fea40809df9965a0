"""Tools for `glm-mlx chat --tools FILE`: schemas from Python functions, JSON tools with commands, running them."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from typing import Literal

import pytest

from glm_mlx.tools import Tool, ToolError, load_tools, run_tool, schema_from_function

PY_TOOLS = '''
"""Tools of a user: this docstring is not a tool."""
from __future__ import annotations

import json
from os.path import join  # imported: not a tool
from typing import Literal, Optional

CALLS = []


def get_weather(city: str, units: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather in a city, météo included ☀️.

    This second paragraph is for people, not for the schema.

    Args:
        city: The city's name,
            e.g. "Zürich" or <São Paulo>.
        units: Temperature units.

    Returns:
        A sentence.
    """
    return f"{city}: 21 degrees {units}"


def add(a: int, b: int) -> int:
    """Add two integers.

    :param a: The first addend.
    :param int b: The second
        addend.
    """
    return a + b


def search(query: str, limit: Optional[int] = None, tags: list[str] = (), exact: bool | None = None,
           weights: dict[str, float] | None = None, ratio: float = 1.0) -> dict:
    """Search the notes.

    Args:
        query (str): What to look for.
        limit: At most this many hits; all when null.
        tags: Only notes with all these tags.
        exact: Match the words exactly.
        weights: A weight per field.
        ratio: A number.
    """
    CALLS.append((query, limit, list(tags), exact, weights, ratio))
    return {"query": query, "hits": ["naïve", "日本"], "limit": limit}


def explode(reason: str) -> str:
    """Always fails.

    Args:
        reason: Why.
    """
    raise RuntimeError(f"boom: {reason}")


def nothing() -> None:
    """Returns nothing, takes nothing."""


def helper(x):
    return x * 2


def _private(x: int) -> int:
    """Not a tool: private.

    Args:
        x: A number.
    """
    return x
'''


@pytest.fixture
def py_tools(tmp_path):
    f = tmp_path / "my_tools.py"
    f.write_text(PY_TOOLS, encoding="utf-8")
    return load_tools(f)


def write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(textwrap.dedent(text), encoding="utf-8")
    return f


# -- Python tools: schemas -----------------------------------------------------------

def test_python_file_public_documented_functions_become_tools(py_tools):
    assert list(py_tools) == ["get_weather", "add", "search", "explode", "nothing"]
    assert all(isinstance(t, Tool) and t.name == n for n, t in py_tools.items())


def test_python_schemas_exactly(py_tools):
    assert py_tools["get_weather"].schema == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city, météo included ☀️.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": 'The city\'s name, e.g. "Zürich" or <São Paulo>.'},
                    "units": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature units."},
                },
                "required": ["city"],
            },
        },
    }
    assert py_tools["add"].schema["function"] == {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "description": "The first addend."},
                           "b": {"type": "integer", "description": "The second addend."}},
            "required": ["a", "b"],
        },
    }
    assert py_tools["search"].schema["function"]["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "nullable": True, "description": "At most this many hits; all when null."},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Only notes with all these tags."},
            "exact": {"type": "boolean", "nullable": True, "description": "Match the words exactly."},
            "weights": {"type": "object", "additionalProperties": {"type": "number"}, "nullable": True,
                        "description": "A weight per field."},
            "ratio": {"type": "number", "description": "A number."},
        },
        "required": ["query"],
    }
    assert py_tools["nothing"].schema["function"]["parameters"] == {"type": "object", "properties": {}}


def test_schema_key_order_is_the_rendered_order(py_tools):
    # The template writes the schema with tojson: key order is what the model reads.
    units = py_tools["get_weather"].schema["function"]["parameters"]["properties"]["units"]
    assert list(units) == ["type", "enum", "description"]
    assert list(py_tools["get_weather"].schema["function"]) == ["name", "description", "parameters"]


def test_schemas_agree_with_transformers_get_json_schema(py_tools):
    from transformers.utils import get_json_schema

    def convert(temperature: float, to: Literal["C", "F", "K"], precision: int | None = None,
                values: list[float] | None = None) -> float:
        """Convert a temperature.

        Args:
            temperature: The value.
            to: The target unit.
            precision: Digits after the point.
            values: More values,
                converted alike.
        """

    ours = schema_from_function(convert)
    theirs = get_json_schema(convert)
    theirs["function"].pop("return")  # the model never writes the return value: we leave it out
    assert json.dumps(ours) == json.dumps(theirs)


def test_undocumented_parameter_is_an_error_naming_function_and_parameter(tmp_path):
    f = write(tmp_path, "t.py", '''
        def lookup(word: str, lang: str = "en") -> str:
            """Look a word up.

            Args:
                word: The word.
            """
    ''')
    with pytest.raises(ToolError, match=r"t\.py:2: lookup\(\): parameter 'lang' is not described in the docstring"):
        load_tools(f)


def test_untyped_parameter_is_an_error(tmp_path):
    f = write(tmp_path, "t.py", '''
        def lookup(word) -> str:
            """Look a word up.

            Args:
                word: The word.
            """
    ''')
    with pytest.raises(ToolError, match=r"t\.py:2: lookup\(\): parameter 'word' has no type hint"):
        load_tools(f)


@pytest.mark.parametrize("signature, message", [
    ("x: object", r"parameter 'x': cannot describe object in JSON schema"),
    ("x: dict[int, str]", r"parameter 'x': dict\[int, str\]: JSON object keys are strings"),
    ("*xs: int", r"parameter 'xs' is not a named parameter"),
])
def test_unsupported_parameters_are_errors(tmp_path, signature, message):
    f = write(tmp_path, "t.py", f'''
        def f({signature}) -> str:
            """Do it.

            Args:
                x: A thing.
                xs: Things.
            """
    ''')
    with pytest.raises(ToolError, match=message):
        load_tools(f)


def test_empty_description_is_an_error(tmp_path):
    f = write(tmp_path, "t.py", '''
        def f(x: int) -> str:
            """
            Args:
                x: A thing.
            """
    ''')
    with pytest.raises(ToolError, match=r"f\(\): the docstring's first paragraph, the tool's description, is empty"):
        load_tools(f)


def test_python_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ToolError, match=r"bad\.py:3: syntax error"):
        load_tools(write(tmp_path, "bad.py", "import os\n\ndef f(:\n    pass\n"))
    with pytest.raises(ToolError, match=r"raises\.py:2: loading it raised KeyError: 'HOME_OF_NOBODY'"):
        load_tools(write(tmp_path, "raises.py", "import os\nos.environ['HOME_OF_NOBODY']\n"))
    with pytest.raises(ToolError, match=r"none\.py: defines no tools"):
        load_tools(write(tmp_path, "none.py", "def helper(x):\n    return x\n"))
    with pytest.raises(ToolError, match=r"missing\.py: no such tools file"):
        load_tools(tmp_path / "missing.py")
    with pytest.raises(ToolError, match=r"tools\.yaml: a tools file is a \.py file"):
        load_tools(write(tmp_path, "tools.yaml", "[]"))


# -- Python tools: running -----------------------------------------------------------

def test_running_python_tools(py_tools):
    assert run_tool(py_tools, "get_weather", {"city": "Zürich"}) == "Zürich: 21 degrees celsius"
    assert run_tool(py_tools, "get_weather", {"city": "Oslo", "units": "fahrenheit"}) == "Oslo: 21 degrees fahrenheit"
    assert run_tool(py_tools, "add", {"a": 2, "b": 40}) == "42"  # an int result goes back as JSON
    assert run_tool(py_tools, "nothing", {}) == "null"
    # a dict result: JSON with unicode kept
    assert run_tool(py_tools, "search", {"query": "q", "tags": ["a", "b"], "weights": {"title": 2, "body": 0.5}}) \
        == '{"query": "q", "hits": ["naïve", "日本"], "limit": null}'
    assert run_tool(py_tools, "search", {"query": "q", "limit": None, "exact": None}).startswith('{"query": "q"')
    assert run_tool(py_tools, "search", {"query": "q", "ratio": 2}).startswith('{"query"')  # an int is a number


@pytest.mark.parametrize("name, arguments, result", [
    ("get_weather", {}, "error: missing argument 'city'"),
    ("get_weather", {"city": "Rome", "town": "x"}, "error: unknown argument 'town' (the arguments are: city, units)"),
    ("get_weather", {"city": 7}, "error: argument 'city' must be a string, got 7"),
    ("get_weather", {"city": "Rome", "units": "kelvin"},
     'error: argument \'units\' must be one of "celsius", "fahrenheit", got "kelvin"'),
    ("add", {"a": 1, "b": "2"}, "error: argument 'b' must be an integer, got \"2\""),
    ("add", {"a": 1, "b": True}, "error: argument 'b' must be an integer, got true"),
    ("add", {"a": 1.5, "b": 2}, "error: argument 'a' must be an integer, got 1.5"),
    ("search", {"query": "q", "tags": ["ok", 3]}, "error: argument 'tags[1]' must be a string, got 3"),
    ("search", {"query": "q", "tags": "ok"}, "error: argument 'tags' must be an array, got \"ok\""),
    ("search", {"query": "q", "weights": {"t": "high"}}, "error: argument 'weights.t' must be a number, got \"high\""),
    ("search", {"query": "q", "ratio": False}, "error: argument 'ratio' must be a number, got false"),
    ("search", {"query": None}, "error: argument 'query' must be a string, got null"),
    ("add", ["1", "2"], 'error: the arguments must be an object, got ["1", "2"]'),
    ("explode", {"reason": "as planned"}, "error: RuntimeError: boom: as planned"),
    ("nope", {}, "error: unknown tool 'nope' (the tools are: get_weather, add, search, explode, nothing)"),
])
def test_bad_calls_come_back_as_error_observations(py_tools, name, arguments, result):
    assert run_tool(py_tools, name, arguments) == result


def test_bad_arguments_never_reach_the_function(tmp_path):
    f = write(tmp_path, "t.py", PY_TOOLS)
    tools = load_tools(f)
    calls = sys.modules["glm_mlx_tools_t"].CALLS
    run_tool(tools, "search", {"query": 1})
    assert calls == []
    run_tool(tools, "search", {"query": "x", "tags": ["a"]})
    assert calls == [("x", None, ["a"], None, None, 1.0)]


def test_tool_run_directly_checks_arguments_too(py_tools):
    assert py_tools["add"].run({"a": 1}) == "error: missing argument 'b'"
    assert py_tools["add"].run({"a": 1, "b": 2}) == "3"


def test_a_python_tool_past_its_timeout(tmp_path):
    tools = load_tools(write(tmp_path, "slow.py", '''
        import time

        def slow(seconds: float) -> str:
            """Sleep.

            Args:
                seconds: How long.
            """
            time.sleep(seconds)
            return "woke"
    '''))
    t0 = time.monotonic()
    assert run_tool(tools, "slow", {"seconds": 5}, timeout=0.2) == "error: timed out after 0.2s"
    assert time.monotonic() - t0 < 2
    assert run_tool(tools, "slow", {"seconds": 0}, timeout=5) == "woke"


def test_hand_made_tools_run_through_run_tool():
    def boom(args):
        raise KeyError("k")

    tools = {"echo": Tool({"type": "function", "function": {"name": "echo"}}, lambda a: a["text"]),
             "boom": Tool({"type": "function", "function": {"name": "boom"}}, boom)}
    assert tools["echo"].name == "echo"
    assert run_tool(tools, "echo", {"text": "hi"}) == "hi"
    assert run_tool(tools, "boom", {}) == "error: KeyError: 'k'"


# -- JSON tools ----------------------------------------------------------------------

DOUBLE = [sys.executable, "-c", "import json,sys; a=json.load(sys.stdin); print(a['x']*2)"]


def json_tool(name, command, properties=None, required=None, **extra):
    params = {"type": "object", "properties": properties if properties is not None else {"x": {"type": "integer"}}}
    if required is not None:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.",
                                             "parameters": params}, "command": command, **extra}


def write_json(tmp_path, entries, name="tools.json"):
    f = tmp_path / name
    f.write_text(json.dumps(entries, indent=2, ensure_ascii=False), encoding="utf-8")
    return f


def test_json_tools_run_real_commands(tmp_path):
    echo = [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"]
    shell_string = f"'{sys.executable}' -c 'import json,sys; print(json.load(sys.stdin)[\"s\"].upper())'"
    tools = load_tools(write_json(tmp_path, [
        json_tool("double", DOUBLE, required=["x"]),
        json_tool("echo", echo, {"s": {"type": "string", "description": "ünï ☃"},
                                 "n": {"type": "object", "properties": {"deep": {"type": "array"}}}}),
        json_tool("upper", shell_string, {"s": {"type": "string"}}),
    ]))
    assert list(tools) == ["double", "echo", "upper"]
    assert tools["double"].schema == {"type": "function", "function": {
        "name": "double", "description": "The double tool.",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    assert run_tool(tools, "double", {"x": 21}) == "42"
    # the arguments arrive as JSON on stdin, unicode intact
    args = {"s": "a\n<b> ☃ 日本", "n": {"deep": [1, {"k": None}]}}
    assert json.loads(run_tool(tools, "echo", args)) == args
    assert run_tool(tools, "upper", {"s": "straße"}) == "STRASSE"  # a string command is split, not given to a shell
    assert run_tool(tools, "double", {}) == "error: missing argument 'x'"
    assert run_tool(tools, "double", {"x": "21"}) == "error: argument 'x' must be an integer, got \"21\""
    assert run_tool(tools, "echo", {"n": {"deep": 3}}) == "error: argument 'n.deep' must be an array, got 3"


def test_json_tool_failures_are_observations(tmp_path):
    fail = [sys.executable, "-c", ("import sys; print('partial'); sys.stderr.write('bad things\\nhappened\\n'); "
                                   "sys.exit(3)")]
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    tools = load_tools(write_json(tmp_path, [
        json_tool("fail", fail), json_tool("slow", slow), json_tool("missing", ["/no/such/program-xyz"]),
    ]))
    assert run_tool(tools, "fail", {}) == "error: exit 3: bad things\nhappened"
    t0 = time.monotonic()
    assert run_tool(tools, "slow", {}, timeout=0.5) == "error: timed out after 0.5s"
    assert time.monotonic() - t0 < 5
    assert run_tool(tools, "missing", {}).startswith("error: cannot run /no/such/program-xyz: ")


def test_a_timeout_kills_what_the_command_started(tmp_path):
    # The child starts a grandchild that holds the output pipe: it must die too, or the read would wait for it.
    code = ("import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); "
            "time.sleep(30)")
    tools = load_tools(write_json(tmp_path, [json_tool("spawn", [sys.executable, "-c", code])]))
    t0 = time.monotonic()
    assert run_tool(tools, "spawn", {}, timeout=0.5) == "error: timed out after 0.5s"
    assert time.monotonic() - t0 < 5


def test_json_commands_run_in_the_files_folder(tmp_path):
    (tmp_path / "data.txt").write_text("from the folder")
    tools = load_tools(write_json(tmp_path, [json_tool("cat", [sys.executable, "-c",
                                                               "print(open('data.txt').read())"], {})]))
    assert run_tool(tools, "cat", {}) == "from the folder"


def test_malformed_json_names_file_and_line(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text('[\n  {"type": "function",\n   "function": {"name": "x"},\n   "command": ["true"],,\n  }\n]\n')
    with pytest.raises(ToolError, match=r"tools\.json:4:\d+: malformed JSON: "):
        load_tools(f)


def test_a_tools_file_too_deep_or_too_large_is_one_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)  # json's recursion limit: was a RecursionError traceback
    with pytest.raises(ToolError, match="deep.json: nested too deeply"):
        load_tools(deep)
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # sparse: no disk taken
    with pytest.raises(ToolError, match="big.json: .* too large for a tools file"):
        load_tools(big)


@pytest.mark.parametrize("entries, message", [
    ([json_tool("a", ["true"]), {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {}}}}], r"tool 1 \(b\): missing \"command\""),
    ([json_tool("a", [])], r"tool 0 \(a\): \"command\" must be a non-empty list"),
    ([json_tool("a", "prog 'unbalanced")], r"tool 0 \(a\): command: No closing quotation"),
    ([{"function": {"name": "a"}, "command": ["true"]}], r"tool 0 \(a\): expected \{\"type\": \"function\""),
    ([json_tool("a b", ["true"])], r"tool 0 \(a b\): the name must be"),
    ([json_tool("a", ["true"], {"x": "int"})], r"tool 0 \(a\): parameters must be a JSON schema"),
    ([json_tool("a", ["true"], required=["y"])], r"tool 0 \(a\): \"required\" must list names among the properties"),
    ([json_tool("a", ["true"]), json_tool("a", ["false"])], r"two tools are named 'a'"),
    ({"tools": []}, r"tools\.json: expected a list of tools"),
    ([], r"tools\.json: defines no tools"),
])
def test_bad_json_tool_entries(tmp_path, entries, message):
    with pytest.raises(ToolError, match=message):
        load_tools(write_json(tmp_path, entries))


def test_tool_error_is_a_value_error():
    assert issubclass(ToolError, ValueError)  # the CLI reports ValueErrors in one line


def test_a_result_that_is_not_unicode_comes_back_as_text_a_conversation_can_hold(tmp_path):
    """A function returning bytes decoded with surrogateescape: its lone surrogates would fail the next
    prompt's tokenization and /save; they come back replaced."""
    f = write(tmp_path, "t.py", '''
        def raw() -> str:
            """Bytes from a file, decoded as a shell would."""
            return b"caf\\xe9".decode("utf-8", "surrogateescape")
    ''')
    result = run_tool(load_tools(f), "raw", {})
    assert result.startswith("caf") and result.encode("utf-8")


def test_what_a_tool_gives_back_is_bounded(tmp_path, monkeypatch):
    """A command that writes without end, or more than any context holds, and a function returning as
    much: the chat keeps at most MAX_RESULT of it and says how much was cut."""
    import glm_mlx.tools as tools_module

    monkeypatch.setattr(tools_module, "MAX_RESULT", 1000)
    flood = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('y' * 65536)"]
    lots = [sys.executable, "-c", "import sys; sys.stdout.write('x' * 5000)"]
    tools = load_tools(write_json(tmp_path, [json_tool("flood", flood), json_tool("lots", lots)]))
    assert run_tool(tools, "flood", {}, timeout=1) == "error: timed out after 1s"
    assert run_tool(tools, "lots", {}) == "x" * 1000 + "\n[4000 more bytes of output cut]"
    f = write(tmp_path, "t.py", '''
        def big() -> str:
            """A long answer."""
            return "z" * 5000
    ''')
    assert run_tool(load_tools(f), "big", {}) == "z" * 1000 + "\n[4000 more characters cut]"
