"""The model folder's tokenizer and chat template.

Tokenization is the folder's own tokenizer.json through transformers' fast
tokenizer. The chat template is rendered by us, in Jinja's immutable sandbox
with the globals and filters transformers gives templates, so a model folder
can never run code of its own and the prompt equals apply_chat_template's.
"""

from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

from jinja2 import FunctionLoader
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Characters a template may make beyond twice its inputs' (a value it builds, or its whole output; a
# list counts the characters it holds): a 128K-token prompt is under a million.
RENDER_LIMIT = 1 << 24
INT_BITS = 1 << 16  # the largest integer a template may make (Python prints none past 4300 digits anyway)
MAX_TEMPLATE = 1 << 20  # bytes of template source (GLM-4.5's: 3 KB)
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "chat_template.json")
_PERCENT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d+))?")
_FORMAT_WIDTHS = re.compile(r"\{[^{}]*:[^{}\d]*(\d*)(?:\.(\d+))?[^{}]*\}")


class ChatTemplateError(TemplateError, ValueError):
    """A chat template that failed: a syntax error, an escape the sandbox blocked, an include, a value
    over the render limit, or an error of its own. One line that names the template."""


def _raise(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson: no HTML escaping, unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _as_transformers_passes(message: dict) -> dict:
    # apply_chat_template drops None values (OpenAI's content=None beside tool_calls would render "None")
    # and fills reasoning_content from its other names; the template must see the same message.
    m = {k: v for k, v in message.items() if v is not None}
    reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
    return m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning}


class _Generator(CodeGenerator):
    """Jinja's code generator, with `a ~ b` joined by the environment (so that it is bounded too)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.joined((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, bounded: no value a template makes may hold more than `limit`
    characters, checked before it is made where one step could make it huge (`'x' * 3000000000`, a
    width or count of a billion, `replace('', s)`, a string doubled in a loop is refused at the step
    that crosses the limit), and its output stops there too. Time is not bounded."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])
    code_generator_class = _Generator
    limit = RENDER_LIMIT

    def size(self, v, budget: int | None = None) -> int:
        """Characters `v` holds, counted through lists and dicts (a list held twice counts twice, but is
        counted once: a list nested in itself 40 times is 2^40 at once); stops counting past `budget`."""
        budget, seen = self.limit if budget is None else budget, {}

        def count(v) -> int:
            if isinstance(v, str):
                return len(v)
            if not isinstance(v, (list, tuple, dict)):
                return 1
            if id(v) not in seen:
                items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
                n = len(items)
                for x in items:
                    if n > budget:
                        break
                    n += count(x)
                seen[id(v)] = n
            return seen[id(v)]

        return count(v)

    def fits(self, v, what: str):
        if self.size(v) > self.limit:
            raise SecurityError(f"{what} would make more than {self.limit} characters")
        return v

    def before(self, name: str, s, args: tuple, kwargs: dict) -> None:
        """Refuse a call that would make too much: any argument over the limit, an integer above it (a
        width, a count), or, on a string, what replace, indent, expandtabs or a format would make."""
        for a in (s, *args, *kwargs.values()):
            if (isinstance(a, int) and abs(a) > self.limit) or self.size(a) > self.limit:
                raise SecurityError(f"{name}: an argument over the limit of {self.limit}")
        if not isinstance(s, str):
            return
        grow = 0
        if name in ("replace", "the replace filter") and len(args) >= 2 and isinstance(args[0], str):
            grow = (s.count(args[0]) if args[0] else len(s) + 1) * len(str(args[1]))
        elif name in ("the indent filter", "expandtabs"):
            width = (args or [kwargs.get("width", kwargs.get("tabsize", 4))])[0]
            grow = (s.count("\n" if "indent" in name else "\t") + 1) * (width if isinstance(width, int) else len(str(width)))
        elif name in ("format", "the format filter", "%"):
            grow = max([int(w) for m in [*_PERCENT_WIDTHS.findall(s), *_FORMAT_WIDTHS.findall(s)] for w in m if w],
                       default=0)
        if len(s) + grow > self.limit:
            raise SecurityError(f"{name} would make more than {self.limit} characters")

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and self.size(seq) * n > self.limit:
                    raise SecurityError(f"a repeat would make more than {self.limit} characters")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > INT_BITS:
                raise SecurityError(f"a product of more than {INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and (
                right * abs(left).bit_length() > INT_BITS):
            raise SecurityError(f"a power of more than {INT_BITS} bits")
        elif operator == "%":
            self.before("%", left, right if isinstance(right, tuple) else (right,), {})
        return self.fits(super().call_binop(context, operator, left, right), f"{operator!r}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        name = getattr(__obj, "__name__", "a call")
        __self.before(name, getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None), args, kwargs)
        return __self.fits(super().call(__context, __obj, *args, **kwargs), name)

    def joined(self, parts: tuple) -> str:
        """`a ~ b ~ ...`"""
        self.fits(list(parts), "'~'")
        return self.fits("".join(map(str, parts)), "'~'")

    def concat(self, pieces) -> str:  # a macro's, a {% set %} block's or a caller's output
        pieces = list(pieces)
        return "".join(self.fits(pieces, "a block"))


def _bounded(env: _Sandbox, name: str, f):
    """A filter whose arguments and result are checked as a call's (the sandbox calls filters directly)."""
    passes = getattr(f, "jinja_pass_arg", None) is not None  # (its first argument: a context or environment)

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        user = args[1:] if passes else args
        env.before(f"the {name} filter", user[0] if user else None, tuple(user[1:]), kwargs)
        return env.fits(f(*args, **kwargs), f"the {name} filter")

    return bounded


