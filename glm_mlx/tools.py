"""Tools for `glm-mlx chat --tools FILE`.

A `.py` file: each public function defined in it that has a docstring is a
tool; its schema comes from the type hints and the docstring (the first
paragraph describes the tool, `Args:` or `:param` lines its parameters), in
the form transformers' `get_json_schema` gives. A `.json` file: a list of
OpenAI-style schemas, each with a `command` that gets the arguments as JSON
on stdin and answers on stdout.

Running a tool never raises: bad arguments, a failing function or command
and a timeout all come back as an `error: ...` text, the observation the
model reads next. What comes back is bounded (MAX_RESULT, and a note of what
was cut), however much the tool writes.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union


@dataclass
class Tool:
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}
    run: Callable[[dict], str]  # arguments -> the result text the model reads

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


class ToolError(ValueError):
    """A tools file that cannot be used; the message names the file (and line where known)."""


def load_tools(path: str | Path) -> dict[str, Tool]:
    """The tools a .py or .json file defines, by name."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: no such tools file")
    if path.suffix == ".py":
        tools = _python_tools(path)
    elif path.suffix == ".json":
        tools = _json_tools(path)
    else:
        raise ToolError(f"{path}: a tools file is a .py file of functions or a .json file of schemas")
    if not tools:
        raise ToolError(f"{path}: defines no tools" + (" (public functions with a docstring become tools)"
                                                        if path.suffix == ".py" else ""))
    out: dict[str, Tool] = {}
    for t in tools:
        if t.name in out:
            raise ToolError(f"{path}: two tools are named {t.name!r}")
        out[t.name] = t
    return out


def run_tool(tools: dict[str, Tool], name: str, arguments: dict, timeout: float = 60.0) -> str:
    """Run one call; the result, or an `error: ...` text for the model, never an exception.

    A command is killed at the timeout. A Python function cannot be: it runs in
    a daemon thread that is abandoned at the timeout (it cannot hold up exit).
    """
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r} (the tools are: {', '.join(tools) or 'none'})"
    if isinstance(tool.run, _Command):
        return tool.run(arguments, timeout)  # its output bounded as it is read, and decoded
    result = _in_thread(tool, arguments, timeout)
    if len(result) > MAX_RESULT:
        result = result[:MAX_RESULT] + f"\n[{len(result) - MAX_RESULT} more characters cut]"
    # lone surrogates (a function that decoded bytes with surrogateescape) would fail the next prompt's
    # tokenization and /save
    return result.encode("utf-8", "replace").decode("utf-8")


