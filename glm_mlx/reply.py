"""GLM-4.5's reply text -> reasoning, content and tool calls, whole or streamed.

What the model writes after `<|assistant|>`, up to its stop token:

    \\n<think>REASONING</think>\\nCONTENT
    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    </tool_call>

The chat template writes string values raw and everything else as JSON
(`v | tojson if v is not string else v`), so a value is typed by its tool's
schema when there is one, and otherwise JSON-decoded if it parses as JSON.

One state machine serves both forms: `parse_reply(text)` is a `ReplyStream`
fed the whole text at once. The stream holds back only what could still turn
into markup (a suffix that begins a tag, such as `<`, `<tool_`, `</think`) and
whitespace that may turn out to be trailing; everything else is emitted at
once. The joined "reasoning" events equal `reply.reasoning` exactly, and the
joined "content" events `reply.content` (both stripped).

How markup is read, and what is done with malformed markup (never an
exception; one line in `errors` per malformed call, and its raw text kept out
of the content and quoted in that line, for the user and the model to see):
- `<think>` opens reasoning only as the reply's first non-blank text; a
  `</think>` there without its opener is dropped. Later on, both are kept
  as literal text. Inside reasoning only `</think>` means anything: a call
  drafted there stays reasoning. An unclosed `<think>` (cut off) is all
  reasoning, which is not an error.
- Inside `<arg_value>` only `</arg_value>` ends the value, so a value may hold
  any other markup as text. A value that itself holds `</arg_value>` cannot be
  written in GLM's format at all.
- A call is malformed, and dropped, when it has no name or a name with
  whitespace in it, an `<arg_key>` without its `<arg_value>` (or the reverse),
  text other than whitespace between tags, a tag out of place, a duplicate
  key, a value that does not decode to its schema's type, a missing required
  argument, or (with `tools` given) a name no tool has. A value whose schema
  allows a string and other types is read as the other type when it decodes
  to one ("42" for ["string", "integer"] is 42). `tools=[]` means no
  tool is offered: every call is then an unknown tool.
- A call not closed before the reply ends, or before the next `<tool_call>`,
  is malformed. `<arg_key>`/`<arg_value>` outside any call start a malformed
  call that runs to the next `</tool_call>`. A stray closing tag
  (`</tool_call>`, `</arg_key>`, `</arg_value>`) is dropped with an error.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>",
         "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
_LONGEST = max(map(len, _TAGS))  # no tag is a prefix of another: each ends at its only '>'


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def to_openai(self, id: str) -> dict:
        """The call as an OpenAI chat message's `tool_calls` entry (arguments as a JSON string)."""
        return {"id": id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_reply(text: str, tools: list[dict] | None = None) -> Reply:
    """Split a whole reply (the text after `<|assistant|>`, without the stop
    token) into reasoning, content and tool calls; see the module docstring."""
    s = ReplyStream(tools)
    s.feed(text)
    s.finish()
    return s.reply


# -- lexing: text and tags, holding back a suffix that may still become a tag ----

def _lex(buf: str) -> tuple[list[tuple[bool, str]], str]:
    """(tokens, held): tokens are (is_tag, text); held is a possible tag's start."""
    out, start, i = [], 0, 0
    while (j := buf.find("<", i)) >= 0:
        tag = next((t for t in _TAGS if buf.startswith(t, j)), None)
        if tag is not None:
            if j > start:
                out.append((False, buf[start:j]))
            out.append((True, tag))
            start = i = j + len(tag)
        elif len(buf) - j < _LONGEST and any(t.startswith(buf[j:]) for t in _TAGS):
            if j > start:
                out.append((False, buf[start:j]))
            return out, buf[j:]
        else:
            i = j + 1
    if start < len(buf):
        out.append((False, buf[start:]))
    return out, ""


class _Channel:
    """Reasoning or content text, emitted stripped: leading whitespace is
    dropped, and whitespace is held until something other than whitespace
    follows it, so the joined events are exactly the stripped text."""

    def __init__(self, kind: str):
        self.kind, self.started, self.pending, self.parts = kind, False, "", []

    def add(self, text: str, events: list) -> None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return
        piece = self.pending + body
        self.pending = text[len(body):]
        self.parts.append(piece)
        events.append((self.kind, piece))


# -- one tool call's markup -> a ToolCall or an error line ---------------------------

class _Malformed(Exception):
    pass


@dataclass
class _Call:
    number: int
    headless: bool  # begun by <arg_key>/<arg_value> outside any <tool_call>
    tokens: list = field(default_factory=list)  # (is_tag, text) after the opening tag
    raw: list = field(default_factory=list)
    in_value: bool = False

    def add(self, is_tag: bool, text: str) -> None:
        self.raw.append(text)
        self.tokens.append((is_tag, text))
        if is_tag:
            self.in_value = text == "<arg_value>"

    def merged(self) -> list:
        """The tokens with adjacent texts joined (they arrive in pieces; joined once, at the end)."""
        out = []
        for is_tag, text in self.tokens:
            if not is_tag and out and not out[-1][0]:
                out[-1][1].append(text)
            else:
                out.append((is_tag, [text]))
        return [(is_tag, "".join(parts)) for is_tag, parts in out]

    def name(self) -> str:
        first = self.merged()[:1]
        return "" if self.headless or not first or first[0][0] else first[0][1].strip()


def _snippet(text: str, limit: int = 160) -> str:
    if len(text) > limit:
        text = text[: limit - 40] + " ... " + text[-35:]
    return repr(text)


def _structure(tokens: list) -> tuple[str, list[tuple[str, str]]]:
    """(name, [(key, raw value)]) of a closed call's tokens, or _Malformed."""
    i, n = 0, len(tokens)

    def text() -> str:  # the text token at i, if any, consumed
        nonlocal i
        if i < n and not tokens[i][0]:
            i += 1
            return tokens[i - 1][1]
        return ""

    def expect(tag: str, what: str) -> None:
        nonlocal i
        if i < n and tokens[i] == (True, tag):
            i += 1
            return
        if i >= n:
            raise _Malformed(f"{what}, found </tool_call>")
        raise _Malformed(f"{what}, found {tokens[i][1] if tokens[i][0] else _snippet(tokens[i][1], 40)}")

    name = text().strip()
    if not name:
        raise _Malformed("no tool name after <tool_call>")
    if any(c.isspace() or c in "<>" for c in name):
        raise _Malformed(f"the tool name {_snippet(name, 60)} is not one word")
    args = []
    while True:
        between = text()
        if between.strip():
            raise _Malformed(f"unexpected text {_snippet(between.strip(), 40)} between tags")
        if i >= n:
            return name, args
        if tokens[i] == (True, "<arg_value>"):
            raise _Malformed("<arg_value> without an <arg_key> before it")
        expect("<arg_key>", "expected <arg_key>")
        key = text().strip()
        expect("</arg_key>", f"<arg_key>{key} is not closed by </arg_key>")
        if not key:
            raise _Malformed("an empty <arg_key>")
        between = text()
        if between.strip():
            raise _Malformed(f"unexpected text {_snippet(between.strip(), 40)} after <arg_key>{key}</arg_key>")
        expect("<arg_value>", f"argument {key!r} has no <arg_value>")
        value = text()
        expect("</arg_value>", f"the value of {key!r} is not closed by </arg_value>")
        args.append((key, value))


# -- typing values by the tool's schema ----------------------------------------------

def _reject_constant(c: str):
    raise ValueError(f"{c} is not JSON")  # json.loads would take NaN/Infinity: "NaN" is a string


def _loads(raw: str):
    return json.loads(raw, parse_constant=_reject_constant)


_MISSING = object()


def _types(schema: dict) -> list[str] | None:
    """The JSON types a property schema allows; None when it does not say."""
    t = schema.get("type")
    if isinstance(t, str):
        t = [t]
    if isinstance(t, list):
        return t if all(x in _CHECK for x in t) else None
    for k in ("anyOf", "oneOf"):
        if isinstance(schema.get(k), list):
            out = []
            for sub in schema[k]:
                ts = _types(sub) if isinstance(sub, dict) else None
                if ts is None:
                    return None
                out += ts
            return out
    return None


def _as_int(v):
    if isinstance(v, bool):
        return _MISSING
    if isinstance(v, int):
        return v
    return int(v) if isinstance(v, float) and v.is_integer() else _MISSING


_CHECK = {
    "integer": _as_int,
    "number": lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else _MISSING,
    "boolean": lambda v: v if isinstance(v, bool) else _MISSING,
    "array": lambda v: v if isinstance(v, list) else _MISSING,
    "object": lambda v: v if isinstance(v, dict) else _MISSING,
    "null": lambda v: v if v is None else _MISSING,
    "string": lambda v: _MISSING,  # strings are taken raw, never decoded
}


def _value(key: str, raw: str, schema):
    types = _types(schema) if isinstance(schema, dict) else None
    if types is None:
        try:
            return _loads(raw)
        except (ValueError, RecursionError):
            return raw
    try:
        decoded = _loads(raw)
    except (ValueError, RecursionError):
        decoded = _MISSING
    if decoded is not _MISSING:
        for t in types:
            if (v := _CHECK[t](decoded)) is not _MISSING:
                return v
    if "string" in types:
        return raw
    raise _Malformed(f"argument {key!r} must be {' or '.join(types)}, got {_snippet(raw, 60)}")


def _schemas(tools: list[dict]) -> dict[str, dict]:
    out = {}
    for t in tools:
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"a tool schema without a function name: {str(t)[:80]}")
        out[f["name"]] = f.get("parameters") or {}
    return out


