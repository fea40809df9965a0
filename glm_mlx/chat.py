"""The chat: a conversation whose KV cache is kept between turns, and its REPL.

`ChatSession` owns the OpenAI-format message list and the cache. Each turn
renders the whole conversation with the folder's template, finds the longest
prefix of those tokens already in the cache, trims the cache to it and
prefills only the rest. GLM's template makes this pay: the token that ended
the last reply (`<|user|>`, `<|observation|>`) is the one the next prompt
continues with. Reasoning of earlier turns is dropped by the template once a
new user turn comes, and then that reply is prefilled again from the point
where the rendering changed: the cache always holds exactly what the
template says, never a stale variant.

`Repl` is the terminal around it. Everything the model, a tool or a file
controls is printed as plain text with its control characters escaped
(`visible`), a tool call is shown as the exact JSON it will be given, and
consent is asked only after the reply has ended, with what was typed ahead
discarded. No input, file or fault loses the conversation: each is one line
and the chat goes on, and an exit the user did not ask for writes the
conversation to a recovery file it names.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from jinja2.exceptions import TemplateError
from rich.text import Text

from .generate import Stats, fmt_bytes, fmt_rate, peak_rss_bytes, stream
from .model import Model
from .reply import ReplyStream, ToolCall
from .tokenizer import Tokenizer


class ContextFull(ValueError):
    """The conversation no longer fits the context limit."""


@dataclass
class TurnStats(Stats):
    """A turn's numbers; prompt_tokens counts only what was prefilled (not in the cache)."""

    context: int = 0
    limit: int = 0

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} new tokens, {fmt_rate(self.prompt_tps)} tokens/s | "
                f"generation: {self.generated} tokens, {fmt_rate(self.gen_tps)} tokens/s{self.drafts} | "
                f"context: {self.context}/{self.limit} | "
                f"peak memory: {fmt_bytes(mx.get_peak_memory())} (MLX), {fmt_bytes(peak_rss_bytes())} (process)")