def _in_thread(tool: Tool, arguments: dict, timeout: float) -> str:
    box: list[str] = []

    def work():
        try:
            box.append(tool.run(arguments))
        except BaseException as e:  # noqa: BLE001 - whatever the tool does, the chat goes on
            box.append(f"error: {_exception_text(e)}")

    worker = threading.Thread(target=work, name=f"tool {tool.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"error: timed out after {timeout:g}s"
    return box[0]


# -- Python files ------------------------------------------------------------------

def _python_tools(path: Path) -> list[Tool]:
    module_name = "glm_mlx_tools_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[module_name]
        line = f":{e.lineno}" if e.lineno else ""  # none for a NUL byte
        raise ToolError(f"{path}{line}: syntax error: {e.msg}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module may raise anything
        del sys.modules[module_name]
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise ToolError(f"{where}: loading it raised {_exception_text(e)}") from None
    tools = []
    for name, fn in vars(module).items():
        if inspect.isfunction(fn) and fn.__module__ == module_name and not name.startswith("_") and fn.__doc__:
            schema = schema_from_function(fn)
            tools.append(Tool(schema, _PythonRun(fn, schema["function"]["parameters"])))
    return tools


def schema_from_function(fn) -> dict:
    """The OpenAI-style schema of a typed function with a Google-style (or :param) docstring."""
    where = f"{fn.__code__.co_filename}:{fn.__code__.co_firstlineno}: {fn.__name__}()"
    doc = inspect.cleandoc(fn.__doc__ or "")
    description, described = _parse_docstring(doc)
    if not description:
        raise ToolError(f"{where}: the docstring's first paragraph, the tool's description, is empty")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 - a hint naming something undefined
        raise ToolError(f"{where}: cannot resolve its type hints ({e})") from None
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolError(f"{where}: parameter {p.name!r} is not a named parameter; tools take named arguments")
        if p.name not in hints:
            raise ToolError(f"{where}: parameter {p.name!r} has no type hint (the model needs its type)")
        if p.name not in described:
            raise ToolError(f"{where}: parameter {p.name!r} is not described in the docstring "
                            f"(add `{p.name}: what it is` under Args:)")
        try:
            properties[p.name] = {**_json_type(hints[p.name]), "description": described[p.name]}
        except TypeError as e:
            raise ToolError(f"{where}: parameter {p.name!r}: {e}") from None
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"type": "function",
            "function": {"name": fn.__name__, "description": description, "parameters": parameters}}


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_SUPPORTED = "str, int, float, bool, list[...], dict[str, ...], Literal[...], Optional[...] and unions of these"


def _json_type(hint) -> dict:
    """JSON schema of a type hint, in the shapes transformers' get_json_schema writes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint is list or hint is dict:
        return {"type": "array" if hint is list else "object"}
    if origin in (Union, types.UnionType):
        subs = [_json_type(a) for a in args if a is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal:
        if any(type(a) not in _SCALARS for a in args):
            raise TypeError(f"Literal values must be str, int, float, bool or None, got {hint}")
        kinds = list(dict.fromkeys(_SCALARS[type(a)] for a in args))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _json_type(args[0])} if args else {"type": "array"}
    if origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{hint}: JSON object keys are strings")
        return {"type": "object", "additionalProperties": _json_type(args[1])} if args else {"type": "object"}
    raise TypeError(f"cannot describe {getattr(hint, '__name__', hint)!s} in JSON schema (use {_SUPPORTED})")


_SECTION = re.compile(r"(Args|Arguments|Returns|Yields|Raises|Examples?|Notes?):\s*$")
_ARG = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:(.*)$")  # name: text, or name (type): text
_PARAM = re.compile(r":param\s+(?:[^:]*\s)?(\w+)\s*:(.*)$")  # :param name: text, or :param type name: text


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the first paragraph, {parameter: description}) of a cleaned docstring."""
    lines = doc.splitlines()
    first = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()) or line.lstrip().startswith(":"):
            break
        first.append(line.strip())
    described: dict[str, list[str]] = {}

    def indent(s):
        return len(s) - len(s.lstrip())

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() in ("Args:", "Arguments:"):  # Google style: entries one level in, continuations deeper
            header, entry, i = indent(line), None, i + 1
            while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > header):
                if lines[i].strip():
                    entry = indent(lines[i]) if entry is None else entry
                    m = _ARG.match(lines[i].strip()) if indent(lines[i]) == entry else None
                    if m:
                        name = m.group(1)
                        described[name] = [m.group(2).strip()]
                    elif described:
                        described[name].append(lines[i].strip())
                i += 1
            continue
        m = _PARAM.match(line.strip())
        if m:
            name, at, i = m.group(1), indent(line), i + 1
            described[name] = [m.group(2).strip()]
            while i < len(lines) and lines[i].strip() and indent(lines[i]) > at \
                    and not lines[i].lstrip().startswith(":"):
                described[name].append(lines[i].strip())
                i += 1
            continue
        i += 1
    return " ".join(first), {k: " ".join(p for p in v if p) for k, v in described.items() if any(v)}


