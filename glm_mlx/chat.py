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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .generate import Stats, fmt_bytes, peak_rss_bytes, stream
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
        return (f"prompt: {self.prompt_tokens} new tokens, {self.prompt_tps:.1f} tokens/s | "
                f"generation: {self.generated} tokens, {self.gen_tps:.1f} tokens/s{self.drafts} | "
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
        self.last = TurnStats()

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

    def save(self, path: str | Path) -> None:
        """The conversation as an OpenAI-format message list (tool arguments as JSON strings)."""
        out = []
        for m in self.conversation():
            m = dict(m)
            if "tool_calls" in m:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                    c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
            out.append(m)
        Path(path).write_text(json.dumps(out, indent=1, ensure_ascii=False))

    def load(self, path: str | Path) -> None:
        try:
            msgs = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a conversation ({e})") from None
        if isinstance(msgs, dict):
            msgs = msgs.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError(f"{path}: not a conversation (expected a list of messages with roles)")
        system = None
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0].get("content"), msgs[1:]
        for m in msgs:  # GLM's template iterates the arguments: keep them as mappings
            for c in m.get("tool_calls") or []:
                args = c.get("function", {}).get("arguments")
                if isinstance(args, str):
                    try:
                        c["function"]["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}: tool call arguments are not JSON: {args[:60]!r}") from None
        self.system, self.messages = system, msgs

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


# -- the terminal ----------------------------------------------------------------

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
Ctrl-C stops a reply and keeps the conversation."""

MAX_TOOL_ROUNDS = 16


class Repl:
    def __init__(self, session: ChatSession, console, tools: dict | None = None, *, show_thinking: bool = True,
                 approve_all: bool = False, ask=input):
        self.s, self.console, self.tools = session, console, tools or {}
        self.show_thinking, self.approve_all, self.ask = show_thinking, approve_all, ask

    def read_message(self) -> str | None:
        """One user message (multi-line aware), or None at end of input."""
        try:
            first = self.ask("> ")
        except EOFError:
            return None
        if first.strip() == '"""':
            lines = []
            while (line := self.ask(". ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.ask(". "))
        return "\n".join(lines)

    def run(self) -> None:
        self.console.print("[dim]glm-mlx chat: /help for commands, Ctrl-D to leave[/dim]")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.console.print("\n[dim](/exit or Ctrl-D to leave)[/dim]")
                continue
            if text is None or text.strip() == "/exit":
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                self.command(text.strip())
                continue
            self.s.add_user(text)
            self.turn()

    def command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        s, out = self.s, self.console.print
        if cmd in ("/think", "/nothink"):
            s.think = cmd == "/think"
            out(f"[dim]reasoning {'on' if s.think else 'off'}[/dim]")
        elif cmd == "/clear":
            s.clear()
            out("[dim]conversation cleared[/dim]")
        elif cmd == "/system":
            s.system = arg.strip() or None
            out(f"[dim]system prompt {'set' if s.system else 'removed'}[/dim]")
        elif cmd in ("/save", "/load") and not arg.strip():
            out(f"[red]{cmd} needs a file name[/red]")
        elif cmd == "/save":
            s.save(arg.strip())
            out(f"[dim]saved {len(s.conversation())} messages to {arg.strip()}[/dim]")
        elif cmd == "/load":
            try:
                s.load(arg.strip())
                out(f"[dim]loaded {len(s.conversation())} messages[/dim]")
            except ValueError as e:
                out(f"[red]{e}[/red]")
        elif cmd == "/stats":
            out(f"[dim]{s.last.line()}[/dim]", highlight=False)
            from .offload import offloaded_banks, offloaded_stats

            if (total := offloaded_stats(s.model)) is not None:
                out(f"[dim]{total.line()}[/dim]", highlight=False)
                for bank in offloaded_banks(s.model):
                    out(f"[dim]  layer {bank.file.layer}: {bank.stats.line()}[/dim]", highlight=False)
        elif cmd == "/help":
            out(HELP, markup=False, highlight=False)
        else:
            out(f"[red]unknown command {cmd}[/red] (/help lists them)")

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
                self.console.print("\n[yellow][interrupted][/yellow]")
                return
            if not calls and not errors:
                return
            for err in errors:  # the model hears of its malformed call, as an observation
                self.s.add_tool_result(ToolCall("invalid_tool_call", {}), f"error: {err}")
            for call, call_id in calls:
                self.s.add_tool_result(call, self.run_call(call), call_id)
        self.console.print(f"[yellow]stopped after {MAX_TOOL_ROUNDS} rounds of tool calls[/yellow]")

    def reply(self):
        calls, errors, mode = [], [], None
        for kind, value in self.s.stream_reply():
            if kind in ("reasoning", "content"):
                if kind == "reasoning" and not self.show_thinking:
                    continue
                if mode != kind and mode is not None:
                    self.console.print()
                mode = kind
                self.console.print(value, end="", style="dim" if kind == "reasoning" else None,
                                   markup=False, highlight=False, soft_wrap=True)
            elif kind == "tool_call":
                calls.append(value)
            elif kind == "error":
                errors.append(value)
                self.console.print(f"\n[red]malformed tool call: {value}[/red]", highlight=False)
        self.console.print()
        ids = [c["id"] for c in self.s.messages[-1].get("tool_calls", [])]
        self.console.print(f"[dim]{self.s.last.line()}[/dim]", highlight=False)
        return list(zip(calls, ids)), errors

    def run_call(self, call: ToolCall) -> str:
        from .tools import run_tool

        args = json.dumps(call.arguments, ensure_ascii=False)
        self.console.print(f"[bold cyan]tool call[/bold cyan] {call.name}({args})", highlight=False)
        if call.name not in self.tools:
            return f"error: no tool named {call.name!r}"
        if not self.approve_all:
            answer = self.ask("run it? [y]es / [n]o / [a]lways: ").strip().lower()
            if answer in ("a", "always"):
                self.approve_all = True
            elif answer not in ("y", "yes"):
                return "error: the user declined to run this tool"
        result = run_tool(self.tools, call.name, call.arguments)
        self.console.print(f"[dim]{result}[/dim]", markup=False, highlight=False)
        return result

    def make_room(self, why: str) -> bool:
        """The conversation outgrew the context: ask what to drop. False: give up this turn."""
        self.console.print(f"[yellow]{why}[/yellow]")
        answer = self.ask("[c]lear the conversation, [d]rop the oldest turns, or [k]eep it and skip this message? ")
        answer = answer.strip().lower()[:1]
        if answer == "c":
            last = self.s.messages[-1]
            self.s.clear()
            self.s.messages.append(last)
            return True
        if answer == "d":
            while self.s.drop_oldest_turn():
                if len(self.s.prompt_tokens()) + 1 <= self.s.context_limit:
                    return True
            self.console.print("[yellow]even the last turn alone does not fit[/yellow]")
        if self.s.messages and self.s.messages[-1]["role"] == "user":
            self.s.messages.pop()
        return False