@dataclass
class ChatSession:
    model: Model
    tokenizer: Tokenizer
    system: str | None = None
    tools: list[dict] | None = None  # OpenAI-style schemas, rendered into the system turn
    think: bool = True
    temp: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    context_limit: int | None = None
    kv_bits: int | None = None  # 8 or 4: a quantized KV cache
    mtp: bool = False  # speculative decoding, the MTP layer drafting (generate.speculative_tokens)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.context_limit = self.context_limit or self.model.args.max_position_embeddings
        self.cache = self.model.make_cache(self.kv_bits, mtp=self.mtp)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.last = TurnStats(limit=self.context_limit)

    # -- the conversation ------------------------------------------------------

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_tokens(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.conversation(), tools=self.tools or None,
                                                  add_generation_prompt=True, enable_thinking=self.think)
        return self.tokenizer.encode(text)

    def clear(self) -> None:
        self.messages.clear()

    def drop_oldest_turn(self) -> bool:
        """Forget the oldest user turn and everything up to the next one."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        del self.messages[: users[1]]
        return True

    def save(self, path: str | Path) -> Path:
        """Write the conversation as an OpenAI-format message list (tool arguments as JSON strings), whole
        or not at all: a temporary file beside it, renamed over it. Returns the path written."""
        out = []
        for m in self.conversation():
            m = dict(m)
            if "tool_calls" in m:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                    c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
            out.append(m)
        return write_atomically(Path(path).expanduser(), json.dumps(out, indent=1, ensure_ascii=False))

    def load(self, path: str | Path) -> list[str]:
        """Replace the conversation with a saved one (a message list, or {"messages": [...]}); a file that
        is not one is refused whole (ValueError naming it) and the conversation kept. Returns the keys
        it ignored."""
        path = Path(path).expanduser()
        msgs = read_json(path, MAX_CONVERSATION_BYTES)
        if isinstance(msgs, dict):
            msgs = msgs.get("messages")
        if not isinstance(msgs, list):
            raise ValueError(f"{path}: not a conversation (expected a list of messages with roles)")
        ignored: set[str] = set()
        msgs = [_checked_message(path, i, m, ignored) for i, m in enumerate(msgs)]
        system = None
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0].get("content"), msgs[1:]
        self.system, self.messages = system, msgs
        return sorted(ignored)

    # -- one reply ---------------------------------------------------------------

    def _reuse_cache(self, ids: list[int]) -> int:
        """Trim the cache to the longest prefix it shares with ids; return its length."""
        n = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # at least one token must go through to give logits
        for c in self.cache:
            c.trim(c.offset - n)
        self.cached = self.cached[:n]
        return n

    def stream_reply(self) -> Iterator[tuple[str, object]]:
        """Generate the assistant's reply to the conversation as events:
        ("reasoning" | "content", text), ("tool_call", ToolCall), ("error", message).
        The reply is appended to the messages when it ends (or is interrupted)."""
        ids = self.prompt_tokens()
        if len(ids) + 1 > self.context_limit:
            raise ContextFull(f"the conversation is {len(ids)} tokens; the context limit is {self.context_limit}")
        kept = self._reuse_cache(ids)
        budget = min(self.max_tokens, self.context_limit - len(ids))
        st = self.last = TurnStats(limit=self.context_limit)
        parser = ReplyStream(self.tools)
        try:
            for piece in stream(self.model, self.tokenizer, ids[kept:], self.cache, temp=self.temp,
                                top_p=self.top_p, max_tokens=budget, stats=st):
                yield from parser.feed(piece)
            yield from parser.finish()
        finally:
            # Ctrl-C can land between two layers' cache updates: keep what all layers hold.
            n = min(c.offset for c in self.cache)
            for c in self.cache:
                c.trim(c.offset - n)
            self.cached = (ids + st.tokens)[:n]
            st.context = n
            self._append(parser.reply)

    def _append(self, reply) -> None:
        msg: dict = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            msg["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            # arguments kept as a mapping: GLM's template iterates them (save() writes OpenAI's JSON strings)
            msg["tool_calls"] = [{"id": f"call_{len(self.messages)}_{i}", "type": "function",
                                  "function": {"name": c.name, "arguments": dict(c.arguments)}}
                                 for i, c in enumerate(reply.tool_calls)]
        self.messages.append(msg)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_tool_result(self, call: ToolCall, result: str, call_id: str | None = None) -> None:
        msg = {"role": "tool", "name": call.name, "content": result}
        if call_id:
            msg["tool_call_id"] = call_id
        self.messages.append(msg)


# -- conversation files ------------------------------------------------------------

MAX_CONVERSATION_BYTES = 32 << 20  # a 128K-token context is well under 1 MB of text
MAX_NESTING = 64  # how deep a tool call's arguments may nest (the template renders them recursively)
_KEYS = {"system": {"content"}, "user": {"content"}, "assistant": {"content", "reasoning_content", "tool_calls"},
         "tool": {"content", "name", "tool_call_id"}}


def read_json(path: Path, limit: int):
    """The JSON value of a regular file of at most `limit` bytes; ValueError naming the file otherwise."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
        if regular:  # a FIFO would block, /dev/zero never ends
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ValueError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not regular:
        raise ValueError(f"{path}: not a regular file")
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit >> 20} MB, more than any conversation")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def _checked_message(path: Path, i: int, m, ignored: set[str]) -> dict:
    """Message i of a loaded conversation in the shape the template and the chat expect, or ValueError
    saying what is wrong with it. Keys the chat does not use are dropped (and named in `ignored`)."""
    where = f"{path}: message {i}"
    if not isinstance(m, dict) or m.get("role") not in _KEYS:
        raise ValueError(f"{where}: expected an object with a role ({', '.join(_KEYS)})")
    out = {"role": m["role"]}
    for k, v in m.items():
        if k == "role":
            continue
        if k not in _KEYS[m["role"]]:
            ignored.add(k)
        elif k == "tool_calls":
            if v is not None:
                out[k] = [_checked_call(f"{where}: tool call {j}", c) for j, c in enumerate(_list(where, k, v))]
        elif v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: {k} must be text, got {type(v).__name__}")
        elif v is not None:
            out[k] = _text(where, k, v)
    return out