class _PythonRun:
    """Calls a function with checked arguments; its result as text."""

    def __init__(self, fn, parameters: dict):
        self.fn, self.parameters = fn, parameters

    def __call__(self, arguments: dict) -> str:
        problem = _arguments_problem(arguments, self.parameters)
        if problem:
            return f"error: {problem}"
        try:
            result = self.fn(**arguments)
        except Exception as e:  # noqa: BLE001 - the model reads what went wrong
            return f"error: {_exception_text(e)}"
        if isinstance(result, str):
            return result
        return json.dumps(result, ensure_ascii=False, default=str)


def _exception_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# -- JSON files --------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule; GLM's call format ends the name at a newline


MAX_TOOLS_FILE = 16 << 20  # schemas for a chat: a file larger is not one


def _json_tools(path: Path) -> list[Tool]:
    if (size := path.stat().st_size) > MAX_TOOLS_FILE:
        raise ToolError(f"{path}: {size} bytes, too large for a tools file (at most {MAX_TOOLS_FILE >> 20} MB)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ToolError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise ToolError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ToolError(f"{path}: nested too deeply to be tool schemas") from None
    if not isinstance(entries, list):
        raise ToolError(f"{path}: expected a list of tools, each {{\"type\": \"function\", \"function\": {{...}}, "
                        f"\"command\": [...]}}")
    return [_json_tool(path, i, entry) for i, entry in enumerate(entries)]


def _json_tool(path: Path, i: int, entry) -> Tool:
    fn = entry.get("function") if isinstance(entry, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    where = f"{path}: tool {i}" + (f" ({name})" if isinstance(name, str) else "")
    if not isinstance(fn, dict) or entry.get("type") != "function":
        raise ToolError(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                        f"\"parameters\"}}, \"command\": ...}}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"{where}: the name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    if not isinstance(fn.get("description", ""), str):
        raise ToolError(f"{where}: the description must be a string")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not (isinstance(params, dict) and params.get("type") == "object"
            and isinstance(params.get("properties", {}), dict)
            and all(isinstance(p, dict) for p in params.get("properties", {}).values())):
        raise ToolError(f"{where}: parameters must be a JSON schema {{\"type\": \"object\", \"properties\": {{...}}}}")
    required = params.get("required", [])
    if not isinstance(required, list) or any(r not in params.get("properties", {}) for r in required):
        raise ToolError(f"{where}: \"required\" must list names among the properties")
    if "command" not in entry:
        raise ToolError(f"{where}: missing \"command\" (a list [\"program\", \"arg\", ...] or a string)")
    command = entry["command"]
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as e:
            raise ToolError(f"{where}: command: {e}") from None
    if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
        raise ToolError(f"{where}: \"command\" must be a non-empty list of strings or a string")
    schema = {k: v for k, v in entry.items() if k != "command"}
    return Tool(schema, _Command(command, params, path.parent))


class _Command:
    """Runs a program (no shell), the arguments as JSON on stdin, its stdout the result.

    It runs in the tools file's folder, in a session of its own so that a
    timeout or Ctrl-C kills everything it started.
    """

    def __init__(self, argv: list[str], parameters: dict, cwd: Path):
        self.argv, self.parameters, self.cwd = argv, parameters, cwd

    def __call__(self, arguments: dict, timeout: float = 60.0) -> str:
        problem = _arguments_problem(arguments, self.parameters)
        if problem:
            return f"error: {problem}"
        data = json.dumps(arguments, ensure_ascii=False).encode()
        try:
            p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=self.cwd, start_new_session=True)
        except OSError as e:
            return f"error: cannot run {self.argv[0]}: {e.strerror or e}"
        # communicate(), with what is kept of the output bounded: a command that writes without end
        # must not take the chat's memory with it.
        out = err = None
        deadline = time.monotonic() + timeout
        try:
            out, err = _Capped(p.stdout, MAX_RESULT), _Capped(p.stderr, 4096, tail=True)
            threading.Thread(target=_feed, args=(p.stdin, data), daemon=True).start()
            p.wait(timeout)
            for r in (out, err):  # a process it started may still hold the pipes
                r.thread.join(max(0.0, deadline - time.monotonic()))
                if r.thread.is_alive():
                    raise subprocess.TimeoutExpired(self.argv, timeout)
        except subprocess.TimeoutExpired:
            self._kill(p, out, err)
            return f"error: timed out after {timeout:g}s"
        except BaseException:
            self._kill(p, out, err)
            raise
        if p.returncode != 0:
            tail = err.data.decode(errors="replace").strip()[-500:]
            return f"error: exit {p.returncode}: {tail}" if tail else f"error: exit {p.returncode}"
        text = out.data.decode(errors="replace")
        return text + f"\n[{out.dropped} more bytes of output cut]" if out.dropped else text.rstrip("\n")

    @staticmethod
    def _kill(p: subprocess.Popen, *readers: "_Capped | None") -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        for r in readers:  # at the end of the pipes now, unless something left the process group
            if r is not None:
                r.thread.join(5)


MAX_RESULT = 1 << 20  # bytes of a command's output, characters of a function's result, the model is given


class _Capped:
    """Reads a pipe to its end in a thread, keeping its first `limit` bytes (or, with `tail`, its last)
    and counting the rest."""

    def __init__(self, pipe, limit: int, tail: bool = False):
        self.data, self.dropped = bytearray(), 0
        self.thread = threading.Thread(target=self._read, args=(pipe, limit, tail), daemon=True)
        self.thread.start()

    def _read(self, pipe, limit: int, tail: bool) -> None:
        with pipe:
            while chunk := pipe.read1(1 << 16):
                self.data += chunk
                if len(self.data) > limit:
                    self.dropped += len(self.data) - limit
                    if tail:
                        del self.data[: len(self.data) - limit]
                    else:
                        del self.data[limit:]


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, OSError):  # the command did not read its arguments: its affair
        pass


# -- arguments against the schema --------------------------------------------------

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "an array", "object": "an object", "null": "null"}
_PY = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
       "null": type(None)}