def _no_other_templates(name: str):
    raise SecurityError(f"it names another template ({name!r}): a chat template may not include, import or extend one")


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                   loader=FunctionLoader(_no_other_templates))
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded(env, name, f) for name, f in env.filters.items()}
    env.finalize = lambda v: env.fits(v, "an output")
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(self, folder: str | Path):
        # Only transformers' tokenizer is used: its "PyTorch was not found" advice (printed on import when
        # torch is absent, as it is for users) does not apply. Set before the import, unless the user chose.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoTokenizer  # imported late: it is slow to import

        from .loading import read_json

        self.folder = Path(folder).expanduser()
        for name in TOKENIZER_JSON:  # so that a file that is not JSON is named
            if (self.folder / name).is_file():
                read_json(self.folder / name)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.folder), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises bare Exceptions for bad files)
            raise ValueError(f"{self.folder}: its tokenizer cannot be loaded ({_one_line(e)})") from None
        self.template_name, self.template_source = self._find_template()
        if self.template_source is not None:
            self.template  # compiled now: a template that cannot be is refused at load, not mid-chat

    def _find_template(self) -> tuple[str, str | None]:
        """(where the template is, for messages; its source or None)."""
        from .loading import read_json

        jinja, cfg = self.folder / "chat_template.jinja", self.folder / "tokenizer_config.json"
        try:
            if jinja.is_file():
                if jinja.stat().st_size > MAX_TEMPLATE:
                    raise ValueError(f"{jinja}: larger than {MAX_TEMPLATE} bytes: not a chat template")
                return str(jinja), jinja.read_bytes().decode()
            if cfg.is_file():
                t = read_json(cfg)
                t = t.get("chat_template") if isinstance(t, dict) else None
                if isinstance(t, str) and len(t) <= MAX_TEMPLATE:
                    return f"{cfg} (chat_template)", t
        except UnicodeDecodeError:
            raise ValueError(f"{jinja}: not UTF-8 text") from None
        return str(jinja), None

    @cached_property
    def template(self):
        if self.template_source is None:
            raise ValueError(f"{self.folder}: the model folder has no chat template")
        try:
            return _environment().from_string(self.template_source)
        except Exception as e:  # noqa: BLE001 (the template is foreign code: whatever it raises is its fault)
            raise ChatTemplateError(f"{self.template_name}: {_one_line(e)}") from None

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **options) -> str:
        """The prompt text the folder's template makes of a conversation. Whatever fails in the template
        (an escape the sandbox blocks, more than the render limit, an include, its own error) is a
        ChatTemplateError naming it."""
        messages = [_as_transformers_passes(m) for m in messages]
        documents = options.pop("documents", None)
        template = self.template
        env = template.environment
        inputs = {"messages": messages, "tools": tools, "documents": documents,
                  "add_generation_prompt": add_generation_prompt, **self.hf.special_tokens_map, **options}
        env.limit = RENDER_LIMIT + 2 * _Sandbox.size(env, list(inputs.values()), 1 << 62)
        out, n = [], 0
        try:
            for piece in template.generate(**inputs):
                n += len(piece)
                if n > env.limit:
                    raise SecurityError(f"its output would be more than {env.limit} characters")
                out.append(piece)
        except Exception as e:  # noqa: BLE001 (the template is foreign code: whatever it raises is its fault)
            raise ChatTemplateError(f"{self.template_name}: {_one_line(e)}") from None
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        """Token ids of text that already holds its special tokens (a rendered prompt)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        i = self.hf.convert_tokens_to_ids(token)
        return None if i is None or i == self.hf.unk_token_id else i

    def __len__(self) -> int:
        return len(self.hf)


class StreamDecoder:
    """Turns tokens into text as they come, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, TemplateSyntaxError):
        text = f"line {e.lineno}: {text}"
    return f"{type(e).__name__}: {text}"[:300] if not isinstance(e, (TemplateError, ValueError)) else text[:300]