def _list(where: str, key: str, v) -> list:
    if not isinstance(v, list):
        raise ValueError(f"{where}: {key} must be a list")
    return v


def _text(where: str, key: str, v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: {key} holds an escape that is no Unicode character (a lone surrogate)") from None
    return v


def _checked_call(where: str, c) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: expected {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI's form: a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{where}: arguments are not JSON: {args[:60]!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: arguments must be a JSON object")
    _check_value(where, args, 0)
    out = {"id": c["id"]} if isinstance(c.get("id"), str) else {}
    # arguments kept as a mapping: GLM's template iterates them (save() writes JSON strings again)
    return {**out, "type": "function", "function": {"name": _text(where, "name", fn["name"]), "arguments": args}}


def _check_value(where: str, v, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ValueError(f"{where}: arguments nested deeper than {MAX_NESTING} levels")
    if isinstance(v, str):
        _text(where, "arguments", v)
    elif isinstance(v, dict):
        for k, x in v.items():
            _text(where, "arguments", k)
            _check_value(where, x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_value(where, x, depth + 1)


def write_atomically(path: Path, text: str) -> Path:
    """Write text to path whole or not at all: a temporary file in its folder, flushed, then renamed over
    it. An existing file keeps its permissions; a new one is readable by its owner only (a conversation
    may be private). ValueError naming the path when it cannot be written."""
    try:
        data = text.encode("utf-8")
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else 0o600
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot write it ({getattr(e, 'strerror', None) or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)  # ours: made above
        if isinstance(e, OSError):
            raise ValueError(f"{path}: cannot write it ({e.strerror or e})") from None
        raise
    return path


def glm_home() -> Path:
    """Where glm-mlx keeps its own files: $GLM_MLX_HOME, else ~/.cache/glm-mlx."""
    return Path(os.environ.get("GLM_MLX_HOME", Path.home() / ".cache" / "glm-mlx"))


# -- what reaches the terminal -------------------------------------------------------

# Shown escaped: control characters but newline and tab (ANSI sequences, \r, backspace), DEL, C1 controls,
# and the characters that hide or reorder text (zero width space, line separators, bidi overrides and
# isolates, word joiner, BOM, Unicode tag characters).
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2028-\u202e\u2060-\u2069\ufeff\U000e0000-\U000e007f]")
_SHORT = {"\b": "\\b", "\f": "\\f", "\r": "\\r"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _SHORT:
        return _SHORT[c]
    n = ord(c)
    if n > 0xFFFF:  # as JSON writes it: a surrogate pair
        n -= 0x10000
        return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
    return f"\\u{n:04x}"


def visible(text: str) -> str:
    """text with every character that could hide, move or restyle what the terminal shows written as
    its JSON escape (\\u001b, \\r, ...); newlines and tabs kept. Inside a JSON string the result is
    still JSON for the same value."""
    return _HIDDEN.sub(_escape, text)


def shown_arguments(arguments: dict) -> str:
    """A call's arguments as the JSON a tool is given (one line), every hidden character escaped."""
    return visible(json.dumps(arguments, ensure_ascii=False))


def _plain(text: str, style: str = "") -> Text:
    return Text(visible(text), style=style)


def discard_typeahead() -> bool:
    """Drop what was typed at the terminal and not read yet (a `y` typed while a reply streamed must
    not answer the question that follows). True when something was dropped."""
    try:
        import fcntl
        import struct
        import termios

        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return False
        pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        termios.tcflush(fd, termios.TCIFLUSH)
        return pending > 0
    except (ImportError, OSError, ValueError):  # no terminal, or not a POSIX one
        return False


@contextmanager
def terminal_input(history: Path | None) -> Iterator[Callable[[str], None]]:
    """Input for the chat: bytes that are not UTF-8 arrive as surrogate escapes (so the chat can refuse
    the line instead of failing), and at a terminal the standard library's readline gives line editing
    and a history kept in `history` across chats. Yields `remember(line)`, which adds a line to it."""
    if callable(getattr(sys.stdin, "reconfigure", None)):
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        if not sys.stdin.isatty():
            raise ImportError
        import readline
    except (ImportError, ValueError, AttributeError):  # no readline, or stdin closed or absent
        yield lambda line: None
        return
    readline.set_auto_history(False)  # answers to questions stay out of it
    readline.set_history_length(1000)
    if history is not None and history.is_file():
        try:
            readline.read_history_file(history)
        except OSError:
            pass  # unreadable history: start a new one
    try:
        yield readline.add_history
    finally:
        if history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
                os.chmod(history, 0o600)  # what was typed may be private
            except OSError:
                pass  # a history that cannot be written loses nothing of the conversation


class _Stop(Exception):
    """The user stopped at a question (Ctrl-C or Ctrl-D): back to the prompt."""


# -- the REPL -------------------------------------------------------------------------

HELP = """commands:
  /think, /nothink     reasoning on or off (the template's enable_thinking)
  /clear               forget the conversation
  /system TEXT         set the system prompt (empty: none)
  /save FILE           write the conversation as OpenAI-format JSON
  /load FILE           read one back
  /stats               speed, context and memory of the last reply
  /help                this
  /exit                leave (Ctrl-D too)
a line ending in \\ continues on the next; \"\"\" starts and ends a multi-line block.
Up and down recall earlier messages. Ctrl-C stops a reply or a tool and keeps the conversation;
at a question it answers no."""

MAX_TOOL_ROUNDS = 16
RESULT_SHOWN = 2000  # characters of a tool's result printed (the model reads all of it)
# A turn that fails on these says so in a line and the chat goes on: an experts file that cannot be read,
# a template that refuses the conversation.
TURN_ERRORS = (ValueError, OSError, TemplateError)


class Repl:
    def __init__(self, session: ChatSession, console, tools: dict | None = None, *, show_thinking: bool = True,
                 approve_all: bool = False, ask=input, remember: Callable[[str], None] = lambda line: None):
        self.s, self.console, self.tools = session, console, tools or {}
        self.show_thinking, self.approve_all, self.ask, self.remember = show_thinking, approve_all, ask, remember
        self.midline = False  # streamed text left the cursor mid-line

    def end_line(self) -> None:
        if self.midline:
            self.console.print()
            self.midline = False

    def say(self, text: str, style: str = "dim") -> None:
        """One line of ours; whatever it quotes is printed as plain text, hidden characters escaped."""
        self.console.print(_plain(text, style), highlight=False, soft_wrap=True)

    def read(self, prompt: str, remember: bool = True) -> str:
        line = self.ask(prompt)
        if any("\udc80" <= c <= "\udcff" for c in line):  # surrogate escapes: bytes that are not UTF-8
            raise UnicodeError("that line is not UTF-8 text; it was not sent")
        if remember and line.strip():
            self.remember(line)
        return line

    def read_message(self) -> str | None:
        """One user message (multi-line aware), or None at end of input."""
        try:
            first = self.read("> ")
        except EOFError:
            return None
        lines = []
        try:
            if first.strip() == '"""':
                while (line := self.read(". ")).strip() != '"""':
                    lines.append(line)
                return "\n".join(lines)
            lines = [first]
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                lines.append(self.read(". "))
        except EOFError:  # the input ended inside the message: send what there is
            self.console.print()
        return "\n".join(lines)

    def run(self) -> None:
        """The chat until /exit or the end of input. Any other way out (an error the chat does not know,
        SIGTERM, SIGHUP) first writes the conversation to a recovery file and names it."""
        with _signals_raise():
            try:
                self.loop()
            except BaseException:
                self.recover()
                raise

    def loop(self) -> None:
        self.say("glm-mlx chat: /help for commands, Ctrl-D to leave")
        while True:
            try:
                text = self.read_message()
                if text is None or text.strip() == "/exit":
                    return
                if not text.strip():
                    continue
                if text.startswith("/"):
                    self.command(text.strip())
                    continue
            except KeyboardInterrupt:
                self.console.print()
                self.say("(/exit or Ctrl-D to leave)")
                continue
            except UnicodeError as e:
                self.say(f"error: {e}", "red")
                continue
            self.s.add_user(text)
            try:
                self.turn()
            except KeyboardInterrupt:  # between the steps turn() guards: the conversation is as it was left
                self.end_line()
                self.say("[interrupted]", "yellow")

    def recover(self) -> Path | None:
        """Write the conversation to a new recovery file (if it has any messages) and say where."""
        if not self.s.messages:
            return None
        name = time.strftime("recovered-%Y%m%d-%H%M%S") + f"-{os.getpid()}.json"
        for folder in (glm_home() / "chats", Path(tempfile.gettempdir())):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = self.s.save(folder / name)
                break
            except (OSError, ValueError):
                continue
        else:
            return None
        try:
            self.say(f"the conversation was saved to {path} (/load it to go on)", "yellow")
        except OSError:  # the terminal is gone (SIGHUP)
            pass
        return path

    def command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        s, arg = self.s, arg.strip()
        if cmd in ("/think", "/nothink"):
            s.think = cmd == "/think"
            self.say(f"reasoning {'on' if s.think else 'off'}")
        elif cmd == "/clear":
            s.clear()
            self.say("conversation cleared")
        elif cmd == "/system":
            s.system = arg or None
            self.say(f"system prompt {'set' if s.system else 'removed'}")
        elif cmd in ("/save", "/load") and not arg:
            self.say(f"{cmd} needs a file name", "red")
        elif cmd == "/save":
            try:
                path = s.save(arg)
                self.say(f"saved {len(s.conversation())} messages to {path}")
            except ValueError as e:
                self.say(f"error: {e}", "red")
        elif cmd == "/load":
            try:
                ignored = s.load(arg)
                self.say(f"loaded {len(s.conversation())} messages"
                         + (f" (ignored: {', '.join(ignored)})" if ignored else ""))
            except ValueError as e:
                self.say(f"error: {e} (the conversation is unchanged)", "red")
        elif cmd == "/stats" and not s.last.prompt_tokens:
            self.say("no reply yet")
        elif cmd == "/stats":
            self.say(s.last.line())
            from .offload import offloaded_banks, offloaded_stats

            if (total := offloaded_stats(s.model)) is not None:
                self.say(total.line())
                for bank in offloaded_banks(s.model):
                    self.say(f"  layer {bank.file.layer}: {bank.stats.line()}")
        elif cmd == "/help":
            self.console.print(HELP, markup=False, highlight=False)
        else:
            self.say(f"unknown command {cmd} (/help lists them)", "red")

    def turn(self) -> None:
        """Replies, tool calls and their results, until the model answers in text."""
        for _ in range(MAX_TOOL_ROUNDS):
            try:
                calls, errors = self.reply()
            except ContextFull as e:
                if not self.make_room(str(e)):
                    return
                continue
            except KeyboardInterrupt:
                self.end_line()
                self.say("[interrupted]", "yellow")
                return
            except TURN_ERRORS as e:
                self.end_line()
                self.say(f"error: {e} (the conversation is kept: /save writes it)", "red")
                return
            if not calls and not errors:
                return
            for err in errors:  # the model hears of its malformed call, as an observation
                self.s.add_tool_result(ToolCall("invalid_tool_call", {}), f"error: {err}")
            stopped = False
            for call, call_id in calls:  # every call gets its result, so the conversation stays well formed
                if stopped:
                    result = "error: not run: the user stopped before it"
                else:
                    try:
                        result = self.run_call(call)
                    except _Stop as e:
                        stopped, result = True, f"error: {e}"
                self.s.add_tool_result(call, result, call_id)
            if stopped:
                return
        self.say(f"stopped after {MAX_TOOL_ROUNDS} rounds of tool calls", "yellow")

    def reply(self):
        """Stream one reply: its text, each tool call as it closes, then the stats line."""
        calls, errors, mode = [], [], None
        events = self.s.stream_reply()
        try:
            for kind, value in events:
                if kind in ("reasoning", "content"):
                    if kind == "reasoning" and not self.show_thinking:
                        continue
                    if mode != kind:
                        self.end_line()
                    mode, self.midline = kind, True
                    self.console.print(_plain(value, "dim" if kind == "reasoning" else ""), end="",
                                       highlight=False, soft_wrap=True)
                    continue
                self.end_line()
                mode = "call"
                if kind == "tool_call":
                    calls.append(value)
                    self.console.print(Text.assemble(("tool call ", "bold cyan"), visible(
                        f"{value.name}({shown_arguments(value.arguments)})")), highlight=False, soft_wrap=True)
                elif kind == "error":
                    errors.append(value)
                    self.say(f"malformed tool call: {value}", "red")
        finally:
            events.close()  # the reply is appended to the conversation now, not when it is collected
        self.end_line()
        ids = [c["id"] for c in self.s.messages[-1].get("tool_calls", [])]
        self.say(self.s.last.line())
        return list(zip(calls, ids)), errors

    def run_call(self, call: ToolCall) -> str:
        """Ask (unless always), run, show the result; the text the model reads. _Stop when the user
        stopped at the question or while the tool ran."""
        from .tools import run_tool

        if call.name not in self.tools:
            return f"error: no tool named {call.name!r}"
        if not self.approve_all:
            try:
                answer = self.question(f"run {call.name}({shown_arguments(call.arguments)})? "
                                       "[y]es / [n]o / [a]lways: ")
            except _Stop as e:
                self.say(f"{e}: the tool was not run", "yellow")
                raise _Stop("the user declined to run this tool") from None
            if answer in ("a", "always"):
                self.approve_all = True
            elif answer not in ("y", "yes"):
                return "error: the user declined to run this tool"
        try:
            result = run_tool(self.tools, call.name, call.arguments)
        except KeyboardInterrupt:
            self.say("[interrupted] the tool was stopped", "yellow")
            raise _Stop("the user stopped the tool before it finished") from None
        shown = result if len(result) <= RESULT_SHOWN else \
            result[:RESULT_SHOWN] + f" ... ({len(result) - RESULT_SHOWN} more characters)"
        self.say(shown)
        return result

    def question(self, prompt: str) -> str:
        """The user's answer to a question, lower-cased; only what is typed after it is asked counts.
        Ctrl-C or Ctrl-D: _Stop."""
        if discard_typeahead():
            self.say("(what was typed before this question was discarded)", "yellow")
        try:
            return self.read(visible(prompt), remember=False).strip().lower()
        except (KeyboardInterrupt, EOFError) as e:
            self.console.print()
            raise _Stop("[interrupted]" if isinstance(e, KeyboardInterrupt) else "no answer (end of input)") from None
        except UnicodeError:
            return ""

    def make_room(self, why: str) -> bool:
        """The conversation outgrew the context: ask what to drop. False: give up this turn."""
        self.say(why, "yellow")
        try:
            answer = self.question("[c]lear the conversation, [d]rop the oldest turns, "
                                   "or [k]eep it and skip this message? ")[:1]
        except _Stop:
            answer = "k"
        if answer == "c":
            last = self.s.messages[-1]
            self.s.clear()
            self.s.messages.append(last)
            return True
        if answer == "d":
            while self.s.drop_oldest_turn():
                if len(self.s.prompt_tokens()) + 1 <= self.s.context_limit:
                    return True
            self.say("even the last turn alone does not fit", "yellow")
        if self.s.messages and self.s.messages[-1]["role"] == "user":
            self.s.messages.pop()
        return False


@contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP (the terminal closed) raise SystemExit while the chat runs, so that it can
    save the conversation on the way out."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)

    import threading

    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