def _arguments_problem(arguments, parameters: dict) -> str | None:
    """What is wrong with a call's arguments, in a line for the model; None if nothing."""
    if not isinstance(arguments, dict):
        return f"the arguments must be an object, got {_show(arguments)}"
    return _object_problem(arguments, parameters, "", top=True)


def _object_problem(value: dict, schema: dict, prefix: str, top: bool = False) -> str | None:
    props = schema.get("properties") or {}
    for name in schema.get("required", []):
        if name not in value:
            return f"missing argument '{prefix}{name}'"
    extra = schema.get("additionalProperties", not top)
    for name, v in value.items():
        if name in props:
            problem = _value_problem(v, props[name], f"{prefix}{name}")
        elif isinstance(extra, dict):
            problem = _value_problem(v, extra, f"{prefix}{name}")
        elif not extra:
            known = ", ".join(props) or "none"
            problem = f"unknown argument '{prefix}{name}' (the arguments are: {known})"
        else:
            problem = None
        if problem:
            return problem
    return None


def _value_problem(value: Any, schema: dict, where: str) -> str | None:
    if not isinstance(schema, dict) or (value is None and schema.get("nullable")):
        return None
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if kinds and not any(_is(value, k) for k in kinds):
        return f"argument '{where}' must be {' or '.join(_TYPE_NAMES.get(k, k) for k in kinds)}, got {_show(value)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(_same(e, value) for e in enum):
        return f"argument '{where}' must be one of {', '.join(_show(e) for e in enum)}, got {_show(value)}"
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and all(_value_problem(value, s, where) for s in schema[key]):
            return f"argument '{where}' matches none of its allowed forms, got {_show(value)}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = _value_problem(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict) and ("properties" in schema or "required" in schema
                                    or isinstance(schema.get("additionalProperties"), (dict, bool))):
        return _object_problem(value, schema, f"{where}.")
    return None


def _same(a, b) -> bool:
    # JSON's equality: 1 == 1.0, but true is not 1
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return a == b and (type(a) is type(b) or num(a) and num(b))


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return kind not in _PY or isinstance(value, _PY[kind])


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."