def _build(name: str, pairs: list[tuple[str, str]], schemas: dict | None) -> ToolCall:
    params = None
    if schemas is not None:
        if name not in schemas:
            known = ", ".join(schemas) if schemas else "none (no tools are available)"
            raise _Malformed(f"unknown tool; the tools are: {known}")
        params = schemas[name]
    props = (params or {}).get("properties") or {}
    args, problems = {}, []
    for key, raw in pairs:
        if key in args:
            problems.append(f"duplicate argument {key!r}")
            continue
        try:
            args[key] = _value(key, raw, props.get(key))
        except _Malformed as e:
            problems.append(str(e))
            args[key] = raw
    missing = [k for k in (params or {}).get("required") or [] if k not in args]
    if missing:
        problems.append(f"missing required argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if problems:
        raise _Malformed("; ".join(problems))
    return ToolCall(name, args)


# -- the stream -------------------------------------------------------------------------

class ReplyStream:
    """A reply parsed as it is generated: `feed` each decoded piece, `finish`
    at the end. Both return events, in the order of the text:
    ("reasoning", str), ("content", str), ("tool_call", ToolCall), ("error", str).
    Nothing of a tag or of a call's markup is ever emitted as text."""

    def __init__(self, tools: list[dict] | None = None):
        self._schemas = None if tools is None else _schemas(tools)
        self._state = "begin"  # begin (only blanks so far) | think | content | call
        self._held = ""
        self._reasoning, self._content = _Channel("reasoning"), _Channel("content")
        self._calls: list[ToolCall] = []
        self._errors: list[str] = []
        self._call: _Call | None = None
        self._ncalls = 0
        self._finished = False

    def feed(self, piece: str) -> list[tuple[str, object]]:
        if self._finished:
            raise RuntimeError("ReplyStream.feed() after finish()")
        tokens, self._held = _lex(self._held + piece)
        events: list = []
        for tok in tokens:
            self._step(*tok, events)
        return events

    def finish(self) -> list[tuple[str, object]]:
        """Flush at the end of generation: held text goes out as text, an unclosed call becomes an error."""
        if self._finished:
            return []
        events: list = []
        if self._held:
            self._step(False, self._held, events)
            self._held = ""
        if self._call is not None:
            self._close(events, "it is not closed: the reply ended inside it")
        self._finished = True
        return events

    @property
    def reply(self) -> Reply:
        """Everything fed so far, as parse_reply would read it (an unfinished stream is finished on a copy)."""
        s = self
        if not self._finished:
            s = copy.deepcopy(self, {id(self._schemas): self._schemas})
            s.finish()
        return Reply("".join(s._reasoning.parts), "".join(s._content.parts), list(s._calls), list(s._errors))

    # -- one token at a time

    def _step(self, is_tag: bool, text: str, events: list) -> None:
        state = self._state
        if state == "call":
            self._call_step(is_tag, text, events)
        elif state == "think":
            if is_tag and text == "</think>":
                self._state = "content"
            else:
                self._reasoning.add(text, events)
        elif not is_tag:
            self._content.add(text, events)
            if text.strip():
                self._state = "content"
        elif state == "begin" and text in ("<think>", "</think>"):
            self._state = "think" if text == "<think>" else "content"
        elif text in ("<tool_call>", "<arg_key>", "<arg_value>"):
            self._open(text != "<tool_call>", text)
        elif text in ("</tool_call>", "</arg_key>", "</arg_value>"):
            self._error(f"a stray {text} outside any tool call (dropped)", events)
        else:  # <think> or </think> after the reply began: plain text
            self._content.add(text, events)
            self._state = "content"

    def _open(self, headless: bool, tag: str) -> None:
        self._ncalls += 1
        self._call = _Call(self._ncalls, headless)
        self._state = "call"
        if headless:
            self._call.add(True, tag)
        else:
            self._call.raw.append(tag)

    def _call_step(self, is_tag: bool, text: str, events: list) -> None:
        call = self._call
        if is_tag and call.in_value and text != "</arg_value>":
            is_tag = False  # inside a value only its closing tag is markup
        if is_tag and text == "<tool_call>":
            self._close(events, "it is not closed before the next <tool_call>")
            self._open(False, text)
        elif is_tag and text == "</tool_call>":
            call.raw.append(text)
            self._close(events, None)
        else:
            call.add(is_tag, text)

    def _close(self, events: list, cut: str | None) -> None:
        call, self._call, self._state = self._call, None, "content"
        name = call.name().split()[0] if call.name() else ""
        try:
            if call.headless:
                raise _Malformed("<arg_key>/<arg_value> outside any <tool_call>")
            if cut:
                raise _Malformed(cut)
            tc = _build(*_structure(call.merged()), self._schemas)
        except _Malformed as e:
            who = f"tool call {call.number}" + (f" ({name})" if name else "")
            self._error(f"{who}: {e}; its markup: {_snippet(''.join(call.raw))}", events)
            return
        self._calls.append(tc)
        events.append(("tool_call", tc))

    def _error(self, message: str, events: list) -> None:
        self._errors.append(message)
        events.append(("error", message))
